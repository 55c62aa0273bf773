//! How an [`Event`] maps onto a Kafka-style record, without any Kafka client.
//!
//! - **key**: the source id, so all events of one source land in one
//!   partition, in order (PATTERN §1);
//! - **value**: the payload, unchanged, so other consumers read it as is;
//! - **headers**: dualstream's own (`ds-id`, `ds-type`, `ds-source-type`,
//!   `ds-source-id`, `ds-occurred-at`) followed by the user headers.
//!
//! The Kafka sink writes records with [`headers`]; the replay consumer reads
//! them back with [`decode`].

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::event::{DecodeError, Event, EventId, Source};
use crate::validate::Limits;

/// Header names starting with this prefix are reserved for dualstream.
pub const RESERVED_PREFIX: &str = "ds-";
/// Header: the event id (36-character UUID text).
pub const HEADER_ID: &str = "ds-id";
/// Header: the event type.
pub const HEADER_TYPE: &str = "ds-type";
/// Header: the source type.
pub const HEADER_SOURCE_TYPE: &str = "ds-source-type";
/// Header: the source id (also the record key).
pub const HEADER_SOURCE_ID: &str = "ds-source-id";
/// Header: the occurrence time, decimal milliseconds since the Unix epoch.
pub const HEADER_OCCURRED_AT: &str = "ds-occurred-at";

/// The record key of an event: its source id.
pub fn key(event: &Event) -> &[u8] {
    event.source().source_id().as_bytes()
}

/// Text buffers that [`headers`] borrows from; keep it alive while the
/// headers are in use.
#[derive(Debug)]
pub struct HeaderScratch {
    id: [u8; 36],
    occurred_at: String,
}

impl Default for HeaderScratch {
    fn default() -> Self {
        Self { id: [0; 36], occurred_at: String::new() }
    }
}

/// Every header of the record for `event`, in order: dualstream's own, then
/// the user headers.
pub fn headers<'a>(event: &'a Event, scratch: &'a mut HeaderScratch) -> impl Iterator<Item = (&'a str, &'a [u8])> {
    scratch.occurred_at = event.occurred_at_ms().to_string();
    let HeaderScratch { id, occurred_at } = scratch;
    let id: &'a str = event.id().encode(id);
    [
        (HEADER_ID, id.as_bytes()),
        (HEADER_TYPE, event.event_type().as_bytes()),
        (HEADER_SOURCE_TYPE, event.source().source_type().as_bytes()),
        (HEADER_SOURCE_ID, event.source().source_id().as_bytes()),
        (HEADER_OCCURRED_AT, occurred_at.as_bytes()),
    ]
    .into_iter()
    .chain(event.headers().iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
}

/// Rebuild and validate an event from a record's headers and value.
pub fn decode<'a>(
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    value: Option<&[u8]>,
    limits: &Limits,
) -> Result<Event, DecodeError> {
    let (mut id, mut ty, mut st, mut sid, mut at) = (None, None, None, None, None);
    let mut user = BTreeMap::new();
    for (name, value) in headers {
        let text = || -> Result<&'a str, DecodeError> {
            let bytes = value.unwrap_or_default();
            std::str::from_utf8(bytes)
                .map_err(|e| DecodeError::BadHeader { name: name.to_owned(), reason: e.to_string() })
        };
        match name {
            HEADER_ID => id = Some(text()?),
            HEADER_TYPE => ty = Some(text()?),
            HEADER_SOURCE_TYPE => st = Some(text()?),
            HEADER_SOURCE_ID => sid = Some(text()?),
            HEADER_OCCURRED_AT => at = Some(text()?),
            _ if name.starts_with(RESERVED_PREFIX) => {}
            _ => {
                user.insert(name.to_owned(), text()?.to_owned());
            }
        }
    }
    let id: EventId = id
        .ok_or(DecodeError::MissingHeader(HEADER_ID))?
        .parse()
        .map_err(|e: crate::event::InvalidEventId| DecodeError::BadHeader { name: HEADER_ID.into(), reason: e.to_string() })?;
    let at: u64 = at
        .ok_or(DecodeError::MissingHeader(HEADER_OCCURRED_AT))?
        .parse()
        .map_err(|e: std::num::ParseIntError| DecodeError::BadHeader { name: HEADER_OCCURRED_AT.into(), reason: e.to_string() })?;
    let source = Source::with_limits(
        st.ok_or(DecodeError::MissingHeader(HEADER_SOURCE_TYPE))?,
        sid.ok_or(DecodeError::MissingHeader(HEADER_SOURCE_ID))?,
        limits,
    )?;
    let ty = ty.ok_or(DecodeError::MissingHeader(HEADER_TYPE))?;
    Ok(Event::from_parts(id, ty.into(), source, at, Bytes::copy_from_slice(value.unwrap_or_default()), user, limits)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let e = Event::builder("repo.pushed", "repo", "owner/repo")
            .payload("body")
            .header("trace", "t-1")
            .build()
            .expect("valid");
        assert_eq!(key(&e), b"owner/repo");
        let mut scratch = HeaderScratch::default();
        let hs: Vec<(String, Vec<u8>)> =
            headers(&e, &mut scratch).map(|(k, v)| (k.to_owned(), v.to_vec())).collect();
        assert_eq!(hs[0].0, HEADER_ID);
        assert_eq!(hs.last().map(|h| h.0.as_str()), Some("trace"));
        let back = decode(hs.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))), Some(b"body"), &Limits::default())
            .expect("decodes");
        assert_eq!(back, e);
    }

    #[test]
    fn foreign_records_are_typed_errors() {
        let err = decode([], Some(b"x".as_slice()), &Limits::default()).unwrap_err();
        assert!(matches!(err, DecodeError::MissingHeader(HEADER_ID)));
        let bad = [(HEADER_ID, Some(b"\xff".as_slice()))];
        assert!(matches!(decode(bad, None, &Limits::default()), Err(DecodeError::BadHeader { .. })));
    }
}
