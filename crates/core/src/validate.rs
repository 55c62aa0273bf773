//! Limits and the typed errors for bad input (docs/design.md, "Bad input").

use serde::{Deserialize, Serialize};

/// The limits an [`Event`](crate::Event) is validated against.
///
/// The defaults suit most deployments: an event that passes them, even one
/// at every maximum at once, fits librdkafka's default `message.max.bytes`
/// (1,000,000 bytes) as a Kafka record. Raise `max_payload_bytes` together
/// with the producer's and the broker's `message.max.bytes` if you need
/// larger events (the Kafka sink checks each record against the producer's).
///
/// Limits are for the producing side. Code that reads stored events or
/// notifications back decodes with [`Limits::lenient`], so that an event
/// accepted under raised limits is never refused on the way out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest payload in bytes. Default: 850,000.
    ///
    /// Why not 1 MiB: librdkafka refuses a record above its
    /// `message.max.bytes` (default 1,000,000 bytes), counting the key, the
    /// headers and their lengths and framing besides the payload (the Kafka
    /// sink adds the 61-byte batch header: 97 bytes of framing in all). With
    /// the other defaults at their maximum (a 256-byte key, dualstream's five
    /// headers, 32 user headers of 64 + 4,096 bytes) those come to at most
    /// 134,165 bytes, so an 850,000-byte payload fits with 15,835 bytes to
    /// spare (a test in `dualstream-kafka` checks the sum).
    pub max_payload_bytes: usize,
    /// Longest event type in bytes. Default: 128.
    pub max_event_type_len: usize,
    /// Longest source type in bytes. Default: 64.
    pub max_source_type_len: usize,
    /// Longest source id in bytes. Default: 256.
    pub max_source_id_len: usize,
    /// Most user headers on one event. Default: 32.
    pub max_headers: usize,
    /// Longest header name in bytes. Default: 64.
    pub max_header_name_len: usize,
    /// Longest header value in bytes. Default: 4096.
    pub max_header_value_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 850_000,
            max_event_type_len: 128,
            max_source_type_len: 64,
            max_source_id_len: 256,
            max_headers: 32,
            max_header_name_len: 64,
            max_header_value_len: 4096,
        }
    }
}

/// A value that broke one of the rules of the event model. Each variant names
/// the field and the limit it broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A required text field was empty.
    #[error("{field} must not be empty")]
    Empty {
        /// The field, for example `source_id`.
        field: &'static str,
    },
    /// A text field was longer than its limit.
    #[error("{field} is {len} bytes long; the limit is {max} bytes")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A text field held a character outside its character set.
    #[error("{field} contains {ch:?} (U+{:04X}) at byte {index}; allowed: {allowed}", u32::from(*.ch))]
    InvalidChar {
        /// The field.
        field: &'static str,
        /// The offending character.
        ch: char,
        /// Its byte index.
        index: usize,
        /// The allowed set, in words.
        allowed: &'static str,
    },
    /// The payload was larger than [`Limits::max_payload_bytes`].
    #[error("payload is {size} bytes; the limit is {max} bytes")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// More headers than [`Limits::max_headers`].
    #[error("headers: {count} headers; the limit is {max}")]
    TooManyHeaders {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A user header used the prefix reserved for dualstream's own headers.
    #[error("header name {name:?} uses the reserved prefix \"{}\"", crate::record::RESERVED_PREFIX)]
    ReservedHeader {
        /// The header name.
        name: String,
    },
    /// A header value held a control character (C0, DEL or C1).
    #[error(
        "header {name:?}: value contains {ch:?} (U+{:04X}) at byte {index}; control characters are not allowed",
        u32::from(*.ch)
    )]
    HeaderValueInvalidChar {
        /// The header name.
        name: String,
        /// The offending character.
        ch: char,
        /// Its byte index in the value.
        index: usize,
    },
    /// The occurrence time was outside 1970-01-01T00:00:00.000Z ..=
    /// 9999-12-31T23:59:59.999Z (see [`MAX_OCCURRED_AT_MS`]).
    #[error(
        "{field} is {ms} ms since the Unix epoch; allowed: 0 to {MAX_OCCURRED_AT_MS} \
         (1970-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z)"
    )]
    TimestampOutOfRange {
        /// The field: `occurred_at` (builder), `occurred_at_ms` (JSON) or
        /// `ds-occurred-at` (record header).
        field: &'static str,
        /// The value, in milliseconds since the Unix epoch (negative: before it).
        ms: i128,
    },
}

/// The latest occurrence time an event may carry, in milliseconds since the
/// Unix epoch: 9999-12-31T23:59:59.999Z, the last instant with a four-digit
/// year (RFC 3339). The earliest is the epoch itself (0).
pub const MAX_OCCURRED_AT_MS: u64 = 253_402_300_799_999;

