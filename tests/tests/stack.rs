//! The local stack is real: a Kafka-protocol broker that rdkafka produces to
//! and reads from, and a Redis whose PSUBSCRIBE follows the naming crate's
//! patterns exactly.

use std::time::Duration;

use dualstream::channel::ChannelNamer;
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
            deadpool_redis::redis::cmd("PUBLISH").arg(&channel).arg("x").query_async::<i64>(&mut conn).await.expect("publish")
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
