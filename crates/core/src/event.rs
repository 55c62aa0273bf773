//! The event: what every publish carries.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::validate::{check_occurred_at, Limits, ValidationError};

/// A unique, time-sortable event id: a UUIDv7 (millisecond timestamp first,
/// monotonic within one process).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(uuid::Uuid);

impl EventId {
    /// A new id for now.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }

    /// The id as its 36-character text form, without allocating.
    pub fn encode<'b>(&self, buf: &'b mut [u8; 36]) -> &'b str {
        self.0.hyphenated().encode_lower(buf)
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<uuid::Uuid> for EventId {
    fn from(u: uuid::Uuid) -> Self {
        Self(u)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// The text was not a UUID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("id: {0:?} is not a UUID (expected 36 characters like 0190f1d2-7c1e-7a3b-9f00-0123456789ab)")]
pub struct InvalidEventId(pub String);

impl FromStr for EventId {
    type Err = InvalidEventId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self).map_err(|_| InvalidEventId(s.chars().take(64).collect()))
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 36];
        s.serialize_str(self.encode(&mut buf))
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where an event comes from: a source type (`user`) and a source id
/// (`octocat`). All events of one source are kept in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    source_type: Arc<str>,
    source_id: Arc<str>,
}

impl Source {
    /// A validated source with the default [`Limits`].
    pub fn new(source_type: impl Into<Arc<str>>, source_id: impl Into<Arc<str>>) -> Result<Self, ValidationError> {
        Self::with_limits(source_type, source_id, &Limits::default())
    }

    /// A validated source.
    pub fn with_limits(
        source_type: impl Into<Arc<str>>,
        source_id: impl Into<Arc<str>>,
        limits: &Limits,
    ) -> Result<Self, ValidationError> {
        let (source_type, source_id) = (source_type.into(), source_id.into());
        limits.check_source_type(&source_type)?;
        limits.check_source_id(&source_id)?;
        Ok(Self { source_type, source_id })
    }

    /// The source type, for example `user`. ASCII letters, digits, `.`, `_`, `-`.
    pub fn source_type(&self) -> &str {
        &self.source_type
    }

    /// The source id, for example `octocat`. Any text without control characters.
    pub fn source_id(&self) -> &str {
        &self.source_id
    }

    pub(crate) fn source_type_arc(&self) -> &Arc<str> {
        &self.source_type
    }

    pub(crate) fn source_id_arc(&self) -> &Arc<str> {
        &self.source_id
    }
}

/// A validated event. Build one with [`Event::builder`].
///
/// Cloning is cheap: the text fields are shared and the payload is [`Bytes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    id: EventId,
    event_type: Arc<str>,
    source: Source,
    occurred_at_ms: u64,
    payload: Bytes,
    headers: BTreeMap<String, String>,
}

impl Event {
    /// Start building an event of `event_type` from the source
    /// `source_type`/`source_id`.
    pub fn builder(
        event_type: impl Into<Arc<str>>,
        source_type: impl Into<Arc<str>>,
        source_id: impl Into<Arc<str>>,
    ) -> EventBuilder {
        EventBuilder {
            id: None,
            event_type: event_type.into(),
            source_type: source_type.into(),
            source_id: source_id.into(),
            occurred_at: None,
            payload: Bytes::new(),
            headers: BTreeMap::new(),
            limits: None,
        }
    }

    /// The unique id.
    pub fn id(&self) -> EventId {
        self.id
    }
    /// The event type, for example `user.created`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    pub(crate) fn event_type_arc(&self) -> &Arc<str> {
        &self.event_type
    }
    /// The source.
    pub fn source(&self) -> &Source {
        &self.source
    }
    /// When the event happened: from the Unix epoch to the end of year 9999
    /// ([`MAX_OCCURRED_AT_MS`](crate::MAX_OCCURRED_AT_MS)).
    pub fn occurred_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.occurred_at_ms)
    }
    /// When the event happened, in milliseconds since the Unix epoch.
    pub fn occurred_at_ms(&self) -> u64 {
        self.occurred_at_ms
    }
    /// The payload: the full event body that goes to the durable sink.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// User headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }
    pub(crate) fn headers_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.headers
    }

    /// Approximate memory this event holds, in bytes: used by bounded queues.
    pub fn size_hint(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len() + 48).sum();
        std::mem::size_of::<Self>()
            + self.payload.len()
            + self.event_type.len()
            + self.source.source_type.len()
            + self.source.source_id.len()
            + headers
    }

    /// Decode an event from its JSON form (see `docs/wire-format.md`),
    /// validated against the default [`Limits`]: for input that is to be
    /// published. To read back what was published under other limits, use
    /// [`from_json_with_limits`](Self::from_json_with_limits) with
    /// [`Limits::lenient`].
    pub fn from_json(json: &[u8]) -> Result<Self, DecodeError> {
        Self::from_json_with_limits(json, &Limits::default())
    }

    /// Decode an event from its JSON form, validated against `limits`. The
    /// occurrence time is always range-checked.
    pub fn from_json_with_limits(json: &[u8], limits: &Limits) -> Result<Self, DecodeError> {
        let repr: EventRepr = serde_json::from_slice(json).map_err(DecodeError::Json)?;
        repr.into_event(limits)
    }

    /// The JSON form of this event. The payload is base64 (standard alphabet).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and numbers into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Builds a validated [`Event`].
