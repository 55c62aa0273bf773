use super::*;
use proptest::prelude::*;

/// Redis's `stringmatchlen` rules (util.c) for `*`, `?`, `[...]` (with `^`
/// negation and ranges) and `\` escapes; the integration tests check the
/// same cases against a real PSUBSCRIBE.
fn redis_glob(pattern: &[u8], s: &[u8]) -> bool {
    match pattern.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|i| redis_glob(&pattern[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && redis_glob(&pattern[1..], &s[1..]),
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
                    [] => break,
                    [b']', ..] => {
                        p = &p[1..];
                        break;
                    }
                    [b'\\', x, rest @ ..] => {
                        matched |= *x == c;
                        p = rest;
                    }
                    [a, b'-', b, rest @ ..] if *b != b']' => {
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
            matched != negate && redis_glob(p, &s[1..])
        }
        Some(b'\\') if pattern.len() >= 2 => {
            !s.is_empty() && s[0] == pattern[1] && redis_glob(&pattern[2..], &s[1..])
        }
        Some(&c) => !s.is_empty() && s[0] == c && redis_glob(&pattern[1..], &s[1..]),
    }
}

#[test]
fn the_glob_model_agrees_with_redis_on_known_cases() {
    assert!(redis_glob(b"events:user:*", b"events:user:octocat"));
    assert!(!redis_glob(b"events:user:*", b"events:user2:octocat"));
    assert!(redis_glob(b"events:*", b"events:user"));
    assert!(redis_glob(b"a?c", b"abc"));
    assert!(redis_glob(b"a[bc]d", b"acd"));
    assert!(!redis_glob(b"a[^bc]d", b"acd"));
    assert!(redis_glob(b"a\\*", b"a*"));
    assert!(!redis_glob(b"a\\*", b"ab"));
}

#[test]
fn ordinary_ids_stay_readable() {
    let n = ChannelNamer::default();
    assert_eq!(n.channel("user", "octocat").unwrap(), "events:user:octocat");
    assert_eq!(n.channel("repo", "owner/repo").unwrap(), "events:repo:owner/repo");
    assert_eq!(n.channel("org", "Ünïcødé 🚀").unwrap(), "events:org:Ünïcødé 🚀");
}

#[test]
fn glob_syntax_and_colons_are_escaped() {
    let n = ChannelNamer::default();
    assert_eq!(n.channel("user", "*").unwrap(), "events:user:%2A");
    assert_eq!(n.channel("user", "a:b").unwrap(), "events:user:a%3Ab");
    assert_eq!(n.channel("user", r"[x]?\%").unwrap(), "events:user:%5Bx%5D%3F%5C%25");
}

#[test]
fn invalid_parts_are_typed_errors() {
    let n = ChannelNamer::default();
    assert!(matches!(
        n.channel("", "a"),
        Err(ChannelError::Invalid(ValidationError::Empty { field: "source_type" }))
    ));
    assert!(matches!(
        n.channel("us*er", "a"),
        Err(ChannelError::Invalid(ValidationError::InvalidChar { field: "source_type", ch: '*', .. }))
    ));
    assert!(matches!(
        n.channel("user", "a\u{7}"),
        Err(ChannelError::Invalid(ValidationError::InvalidChar { field: "source_id", .. }))
    ));
    assert!(matches!(n.pattern_for_type("a:b"), Err(ChannelError::Invalid(_))));
    assert!(matches!(ChannelNamer::with_prefix("ev:ents"), Err(ChannelError::InvalidPrefix { .. })));
    assert!(matches!(ChannelNamer::with_prefix(""), Err(ChannelError::InvalidPrefix { .. })));
}

#[test]
fn parse_rejects_what_naming_never_produces() {
    let n = ChannelNamer::default();
    for bad in [
        "other:user:a",
        "events:user:a:b",
        "events:user:a*",
        "events:user:%2a",
        "events:user:%41",
        "events:user:%2",
        "events:user:%FF",
        "events:user:",
        "events::a",
    ] {
        assert!(n.parse(bad).is_err(), "{bad} must not parse");
    }
    assert_eq!(
        n.parse("events:user").unwrap(),
        ChannelName { source_type: "user".into(), source_id: None }
    );
}

#[test]
fn prefixes_are_kept_apart() {
    let a = ChannelNamer::with_prefix("tenant-a").unwrap();
    let ch = a.channel("user", "x").unwrap();
    assert_eq!(ch, "tenant-a:user:x");
    assert!(!redis_glob(ChannelNamer::default().pattern_all().as_bytes(), ch.as_bytes()));
    assert!(ChannelNamer::default().parse(&ch).is_err());
}

fn source_type() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,12}"
}

/// Ids biased towards the dangerous characters.
fn source_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\\p{Cc}]{1,24}",
        "[a-c:*?\\[\\]\\\\%/]{1,12}",
        "(%[0-9A-Fa-f]{2}|[a:*]){1,6}",
    ]
}

proptest! {
    #[test]
    fn naming_round_trips_so_it_is_injective(t in source_type(), id in source_id()) {
        let n = ChannelNamer::default();
        let ch = n.channel(&t, &id).unwrap();
        let parsed = n.parse(&ch).unwrap();
        prop_assert_eq!(parsed.source_type, t);
        prop_assert_eq!(parsed.source_id, Some(id));
    }

    #[test]
    fn distinct_sources_get_distinct_channels(t1 in source_type(), id1 in source_id(), t2 in source_type(), id2 in source_id()) {
        let n = ChannelNamer::default();
        let (a, b) = (n.channel(&t1, &id1).unwrap(), n.channel(&t2, &id2).unwrap());
        prop_assert_eq!(a == b, t1 == t2 && id1 == id2);
    }

    #[test]
    fn a_channel_used_as_a_pattern_matches_only_itself(t1 in source_type(), id1 in source_id(), t2 in source_type(), id2 in source_id()) {
        let n = ChannelNamer::default();
        let (a, b) = (n.channel(&t1, &id1).unwrap(), n.channel(&t2, &id2).unwrap());
        prop_assert_eq!(redis_glob(a.as_bytes(), b.as_bytes()), a == b);
        prop_assert_eq!(redis_glob(a.as_bytes(), a.as_bytes()), true);
    }

    #[test]
    fn a_type_pattern_matches_exactly_that_types_channels(t1 in source_type(), id in source_id(), t2 in source_type()) {
        let n = ChannelNamer::default();
        let ch = n.channel(&t1, &id).unwrap();
        let pattern = n.pattern_for_type(&t2).unwrap();
        prop_assert_eq!(redis_glob(pattern.as_bytes(), ch.as_bytes()), t1 == t2);
        prop_assert!(!redis_glob(pattern.as_bytes(), n.aggregate(&t1).unwrap().as_bytes()));
        prop_assert!(redis_glob(n.pattern_all().as_bytes(), ch.as_bytes()));
        prop_assert!(redis_glob(n.pattern_all_sources().as_bytes(), ch.as_bytes()));
        prop_assert!(!redis_glob(n.pattern_all_sources().as_bytes(), n.aggregate(&t1).unwrap().as_bytes()));
    }

    #[test]
    fn parse_never_panics_and_accepts_only_canonical_names(s in "[a-z:%*A-F0-9]{0,30}") {
        let n = ChannelNamer::default();
        if let Ok(ChannelName { source_type, source_id: Some(id) }) = n.parse(&s) {
            prop_assert_eq!(n.channel(&source_type, &id).unwrap(), s);
        }
    }
}
