//! The lightweight real-time message (docs/design.md, "The notification").

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventId};
use crate::trace::TraceContext;
use crate::validate::{Limits, ValidationError};

/// Where the durable sink stored an event: for Kafka, topic, partition and
/// offset. Positions of one partition are ordered by offset.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// The topic (or the custom sink's log name).
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

impl Position {
    /// The offset a [`DurableSink`](crate::DurableSink) reports for a write
    /// it knows was stored without knowing where (Kafka answers a retried
    /// batch it had stored already with offset -1). Any negative offset means
    /// the same: the publisher's receipt and notification then carry no
    /// position.
    pub const UNKNOWN_OFFSET: i64 = -1;

    /// Whether the offset is a real one (not negative).
    pub fn is_known(&self) -> bool {
        self.offset >= 0
    }

    /// A position.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32, offset: i64) -> Self {
        Self { topic: topic.into(), partition, offset }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// The notification sent on the real-time path after the durable write: the
/// identifiers of the event and its position, never the payload.
///
/// Its JSON form is small and its field names are stable (see
/// `docs/wire-format.md`):
///
/// ```json
/// {"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"user.created","source_type":"user","source_id":"octocat","topic":"events","partition":0,"offset":42}
/// ```
///
/// `topic`, `partition` and `offset` are absent when the event was not written
/// durably (the real-time-only mode). `traceparent` and `tracestate` are
/// present when the event carries a W3C trace context ([`crate::trace`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The event id.
    pub id: EventId,
    /// The event type.
    pub event_type: Arc<str>,
    /// The source type.
    pub source_type: Arc<str>,
    /// The source id.
    pub source_id: Arc<str>,
    /// Where the durable sink stored the event, once known.
    pub position: Option<Position>,
    /// The event's W3C trace context, if it carries one.
    pub trace: Option<TraceContext>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    id: EventId,
    #[serde(rename = "type", borrow)]
    event_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    source_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    source_id: std::borrow::Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    topic: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    traceparent: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    tracestate: Option<std::borrow::Cow<'a, str>>,
}

/// Why a notification could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotificationDecodeError {
    /// Malformed JSON or the wrong shape.
    #[error("malformed notification JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field broke a rule of the event model.
    #[error("invalid notification: {0}")]
    Invalid(#[from] ValidationError),
    /// Only some of `topic`, `partition` and `offset` were present.
    #[error("notification position: topic, partition and offset must be all present or all absent")]
    PartialPosition,
}

impl Notification {
    /// The notification for `event`, with its position if known.
    pub fn for_event(event: &Event, position: Option<Position>) -> Self {
        Self {
            id: event.id(),
            event_type: event.event_type_arc().clone(),
            source_type: event.source().source_type_arc().clone(),
            source_id: event.source().source_id_arc().clone(),
            position,
            trace: TraceContext::of(event),
        }
    }

