//! The dual publisher and the batching engine on the real services, faults
//! included, and a user's own sink plugged in.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dualstream::prelude::*;
use dualstream::{DeliveryError, EventId, SinkError};
use dualstream_tests::*;

fn event(source: &str, i: usize) -> Event {
    Event::builder("metric.sampled", "sensor", source).payload(format!("{i}")).build().expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_stream_loses_no_event() {
    init_tracing();
    let brokers = kafka_brokers();
    let topic = unique_topic("dual");
    create_topic(&brokers, &topic, 3).await;
    let mut redis = OwnedRedis::start();
    let (engine, notifier) = dual_engine(&brokers, &topic, &redis.url());

    // A steady stream in the background while Redis dies and comes back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let submitted = Arc::new(Mutex::new(Vec::new()));
    let producer = {
        let (engine, stop, submitted) = (engine.clone(), stop.clone(), submitted.clone());
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..20 {
                    let e = event(&format!("s{}", i % 8), i);
                    submitted.lock().expect("lock").push(e.id());
                    let engine = engine.clone();
                    tasks.push(tokio::spawn(async move { engine.submit(e).await }));
                    i += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tasks
        })
    };
    let count = || submitted.lock().expect("lock").len();
    let wait_for = |target: usize| async move {
        let until = Instant::now() + Duration::from_secs(30);
        while count() < target {
            assert!(Instant::now() < until, "{target} events submitted within 30 s (got {})", count());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    wait_for(1_000).await;
    redis.kill();
    let until = Instant::now() + Duration::from_secs(30);
    while notifier.stats().failed + notifier.stats().skipped < 500 {
        assert!(Instant::now() < until, "the outage is noticed: {:?}", notifier.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.restart();
    let sent_before = notifier.stats().published;
    while notifier.stats().published < sent_before + 500 {
        assert!(Instant::now() < until, "notifications resume: {:?}", notifier.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let tasks = producer.await.expect("producer");
    let ids = submitted.lock().expect("lock").clone();
    let total = ids.len();
    let mut outcomes = std::collections::HashMap::new();
    for t in tasks {
        let receipt = t.await.expect("task").expect("zero publish errors while Redis is down");
        *outcomes.entry(format!("{:?}", receipt.notification)).or_insert(0) += 1;
    }
    engine.shutdown().await;
    assert!(outcomes.contains_key("Sent"), "{outcomes:?}");
    let stats = notifier.stats();
    assert!(stats.failed + stats.skipped > 0, "the outage was noticed: {stats:?}");

    let records = read_topic(&brokers, &topic, total, Duration::from_secs(60));
    let read: Vec<_> = records.iter().map(|r| r.event().id()).collect();
    assert_eq!(read.len(), total, "every event exactly once");
    assert_eq!(read.iter().collect::<HashSet<_>>(), ids.iter().collect::<HashSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_stopped_fails_publishes_in_time_and_recovers() {
    init_tracing();
    let broker = OwnedBroker::start();
    let brokers = broker.brokers();
    let topic = unique_topic("down");
    create_topic(&brokers, &topic, 1).await;
    let sink = Arc::new(
        KafkaSink::new(KafkaSinkConfig {
            bootstrap_servers: brokers.clone(),
            topic: TopicRouting::Single { topic: topic.clone() },
            message_timeout_ms: 2_000,
            enqueue_timeout_ms: 100,
            queue_max_messages: 500,
            ..KafkaSinkConfig::default()
        })
        .expect("sink"),
    );
    let publisher = DualPublisher::builder().durable(sink.clone()).mode(Mode::DurableOnly).build().expect("publisher");
    publisher.publish(event("a", 0)).await.expect("broker up");

    broker.stop();
    let started = Instant::now();
    let results = publisher.publish_batch((1..=2_000).map(|i| event("a", i)).collect()).await;
    let took = started.elapsed();
    let mut timeouts = 0;
    let mut queue_full = 0;
    for r in results {
        let err = r.expect_err("broker is down");
        assert!(err.is_retriable());
        let text = err.to_string();
        match err.into_event().map(|_| text.clone()) {
            Some(t) if t.contains("delivery deadline") => timeouts += 1,
            Some(t) if t.contains("queue full") => queue_full += 1,
            other => panic!("unexpected error: {other:?}"),
        }
    }
    assert!(took < Duration::from_secs(15), "failed within the deadline, not hanging: {took:?}");
    assert!(timeouts <= 500, "memory bounded: at most the queue's 500 records were held ({timeouts})");
    assert_eq!(timeouts + queue_full, 2_000, "every event accounted for");
    // Nothing stays in the producer (the last delivery report is released
    // just after it resolved its caller).
    let drained = Instant::now() + Duration::from_secs(1);
    while sink.in_flight() != 0 && Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(sink.in_flight(), 0, "nothing left in the producer");

    broker.resume();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match publisher.publish(event("a", 9_999)).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < until, "publishing resumes after the broker returns: {e}"),
        }
    }
    for i in 0..20 {
        publisher.publish(event("a", 10_000 + i)).await.expect("resumed");
    }
}

/// A user's own durable sink: appends JSON lines to a file.
struct FileSink {
    path: PathBuf,
    lines: Mutex<i64>,
}

#[async_trait]
impl DurableSink for FileSink {
    async fn publish(&self, event: Event) -> Result<Position, DeliveryError> {
        let mut n = self.lines.lock().expect("lock");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(&[event.to_json(), b"\n".to_vec()].concat()));
        match written {
            Ok(()) => {
                *n += 1;
                Ok(Position::new("file", 0, *n - 1))
            }
            Err(e) => Err(DeliveryError::new(SinkError::other(e), event)),
        }
    }
    async fn health_check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_file_sink_plugs_into_the_publisher_and_the_engine() {
    let path = std::env::temp_dir().join(format!("{}.jsonl", unique_topic("filesink")));
    let url = redis_url();
    let notifier = RedisNotifier::new(RedisNotifierConfig { url: url.clone(), channel_prefix: unique_topic("f"), ..Default::default() })
        .expect("notifier");
    let pattern = notifier.namer().pattern_all();
    let mut sub = Subscriber::new(&url, &[pattern], &[]).await;
    let publisher = DualPublisher::builder()
        .durable(Arc::new(FileSink { path: path.clone(), lines: Mutex::new(0) }))
        .notifier(Arc::new(notifier))
        .build()
        .expect("publisher");
    let engine = BatchEngine::new(publisher, BatchConfig::default()).expect("engine");
    let events: Vec<Event> = (0..50).map(|i| event("file", i)).collect();
    let results = futures::future::join_all(events.iter().cloned().map(|e| engine.submit(e))).await;
    engine.shutdown().await;
    for (i, r) in results.into_iter().enumerate() {
        let receipt = r.expect("stored in the file");
        assert_eq!(receipt.position, Some(Position::new("file", 0, i as i64)));
        assert_eq!(receipt.notification, NotificationOutcome::Sent);
    }
    let text = std::fs::read_to_string(&path).expect("file");
    let stored: Vec<Event> = text.lines().map(|l| Event::from_json(l.as_bytes()).expect("json line")).collect();
    assert_eq!(stored, events);
    let notes = sub.drain(Duration::from_millis(500)).await;
    let ids: Vec<_> = notes.iter().map(|(_, p)| Notification::from_json(p).expect("json").id).collect();
    assert_eq!(ids, events.iter().map(Event::id).collect::<Vec<_>>());
    let _ = std::fs::remove_file(path);
}

/// Redis far away (80 ms each way, a 160 ms round trip under the 200 ms
/// notifier timeout): the connection is made although its handshake takes
/// longer than one call's bound, and every notification of a fast stream
/// reaches a subscriber, in order per source, while callers get their
/// receipts and Kafka every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_away_redis_still_gets_every_notification_in_order() {
    let brokers = kafka_brokers();
    let redis = OwnedRedis::start();
    let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", redis.port).parse().expect("addr");
    let proxy = dualstream_tests::proxy::DelayProxy::start(upstream, Duration::from_millis(80)).await.expect("proxy");
    let topic = unique_topic("far-redis");
    create_topic(&brokers, &topic, 3).await;
    let notifier = Arc::new(redis_notifier(&proxy.redis_url()));
    let publisher = DualPublisher::builder()
        .durable(Arc::new(kafka_sink(&brokers, &topic)))
        .notifier(notifier.clone())
        .build()
        .expect("publisher");
    let engine = BatchEngine::new(publisher, BatchConfig::default()).expect("engine");
    let pattern = ChannelNamer::default().pattern_for_type("order").expect("pattern");
    let mut sub = Subscriber::new(&redis.url(), &[pattern], &[]).await;
    let events: Vec<Event> = (0..20_000)
        .map(|i| Event::builder("order.placed", "order", format!("o{}", i % 50)).payload(format!("{i}")).build().expect("valid"))
        .collect();
    for r in engine.submit_many(events.clone()).await {
        r.expect("stored");
    }
    engine.shutdown().await;
    let got = sub.drain(Duration::from_secs(3)).await;
    let stats = notifier.stats();
    assert_eq!(got.len(), events.len(), "every notification arrived ({stats:?})");
    let mut per_source: std::collections::HashMap<String, Vec<EventId>> = Default::default();
    for (_, payload) in &got {
        let n = Notification::from_json(payload).expect("notification");
        per_source.entry(n.source_id.to_string()).or_default().push(n.id);
    }
    for (source, ids) in per_source {
        let expected: Vec<EventId> = events.iter().filter(|e| e.source().source_id() == source).map(Event::id).collect();
        assert_eq!(ids, expected, "notifications of {source} in order");
    }
    assert_eq!(read_topic(&brokers, &topic, events.len(), Duration::from_secs(30)).len(), events.len());
}
