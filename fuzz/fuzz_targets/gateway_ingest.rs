//! The gateway's ingest body parsing (`POST /v1/events`: one JSON event, a JSON array, or NDJSON),
//! exactly as served, through `dualstream_gateway::parse_ingest_body`. Never more than
//! `max_events` events, and every accepted event is one a consumer reads back: it survives the
//! Kafka record encoding and the JSON form under the default limits.
#![no_main]

use dualstream_core::record::{self, HeaderScratch};
use dualstream_core::{Event, Limits};
use dualstream_gateway::{parse_ingest_body, IngestBodyError};
use libfuzzer_sys::fuzz_target;

/// The input: a first line `<max_events> <content type>` (either may be missing: 4 events, no
/// content type), then the body.
fn input(data: &[u8]) -> (usize, Option<&str>, &[u8]) {
    let (first, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let first = std::str::from_utf8(first).unwrap_or_default();
    let (max, content_type) = first.split_once(' ').unwrap_or((first, ""));
    let max_events = max.parse::<usize>().map_or(4, |n| n.clamp(1, 64));
    (max_events, Some(content_type).filter(|c| !c.is_empty()), body)
}

fuzz_target!(|data: &[u8]| {
    let (max_events, content_type, body) = input(data);
    match parse_ingest_body(content_type, body, max_events) {
        Ok(events) => {
            assert!(events.len() <= max_events, "{} events", events.len());
            for e in &events {
                let limits = Limits::default();
                let mut scratch = HeaderScratch::default();
                let hs: Vec<(String, Vec<u8>)> =
                    record::headers(e, &mut scratch).map(|(k, v)| (k.to_owned(), v.to_vec())).collect();
                let fields = hs.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice())));
                let back = record::decode(fields, Some(e.payload()), &limits).expect("its record decodes");
                assert_eq!(&back, e);
                assert_eq!(&Event::from_json(&e.to_json()).expect("an ingested event's JSON decodes"), e);
            }
        }
        Err(IngestBodyError::TooManyEvents { limit, at_least }) => {
            assert!(limit == max_events && at_least > max_events, "{limit} {at_least}")
        }
        Err(IngestBodyError::Invalid { .. }) => {}
        Err(e) => panic!("unknown error {e:?}"),
    }
});
