//! Limits and the typed errors for bad input (PATTERN §8).

use serde::{Deserialize, Serialize};

/// The limits an [`Event`](crate::Event) is validated against.
///
/// The defaults suit most deployments; raise `max_payload_bytes` together with
/// the broker's `message.max.bytes` if you need larger events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest payload in bytes. Default: 1 MiB.
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
            max_payload_bytes: 1024 * 1024,
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
    #[error("{field} contains {ch:?} at byte {index}; allowed: {allowed}")]
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
    /// The occurrence time was before the Unix epoch or too far after it.
    #[error("occurred_at is out of range: must be between the Unix epoch and year 292277026596")]
    TimestampOutOfRange,
}

pub(crate) const TYPE_CHARSET: &str = "ASCII letters, digits, '.', '_' and '-'";
pub(crate) const SOURCE_ID_CHARSET: &str = "any Unicode character except control characters";

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

/// Free text without control characters: source id.
pub(crate) fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    check_len(field, value, max)?;
    match value.char_indices().find(|(_, c)| c.is_control()) {
        Some((index, ch)) => Err(ValidationError::InvalidChar { field, ch, index, allowed: SOURCE_ID_CHARSET }),
        None => Ok(()),
    }
}

impl Limits {
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
    /// Check a user header against these limits and rules.
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
        Ok(())
    }
}
