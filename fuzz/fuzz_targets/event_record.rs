//! `dualstream_core::record::decode` on arbitrary record headers and value, with the default and the
//! lenient limits. Whatever decodes under the default limits decodes the same under the lenient ones;
//! whatever decodes re-encodes (key, headers, value; and JSON) and decodes back to an equal event.
#![no_main]

use dualstream_core::record::{self, HeaderScratch};
use dualstream_core::{Event, Limits};
use libfuzzer_sys::fuzz_target;

/// Record headers: name and value.
type Headers = Vec<(String, Option<Vec<u8>>)>;

/// The input as text-like bytes: one header a line (`name: value`; a line without `: ` is a header
/// with no value), then an empty line and the record value (none without the empty line).
fn record(data: &[u8]) -> (Headers, Option<&[u8]>) {
    let (head, value) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], Some(&data[i + 2..])),
        None => (data, None),
    };
    let headers = head
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| match line.windows(2).position(|w| w == b": ") {
            Some(i) => (String::from_utf8_lossy(&line[..i]).into_owned(), Some(line[i + 2..].to_vec())),
            None => (String::from_utf8_lossy(line).into_owned(), None),
        })
        .collect();
    (headers, value)
}

fn decode(headers: &Headers, value: Option<&[u8]>, limits: &Limits) -> Option<Event> {
    record::decode(headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())), value, limits).ok()
}

fn check_round_trip(event: &Event, limits: &Limits) {
    assert_eq!(record::key(event), event.source().source_id().as_bytes());
    let mut scratch = HeaderScratch::default();
    let headers: Vec<(String, Vec<u8>)> =
        record::headers(event, &mut scratch).map(|(k, v)| (k.to_owned(), v.to_vec())).collect();
    let fields = headers.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice())));
    let again = record::decode(fields, Some(event.payload()), limits).expect("a decoded event's record decodes");
    assert_eq!(&again, event);
    let json = Event::from_json_with_limits(&event.to_json(), limits).expect("a decoded event's JSON decodes");
    assert_eq!(&json, event);
}

fuzz_target!(|data: &[u8]| {
    let (headers, value) = record(data);
    let strict = decode(&headers, value, &Limits::default());
    let lenient = decode(&headers, value, &Limits::lenient());
    if let Some(e) = &strict {
        assert_eq!(lenient.as_ref(), Some(e), "the lenient limits accept what the default limits accept");
        check_round_trip(e, &Limits::default());
    }
    if let Some(e) = &lenient {
        check_round_trip(e, &Limits::lenient());
    }
});
