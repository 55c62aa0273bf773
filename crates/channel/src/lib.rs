//! Redis Pub/Sub channel names for dualstream (docs/design.md, "Channel
//! names"). Pure functions: this crate does no I/O.
//!
//! One channel per source: `events:{source_type}:{source_id}`.
//!
//! ```
//! use dualstream_channel::ChannelNamer;
//!
//! let names = ChannelNamer::default();
//! assert_eq!(names.channel("user", "octocat")?, "events:user:octocat");
//! assert_eq!(names.channel("repo", "owner/repo")?, "events:repo:owner/repo");
//! assert_eq!(names.pattern_for_type("user")?, "events:user:*");
//! assert_eq!(names.pattern_all(), "events:*");
//! assert_eq!(names.aggregate("user")?, "events:user");
//!
//! // Glob syntax and ':' in a source id are escaped, reversibly:
//! assert_eq!(names.channel("user", "a:b*")?, "events:user:a%3Ab%2A");
//! let parsed = names.parse("events:user:a%3Ab%2A")?;
//! assert_eq!(parsed.source_id.as_deref(), Some("a:b*"));
//! # Ok::<_, dualstream_channel::ChannelError>(())
//! ```
//!
//! # Safety rules
//!
//! - The prefix and the source type are identifiers (ASCII letters, digits,
//!   `.`, `_`, `-`): they can hold neither `:` nor glob syntax.
//! - The source id may hold any text without control characters, bidi
//!   controls, zero-width characters or line/paragraph separators (the event
//!   model's rules). The characters Redis treats specially in `PSUBSCRIBE` patterns
//!   (`*`, `?`, `[`, `]`, `\`), the segment separator `:` and the escape
//!   character `%` itself are written as `%XX` (upper-case hex of the byte).
//!   Everything else is kept as is, so ordinary ids stay readable.
//!
//! Hence a channel name holds exactly two `:` and no glob syntax: used as a
//! pattern it matches only itself, `events:user:*` matches exactly the
//! channels of source type `user` (never `user2`, never an aggregate
//! channel), and the naming is injective ([`ChannelNamer::parse`] inverts it).
//!
//! `events:*` matches every channel under the prefix, aggregate channels
//! included; with aggregate channels on, use
//! [`ChannelNamer::pattern_all_sources`] (`events:*:*`) to receive each event
//! once.
//!
//! # Structure, not size
//!
//! Naming and parsing check the structure of each part (the character sets
//! above, non-empty), never its length: sizes are the event model's
//! [`Limits`], checked where events are produced. So a subscriber builds and
//! parses the channel of any source a publisher could have notified on,
//! whatever limits it used (the checks use [`Limits::lenient`]).

use std::borrow::Cow;
use std::fmt::Write as _;

use dualstream_core::{Limits, Source, ValidationError};

/// Why a channel name could not be built or parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// A part broke the event model's rules.
    #[error("invalid channel part: {0}")]
    Invalid(#[from] ValidationError),
    /// The prefix broke the identifier rules.
    #[error("invalid channel prefix {prefix:?}: must be 1 to 64 ASCII letters, digits, '.', '_' or '-'")]
    InvalidPrefix {
        /// The prefix given.
        prefix: String,
    },
    /// The text is not a channel of this namer.
    #[error("{channel:?} is not a dualstream channel: {reason}")]
    NotAChannel {
        /// The text given (at most 300 characters of it).
        channel: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The parts of a parsed channel name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelName {
    /// The source type.
    pub source_type: String,
    /// The source id; `None` for an aggregate channel.
    pub source_id: Option<String>,
}

/// Builds and parses channel names under one prefix (default `events`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelNamer {
    prefix: String,
}

impl Default for ChannelNamer {
    fn default() -> Self {
        Self { prefix: "events".to_owned() }
    }
}

/// The bytes written as `%XX` in a source id.
fn needs_escape(b: u8) -> bool {
    matches!(b, b'%' | b'*' | b'?' | b'[' | b']' | b'\\' | b':')
}

/// Escape a source id for use in a channel name (see the crate docs).
pub fn escape_id(id: &str) -> Cow<'_, str> {
    if !id.bytes().any(needs_escape) {
        return Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        if c.is_ascii() && needs_escape(c as u8) {
            let _ = write!(out, "%{:02X}", c as u8);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Invert [`escape_id`]. Only the canonical form is accepted, so that
/// `escape_id(unescape_id(s)?) == s` for every accepted `s`.
pub fn unescape_id(escaped: &str) -> Result<String, &'static str> {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = escaped.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            if hex.bytes().any(|h| h.is_ascii_lowercase()) {
                return Err("%-escape must use upper-case hex");
            }
            let v = u8::from_str_radix(hex, 16).map_err(|_| "invalid %-escape")?;
            if !needs_escape(v) {
                return Err("%-escape of a character that is never escaped");
            }
            out.push(v);
            i += 3;
        } else if needs_escape(b) {
            return Err("unescaped glob syntax or ':' in the source id");
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "source id is not UTF-8")
}

