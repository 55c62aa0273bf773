//! `ChannelNamer::parse` on arbitrary text (any accepted name is rebuilt exactly from its parts),
//! names built from arbitrary parts parse back to those parts, and `escape_id` / `unescape_id`
//! round-trip both ways.
#![no_main]

use dualstream_channel::{escape_id, unescape_id, ChannelNamer};
use libfuzzer_sys::fuzz_target;

/// The input as text, four lines: a prefix (the default one when it is not a valid prefix), a
/// channel name to parse, a source type and a source id (the rest of the input).
struct Input<'a> {
    prefix: &'a str,
    text: &'a str,
    source_type: &'a str,
    source_id: &'a str,
}

fn input(data: &[u8]) -> Option<Input<'_>> {
    let mut parts = std::str::from_utf8(data).ok()?.splitn(4, '\n');
    let mut next = || parts.next().unwrap_or_default();
    Some(Input { prefix: next(), text: next(), source_type: next(), source_id: next() })
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = input(data) else { return };
    let namer = ChannelNamer::with_prefix(input.prefix).unwrap_or_default();

    // Arbitrary text: whatever parses is exactly the name of its parts (the naming is injective).
    if let Ok(parsed) = namer.parse(input.text) {
        let rebuilt = match &parsed.source_id {
            Some(id) => namer.channel(&parsed.source_type, id).expect("parsed parts name a channel"),
            None => namer.aggregate(&parsed.source_type).expect("a parsed source type names an aggregate"),
        };
        assert_eq!(rebuilt, input.text);
    }

    // Names built from arbitrary parts parse back to the same parts.
    if let Ok(channel) = namer.channel(input.source_type, input.source_id) {
        let parsed = namer.parse(&channel).expect("a built channel parses");
        assert_eq!(parsed.source_type, input.source_type);
        assert_eq!(parsed.source_id.as_deref(), Some(input.source_id));
        assert_eq!(channel.matches(':').count(), namer.prefix().matches(':').count() + 2);
    }
    if let Ok(aggregate) = namer.aggregate(input.source_type) {
        let parsed = namer.parse(&aggregate).expect("a built aggregate channel parses");
        assert_eq!((parsed.source_type.as_str(), parsed.source_id), (input.source_type, None));
    }

    // escape_id / unescape_id: escaping is inverted; an accepted escaped form is canonical.
    let escaped = escape_id(input.source_id);
    assert!(!escaped.contains(['*', '?', '[', ']', '\\', ':']), "{escaped:?}");
    assert_eq!(unescape_id(&escaped).as_deref(), Ok(input.source_id));
    if let Ok(plain) = unescape_id(input.text) {
        assert_eq!(escape_id(&plain), input.text);
    }
});
