//! The local stack is real: a Kafka-protocol broker that rdkafka produces to
//! and reads from, and a Redis whose PSUBSCRIBE follows the naming crate's
//! patterns exactly.

use std::time::Duration;

use dualstream::channel::ChannelNamer;
use dualstream_channel::glob_model;
use dualstream_tests::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stores_keyed_records_that_read_back() {
    let brokers = kafka_brokers();
    let topic = unique_topic("stack");
    create_topic(&brokers, &topic, 2).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer");
    for i in 0..10 {
        let key = format!("key-{}", i % 3);
        let value = format!("value-{i}");
        producer
            .send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(10))
            .await
            .expect("acknowledged");
    }
    let records = read_topic(&brokers, &topic, 10, Duration::from_secs(30));
    assert_eq!(records.len(), 10);
    for r in &records {
        let value = String::from_utf8(r.value.clone()).expect("utf8");
        let i: usize = value.trim_start_matches("value-").parse().expect("number");
        assert_eq!(r.key.as_deref(), Some(format!("key-{}", i % 3).as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psubscribe_on_a_built_pattern_receives_matches_and_not_near_misses() {
    let url = redis_url();
    let names = ChannelNamer::with_prefix(unique_topic("t")).expect("prefix");
    let pattern = names.pattern_for_type("user").expect("pattern");
    let escaped = names.channel("user", "a*b").expect("channel");
    let mut sub = Subscriber::new(&url, &[pattern, escaped.clone()], &[]).await;
    let client = deadpool_redis::redis::Client::open(url.as_str()).expect("url");
    let conn = client.get_multiplexed_async_connection().await.expect("connection");
    let publish = |channel: String| {
        let mut conn = conn.clone();
        async move {
            deadpool_redis::redis::cmd("PUBLISH")
                .arg(&channel)
                .arg("x")
                .query_async::<i64>(&mut conn)
                .await
                .expect("publish")
        }
    };
    let p = names.prefix().to_owned();
    // Near misses: another type with the same start, the aggregate channel,
    // and a raw channel that the escaped id's pattern would match if the
    // glob syntax had not been escaped.
    for near in [format!("{p}:user2:x"), format!("{p}:user"), format!("{p}:users:x"), format!("{p}:user:a*b")] {
        publish(near).await;
    }
    let hit = names.channel("user", "octocat").expect("channel");
    publish(hit.clone()).await;
    let got = sub.drain(Duration::from_millis(500)).await;
    let channels: Vec<&str> = got.iter().map(|(c, _)| c.as_str()).collect();
    // `{p}:user:a*b` is matched by the type pattern (it is a user channel by
    // shape) but never by the escaped channel used as a pattern.
    assert_eq!(channels, vec![format!("{p}:user:a*b").as_str(), hit.as_str()]);
    // The escaped channel, used as a pattern, matches exactly itself.
    publish(escaped.clone()).await;
    let got = sub.drain(Duration::from_millis(500)).await;
    assert_eq!(got.len(), 2, "once via the type pattern, once via its own: {got:?}");
    assert!(got.iter().all(|(c, _)| *c == escaped));
}

/// The glob model the naming crate's property tests rely on
/// (`crates/channel/src/glob_model.rs`) against a real PSUBSCRIBE, pattern
/// by pattern: every pattern of up to three bytes over `a ? * [ ] ^ - \`,
/// and longer ones with sets, negated sets, ranges (forwards, backwards,
/// ending in `]`) and escapes, each against every channel of one to three
/// bytes over `a b ] ^ - \ [`. Redis must deliver exactly the pairs the
/// model matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_glob_model_agrees_with_a_real_psubscribe() {
    use std::collections::BTreeSet;
    let prefix = format!("{}:", unique_topic("glob"));
    let words = |alphabet: &[u8], longest: usize| {
        let mut all: Vec<Vec<u8>> = vec![vec![]];
        let mut last: Vec<Vec<u8>> = vec![vec![]];
        for _ in 0..longest {
            last = last.iter().flat_map(|w| alphabet.iter().map(move |&c| [w.as_slice(), &[c]].concat())).collect();
            all.extend(last.iter().cloned());
        }
        all.into_iter().filter(|w| !w.is_empty()).collect::<Vec<_>>()
    };
    let mut tails = words(b"a?*[]^-\\", 3);
    for longer in [
        r"a[bc]d", r"a[^bc]d", r"[a-c]", r"[c-a]", r"[^a-c]", r"[a-]", r"[^a-]", r"[]-a]", r"[\]]", r"[^\]]", r"[\^]",
        r"[\-a]", r"[a\-c]", r"[^]a]", r"[a-\]", r"a\[b]", r"a\?", r"a\*b", r"[ab", r"[^", r"*[ab]*", r"?\\?", r"[]]]",
        r"[^^]", r"*-*", r"[*?]", r"\a\b",
    ] {
        tails.push(longer.as_bytes().to_vec());
    }
    let channels: Vec<Vec<u8>> = words(b"ab]^-\\[", 3);
    let full = |tail: &[u8]| [prefix.as_bytes(), tail].concat();
    let patterns: Vec<Vec<u8>> = tails.iter().map(|t| full(t)).collect();
    let channels: Vec<Vec<u8>> = channels.iter().map(|c| full(c)).collect();
    let expected: BTreeSet<(Vec<u8>, Vec<u8>)> = patterns
        .iter()
        .flat_map(|p| channels.iter().filter(|c| glob_model::redis_glob(p, c)).map(move |c| (p.clone(), c.clone())))
        .collect();

    let client = deadpool_redis::redis::Client::open(redis_url().as_str()).expect("redis url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
    pubsub.psubscribe(&patterns).await.expect("psubscribe");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut stream = pubsub.on_message();
        while let Some(msg) = futures::StreamExt::next(&mut stream).await {
            let pattern: Vec<u8> = msg.get_pattern().expect("a pattern message");
            if tx.send((pattern, msg.get_channel_name().as_bytes().to_vec())).is_err() {
                return;
            }
        }
    });
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let mut pipe = deadpool_redis::redis::pipe();
    for c in &channels {
        pipe.cmd("PUBLISH").arg(c).arg("x").ignore();
    }
    pipe.query_async::<()>(&mut conn).await.expect("publish");
    // Everything the model expects, then a quiet half second for anything
    // it does not; never longer than 30 s in all.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut got = BTreeSet::new();
    loop {
        let quiet = if got.len() >= expected.len() { Duration::from_millis(500) } else { Duration::from_secs(5) };
        match tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + quiet), rx.recv()).await {
            Ok(Some(pair)) => assert!(got.insert(pair), "one message per matching pattern and channel"),
            Ok(None) => panic!("the subscription ended"),
            Err(_) => break,
        }
    }
    reader.abort();
    let show = |set: &BTreeSet<(Vec<u8>, Vec<u8>)>| {
        let strip = |b: &[u8]| String::from_utf8_lossy(&b[prefix.len()..]).into_owned();
        set.iter().take(20).map(|(p, c)| format!("{} ~ {}", strip(p), strip(c))).collect::<Vec<_>>()
    };
    let missing: BTreeSet<_> = expected.difference(&got).cloned().collect();
    let extra: BTreeSet<_> = got.difference(&expected).cloned().collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "model and Redis disagree on {} patterns x {} channels: the model matches but Redis does not: {:?}; \
         Redis matches but the model does not: {:?}",
        patterns.len(),
        channels.len(),
        show(&missing),
        show(&extra)
    );
    assert!(expected.len() > 1_000, "the comparison covers many matches: {}", expected.len());
}
