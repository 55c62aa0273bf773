//! The checker's own reading of dualstream's wire formats, written from
//! docs/wire-format.md and sharing no code with dualstream's decoders: a
//! bug that breaks dualstream's encoding and decoding the same way shows
//! here as a malformed record or notification.

use std::collections::BTreeMap;

/// The reserved header prefix and dualstream's own headers (docs/wire-format.md, "The Kafka record").
const RESERVED: &str = "ds-";
const H_ID: &str = "ds-id";
const H_TYPE: &str = "ds-type";
const H_SOURCE_TYPE: &str = "ds-source-type";
const H_SOURCE_ID: &str = "ds-source-id";
const H_OCCURRED_AT: &str = "ds-occurred-at";
/// 9999-12-31T23:59:59.999Z in ms since the epoch.
const MAX_OCCURRED_AT: u64 = 253_402_300_799_999;

/// An event as the checker reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WireEvent {
    pub(crate) id: u128,
    pub(crate) event_type: String,
    pub(crate) source_type: String,
    pub(crate) source_id: String,
    pub(crate) occurred_at_ms: u64,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: BTreeMap<String, String>,
}

impl WireEvent {
    /// A digest of every field, to compare an event delivered by a join
    /// with the record the checker read.
    pub(crate) fn digest(&self) -> u32 {
        digest(
            self.id,
            &self.event_type,
            &self.source_type,
            &self.source_id,
            self.occurred_at_ms,
            &self.payload,
            &self.headers,
        )
    }
}

