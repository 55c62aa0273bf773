//! Several writers of one source: two gateways (each its own Kafka producer
//! and Redis connections) ingest events of the same sources at once while the
//! Redis they notify on restarts. A client of one of them must still get
//! exactly each source's Kafka sequence: the live path proves the offsets
//! between two notifications with the notifications the hub saw, and the
//! two writers' notifications arrive out of offset order, so this is where
//! a proof that assumed one writer would skip or repeat events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualstream_tests::gateway::{user_event, Frame, Sse, TestGateway};
use dualstream_tests::{create_topic, init_tracing, kafka_brokers, read_topic, unique_topic, OwnedRedis};
use serde_json::{json, Value};

/// Post `total` events round-robin over `sources` through `gw`, in batches
/// of 5; returns how many were stored.
async fn ingest(gw: Arc<TestGateway>, token: String, sources: &[&str], total: u64) -> u64 {
    let mut stored = 0;
    let mut n = 0;
    while n < total {
        let batch: Vec<Value> =
            (n..(n + 5).min(total)).map(|i| user_event(sources[i as usize % sources.len()], i)).collect();
        n += batch.len() as u64;
        let (status, reply) = gw.ingest(&token, &Value::Array(batch)).await;
        assert_eq!(status, 200, "{reply}");
        stored += reply["stored"].as_u64().expect("stored");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_of_the_same_sources_through_a_redis_restart_deliver_kafkas_sequence() {
    init_tracing();
    let mut redis = OwnedRedis::start();
    let url = redis.url();
    let brokers = kafka_brokers();
    let topic = unique_topic("mw");
    create_topic(&brokers, &topic, 3).await;
    let first = Arc::new(
        TestGateway::start_on(brokers.clone(), topic.clone(), |c| {
            c.redis_url = url.clone();
        })
        .await,
    );
    let prefix = first.prefix.clone();
    let second = Arc::new(
        TestGateway::start_on(brokers, topic.clone(), |c| {
            c.redis_url = url.clone();
            c.redis.channel_prefix = prefix;
        })
        .await,
    );
    let (a, b) = (first.channel("a"), first.channel("b"));
    let reader = first.token(&[&a, &b], &[]);
    let url_a = |c: &str| form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>();
    let stream = format!("{}/v1/stream?channel={}&channel={}", first.base, url_a(&a), url_a(&b));
    let auth = format!("Bearer {reader}");
    let mut sse = Sse::open(&first.http, &stream, &[("authorization", &auth)]).await;
    assert_eq!(sse.status, 200, "{}", sse.error);
    assert_eq!(sse.next(Duration::from_secs(10)).await.expect("subscribed").event, "subscribed");

    // Both gateways write a, b and c at once; Redis restarts in the middle.
    let sources: &'static [&'static str] = &["a", "b", "c"];
    let writers: Vec<_> = [&first, &second]
        .into_iter()
        .map(|gw| {
            let (gw, token) = (Arc::clone(gw), gw.token(&[], &["user"]));
            tokio::spawn(async move { ingest(gw, token, sources, 600).await })
        })
        .collect();
    let mut frames: Vec<Frame> = Vec::new();
    let started = Instant::now();
    let mut restarted = false;
    let mut markers = 0;
    let mut marked = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while markers < 2 {
        assert!(Instant::now() < deadline, "{markers} of the 2 markers within 120 s");
        if !restarted && started.elapsed() > Duration::from_millis(800) {
            redis.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            redis.restart();
            restarted = true;
        }
        if !marked && writers.iter().all(|w| w.is_finished()) {
            // After both writers: a marker on a and on b, after which
            // nothing is published, so a late or repeated event comes first.
            let producer = first.token(&[], &["user"]);
            for source in ["a", "b"] {
                let marker = json!({"type": "test.marker", "source_type": "user", "source_id": source, "payload": {}});
                let (status, reply) = first.ingest(&producer, &marker).await;
                assert_eq!(status, 200, "{reply}");
            }
            marked = true;
        }
        let Some(f) = sse.next(Duration::from_millis(200)).await else { continue };
        assert!(matches!(f.event.as_str(), "event" | "subscribed"), "unexpected {f:?}");
        if f.event == "event" && f.json()["type"] == "test.marker" {
            markers += 1;
        }
        frames.push(f);
    }
    let mut stored = 0;
    for w in writers {
        stored += w.await.expect("writer");
    }
    assert_eq!(stored, 1_200);
    assert!(restarted);

    let mut kafka: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    let mut records = read_topic(&kafka_brokers(), &topic, 1_202, Duration::from_secs(30));
    records.sort_by_key(|r| (r.partition, r.offset));
    for r in records {
        let e = r.event();
        kafka.entry(e.source().source_id().to_owned()).or_default().push((r.offset, e.id().to_string()));
    }
    let mut delivered: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for f in frames.iter().filter(|f| f.event == "event") {
        let v = f.json();
        let source = v["source_id"].as_str().expect("source_id").to_owned();
        let offset = v["position"]["offset"].as_i64().expect("offset");
        delivered.entry(source).or_default().push((offset, v["id"].as_str().expect("id").to_owned()));
    }
    assert!(!delivered.contains_key("c"), "an unsubscribed channel was delivered");
    for source in ["a", "b"] {
        let got = delivered.get(source).cloned().unwrap_or_default();
        assert_eq!(got.len(), 401, "{source}: delivered {} of 400 and the marker", got.len());
        assert_eq!(&got, &kafka[source], "{source}: the delivered sequence is not Kafka's (gap, duplicate or order)");
    }
}
