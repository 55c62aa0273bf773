//! A model of how Redis matches a channel against a `PSUBSCRIBE` pattern
//! (`stringmatchlen` in its util.c): `*`, `?`, `[...]` with `^` negation
//! and ranges, and `\` escapes, byte by byte. The channel crate's property
//! tests prove the naming rules against it; `tests/tests/stack.rs` (through
//! the feature `glob-model`) checks the model against a real Redis, pattern
//! by pattern.

/// Whether Redis's `PSUBSCRIBE pattern` receives a message published to
/// `channel`.
pub fn redis_glob(pattern: &[u8], channel: &[u8]) -> bool {
    // Redis matches nothing against an empty string but an empty pattern
    // (not even `*`): its loop runs while both have bytes left.
    if channel.is_empty() {
        return pattern.is_empty();
    }
    matches(pattern, channel)
}

fn matches(pattern: &[u8], s: &[u8]) -> bool {
    match pattern.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|i| matches(&pattern[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && matches(&pattern[1..], &s[1..]),
        Some(b'[') => {
            let Some(&c) = s.first() else { return false };
            let mut p = &pattern[1..];
            let negate = p.first() == Some(&b'^');
            if negate {
                p = &p[1..];
            }
            let mut matched = false;
            loop {
                match p {
                    // An unclosed set ends with the pattern.
                    [] => break,
                    [b'\\', x, rest @ ..] => {
                        matched |= *x == c;
                        p = rest;
                    }
                    [b']', rest @ ..] => {
                        p = rest;
                        break;
                    }
                    // A range whenever a byte follows the '-', even a ']'
                    // (Redis reads `[a-]` as the range from ']' to 'a').
                    [a, b'-', b, rest @ ..] => {
                        let (lo, hi) = if a <= b { (*a, *b) } else { (*b, *a) };
                        matched |= lo <= c && c <= hi;
                        p = rest;
                    }
                    [x, rest @ ..] => {
                        matched |= *x == c;
                        p = rest;
                    }
                }
            }
            matched != negate && matches(p, &s[1..])
        }
        Some(b'\\') if pattern.len() >= 2 => !s.is_empty() && s[0] == pattern[1] && matches(&pattern[2..], &s[1..]),
        Some(&c) => !s.is_empty() && s[0] == c && matches(&pattern[1..], &s[1..]),
    }
}