/// A digest of an event's fields (headers in name order).
pub(crate) fn digest(
    id: u128,
    event_type: &str,
    source_type: &str,
    source_id: &str,
    occurred_at_ms: u64,
    payload: &[u8],
    headers: &BTreeMap<String, String>,
) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&id.to_be_bytes());
    for part in [event_type, source_type, source_id] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update(&occurred_at_ms.to_be_bytes());
    h.update(&(payload.len() as u64).to_be_bytes());
    h.update(payload);
    for (k, v) in headers {
        h.update(&(k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update(&(v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    h.finalize()
}

/// A notification as the checker reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WireNote {
    pub(crate) id: u128,
    pub(crate) event_type: String,
    pub(crate) source_type: String,
    pub(crate) source_id: String,
    /// (topic, partition, offset): all three or none.
    pub(crate) position: Option<(String, i32, i64)>,
}

/// A UUID's 36-character text (8-4-4-4-12 hex digits), version 7 (event ids are UUIDv7).
pub(crate) fn parse_uuid7(text: &str) -> Result<u128, String> {
    let b = text.as_bytes();
    if b.len() != 36 {
        return Err(format!("id {text:?}: not 36 characters"));
    }
    let mut v: u128 = 0;
    for (i, c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if *c != b'-' {
                return Err(format!("id {text:?}: no '-' at {i}"));
            }
            continue;
        }
        let d = (*c as char).to_digit(16).ok_or_else(|| format!("id {text:?}: {:?} is not a hex digit", *c as char))?;
        v = (v << 4) | u128::from(d);
    }
    if (v >> 76) & 0xf != 7 {
        return Err(format!("id {text:?}: not a version-7 UUID"));
    }
    Ok(v)
}

/// A UUID's text, for the run's detail lines.
pub(crate) fn uuid_text(id: u128) -> String {
    let h = format!("{id:032x}");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// `type`, `source_type` and header names: ASCII letters, digits, `.`, `_`, `-`; 1..=max bytes.
fn check_name(field: &str, v: &str, max: usize) -> Result<(), String> {
    if v.is_empty() || v.len() > max {
        return Err(format!("{field} {v:?}: length {} outside 1..={max}", v.len()));
    }
    if let Some(c) = v.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{field} {v:?}: character {c:?}"));
    }
    Ok(())
}

fn control(c: char) -> bool {
    matches!(c as u32, 0x00..=0x1f | 0x7f..=0x9f)
}

/// The source id's text rule (docs/wire-format.md, "Text rules").
fn check_source_id(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 256 {
        return Err(format!("source id {v:?}: length {} outside 1..=256", v.len()));
    }
    let forbidden = |c: char| {
        control(c)
            || matches!(c as u32, 0x061c | 0x200e | 0x200f | 0x202a..=0x202e | 0x2066..=0x2069)
            || matches!(c as u32, 0x200b..=0x200d | 0x2060 | 0xfeff | 0x2028 | 0x2029)
    };
    match v.chars().find(|c| forbidden(*c)) {
        Some(c) => Err(format!("source id {v:?}: forbidden character U+{:04X}", c as u32)),
        None => Ok(()),
    }
}

/// A Kafka record: its key, its headers in order (a header without a value
/// is `None`) and its value.
pub(crate) fn parse_record<'a>(
    key: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    value: Option<&[u8]>,
) -> Result<WireEvent, String> {
    let mut own: BTreeMap<&str, String> = BTreeMap::new();
    let mut user = BTreeMap::new();
    for (name, v) in headers {
        let text = std::str::from_utf8(v.ok_or_else(|| format!("header {name:?} has no value"))?)
            .map_err(|e| format!("header {name:?}: not UTF-8 ({e})"))?
            .to_owned();
        if name.len() >= RESERVED.len() && name[..RESERVED.len()].eq_ignore_ascii_case(RESERVED) {
            if ![H_ID, H_TYPE, H_SOURCE_TYPE, H_SOURCE_ID, H_OCCURRED_AT].contains(&name) {
                return Err(format!("unknown reserved header {name:?}"));
            }
            if own.insert(name, text).is_some() {
                return Err(format!("header {name:?} twice"));
            }
        } else {
            check_name("header name", name, usize::MAX)?;
            if let Some(c) = text.chars().find(|c| control(*c)) {
                return Err(format!("header {name:?}: control character U+{:04X}", c as u32));
            }
            if user.insert(name.to_owned(), text).is_some() {
                return Err(format!("header {name:?} twice"));
            }
        }
    }
    let mut take = |name: &str| own.remove(name).ok_or_else(|| format!("header {name:?} missing"));
    let id = parse_uuid7(&take(H_ID)?)?;
    let event_type = take(H_TYPE)?;
    check_name("type", &event_type, 128)?;
    let source_type = take(H_SOURCE_TYPE)?;
    check_name("source type", &source_type, 64)?;
    let source_id = take(H_SOURCE_ID)?;
    check_source_id(&source_id)?;
    let at = take(H_OCCURRED_AT)?;
    if at.is_empty() || !at.bytes().all(|b| b.is_ascii_digit()) || (at.len() > 1 && at.starts_with('0')) {
        return Err(format!("occurred at {at:?}: not a decimal number of ms"));
    }
    let occurred_at_ms: u64 = at.parse().map_err(|e| format!("occurred at {at:?}: {e}"))?;
    if occurred_at_ms > MAX_OCCURRED_AT {
        return Err(format!("occurred at {at:?}: after 9999-12-31T23:59:59.999Z"));
    }
    if key != Some(source_id.as_bytes()) {
        return Err(format!("key {:?} is not the source id {source_id:?}", key.map(String::from_utf8_lossy)));
    }
    Ok(WireEvent {
        id,
        event_type,
        source_type,
        source_id,
        occurred_at_ms,
        payload: value.unwrap_or_default().to_vec(),
        headers: user,
    })
}

/// A notification: compact JSON with exactly the documented fields.
pub(crate) fn parse_notification(json: &[u8]) -> Result<WireNote, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    const FIELDS: [&str; 9] =
        ["id", "type", "source_type", "source_id", "topic", "partition", "offset", "traceparent", "tracestate"];
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("unknown field {k:?}"));
    }
    // The trace context is optional text; the run's events carry none.
    for k in ["traceparent", "tracestate"] {
        if obj.get(k).is_some_and(|v| !v.is_string()) {
            return Err(format!("{k:?}: not a string"));
        }
    }
    let text = |k: &str| {
        obj.get(k).and_then(|v| v.as_str()).map(str::to_owned).ok_or_else(|| format!("{k:?}: missing or not a string"))
    };
    let id = parse_uuid7(&text("id")?)?;
    let event_type = text("type")?;
    check_name("type", &event_type, 128)?;
    let source_type = text("source_type")?;
    check_name("source type", &source_type, 64)?;
    let source_id = text("source_id")?;
    check_source_id(&source_id)?;
    let position = match (obj.get("topic"), obj.get("partition"), obj.get("offset")) {
        (None, None, None) => None,
        (Some(t), Some(p), Some(o)) => {
            let topic = t.as_str().filter(|t| !t.is_empty()).ok_or("\"topic\": not a string")?;
            let partition = p
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p >= 0)
                .ok_or("\"partition\": not an int")?;
            let offset = o.as_i64().filter(|o| *o >= 0).ok_or("\"offset\": not a non-negative int")?;
            Some((topic.to_owned(), partition, offset))
        }
        _ => return Err("topic, partition and offset: not all three or none".to_owned()),
    };
    Ok(WireNote { id, event_type, source_type, source_id, position })
}