fn check_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 64
        && prefix.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

impl ChannelNamer {
    /// A namer with another prefix than `events`.
    pub fn with_prefix(prefix: impl Into<String>) -> Result<Self, ChannelError> {
        let prefix = prefix.into();
        if !check_prefix(&prefix) {
            return Err(ChannelError::InvalidPrefix { prefix });
        }
        Ok(Self { prefix })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The channel of a source, validating the structure of both parts
    /// (not their length: see the crate docs).
    pub fn channel(&self, source_type: &str, source_id: &str) -> Result<String, ChannelError> {
        let source = Source::with_limits(source_type, source_id, &Limits::lenient())?;
        Ok(self.channel_for(&source))
    }

    /// The channel of an already validated source.
    pub fn channel_for(&self, source: &Source) -> String {
        let mut out =
            String::with_capacity(self.prefix.len() + 2 + source.source_type().len() + source.source_id().len());
        self.write_channel(source.source_type(), source.source_id(), &mut out);
        out
    }

    /// Append the channel for parts that were validated already (for example
    /// those of a decoded [`Notification`](dualstream_core::Notification)).
    pub fn write_channel(&self, source_type: &str, source_id: &str, out: &mut String) {
        out.push_str(&self.prefix);
        out.push(':');
        out.push_str(source_type);
        out.push(':');
        out.push_str(&escape_id(source_id));
    }

    /// The aggregate channel of a source type: `events:user`.
    pub fn aggregate(&self, source_type: &str) -> Result<String, ChannelError> {
        Limits::lenient().check_source_type(source_type)?;
        Ok(format!("{}:{source_type}", self.prefix))
    }

    /// The pattern that matches every source channel of one source type:
    /// `events:user:*`.
    pub fn pattern_for_type(&self, source_type: &str) -> Result<String, ChannelError> {
        Limits::lenient().check_source_type(source_type)?;
        Ok(format!("{}:{source_type}:*", self.prefix))
    }

    /// The pattern that matches every channel under the prefix: `events:*`.
    pub fn pattern_all(&self) -> String {
        format!("{}:*", self.prefix)
    }

    /// The pattern that matches every source channel but no aggregate
    /// channel: `events:*:*`.
    pub fn pattern_all_sources(&self) -> String {
        format!("{}:*:*", self.prefix)
    }

    /// Split a channel name into its parts. Accepts exactly the names this
    /// namer produces ([`channel`](Self::channel),
    /// [`aggregate`](Self::aggregate)) for parts of any length: the
    /// structural rules are checked with [`Limits::lenient`], so the channel
    /// of an event accepted under raised limits parses too.
    pub fn parse(&self, channel: &str) -> Result<ChannelName, ChannelError> {
        let not = |reason| ChannelError::NotAChannel { channel: channel.chars().take(300).collect(), reason };
        let rest = channel
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix(':'))
            .ok_or_else(|| not("wrong prefix"))?;
        let (source_type, source_id) = match rest.split_once(':') {
            Some((t, id)) => (t, Some(unescape_id(id).map_err(not)?)),
            None => (rest, None),
        };
        let limits = Limits::lenient();
        limits.check_source_type(source_type)?;
        if let Some(id) = &source_id {
            limits.check_source_id(id)?;
        }
        Ok(ChannelName { source_type: source_type.to_owned(), source_id })
    }
}

#[cfg(any(test, feature = "glob-model"))]
#[doc(hidden)]
pub mod glob_model;
#[cfg(test)]
mod tests;
