//! How an [`Event`] maps onto a Kafka-style record, without any Kafka client.
//!
//! - **key**: the source id, so all events of one source land in one
//!   partition, in order (docs/design.md, "Ordering");
//! - **value**: the payload, unchanged, so other consumers read it as is;
//! - **headers**: dualstream's own (`ds-id`, `ds-type`, `ds-source-type`,
//!   `ds-source-id`, `ds-occurred-at`) followed by the user headers.
//!
//! The Kafka sink writes records with [`headers`]; the replay consumer reads
//! them back with [`decode`].

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::event::{DecodeError, Event, EventId, Source};
use crate::validate::{check_occurred_at, Limits};

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
pub struct HeaderScratch {
    id: [u8; 36],
    occurred_at: itoa::Buffer,
}

impl std::fmt::Debug for HeaderScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderScratch").finish_non_exhaustive()
    }
}

impl Default for HeaderScratch {
    fn default() -> Self {
        Self { id: [0; 36], occurred_at: itoa::Buffer::new() }
    }
}

/// Every header of the record for `event`, in order: dualstream's own, then
/// the user headers.
pub fn headers<'a>(event: &'a Event, scratch: &'a mut HeaderScratch) -> impl Iterator<Item = (&'a str, &'a [u8])> {
    let HeaderScratch { id, occurred_at } = scratch;
    let occurred_at: &'a str = occurred_at.format(event.occurred_at_ms());
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

/// The length of each header's name and value of the record for `event`, in
/// the order of [`headers`], without formatting any of them (the sink's size
/// check before it builds the record).
pub fn header_lengths(event: &Event) -> impl Iterator<Item = (usize, usize)> + '_ {
    let occurred_at = event.occurred_at_ms().checked_ilog10().map_or(1, |d| d as usize + 1);
    [
        (HEADER_ID.len(), 36),
        (HEADER_TYPE.len(), event.event_type().len()),
        (HEADER_SOURCE_TYPE.len(), event.source().source_type().len()),
        (HEADER_SOURCE_ID.len(), event.source().source_id().len()),
        (HEADER_OCCURRED_AT.len(), occurred_at),
    ]
    .into_iter()
    .chain(event.headers().iter().map(|(k, v)| (k.len(), v.len())))
}

/// Rebuild and validate an event from a record's headers and value. The
/// occurrence time is always range-checked; the sizes against `limits`: pass
/// [`Limits::lenient`] to read back whatever the producing side accepted.
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
    // Parsed wider than the event's u64, so that a negative or huge value is
    // a typed range error.
    let at: i128 = at
        .ok_or(DecodeError::MissingHeader(HEADER_OCCURRED_AT))?
        .parse()
        .map_err(|e: std::num::ParseIntError| DecodeError::BadHeader { name: HEADER_OCCURRED_AT.into(), reason: e.to_string() })?;
    let at = check_occurred_at(HEADER_OCCURRED_AT, at)?;
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
    use crate::ValidationError;

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

    proptest::proptest! {
        /// The sink's size check counts the record without building it:
        /// every header's name and value length, as [`headers`] makes them.
        #[test]
        fn header_lengths_are_the_lengths_of_the_headers(
            at in 0u64..=crate::validate::MAX_OCCURRED_AT_MS,
            ty in "[a-z][a-z.]{0,20}",
            id in "[a-zA-Z0-9/_-]{1,40}",
            user in proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,30}", 0..4),
        ) {
            let mut b = Event::builder(ty, "user", id)
                .occurred_at(std::time::UNIX_EPOCH + std::time::Duration::from_millis(at));
            for (k, v) in &user {
                b = b.header(k.clone(), v.clone());
            }
            let e = b.build().expect("valid");
            let built: Vec<(usize, usize)> = headers_of(&e).iter().map(|(k, v)| (k.len(), v.len())).collect();
            proptest::prop_assert_eq!(header_lengths(&e).collect::<Vec<_>>(), built);
        }
    }

    #[test]
    fn header_lengths_count_the_occurrence_times_digits() {
        for (ms, digits) in [(0, 1), (9, 1), (10, 2), (999, 3), (1_000, 4), (1_733_000_000_000, 13)] {
            let e = Event::builder("t", "user", "u")
                .occurred_at(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
                .build()
                .expect("valid");
            assert_eq!(header_lengths(&e).nth(4), Some((HEADER_OCCURRED_AT.len(), digits)), "{ms}");
        }
    }

    fn headers_of(e: &Event) -> Vec<(String, Vec<u8>)> {
        let mut scratch = HeaderScratch::default();
        headers(e, &mut scratch).map(|(k, v)| (k.to_owned(), v.to_vec())).collect()
    }

    fn decode_with(hs: &[(String, Vec<u8>)], value: &[u8], limits: &Limits) -> Result<Event, DecodeError> {
        decode(hs.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))), Some(value), limits)
    }

    /// An event accepted under raised limits reads back with the lenient
    /// limits (not with the defaults).
    #[test]
    fn lenient_limits_read_back_what_raised_limits_accepted() {
        let raised = Limits { max_payload_bytes: 2_000_000, max_source_id_len: 1_000, ..Limits::default() };
        let e = Event::builder("t", "user", "x".repeat(600))
            .payload(vec![b'p'; 1_500_000])
            .limits(raised)
            .build()
            .expect("valid under raised limits");
        let hs = headers_of(&e);
        let err = decode_with(&hs, e.payload(), &Limits::default()).expect_err("over the default limits");
        assert!(matches!(err, DecodeError::Invalid(ValidationError::TooLong { field: "source_id", .. })), "{err}");
        assert_eq!(decode_with(&hs, e.payload(), &Limits::lenient()).expect("lenient"), e);
    }

    #[test]
    fn stored_occurred_at_is_range_checked() {
        let e = Event::builder("t", "user", "a").build().expect("valid");
        let mut hs = headers_of(&e);
        for (text, ms) in [("-5", -5), ("253402300800000", 253_402_300_800_000_i128)] {
            let at = hs.iter_mut().find(|(k, _)| k == HEADER_OCCURRED_AT).expect("header");
            at.1 = text.as_bytes().to_vec();
            match decode_with(&hs, b"", &Limits::lenient()) {
                Err(DecodeError::Invalid(ValidationError::TimestampOutOfRange { field, ms: got })) => {
                    assert_eq!((field, got), (HEADER_OCCURRED_AT, ms))
                }
                other => panic!("{text}: expected a range error, got {other:?}"),
            }
        }
    }

    #[test]
    fn stored_header_values_with_control_characters_are_refused() {
        let e = Event::builder("t", "user", "a").build().expect("valid");
        let mut hs = headers_of(&e);
        hs.push(("trace".into(), b"a\x1b[31m".to_vec()));
        let err = decode_with(&hs, b"", &Limits::lenient()).expect_err("an escape sequence in a header value");
        let DecodeError::Invalid(ValidationError::HeaderValueInvalidChar { name, ch, index }) = err else {
            panic!("expected a header value error, got {err:?}")
        };
        assert_eq!((name.as_str(), ch, index), ("trace", '\u{1b}', 1));
    }

    #[test]
    fn foreign_records_are_typed_errors() {
        let err = decode([], Some(b"x".as_slice()), &Limits::default()).expect_err("refused");
        assert!(matches!(err, DecodeError::MissingHeader(HEADER_ID)));
        let bad = [(HEADER_ID, Some(b"\xff".as_slice()))];
        assert!(matches!(decode(bad, None, &Limits::default()), Err(DecodeError::BadHeader { .. })));
    }
}