/// Check an occurrence time (milliseconds since the Unix epoch) against
/// `0..=MAX_OCCURRED_AT_MS`.
pub(crate) fn check_occurred_at(field: &'static str, ms: i128) -> Result<u64, ValidationError> {
    match u64::try_from(ms) {
        Ok(v) if v <= MAX_OCCURRED_AT_MS => Ok(v),
        _ => Err(ValidationError::TimestampOutOfRange { field, ms }),
    }
}

pub(crate) const TYPE_CHARSET: &str = "ASCII letters, digits, '.', '_' and '-'";
pub(crate) const SOURCE_ID_CHARSET: &str = "any Unicode character except control characters, bidi controls \
     (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069), zero-width characters (U+200B-U+200D, U+2060, \
     U+FEFF) and line/paragraph separators (U+2028, U+2029)";

/// Characters a source id may not hold: control characters (C0, DEL, C1),
/// bidi controls, zero-width characters and line/paragraph separators. They
/// are invisible or reorder the text around them, so two ids that look the
/// same could differ, or an id could display as another one (in logs, in
/// channel names, in dashboards).
pub(crate) fn forbidden_in_text(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{200B}'..='\u{200D}'
                | '\u{2060}'
                | '\u{FEFF}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if value.len() > max {
        return Err(ValidationError::TooLong { field, len: value.len(), max });
    }
    Ok(())
}

/// An identifier-like field: event type, source type, header name.
pub(crate) fn check_ident(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    check_len(field, value, max)?;
    match value
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some((index, ch)) => Err(ValidationError::InvalidChar { field, ch, index, allowed: TYPE_CHARSET }),
        None => Ok(()),
    }
}

/// Free text without the characters of [`forbidden_in_text`]: source id.
pub(crate) fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    check_len(field, value, max)?;
    match value.char_indices().find(|(_, c)| forbidden_in_text(*c)) {
        Some((index, ch)) => Err(ValidationError::InvalidChar { field, ch, index, allowed: SOURCE_ID_CHARSET }),
        None => Ok(()),
    }
}

impl Limits {
    /// Every length and count maximum at its largest (`usize::MAX`), while
    /// the structural rules still apply: text fields are non-empty and use
    /// their character sets, source ids hold none of the forbidden
    /// characters, header names are identifiers outside the reserved `ds-`
    /// prefix and header values hold no control characters.
    ///
    /// For decoding what was already accepted on the producing side (stored
    /// records, notifications, channel names), whatever limits it used:
    /// sizes are checked where events are produced, not where they are read.
    pub fn lenient() -> Self {
        Self {
            max_payload_bytes: usize::MAX,
            max_event_type_len: usize::MAX,
            max_source_type_len: usize::MAX,
            max_source_id_len: usize::MAX,
            max_headers: usize::MAX,
            max_header_name_len: usize::MAX,
            max_header_value_len: usize::MAX,
        }
    }

