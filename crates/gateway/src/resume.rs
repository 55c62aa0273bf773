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
    // Written digit by digit: a session encodes its token for every item it
    // sends, and `write!` was about 7 % of a busy gateway's CPU
    // (docs/benchmark-analysis.md). "r1." + 8 hex + "." and at most 39
    // bytes an entry.
    let mut out = Vec::with_capacity(12 + positions.len().max(1) * 40);
    out.extend_from_slice(b"r1.");
    push_hex8(&mut out, log);
    out.push(b'.');
    if positions.is_empty() {
        out.push(b'-');
    }
    for (i, (channel, (partition, next))) in positions.iter().enumerate() {
        if i > 0 {
            out.push(b'_');
        }
        push_hex8(&mut out, *channel);
        out.push(b'-');
        push_decimal(&mut out, i64::from(*partition));
        out.push(b'-');
        push_decimal(&mut out, *next);
    }
    // Only ASCII was written.
    String::from_utf8(out).unwrap_or_default()
}

/// `v` as 8 lower-case hex digits.
fn push_hex8(out: &mut Vec<u8>, v: u32) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.extend((0..8).rev().map(|i| DIGITS[((v >> (4 * i)) & 0xf) as usize]));
}

/// `v` in decimal, as `Display` writes it.
fn push_decimal(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    let mut n = v.unsigned_abs();
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
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

    /// The digits written by hand are those `write!` writes.
    #[test]
    fn encodes_as_formatted() {
        let values = [0, 1, 9, 10, 99, 100, 12_345, i64::from(i32::MAX), i64::MAX, -1, i64::MIN];
        let hashes = [0, 1, 0xf, 0x10, 0xdead_beef, u32::MAX, hash("events:user:a")];
        for (i, &log) in hashes.iter().enumerate() {
            let mut positions = BTreeMap::new();
            let mut want = Vec::new();
            for (j, &next) in values.iter().enumerate() {
                let channel = hashes[(i + j) % hashes.len()].wrapping_add(j as u32);
                let partition = (next % 1_000) as i32;
                positions.insert(channel, (partition, next));
            }
            for (channel, (partition, next)) in &positions {
                want.push(format!("{channel:08x}-{partition}-{next}"));
            }
            assert_eq!(encode(log, &positions), format!("r1.{log:08x}.{}", want.join("_")));
        }
        assert_eq!(encode(0xab, &BTreeMap::new()), "r1.000000ab.-");
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