    /// Append the JSON form to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let wire = Wire {
            id: self.id,
            event_type: (&*self.event_type).into(),
            source_type: (&*self.source_type).into(),
            source_id: (&*self.source_id).into(),
            topic: self.position.as_ref().map(|p| (&*p.topic).into()),
            partition: self.position.as_ref().map(|p| p.partition),
            offset: self.position.as_ref().map(|p| p.offset),
            traceparent: self.trace.as_ref().map(|t| t.traceparent().into()),
            tracestate: self.trace.as_ref().and_then(|t| t.tracestate()).map(Into::into),
        };
        // Writing strings and integers into a Vec cannot fail.
        let _ = serde_json::to_writer(out, &wire);
    }

    /// The JSON form.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        self.write_json(&mut out);
        out
    }

    /// Decode and validate a notification from its JSON form, against the
    /// default [`Limits`]. This stays strict, like
    /// [`Event::from_json`]; a subscriber reading notifications that a
    /// publisher with other limits sent uses
    /// [`from_json_with_limits`](Self::from_json_with_limits) with
    /// [`Limits::lenient`] (as dualstream's own consuming side does).
    pub fn from_json(json: &[u8]) -> Result<Self, NotificationDecodeError> {
        Self::from_json_with_limits(json, &Limits::default())
    }

    /// Decode a notification from its JSON form, its text fields validated
    /// against `limits`. With [`Limits::lenient`] only the structural rules
    /// apply (character sets, non-empty), so any notification a publisher
    /// could have sent decodes, whatever limits it used.
    pub fn from_json_with_limits(json: &[u8], limits: &Limits) -> Result<Self, NotificationDecodeError> {
        let wire: Wire<'_> = serde_json::from_slice(json)?;
        limits.check_event_type(&wire.event_type)?;
        limits.check_source_type(&wire.source_type)?;
        limits.check_source_id(&wire.source_id)?;
        let position = match (wire.topic, wire.partition, wire.offset) {
            (Some(t), Some(partition), Some(offset)) => Some(Position::new(&*t, partition, offset)),
            (None, None, None) => None,
            _ => return Err(NotificationDecodeError::PartialPosition),
        };
        Ok(Self {
            id: wire.id,
            event_type: wire.event_type.into(),
            source_type: wire.source_type.into(),
            source_id: wire.source_id.into(),
            position,
            // Malformed trace context is ignored, never a decode error.
            trace: wire.traceparent.and_then(|p| TraceContext::new(&p, wire.tracestate.as_deref())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_stable_and_small() {
        let e = Event::builder("user.created", "user", "octocat").payload(vec![7u8; 10_000]).build().expect("valid");
        let n = Notification::for_event(&e, Some(Position::new("events", 3, 42)));
        let json = String::from_utf8(n.to_json()).expect("utf8");
        let expected = format!(
            r#"{{"id":"{}","type":"user.created","source_type":"user","source_id":"octocat","topic":"events","partition":3,"offset":42}}"#,
            e.id()
        );
        assert_eq!(json, expected);
        assert!(json.len() < 160, "notification carries no payload: {} bytes", json.len());
        assert_eq!(Notification::from_json(json.as_bytes()).expect("decodes"), n);
    }

    #[test]
    fn position_is_optional_but_whole() {
        let e = Event::builder("t", "user", "a").build().expect("valid");
        let n = Notification::for_event(&e, None);
        let json = n.to_json();
        assert!(!String::from_utf8_lossy(&json).contains("topic"));
        assert_eq!(Notification::from_json(&json).expect("decodes"), n);
        let partial = format!(r#"{{"id":"{}","type":"t","source_type":"user","source_id":"a","offset":1}}"#, e.id());
        assert!(matches!(Notification::from_json(partial.as_bytes()), Err(NotificationDecodeError::PartialPosition)));
    }

    /// A notification a publisher with raised limits sent decodes with the
    /// lenient limits; the structural rules still apply.
    #[test]
    fn lenient_decoding_accepts_raised_sizes_only() {
        let long = "x".repeat(300);
        let head = r#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"t","source_type":"u""#;
        let json = format!(r#"{head},"source_id":"{long}"}}"#);
        assert!(matches!(
            Notification::from_json(json.as_bytes()),
            Err(NotificationDecodeError::Invalid(ValidationError::TooLong { field: "source_id", .. }))
        ));
        let n = Notification::from_json_with_limits(json.as_bytes(), &Limits::lenient()).expect("lenient");
        assert_eq!(&*n.source_id, long.as_str());
        let bidi = format!(r#"{head},"source_id":"a\u202eb"}}"#);
        match Notification::from_json_with_limits(bidi.as_bytes(), &Limits::lenient()) {
            Err(NotificationDecodeError::Invalid(ValidationError::InvalidChar { field, ch, .. })) => {
                assert_eq!((field, ch), ("source_id", '\u{202E}'))
            }
            other => panic!("expected the bidi control to be refused, got {other:?}"),
        }
    }

    #[test]
    fn malformed_notifications_are_typed_errors() {
        assert!(matches!(Notification::from_json(b"nope"), Err(NotificationDecodeError::Json(_))));
        let bad = br#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"t","source_type":"a:b","source_id":"a"}"#;
        assert!(matches!(
            Notification::from_json(bad),
            Err(NotificationDecodeError::Invalid(ValidationError::InvalidChar { field: "source_type", .. }))
        ));
    }

    /// The trace context travels in two optional fields; the bytes it adds
    /// are counted (docs/wire-format.md), and a malformed one is ignored.
    #[test]
    fn trace_context_adds_two_optional_fields() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let plain = Event::builder("user.created", "user", "octocat").build().expect("valid");
        let traced =
            Event::builder("user.created", "user", "octocat").header("traceparent", tp).build().expect("valid");
        let at = Some(Position::new("events", 3, 42));
        let (a, b) = (Notification::for_event(&plain, at.clone()), Notification::for_event(&traced, at));
        let (ja, jb) = (a.to_json(), b.to_json());
        assert_eq!(jb.len() - ja.len(), 72, "\"traceparent\":\"<55>\" and a comma");
        assert!(String::from_utf8_lossy(&jb).ends_with(&format!(r#","traceparent":"{tp}"}}"#)));
        let back = Notification::from_json(&jb).expect("decodes");
        assert_eq!(back.trace.as_ref().map(|t| t.traceparent()), Some(tp));
        assert_eq!(back, b);
        let with_state = Event::builder("t", "user", "u")
            .header("traceparent", tp)
            .header("tracestate", "congo=t61rcWkgMzE")
            .build()
            .expect("valid");
        let n = Notification::for_event(&with_state, None);
        assert_eq!(Notification::from_json(&n.to_json()).expect("decodes"), n);
        let bad = String::from_utf8(ja).expect("utf8").replace('}', r#","traceparent":"00-zz"}"#);
        assert_eq!(Notification::from_json(bad.as_bytes()).expect("still decodes").trace, None);
    }
}
