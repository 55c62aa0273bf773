use super::*;
use crate::glob_model::redis_glob;
use proptest::prelude::*;

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
    // Corners seen on a real Redis 7.0 (tests/tests/stack.rs checks the
    // model against PSUBSCRIBE pattern by pattern): `[a-]x` is one byte from
    // the range ']'..='a' or 'x'; `[]` matches nothing; an unclosed set ends
    // with the pattern; a trailing '\' is literal; ranges may run backwards.
    assert!(redis_glob(b"[a-]x", b"a") && redis_glob(b"[a-]x", b"x") && !redis_glob(b"[a-]x", b"ax"));
    assert!(!redis_glob(b"[]x", b"x") && !redis_glob(b"[]x", b"]x"));
    assert!(redis_glob(b"[a", b"a"));
    assert!(redis_glob(b"a\\", b"a\\"));
    assert!(redis_glob(b"[z-a]x", b"mx"));
}

#[test]
fn ordinary_ids_stay_readable() {
    let n = ChannelNamer::default();
    assert_eq!(n.channel("user", "octocat").expect("valid"), "events:user:octocat");
    assert_eq!(n.channel("repo", "owner/repo").expect("valid"), "events:repo:owner/repo");
    assert_eq!(n.channel("org", "Ünïcødé 🚀").expect("valid"), "events:org:Ünïcødé 🚀");
}

#[test]
fn glob_syntax_and_colons_are_escaped() {
    let n = ChannelNamer::default();
    assert_eq!(n.channel("user", "*").expect("valid"), "events:user:%2A");
    assert_eq!(n.channel("user", "a:b").expect("valid"), "events:user:a%3Ab");
    assert_eq!(n.channel("user", r"[x]?\%").expect("valid"), "events:user:%5Bx%5D%3F%5C%25");
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

/// Naming and parsing check structure, not size: the channel of a source
/// accepted under raised limits is built and parsed back; the text rules
/// still hold.
#[test]
fn long_parts_name_and_parse_but_invisible_characters_do_not() {
    let n = ChannelNamer::default();
    let (t, id) = ("t".repeat(100), "i:".repeat(500));
    let ch = n.channel(&t, &id).expect("any length");
    assert_eq!(n.parse(&ch).expect("parses"), ChannelName { source_type: t.clone(), source_id: Some(id) });
    assert_eq!(n.pattern_for_type(&t).expect("any length"), format!("events:{t}:*"));
    assert_eq!(n.parse(&n.aggregate(&t).expect("any length")).expect("parses").source_type, t);
    for bad in ["a\u{202E}b", "a\u{200B}", "a\u{2028}"] {
        assert!(matches!(n.channel("user", bad), Err(ChannelError::Invalid(ValidationError::InvalidChar { .. }))));
        assert!(n.parse(&format!("events:user:{bad}")).is_err(), "{bad:?} must not parse");
    }
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
        n.parse("events:user").expect("valid"),
        ChannelName { source_type: "user".into(), source_id: None }
    );
}

#[test]
fn prefixes_are_kept_apart() {
    let a = ChannelNamer::with_prefix("tenant-a").expect("valid");
    let ch = a.channel("user", "x").expect("valid");
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
        "[^\\p{Cc}\\p{Cf}\\p{Zl}\\p{Zp}]{1,24}",
        "[a-c:*?\\[\\]\\\\%/]{1,12}",
        "(%[0-9A-Fa-f]{2}|[a:*]){1,6}",
    ]
}

proptest! {
    #[test]
    fn naming_round_trips_so_it_is_injective(t in source_type(), id in source_id()) {
        let n = ChannelNamer::default();
        let ch = n.channel(&t, &id).expect("valid");
        let parsed = n.parse(&ch).expect("valid");
        prop_assert_eq!(parsed.source_type, t);
        prop_assert_eq!(parsed.source_id, Some(id));
    }

    #[test]
    fn distinct_sources_get_distinct_channels(t1 in source_type(), id1 in source_id(), t2 in source_type(), id2 in source_id()) {
        let n = ChannelNamer::default();
        let (a, b) = (n.channel(&t1, &id1).expect("valid"), n.channel(&t2, &id2).expect("valid"));
        prop_assert_eq!(a == b, t1 == t2 && id1 == id2);
    }

    #[test]
    fn a_channel_used_as_a_pattern_matches_only_itself(t1 in source_type(), id1 in source_id(), t2 in source_type(), id2 in source_id()) {
        let n = ChannelNamer::default();
        let (a, b) = (n.channel(&t1, &id1).expect("valid"), n.channel(&t2, &id2).expect("valid"));
        prop_assert_eq!(redis_glob(a.as_bytes(), b.as_bytes()), a == b);
        prop_assert_eq!(redis_glob(a.as_bytes(), a.as_bytes()), true);
    }

    #[test]
    fn a_type_pattern_matches_exactly_that_types_channels(t1 in source_type(), id in source_id(), t2 in source_type()) {
        let n = ChannelNamer::default();
        let ch = n.channel(&t1, &id).expect("valid");
        let pattern = n.pattern_for_type(&t2).expect("valid");
        prop_assert_eq!(redis_glob(pattern.as_bytes(), ch.as_bytes()), t1 == t2);
        prop_assert!(!redis_glob(pattern.as_bytes(), n.aggregate(&t1).expect("valid").as_bytes()));
        prop_assert!(redis_glob(n.pattern_all().as_bytes(), ch.as_bytes()));
        prop_assert!(redis_glob(n.pattern_all_sources().as_bytes(), ch.as_bytes()));
        prop_assert!(!redis_glob(n.pattern_all_sources().as_bytes(), n.aggregate(&t1).expect("valid").as_bytes()));
    }

}