#[derive(Debug, Clone)]
#[must_use]
pub struct EventBuilder {
    id: Option<EventId>,
    event_type: Arc<str>,
    source_type: Arc<str>,
    source_id: Arc<str>,
    occurred_at: Option<SystemTime>,
    payload: Bytes,
    headers: BTreeMap<String, String>,
    limits: Option<Limits>,
}

impl EventBuilder {
    /// Use this id instead of a new one (for example when re-publishing).
    pub fn id(mut self, id: EventId) -> Self {
        self.id = Some(id);
        self
    }
    /// When the event happened; default: now. Must be from the Unix epoch
    /// to the end of year 9999 ([`MAX_OCCURRED_AT_MS`](crate::MAX_OCCURRED_AT_MS)).
    pub fn occurred_at(mut self, at: SystemTime) -> Self {
        self.occurred_at = Some(at);
        self
    }
    /// The payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }
    /// Add a user header. Names starting with `ds-` are reserved.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
    /// Validate against these limits instead of the defaults.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Validate and build.
    pub fn build(self) -> Result<Event, ValidationError> {
        let limits = self.limits.unwrap_or_default();
        let occurred_at_ms = match self.occurred_at {
            None => now_ms(),
            Some(t) => check_occurred_at("occurred_at", system_time_ms(t))?,
        };
        validate_parts(&limits, &self.event_type, &self.payload, &self.headers)?;
        Ok(Event {
            id: self.id.unwrap_or_default(),
            event_type: self.event_type,
            source: Source::with_limits(self.source_type, self.source_id, &limits)?,
            occurred_at_ms,
            payload: self.payload,
            headers: self.headers,
        })
    }
}

fn validate_parts(
    limits: &Limits,
    event_type: &str,
    payload: &[u8],
    headers: &BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    limits.check_event_type(event_type)?;
    limits.check_payload(payload.len())?;
    if headers.len() > limits.max_headers {
        return Err(ValidationError::TooManyHeaders { count: headers.len(), max: limits.max_headers });
    }
    headers.iter().try_for_each(|(k, v)| limits.check_header(k, v))
}

/// Milliseconds since the Unix epoch, negative before it (rounded away from
/// the epoch, so that any instant before it is negative).
fn system_time_ms(t: SystemTime) -> i128 {
    let (ms, sign) = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => (after.as_millis(), 1),
        Err(before) => (before.duration().as_nanos().div_ceil(1_000_000), -1),
    };
    sign * i128::try_from(ms).unwrap_or(i128::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Why an event could not be decoded (from JSON or from a record).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The JSON was malformed or had the wrong shape.
    #[error("malformed event JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The JSON was well formed but a field broke a rule.
    #[error("invalid event: {0}")]
    Invalid(#[from] ValidationError),
    /// A record lacked one of dualstream's headers.
    #[error("record has no {0:?} header")]
    MissingHeader(&'static str),
    /// A record header could not be read.
    #[error("record header {name:?} is invalid: {reason}")]
    BadHeader {
        /// The header.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The JSON shape of an event.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRepr {
    id: EventId,
    #[serde(rename = "type")]
    event_type: Arc<str>,
    source_type: Arc<str>,
    source_id: Arc<str>,
    /// Wider than the event's `u64`, so that a negative or huge value is a
    /// typed range error rather than a JSON shape error.
    occurred_at_ms: i128,
    #[serde(with = "base64_bytes")]
    payload: Bytes,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
}

impl EventRepr {
    fn into_event(self, limits: &Limits) -> Result<Event, DecodeError> {
        Event::from_parts(
            self.id,
            self.event_type,
            Source::with_limits(self.source_type, self.source_id, limits)?,
            check_occurred_at("occurred_at_ms", self.occurred_at_ms)?,
            self.payload,
            self.headers,
            limits,
        )
        .map_err(DecodeError::Invalid)
    }
}

impl Event {
    /// Assemble an already-identified event (from a record, for example) and
    /// validate it.
    pub(crate) fn from_parts(
        id: EventId,
        event_type: Arc<str>,
        source: Source,
        occurred_at_ms: u64,
        payload: Bytes,
        headers: BTreeMap<String, String>,
        limits: &Limits,
    ) -> Result<Self, ValidationError> {
        validate_parts(limits, &event_type, &payload, &headers)?;
        Ok(Event { id, event_type, source, occurred_at_ms, payload, headers })
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Ref<'a> {
            id: EventId,
            #[serde(rename = "type")]
            event_type: &'a str,
            source_type: &'a str,
            source_id: &'a str,
            occurred_at_ms: u64,
            #[serde(with = "base64_bytes")]
            payload: &'a Bytes,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            headers: &'a BTreeMap<String, String>,
        }
        Ref {
            id: self.id,
            event_type: &self.event_type,
            source_type: self.source.source_type(),
            source_id: self.source.source_id(),
            occurred_at_ms: self.occurred_at_ms,
            payload: &self.payload,
            headers: &self.headers,
        }
        .serialize(s)
    }
}

/// Deserializing validates against the default [`Limits`]; use
/// [`Event::from_json_with_limits`] for others and for a typed error.
impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        EventRepr::deserialize(d)?.into_event(&Limits::default()).map_err(serde::de::Error::custom)
    }
}

