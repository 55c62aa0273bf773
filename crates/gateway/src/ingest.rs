//! What an ingest body means: one JSON event, a JSON array, or NDJSON (by
//! its content type), each event built and validated as the core would.
//! No HTTP here: `routes/ingest.rs` serves `POST /v1/events` with it, and the
//! fuzz targets call [`parse_ingest_body`] directly.

use std::time::{Duration, UNIX_EPOCH};

use dualstream_core::{Event, EventId};
use serde_json::Value;

use crate::wire::IngestEvent;

/// Why an ingest body was refused; nothing of it is stored.
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IngestBodyError {
    /// More than `limit` events (`at_least` were seen): 413 `too_many_events`.
    #[error("events: more than limits.max_events_per_request = {limit} (at least {at_least})")]
    TooManyEvents {
        /// `limits.max_events_per_request`.
        limit: usize,
        /// How many events the body holds, at least.
        at_least: usize,
    },
    /// The body or event `index` is malformed or invalid: 400 `invalid_event`.
    #[error("{message}")]
    Invalid {
        /// The event's index (0 for the body as a whole).
        index: usize,
        /// What is wrong.
        message: String,
    },
}

/// The events of an ingest body (one JSON event, a JSON array, or NDJSON by
/// its content type), built and validated as `POST /v1/events` does before
/// the claims check, without HTTP. Public for the fuzz targets (fuzz/).
#[doc(hidden)]
pub fn parse_ingest_body(
    content_type: Option<&str>,
    body: &[u8],
    max_events: usize,
) -> Result<Vec<Event>, IngestBodyError> {
    let parsed = parse_body(content_type, body, max_events)?;
    let mut events = Vec::with_capacity(parsed.len());
    for (index, e) in parsed.into_iter().enumerate() {
        let event =
            build(e).map_err(|m| IngestBodyError::Invalid { index, message: format!("events[{index}]: {m}") })?;
        events.push(event);
    }
    Ok(events)
}

/// Split the body into events, by its content type.
fn parse_body(content_type: Option<&str>, body: &[u8], max_events: usize) -> Result<Vec<IngestEvent>, IngestBodyError> {
    let ndjson =
        content_type.is_some_and(|v| v.starts_with("application/x-ndjson") || v.starts_with("application/ndjson"));
    let invalid = |index, message| IngestBodyError::Invalid { index, message };
    let too_many = |at_least| IngestBodyError::TooManyEvents { limit: max_events, at_least };
    if ndjson {
        let mut out = Vec::new();
        let lines = body.split(|b| *b == b'\n').enumerate().filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace));
        for (i, (line_index, line)) in lines.enumerate() {
            if out.len() == max_events {
                return Err(too_many(max_events + 1));
            }
            out.push(serde_json::from_slice(line).map_err(|e| invalid(i, format!("line {}: {e}", line_index + 1)))?);
        }
        return Ok(out);
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => {
            let values: Vec<Value> = serde_json::from_slice(body).map_err(|e| invalid(0, format!("body: {e}")))?;
            if values.len() > max_events {
                return Err(too_many(values.len()));
            }
            values
                .into_iter()
                .enumerate()
                .map(|(i, v)| serde_json::from_value(v).map_err(|e| invalid(i, format!("events[{i}]: {e}"))))
                .collect()
        }
        Some(_) => Ok(vec![serde_json::from_slice(body).map_err(|e| invalid(0, format!("body: {e}")))?]),
        None => Err(invalid(0, "body: empty; send a JSON event, a JSON array of events, or NDJSON".into())),
    }
}

fn build(e: IngestEvent) -> Result<Event, String> {
    let mut b = Event::builder(e.event_type, e.source_type, e.source_id);
    match (e.payload, e.payload_base64) {
        (Some(_), Some(_)) => return Err("payload and payload_base64: send one of them, not both".into()),
        (Some(v), None) => b = b.payload(serde_json::to_vec(&v).map_err(|e| format!("payload: {e}"))?),
        (None, Some(s)) => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(|e| format!("payload_base64: not standard base64: {e}"))?;
            b = b.payload(bytes);
        }
        (None, None) => {}
    }
    if let Some(id) = e.id {
        let id: EventId = id.parse().map_err(|e| format!("id: {e}"))?;
        b = b.id(id);
    }
    if let Some(ms) = e.occurred_at_ms {
        const MAX_MS: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
        if ms > MAX_MS {
            return Err(format!("occurred_at_ms: {ms} is later than the limit of {MAX_MS} (year 9999)"));
        }
        b = b.occurred_at(UNIX_EPOCH + Duration::from_millis(ms));
    }
    for (k, v) in e.headers {
        b = b.header(k, v);
    }
    b.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> String {
        format!(r#"{{"type":"t","source_type":"user","source_id":"{id}"}}"#)
    }

    #[test]
    fn ndjson_errors_name_the_line_of_the_body() {
        let body = format!("{}\n\n   \n{}\nnot json\n", event("a"), event("b"));
        let err = parse_ingest_body(Some("application/x-ndjson"), body.as_bytes(), 10).expect_err("line 5");
        let IngestBodyError::Invalid { index, message } = err else { panic!("{err:?}") };
        assert_eq!(index, 2, "the third event");
        assert!(message.starts_with("line 5: "), "{message}");
    }

    #[test]
    fn bodies_over_the_event_limit_are_refused_whole() {
        let body = format!("[{},{},{}]", event("a"), event("b"), event("c"));
        assert_eq!(parse_ingest_body(None, body.as_bytes(), 3).map(|v| v.len()), Ok(3));
        let too_many = IngestBodyError::TooManyEvents { limit: 2, at_least: 3 };
        assert_eq!(parse_ingest_body(None, body.as_bytes(), 2).map(|v| v.len()), Err(too_many.clone()));
        let ndjson = format!("{}\n{}\n{}\n", event("a"), event("b"), event("c"));
        assert_eq!(parse_ingest_body(Some("application/ndjson"), ndjson.as_bytes(), 2).map(|v| v.len()), Err(too_many));
    }
}
