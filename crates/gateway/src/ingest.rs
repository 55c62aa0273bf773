//! `POST /v1/events`: one JSON event, a JSON array, or NDJSON, through the
//! batching engine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dualstream_batch::BatchError;
use dualstream_core::{Event, EventId, SinkError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::origin::Check;
use crate::state::AppState;

/// One event as a producer sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestEvent {
    #[serde(rename = "type")]
    event_type: String,
    source_type: String,
    source_id: String,
    /// Any JSON value, stored as its JSON text.
    #[serde(default)]
    payload: Option<Value>,
    /// Binary payloads, base64 (standard alphabet).
    #[serde(default)]
    payload_base64: Option<String>,
    /// The event id (UUID); made when absent.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// When it happened, in milliseconds since the Unix epoch; now when
    /// absent.
    #[serde(default)]
    occurred_at_ms: Option<u64>,
}

/// An error response: `{"error": {"code", "message", ...}}`.
pub(crate) fn error(status: StatusCode, code: &str, message: impl std::fmt::Display, extra: Value) -> Response {
    let mut body = json!({"error": {"code": code, "message": message.to_string()}});
    if let (Some(obj), Value::Object(more)) = (body["error"].as_object_mut(), extra) {
        obj.extend(more);
    }
    (status, Json(body)).into_response()
}

fn invalid(index: usize, message: impl std::fmt::Display) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_event", message, json!({"index": index}))
}

/// Why an ingest body was refused; nothing of it is stored.
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IngestBodyError {
    /// More than `limit` events (`at_least` were seen): 413 `too_many_events`.
    TooManyEvents {
        /// `limits.max_events_per_request`.
        limit: usize,
        /// How many events the body holds, at least.
        at_least: usize,
    },
    /// The body or event `index` is malformed or invalid: 400 `invalid_event`.
    Invalid {
        /// The event's index (0 for the body as a whole).
        index: usize,
        /// What is wrong.
        message: String,
    },
}

impl IngestBodyError {
    fn response(&self) -> Response {
        match self {
            Self::TooManyEvents { limit, at_least } => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_events",
                format!("events: more than limits.max_events_per_request = {limit} (at least {at_least})"),
                json!({"limit": limit}),
            ),
            Self::Invalid { index, message } => invalid(*index, message),
        }
    }
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
        let event = build(e).map_err(|m| IngestBodyError::Invalid { index, message: format!("events[{index}]: {m}") })?;
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

fn batch_error_json(e: &BatchError) -> Value {
    let code = match e {
        BatchError::QueueFull { .. } => "queue_full",
        BatchError::TooLarge { .. } => "too_large",
        BatchError::Closed { .. } => "shutting_down",
        BatchError::WorkerGone => "outcome_unknown",
        BatchError::LaneDead { .. } => "lane_dead",
        // Handed to Kafka, and its answer does not prove whether it was stored.
        BatchError::Publish(dualstream_publisher::PublishError::Durable(d))
            if matches!(d.error, SinkError::OutcomeUnknown { .. } | SinkError::Timeout { .. }) =>
        {
            "outcome_unknown"
        }
        _ => "not_stored",
    };
    json!({"code": code, "message": e.to_string(), "retriable": e.is_retriable()})
}

/// The media types a cookie-authenticated ingest accepts: none of them may
/// be sent cross-site without a CORS preflight, unlike `text/plain` or a
/// form's types.
const COOKIE_MEDIA_TYPES: [&str; 3] = ["application/json", "application/x-ndjson", "application/ndjson"];