mod base64_bytes {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    pub(super) fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map(Bytes::from)
            .map_err(|e| serde::de::Error::custom(format_args!("payload: not valid base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::MAX_OCCURRED_AT_MS;
    use proptest::prelude::*;

    fn event() -> Event {
        Event::builder("user.created", "user", "octocat")
            .payload(r#"{"name":"Mona"}"#)
            .header("trace-id", "abc")
            .build()
            .expect("valid event")
    }

    #[test]
    fn builder_fills_id_and_time() {
        let a = event();
        let b = event();
        assert_ne!(a.id(), b.id());
        assert!(a.id() < b.id(), "ids are time-sortable within a process");
        let age = SystemTime::now().duration_since(a.occurred_at()).expect("not in the future");
        assert!(age < Duration::from_secs(60));
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let e = event();
        let json = e.to_json();
        let text = std::str::from_utf8(&json).expect("utf8");
        assert!(text.contains(r#""type":"user.created""#), "{text}");
        assert!(text.contains(r#""payload":"eyJuYW1lIjoiTW9uYSJ9""#), "{text}");
        assert_eq!(Event::from_json(&json).expect("decodes"), e);
    }

    #[test]
    fn payload_limit_names_field_and_limit() {
        let limits = Limits { max_payload_bytes: 4, ..Limits::default() };
        let err = Event::builder("t", "user", "a").payload("12345").limits(limits).build().expect_err("refused");
        assert_eq!(err, ValidationError::PayloadTooLarge { size: 5, max: 4 });
        assert_eq!(err.to_string(), "payload is 5 bytes; the limit is 4 bytes");
        let ok = Event::builder("t", "user", "a").payload(vec![0u8; 850_000]).build();
        assert!(ok.is_ok(), "850,000 bytes is the default limit and is allowed");
        let err = Event::builder("t", "user", "a").payload(vec![0u8; 850_001]).build().expect_err("refused");
        assert!(matches!(err, ValidationError::PayloadTooLarge { max: 850_000, .. }));
    }

    #[test]
    fn text_fields_are_checked() {
        let err = Event::builder("", "user", "a").build().expect_err("refused");
        assert_eq!(err, ValidationError::Empty { field: "event_type" });
        let err = Event::builder("user created", "user", "a").build().expect_err("refused");
        assert!(matches!(err, ValidationError::InvalidChar { field: "event_type", ch: ' ', index: 4, .. }));
        let err = Event::builder("t", "us:er", "a").build().expect_err("refused");
        assert!(matches!(err, ValidationError::InvalidChar { field: "source_type", ch: ':', .. }));
        let err = Event::builder("t", "user*", "a").build().expect_err("refused");
        assert!(matches!(err, ValidationError::InvalidChar { field: "source_type", ch: '*', .. }));
        let err = Event::builder("t", "user", "a\nb").build().expect_err("refused");
        assert!(matches!(err, ValidationError::InvalidChar { field: "source_id", ch: '\n', index: 1, .. }));
        let err = Event::builder("t", "user", "x".repeat(257)).build().expect_err("refused");
        assert_eq!(err, ValidationError::TooLong { field: "source_id", len: 257, max: 256 });
        assert_eq!(err.to_string(), "source_id is 257 bytes long; the limit is 256 bytes");
        // Ids may hold ':' '/' and glob characters: channel naming escapes them.
        assert!(Event::builder("t", "repo", "owner/repo:*[x]").build().is_ok());
    }

    #[test]
    fn headers_are_checked() {
        let err = Event::builder("t", "user", "a").header("ds-id", "x").build().expect_err("refused");
        assert!(matches!(err, ValidationError::ReservedHeader { .. }));
        let mut b = Event::builder("t", "user", "a");
        for i in 0..33 {
            b = b.header(format!("h{i}"), "v");
        }
        assert_eq!(b.build().expect_err("refused"), ValidationError::TooManyHeaders { count: 33, max: 32 });
        let err = Event::builder("t", "user", "a").header("h", "v".repeat(4097)).build().expect_err("refused");
        assert!(matches!(err, ValidationError::TooLong { field: "header value", .. }));
    }

    #[test]
    fn timestamps_outside_1970_to_9999_are_rejected_by_the_builder() {
        let at = |t: SystemTime| Event::builder("t", "user", "a").occurred_at(t).build();
        let err = at(UNIX_EPOCH - Duration::from_secs(1)).expect_err("before the epoch");
        assert_eq!(err, ValidationError::TimestampOutOfRange { field: "occurred_at", ms: -1_000 });
        let err = at(UNIX_EPOCH - Duration::from_micros(1)).expect_err("just before the epoch");
        assert_eq!(err, ValidationError::TimestampOutOfRange { field: "occurred_at", ms: -1 }, "any instant before");
        let text = err.to_string();
        assert!(text.contains("occurred_at") && text.contains("9999-12-31T23:59:59.999Z"), "{text}");
        assert_eq!(at(UNIX_EPOCH).expect("the epoch is allowed").occurred_at_ms(), 0);
        let last = UNIX_EPOCH + Duration::from_millis(MAX_OCCURRED_AT_MS);
        assert_eq!(at(last).expect("the end of 9999 is allowed").occurred_at_ms(), MAX_OCCURRED_AT_MS);
        let err = at(last + Duration::from_millis(1)).expect_err("after 9999");
        assert_eq!(err, ValidationError::TimestampOutOfRange { field: "occurred_at", ms: 253_402_300_800_000 });
    }

    fn json_at(ms: &str) -> Vec<u8> {
        let head = r#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"t","source_type":"u","source_id":"a""#;
        format!(r#"{head},"occurred_at_ms":{ms},"payload":""}}"#).into_bytes()
    }

    #[test]
    fn json_occurred_at_is_range_checked() {
        let last = Event::from_json(&json_at("253402300799999")).expect("end of 9999");
        assert_eq!(last.occurred_at_ms(), MAX_OCCURRED_AT_MS);
        assert_eq!(Event::from_json(&json_at("0")).expect("the epoch").occurred_at_ms(), 0);
        for (text, ms) in [("-1", -1), ("253402300800000", 253_402_300_800_000), ("18446744073709551616", 1 << 64)] {
            match Event::from_json(&json_at(text)) {
                Err(DecodeError::Invalid(ValidationError::TimestampOutOfRange { field, ms: got })) => {
                    assert_eq!((field, got), ("occurred_at_ms", ms), "{text}")
                }
                other => panic!("{text}: expected a range error, got {other:?}"),
            }
        }
        assert!(matches!(Event::from_json(&json_at("1.5")), Err(DecodeError::Json(_))), "not an integer");
    }

    #[test]
    fn malformed_json_is_a_typed_error() {
        assert!(matches!(Event::from_json(b"{"), Err(DecodeError::Json(_))));
        assert!(matches!(Event::from_json(b"[]"), Err(DecodeError::Json(_))));
        let bad_id = br#"{"id":"nope","type":"t","source_type":"u","source_id":"a","occurred_at_ms":1,"payload":""}"#;
        let err = Event::from_json(bad_id).expect_err("refused");
        assert!(err.to_string().contains("is not a UUID"), "{err}");
        let bad_b64 = br#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"t","source_type":"u","source_id":"a","occurred_at_ms":1,"payload":"!!"}"#;
        let err = Event::from_json(bad_b64).expect_err("refused");
        assert!(err.to_string().contains("payload: not valid base64"), "{err}");
        let bad_type = br#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"a b","source_type":"u","source_id":"a","occurred_at_ms":1,"payload":""}"#;
        assert!(matches!(
            Event::from_json(bad_type),
            Err(DecodeError::Invalid(ValidationError::InvalidChar { field: "event_type", .. }))
        ));
    }

    proptest! {
        #[test]
        fn json_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Event::from_json(&bytes);
        }

        #[test]
        fn valid_events_round_trip(
            ty in "[A-Za-z0-9._-]{1,40}",
            st in "[A-Za-z0-9._-]{1,20}",
            sid in "[^\\p{Cc}\\p{Cf}\\p{Zl}\\p{Zp}]{1,40}",
            payload in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let e = Event::builder(ty, st, sid).payload(payload).build().expect("valid");
            prop_assert_eq!(Event::from_json(&e.to_json()).expect("round trip"), e);
        }
    }
}