/// The channel a notification of this source is published to:
/// `{prefix}:{source_type}:{source_id}`, the source id escaped.
pub(crate) fn channel(prefix: &str, source_type: &str, source_id: &str) -> String {
    let mut escaped = String::with_capacity(source_id.len());
    for c in source_id.chars() {
        match c {
            '*' => escaped.push_str("%2A"),
            '?' => escaped.push_str("%3F"),
            '[' => escaped.push_str("%5B"),
            ']' => escaped.push_str("%5D"),
            '\\' => escaped.push_str("%5C"),
            ':' => escaped.push_str("%3A"),
            '%' => escaped.push_str("%25"),
            c => escaped.push(c),
        }
    }
    format!("{prefix}:{source_type}:{escaped}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0190f1d2-7c1e-7a3b-9f00-0123456789ab";

    fn record(headers: &[(&str, &str)]) -> Result<WireEvent, String> {
        parse_record(Some(b"octocat"), headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))), Some(b"{}"))
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("ds-id", ID),
            ("ds-type", "user.created"),
            ("ds-source-type", "user"),
            ("ds-source-id", "octocat"),
            ("ds-occurred-at", "1764240000000"),
            ("trace-id", "abc"),
        ]
    }

    #[test]
    fn the_documented_record_reads() {
        let e = record(&good()).expect("reads");
        assert_eq!(e.event_type, "user.created");
        assert_eq!(e.source_id, "octocat");
        assert_eq!(e.occurred_at_ms, 1_764_240_000_000);
        assert_eq!(e.headers.get("trace-id").map(String::as_str), Some("abc"));
        assert_eq!(e.payload, b"{}");
    }

    #[test]
    fn a_misnamed_missing_doubled_or_bad_field_is_malformed() {
        type Break = Box<dyn Fn(&mut Vec<(&'static str, &'static str)>)>;
        let cases: Vec<Break> = vec![
            Box::new(|h| h[2].0 = "ds-sourcetype"),
            Box::new(|h| h[2].0 = "source-type"),
            Box::new(|h| {
                h.remove(4);
            }),
            Box::new(|h| h.push(("ds-type", "x"))),
            Box::new(|h| h[4].1 = "253402300800000"),
            Box::new(|h| h[4].1 = "-1"),
            Box::new(|h| h[0].1 = "0190f1d2-7c1e-4a3b-9f00-0123456789ab"),
            Box::new(|h| h[0].1 = "0190f1d27c1e7a3b9f000123456789ab"),
            Box::new(|h| h[1].1 = "user created"),
            Box::new(|h| h[3].1 = "someone-else"),
            Box::new(|h| h[5].1 = "a\tb"),
        ];
        for (i, break_it) in cases.iter().enumerate() {
            let mut h = good();
            break_it(&mut h);
            assert!(record(&h).is_err(), "case {i}: {h:?} read as valid");
        }
    }

    #[test]
    fn notifications_read_with_a_position_or_none_and_nothing_else() {
        let n = parse_notification(
            br#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"user.created","source_type":"user","source_id":"octocat","topic":"events","partition":0,"offset":42}"#,
        )
        .expect("reads");
        assert_eq!(n.position, Some(("events".to_owned(), 0, 42)));
        let none = parse_notification(
            br#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"t","source_type":"u","source_id":"o"}"#,
        );
        assert_eq!(none.expect("reads").position, None);
        for bad in [
            r#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"t","source_type":"u","source_id":"o","topic":"e"}"#,
            r#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"t","sourcetype":"u","source_id":"o"}"#,
            r#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"t","source_type":"u","source_id":"o","extra":1}"#,
            r#"{"id":"x","type":"t","source_type":"u","source_id":"o"}"#,
            r#"{"id":"0190f1d2-7c1e-7a3b-9f00-0123456789ab","type":"t","source_type":"u","source_id":"o","topic":"e","partition":"0","offset":1}"#,
            "not json",
        ] {
            assert!(parse_notification(bad.as_bytes()).is_err(), "{bad} read as valid");
        }
    }

    #[test]
    fn ids_read_back_to_their_text() {
        assert_eq!(uuid_text(parse_uuid7(ID).expect("reads")), ID);
    }

    #[test]
    fn channels_escape_the_glob_characters() {
        assert_eq!(channel("events", "repo", "owner/repo"), "events:repo:owner/repo");
        assert_eq!(channel("events", "user", "a:b*%"), "events:user:a%3Ab%2A%25");
    }
}
