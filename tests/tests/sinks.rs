//! The Kafka sink and the Redis notifier against the real services.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dualstream::core::record;
use dualstream::prelude::*;
use dualstream::redis::BreakerState;
use dualstream::NotifyError;
use dualstream_tests::*;

fn event(source: &str, i: usize) -> Event {
    Event::builder("order.placed", "customer", source)
        .payload(format!(r#"{{"n":{i}}}"#))
        .header("trace-id", format!("t-{i}"))
        .build()
        .expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_keeps_each_source_in_one_partition_in_publish_order() {
    let brokers = kafka_brokers();
    let topic = unique_topic("sink");
    create_topic(&brokers, &topic, 3).await;
    let sink = kafka_sink(&brokers, &topic);
    sink.health_check().await.expect("healthy");

    let events: Vec<Event> = (0..300).map(|i| event(&format!("c{}", i % 6), i)).collect();
    let mut positions = Vec::new();
    // Half one by one, half as batches.
    for e in &events[..30] {
        positions.push(sink.publish(e.clone()).await.expect("stored"));
    }
    for chunk in events[30..].chunks(90) {
        for r in sink.publish_batch(chunk.to_vec()).await {
            positions.push(r.expect("stored"));
        }
    }
    // Positions grow per partition, and a source never changes partition.
    let mut last_offset: HashMap<i32, i64> = HashMap::new();
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    for (e, p) in events.iter().zip(&positions) {
        assert_eq!(&*p.topic, topic.as_str());
        if let Some(prev) = last_offset.insert(p.partition, p.offset) {
            assert!(p.offset > prev, "offsets are monotonic per partition");
        }
        let part = *partition_of.entry(e.source().source_id()).or_insert(p.partition);
        assert_eq!(part, p.partition, "one source, one partition");
    }

    // An independent consumer sees the key, the headers and the payload.
    let records = read_topic(&brokers, &topic, 300, Duration::from_secs(30));
    assert_eq!(records.len(), 300);
    let by_position: HashMap<(i32, i64), &Record> = records.iter().map(|r| ((r.partition, r.offset), r)).collect();
    for (e, p) in events.iter().zip(&positions) {
        let r = by_position[&(p.partition, p.offset)];
        assert_eq!(r.key.as_deref(), Some(e.source().source_id().as_bytes()));
        assert_eq!(r.header(record::HEADER_ID), Some(e.id().to_string()));
        assert_eq!(r.header(record::HEADER_TYPE).as_deref(), Some("order.placed"));
        assert_eq!(r.header(record::HEADER_SOURCE_TYPE).as_deref(), Some("customer"));
        assert_eq!(r.header(record::HEADER_SOURCE_ID).as_deref(), Some(e.source().source_id()));
        assert_eq!(r.header("trace-id"), e.headers().get("trace-id").cloned());
        assert_eq!(r.value, e.payload().to_vec());
        assert_eq!(&r.event(), e, "the record decodes back to the same event");
    }
    // Per source, the partition order is the publish order.
    for source in partition_of.keys() {
        let mut recs: Vec<&Record> = records.iter().filter(|r| r.key.as_deref() == Some(source.as_bytes())).collect();
        recs.sort_by_key(|r| r.offset);
        let read: Vec<_> = recs.iter().map(|r| r.event().id()).collect();
        let published: Vec<_> = events.iter().filter(|e| e.source().source_id() == *source).map(Event::id).collect();
        assert_eq!(read, published);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pipeline_batch_arrives_in_order_and_zero_subscribers_is_success() {
    let url = redis_url();
    let prefix = unique_topic("n");
    let notifier = RedisNotifier::new(RedisNotifierConfig {
        url: url.clone(),
        channel_prefix: prefix.clone(),
        aggregate_channels: true,
        ..RedisNotifierConfig::default()
    })
    .expect("notifier");
    notifier.health_check().await.expect("PING");

    // Nobody listens yet: still a success.
    let lonely = Notification::for_event(&event("nobody", 0), Some(Position::new("t", 0, 0)));
    notifier.notify(&lonely).await.expect("0 subscribers is a success");

    let names = notifier.namer().clone();
    let mut sub = Subscriber::new(&url, &[names.pattern_all_sources()], &[names.aggregate("customer").expect("agg")]).await;
    let batch: Vec<Notification> = (0..200)
        .map(|i| Notification::for_event(&event(&format!("c:{}", i % 4), i), Some(Position::new("t", 0, i as i64))))
        .collect();
    notifier.notify_batch(&batch).await.expect("pipeline");
    let got = sub.drain(Duration::from_millis(500)).await;
    assert_eq!(got.len(), 400, "per-source channel and aggregate channel");
    let per_source: Vec<Notification> = got
        .iter()
        .filter(|(c, _)| c.matches(':').count() == 2)
        .map(|(_, p)| Notification::from_json(p).expect("notification JSON"))
        .collect();
    assert_eq!(per_source, batch, "received in pipeline order, unchanged");
    for ((channel, _), n) in got.iter().filter(|(c, _)| c.matches(':').count() == 2).zip(&batch) {
        assert_eq!(channel, &names.channel("customer", &n.source_id).expect("channel"));
    }
    let stats = notifier.stats();
    assert_eq!((stats.published, stats.failed, stats.skipped), (201, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_opens_the_breaker_and_a_restart_closes_it() {
    let mut redis = OwnedRedis::start();
    let notifier = RedisNotifier::new(RedisNotifierConfig {
        url: redis.url(),
        timeout_ms: 150,
        breaker: dualstream::redis::BreakerConfig { failure_threshold: 3, open_min_ms: 100, open_max_ms: 400 },
        ..RedisNotifierConfig::default()
    })
    .expect("notifier");
    let n = Notification::for_event(&event("c1", 0), Some(Position::new("t", 0, 0)));
    notifier.notify(&n).await.expect("redis up");

    redis.kill();
    let mut outcomes = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let r = notifier.notify(&n).await;
        assert!(started.elapsed() < Duration::from_millis(1_000), "bounded by the timeout: {:?}", started.elapsed());
        outcomes.push(r);
    }
    assert!(outcomes.iter().all(Result::is_err), "redis is down");
    assert!(outcomes.iter().filter(|r| matches!(r, Err(NotifyError::CircuitOpen))).count() >= 40, "skipped at once");
    let stats = notifier.stats();
    assert_eq!(stats.breaker, BreakerState::Open);
    assert!(stats.skipped >= 40, "{stats:?}");
    assert!(stats.failed >= 3, "{stats:?}");

    redis.restart();
    let mut sub = Subscriber::new(&redis.url(), &[], &[notifier.namer().channel("customer", "c1").expect("ch")]).await;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if notifier.notify(&n).await.is_ok() {
            break;
        }
        assert!(Instant::now() < until, "the same notifier recovers by itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(notifier.stats().breaker, BreakerState::Closed);
    let (_, payload) = sub.next(Duration::from_secs(2)).await.expect("notifications flow again");
    assert_eq!(Notification::from_json(&payload).expect("json"), n);
}
