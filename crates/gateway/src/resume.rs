//! The resume token ([`ResumeToken`]): every subscribed channel's next Kafka
//! offset, and the identity of the event log, in one compact URL- and
//! SSE-safe string. It says where a client is, not who it is: the signed
//! tokens that grant access are in `auth.rs`.
//!
//! `r1.<log>.<entries>`, where `<log>` is the CRC-32 (hex) of the gateway's
//! `stream_id` and topic, and `<entries>` is `_`-separated
//! `<channel crc32 hex>-<partition>-<next offset>`, or `-` for none. A
//! channel is a source: it lives in one partition, and the next offset is
//! the first one the client has not yet been given.

use std::collections::BTreeMap;

/// Why a resume token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resume token: {0}")]
pub struct ResumeTokenError(pub &'static str);

/// A decoded resume token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeToken {
    /// The log it points into.
    pub log: u32,
    /// Channel hash → (partition, next offset).
    pub positions: BTreeMap<u32, (i32, i64)>,
}

/// The hash a resume token stores for a channel or for the log.
pub(crate) fn hash(text: &str) -> u32 {
    crc32fast::hash(text.as_bytes())
}

/// Longest resume token accepted, in bytes.
pub const MAX_RESUME_TOKEN_LEN: usize = 64 * 1024;

impl ResumeToken {
    /// The partition and next offset stored for `channel`.
    pub fn position_of(&self, channel: &str) -> Option<(i32, i64)> {
        self.positions.get(&hash(channel)).copied()
    }

    /// Encode; the output never holds CR, LF or NUL.
    pub fn encode(&self) -> String {
        encode(self.log, &self.positions)
    }

    /// Decode, refusing anything malformed (the error says what).
    pub fn decode(text: &str) -> Result<Self, ResumeTokenError> {
        if text.len() > MAX_RESUME_TOKEN_LEN {
            return Err(ResumeTokenError("longer than 65536 bytes"));
        }
        let rest = text.strip_prefix("r1.").ok_or(ResumeTokenError("it does not start with r1."))?;
        let (log, entries) = rest.split_once('.').ok_or(ResumeTokenError("no log part"))?;
        let log = parse_hex(log).ok_or(ResumeTokenError("the log part is not 8 hex digits"))?;
        let mut positions = BTreeMap::new();
        if entries != "-" {
            for entry in entries.split('_') {
                let mut parts = entry.splitn(3, '-');
                let (Some(c), Some(p), Some(n)) = (parts.next(), parts.next(), parts.next()) else {
                    return Err(ResumeTokenError("an entry is not <channel>-<partition>-<offset>"));
                };
                let c = parse_hex(c).ok_or(ResumeTokenError("a channel hash is not 8 hex digits"))?;
                let p: i32 = p.parse().map_err(|_| ResumeTokenError("a partition is not a number"))?;
                let n: i64 = n.parse().map_err(|_| ResumeTokenError("an offset is not a number"))?;
                if p < 0 || n < 0 {
                    return Err(ResumeTokenError("a partition or offset is negative"));
                }
                if positions.insert(c, (p, n)).is_some() {
                    return Err(ResumeTokenError("a channel appears twice"));
                }
            }
        }
        Ok(Self { log, positions })
    }
}

/// The token of `log` and `positions`, written straight from them: a
/// session encodes one for every item it sends.
pub(crate) fn encode(log: u32, positions: &BTreeMap<u32, (i32, i64)>) -> String {
    use std::fmt::Write;
    // "r1." + 8 hex + "." and about 20 bytes an entry.
    let mut out = String::with_capacity(12 + positions.len().max(1) * 24);
    let _ = write!(out, "r1.{log:08x}.");
    if positions.is_empty() {
        out.push('-');
    }
    for (i, (channel, (partition, next))) in positions.iter().enumerate() {
        if i > 0 {
            out.push('_');
        }
        let _ = write!(out, "{channel:08x}-{partition}-{next}");
    }
    out
}

fn parse_hex(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut t = ResumeToken { log: hash("default/events"), positions: BTreeMap::new() };
        assert_eq!(ResumeToken::decode(&t.encode()), Ok(t.clone()));
        t.positions.insert(hash("events:user:a"), (2, 41));
        t.positions.insert(hash("events:user:b"), (0, 0));
        let s = t.encode();
        assert!(!s.contains(['\r', '\n', '\0', ' ']));
        assert_eq!(ResumeToken::decode(&s), Ok(t));
    }

    #[test]
    fn refuses_malformed_tokens() {
        for bad in [
            "",
            "r2.00000000.-",
            "r1.0000000.-",
            "r1.0000000g.-",
            "r1.00000000.",
            "r1.00000000.00000001-1",
            "r1.00000000.00000001-x-1",
            "r1.00000000.00000001-1--1",
            "r1.00000000.00000001-1-1_00000001-2-3",
            "r1.00000000.00000001-1-99999999999999999999",
        ] {
            assert!(ResumeToken::decode(bad).is_err(), "{bad:?}");
        }
    }
}