/// `POST /v1/events`. The token, its origin (for the cookie), its publish
/// claims and the content type are checked before the body is read.
pub(crate) async fn post_events(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let auth = match state.auth.from_headers(&headers, Check::Unsafe) {
        Ok(a) => a,
        Err(e) => return error(e.status(), e.code(), &e, json!({})),
    };
    if auth.claims.publish.is_empty() {
        return error(StatusCode::FORBIDDEN, "forbidden", "the token has no publish claims", json!({}));
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let media_type = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    if auth.via_cookie && !media_type.as_deref().is_some_and(|m| COOKIE_MEDIA_TYPES.contains(&m)) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content-type: {:?}; with the cookie, send one of {}",
                content_type.unwrap_or(""),
                COOKIE_MEDIA_TYPES.join(", ")
            ),
            json!({}),
        );
    }
    let max = state.config.limits.max_body_bytes;
    let body = match axum::body::to_bytes(body, max).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("body: larger than limits.max_body_bytes = {max}, or cut short ({e})"),
                json!({"limit": max}),
            )
        }
    };
    let events = match parse_ingest_body(content_type, &body, state.config.limits.max_events_per_request) {
        Ok(events) => events,
        Err(e) => return e.response(),
    };
    // Nothing is stored unless every event is valid and may be published.
    for (i, e) in events.iter().enumerate() {
        let source_type = e.source().source_type();
        if !auth.may_publish(source_type) {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("events[{i}]: the token's publish claims do not include source type {source_type:?}"),
                json!({"index": i}),
            );
        }
    }
    let summaries: Vec<(String, Value)> = events
        .iter()
        .map(|e| {
            let v = json!({"id": e.id().to_string(), "type": e.event_type(), "source_type": e.source().source_type(),
                "source_id": e.source().source_id()});
            (e.source().source_type().to_owned(), v)
        })
        .collect();
    let results = state.engine.submit_many(events).await;
    let mut ok = 0usize;
    let mut retriable = 0usize;
    let mut out = Vec::with_capacity(results.len());
    for (r, (source_type, mut summary)) in results.into_iter().zip(summaries) {
        match r {
            Ok(receipt) => {
                ok += 1;
                let position = receipt
                    .position
                    .as_ref()
                    .map(|p| json!({"topic": &*p.topic, "partition": p.partition, "offset": p.offset}));
                summary["position"] = json!(position);
                state.record_ingested(&source_type, summary.clone());
                out.push(json!({"id": summary["id"], "position": position}));
            }
            Err(e) => {
                retriable += usize::from(matches!(e, BatchError::QueueFull { .. }));
                out.push(json!({"id": summary["id"], "error": batch_error_json(&e)}));
            }
        }
    }
    metrics::counter!("dualstream_gateway_ingested_total").increment(ok as u64);
    let n = out.len();
    let body = Json(json!({"stored": ok, "failed": n - ok, "results": out}));
    if ok == n {
        (StatusCode::OK, body).into_response()
    } else if ok == 0 && retriable == n {
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response()
    } else if ok == 0 {
        (StatusCode::BAD_GATEWAY, body).into_response()
    } else {
        (StatusCode::MULTI_STATUS, body).into_response()
    }
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

#[cfg(test)]
mod error_code_tests {
    use dualstream_core::{DeliveryError, Event, SinkError};
    use dualstream_publisher::PublishError;

    use super::{batch_error_json, BatchError};

    fn durable(error: SinkError) -> BatchError {
        let event = Event::builder("t", "user", "u").build().expect("valid");
        BatchError::Publish(PublishError::Durable(DeliveryError::new(error, event)))
    }

    /// A client told `not_stored` may safely send again; one whose write
    /// Kafka may hold is told `outcome_unknown`.
    #[test]
    fn a_write_kafka_may_hold_is_outcome_unknown_not_not_stored() {
        let code = |e: BatchError| batch_error_json(&e)["code"].as_str().map(str::to_owned);
        let unknown = durable(SinkError::OutcomeUnknown { reason: "offset -1".into() });
        assert_eq!(code(unknown).as_deref(), Some("outcome_unknown"));
        let late = durable(SinkError::Timeout { deadline: std::time::Duration::from_secs(1) });
        assert_eq!(code(late).as_deref(), Some("outcome_unknown"));
        let unsent = durable(SinkError::Unavailable { reason: "replacing".into() });
        assert_eq!(code(unsent).as_deref(), Some("not_stored"));
    }
}