    /// Check an event type against these limits and its character set.
    pub fn check_event_type(&self, v: &str) -> Result<(), ValidationError> {
        check_ident("event_type", v, self.max_event_type_len)
    }
    /// Check a source type against these limits and its character set.
    pub fn check_source_type(&self, v: &str) -> Result<(), ValidationError> {
        check_ident("source_type", v, self.max_source_type_len)
    }
    /// Check a source id against these limits and its character set.
    pub fn check_source_id(&self, v: &str) -> Result<(), ValidationError> {
        check_text("source_id", v, self.max_source_id_len)
    }
    /// Check a payload size against these limits.
    pub fn check_payload(&self, len: usize) -> Result<(), ValidationError> {
        if len > self.max_payload_bytes {
            return Err(ValidationError::PayloadTooLarge { size: len, max: self.max_payload_bytes });
        }
        Ok(())
    }
    /// Check a user header against these limits and rules: the name is an
    /// identifier outside the reserved prefix, the value holds no control
    /// character (C0, DEL or C1; tab included).
    pub fn check_header(&self, name: &str, value: &str) -> Result<(), ValidationError> {
        check_ident("header name", name, self.max_header_name_len)?;
        if name.to_ascii_lowercase().starts_with(crate::record::RESERVED_PREFIX) {
            return Err(ValidationError::ReservedHeader { name: name.to_owned() });
        }
        if value.len() > self.max_header_value_len {
            return Err(ValidationError::TooLong {
                field: "header value",
                len: value.len(),
                max: self.max_header_value_len,
            });
        }
        match value.char_indices().find(|(_, c)| c.is_control()) {
            Some((index, ch)) => Err(ValidationError::HeaderValueInvalidChar { name: name.to_owned(), ch, index }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every character a source id may not hold besides the control
    /// characters, as documented in `docs/wire-format.md`.
    const INVISIBLE: &[char] = &[
        '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}',
        '\u{2067}', '\u{2068}', '\u{2069}', '\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}', '\u{2028}',
        '\u{2029}',
    ];

    #[test]
    fn lenient_limits_lift_every_size_but_keep_the_structure() {
        let l = Limits::lenient();
        let big = "x".repeat(100_000);
        l.check_event_type(&big).expect("any length");
        l.check_source_type(&big).expect("any length");
        l.check_source_id(&big).expect("any length");
        l.check_payload(usize::MAX).expect("no overflow at usize::MAX");
        l.check_header(&big, &big).expect("any length");
        assert_eq!(l.check_source_id(""), Err(ValidationError::Empty { field: "source_id" }));
        assert!(matches!(l.check_source_type("a:b"), Err(ValidationError::InvalidChar { field: "source_type", .. })));
        let bidi = l.check_source_id("a\u{202E}b");
        assert!(matches!(bidi, Err(ValidationError::InvalidChar { field: "source_id", .. })), "{bidi:?}");
        assert!(matches!(l.check_header("ds-x", "v"), Err(ValidationError::ReservedHeader { .. })));
        assert!(matches!(l.check_header("h", "a\nb"), Err(ValidationError::HeaderValueInvalidChar { .. })));
    }

    #[test]
    fn source_ids_reject_invisible_and_reordering_characters_by_code_point() {
        let l = Limits::default();
        for &c in INVISIBLE {
            let id = format!("ab{c}cd");
            let err = l.check_source_id(&id).expect_err(&format!("U+{:04X}", u32::from(c)));
            assert!(matches!(err, ValidationError::InvalidChar { field: "source_id", ch, index: 2, .. } if ch == c));
            let text = err.to_string();
            assert!(text.contains(&format!("U+{:04X}", u32::from(c))), "names the code point: {text}");
        }
        // Their neighbours and ordinary non-ASCII text are fine.
        for ok in ["\u{2065}", "\u{206A}", "\u{200A}", "\u{2061}", "a\u{00AD}b", "Ünïcødé 🚀", "عربي", "עברית"] {
            l.check_source_id(ok).expect(ok);
        }
    }

    #[test]
    fn header_values_reject_control_characters_naming_the_header() {
        let l = Limits::default();
        for c in ['\0', '\t', '\n', '\r', '\u{1B}', '\u{7F}', '\u{80}', '\u{9F}'] {
            let err = l.check_header("trace-id", &format!("a{c}")).expect_err(&format!("{c:?}"));
            assert_eq!(err, ValidationError::HeaderValueInvalidChar { name: "trace-id".into(), ch: c, index: 1 });
            assert!(err.to_string().starts_with("header \"trace-id\": value contains"), "{err}");
        }
        l.check_header("trace-id", "00-4bf92f-01 ü \u{202E} \u{A0}").expect("printable text, even bidi, is fine");
        l.check_header("trace-id", "").expect("an empty value is fine");
    }

    proptest! {
        #[test]
        fn a_forbidden_character_anywhere_in_a_source_id_is_reported_where_it_is(
            head in "[^\\p{Cc}\\p{Cf}\\p{Zl}\\p{Zp}]{0,20}",
            bad in prop_oneof![
                proptest::sample::select(INVISIBLE),
                "\\p{Cc}".prop_map(|s| s.chars().next().unwrap_or('\0')),
            ],
            tail in "\\PC{0,20}",
        ) {
            let id = format!("{head}{bad}{tail}");
            match Limits::lenient().check_source_id(&id) {
                Err(ValidationError::InvalidChar { field: "source_id", ch, index, .. }) => {
                    prop_assert_eq!(ch, bad);
                    prop_assert_eq!(index, head.len());
                }
                other => prop_assert!(false, "{:?}: {:?}", id, other),
            }
        }

        #[test]
        fn visible_text_is_a_valid_source_id(id in "[^\\p{Cc}\\p{Cf}\\p{Zl}\\p{Zp}]{1,40}") {
            prop_assert_eq!(Limits::default().check_source_id(&id), Ok(()));
        }

        #[test]
        fn a_header_value_is_valid_iff_it_has_no_control_character(v in "\\PC{0,10}(\\p{Cc}\\PC{0,10})?") {
            let r = Limits::default().check_header("h", &v);
            prop_assert_eq!(r.is_ok(), !v.chars().any(char::is_control), "{:?}: {:?}", v, r);
        }
    }
}