proptest! {
    // Cheap cases, and the edits that make a name non-canonical are narrow
    // (one letter of one escape in the wrong case): many cases.
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn parse_accepts_exactly_the_canonical_names(s in names_under_prefix()) {
        let n = ChannelNamer::default();
        let parsed = n.parse(&s);
        prop_assert_eq!(parsed.is_ok(), is_canonical(&n, &s), "{:?}: {:?}", s, parsed);
        match parsed {
            Ok(ChannelName { source_type, source_id: Some(id) }) => {
                prop_assert_eq!(n.channel(&source_type, &id).expect("valid parts"), s);
            }
            Ok(ChannelName { source_type, source_id: None }) => {
                prop_assert_eq!(n.aggregate(&source_type).expect("valid type"), s);
            }
            Err(_) => {}
        }
    }
}

/// Names under the default prefix: canonical ones (source and aggregate
/// channels), canonical ones with one edit somewhere (a character inserted,
/// replaced or removed, or a letter's case flipped, as in `%2a`), and
/// arbitrary text after `events:`, so that both "accepts every canonical
/// name" and "accepts nothing else" are exercised.
fn names_under_prefix() -> impl Strategy<Value = String> {
    let canonical = || {
        (source_type(), source_id()).prop_map(|(t, id)| ChannelNamer::default().channel(&t, &id).expect("valid"))
    };
    const INSERTED: &[char] = &['%', ':', '*', '?', '[', '\\', 'a', 'F', '2', '\u{202E}', '\n'];
    prop_oneof![
        canonical(),
        source_type().prop_map(|t| format!("events:{t}")),
        (canonical(), any::<prop::sample::Index>(), prop::sample::select(INSERTED), 0..4u8).prop_map(
            |(c, at, ch, edit)| {
                let mut chars: Vec<char> = c.chars().collect();
                let i = at.index(chars.len());
                match edit {
                    0 => chars.insert(i, ch),
                    1 => chars[i] = ch,
                    2 => drop(chars.remove(i)),
                    _ if chars[i].is_ascii_uppercase() => chars[i] = chars[i].to_ascii_lowercase(),
                    _ => chars[i] = chars[i].to_ascii_uppercase(),
                }
                chars.into_iter().collect()
            }
        ),
        "[a-z:%*?\\[\\]\\\\A-F0-9]{0,30}".prop_map(|r| format!("events:{r}")),
        "\\PC{0,20}".prop_map(|r| format!("events:{r}")),
    ]
}

/// Whether `name` is the channel of some valid source, or the aggregate
/// channel of a valid type, decided without `parse`: the naive inverse
/// (the type up to the next ':', every `%XX` decoded) must give parts whose
/// name is `name` again. A canonical name's naive inverse is its source,
/// since naming escapes every '%' it writes.
fn is_canonical(n: &ChannelNamer, name: &str) -> bool {
    let Some(rest) = name.strip_prefix("events:") else { return false };
    match rest.split_once(':') {
        None => n.aggregate(rest).is_ok_and(|a| a == name),
        Some((t, id)) => naive_unescape(id).and_then(|id| n.channel(t, &id).ok()).is_some_and(|c| c == name),
    }
}

fn naive_unescape(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.as_bytes().get(i) {
        if b == b'%' {
            out.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The names the parse property draws are not all of one kind: a good share
/// is canonical and a good share is not.
#[test]
fn the_parse_property_draws_both_canonical_and_other_names() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = names_under_prefix();
    let n = ChannelNamer::default();
    let draws = 2_000;
    let canonical = (0..draws)
        .filter(|_| is_canonical(&n, &strategy.new_tree(&mut runner).expect("draw").current()))
        .count();
    assert!(canonical > draws / 5 && canonical < draws * 4 / 5, "{canonical} canonical of {draws}");
}
