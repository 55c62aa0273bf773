//! How the reading side decodes stored records: with the lenient limits
//! (docs/consumer.md, "One set of limits"), in the replay's reader and in
//! the shared readers alike.

use dualstream_core::{record, DecodeError, Event, Limits};
use rdkafka::message::{BorrowedMessage, Headers, Message};

/// The limits stored records are decoded with: lenient, since what the
/// broker stored was validated when it was produced, under whatever limits
/// the publisher had (see docs/consumer.md, "One set of limits").
pub(crate) fn decode_limits() -> Limits {
    Limits::lenient()
}

/// The event in a consumed record: its `ds-*` headers and its payload.
pub(crate) fn event_of(m: &BorrowedMessage<'_>) -> Result<Event, DecodeError> {
    let limits = decode_limits();
    match m.headers() {
        Some(h) => record::decode(h.iter().map(|h| (h.key, h.value)), m.payload(), &limits),
        None => record::decode(std::iter::empty(), m.payload(), &limits),
    }
}
