//! Clients for the services (feature `clients`): the stack's addresses from
//! the environment, topic creation, a Kafka sink, a Redis notifier and a
//! batching engine set for tests, an independent Kafka read-back with a plain
//! rdkafka consumer, and a Redis subscriber on a connection of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dualstream::batch::{BatchConfig, BatchEngine};
use dualstream::core::{record, Event, Limits};
use dualstream::kafka::{KafkaSink, KafkaSinkConfig, TopicRouting};
use dualstream::redis::{RedisNotifier, RedisNotifierConfig};
use dualstream::DualPublisher;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The broker list from `KAFKA_BROKERS`. Integration tests need the stack:
/// run them with `cargo xtask test`.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS")
        .expect("KAFKA_BROKERS is not set: run the integration tests with `cargo xtask test` (or `cargo xtask up`)")
}

/// The Redis URL from `REDIS_URL`.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .expect("REDIS_URL is not set: run the integration tests with `cargo xtask test` (or `cargo xtask up`)")
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}", dualstream::EventId::new().as_uuid().simple())
}

/// Create a topic (an existing one is fine), waiting until it is usable.
pub async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match admin.create_topics([&topic], &opts).await {
            Ok(results) => match &results[0] {
                Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => return,
                Err(e) if Instant::now() > until => panic!("create topic {name}: {e:?}"),
                Err(_) => {}
            },
            Err(e) if Instant::now() > until => panic!("create topic {name}: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A Kafka sink for `topic` on `brokers`, with short deadlines for tests.
pub fn kafka_sink(brokers: &str, topic: &str) -> KafkaSink {
    KafkaSink::new(KafkaSinkConfig {
        bootstrap_servers: brokers.to_owned(),
        topic: TopicRouting::Single { topic: topic.to_owned() },
        linger_ms: 2,
        message_timeout_ms: 10_000,
        ..KafkaSinkConfig::default()
    })
    .expect("kafka sink")
}

/// A Redis notifier for `url`.
pub fn redis_notifier(url: &str) -> RedisNotifier {
    RedisNotifier::new(RedisNotifierConfig { url: url.to_owned(), ..RedisNotifierConfig::default() })
        .expect("redis notifier")
}

/// A dual-mode batching engine writing to `topic` and notifying `redis_url`
/// (notifier bound 100 ms, so fault tests move quickly); the notifier is
/// returned for its counters.
pub fn dual_engine(brokers: &str, topic: &str, redis_url: &str) -> (BatchEngine, Arc<RedisNotifier>) {
    let notifier = Arc::new(
        RedisNotifier::new(RedisNotifierConfig { url: redis_url.to_owned(), timeout_ms: 100, ..Default::default() })
            .expect("redis notifier"),
    );
    let publisher = DualPublisher::builder()
        .durable(Arc::new(kafka_sink(brokers, topic)))
        .notifier(notifier.clone())
        .build()
        .expect("publisher");
    (BatchEngine::new(publisher, BatchConfig::default()).expect("engine"), notifier)
}

/// One record read back from Kafka by a plain rdkafka consumer.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
}

impl Record {
    /// The event, decoded with the core model.
    pub fn event(&self) -> Event {
        record::decode(
            self.headers.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))),
            Some(&self.value),
            &Limits::default(),
        )
        .expect("record decodes as an event")
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Each partition's high watermark as it is now (partitions with records
/// only), asked by a client of its own at `read_committed`'s alternative
/// (tansu on PostgreSQL 15 drops a connection that asks for the latest
/// offset at `read_committed`), within about 5 s in all. A broker that
/// does not answer (tansu 0.6 on SQLite, right after a kill, sometimes
/// never does) leaves the partition out: the read then relies on the
/// expected count, and says so.
fn high_watermarks(
    brokers: &str,
    topic: &str,
    metadata: &rdkafka::metadata::Metadata,
) -> std::collections::HashMap<i32, i64> {
    let mut highs = std::collections::HashMap::new();
    let Ok(client) = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", "read_uncommitted")
        .create::<BaseConsumer>()
    else {
        return highs;
    };
    let until = Instant::now() + Duration::from_secs(5);
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let left = until.saturating_duration_since(Instant::now()).max(Duration::from_millis(500));
        match client.fetch_watermarks(topic, p.id(), left) {
            Ok((_, high)) if high > 0 => {
                highs.insert(p.id(), high);
            }
            Ok(_) => {}
            Err(e) => eprintln!(
                "read_topic({topic}): no watermark for partition {} ({e}): reading to the expected count",
                p.id()
            ),
        }
    }
    highs
}

/// Read every record of `topic` from the beginning of all its partitions,
/// until `expect` records arrived and then one quiet second (so extra
/// records, duplicates included, are seen), or `timeout`. While a partition
/// is short of its high watermark as it was when the read began, the quiet
/// must last 5 s: a pause in the fetches on a busy machine does not end the
/// read early.
pub fn read_topic(brokers: &str, topic: &str, expect: usize, timeout: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_topic("readback"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let until = Instant::now() + timeout;
    let mut behind = high_watermarks(brokers, topic, &metadata);
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < until {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                if behind.get(&m.partition()).is_some_and(|high| m.offset() + 1 >= *high) {
                    behind.remove(&m.partition());
                }
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect())
                        .unwrap_or_default(),
                    value: m.payload().unwrap_or_default().to_vec(),
                });
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {
                // Short of a watermark, wait longer for the rest: 5 s of
                // quiet rather than 1 (tansu on SQLite can report a high
                // watermark past its last record after a kill).
                let quiet = if behind.is_empty() { Duration::from_secs(1) } else { Duration::from_secs(5) };
                if out.len() >= expect && quiet_since.elapsed() > quiet {
                    break;
                }
            }
        }
    }
    if !behind.is_empty() {
        eprintln!(
            "read_topic({topic}): partitions {behind:?} (partition: high watermark) not read to their watermarks"
        );
    }
    out
}

/// A Redis Pub/Sub subscriber on a dedicated connection.
#[derive(Debug)]
pub struct Subscriber {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    _task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// PSUBSCRIBE to `patterns` and SUBSCRIBE to `channels`; returns once
    /// the server confirmed the subscriptions.
    pub async fn new(url: &str, patterns: &[String], channels: &[String]) -> Self {
        let client = deadpool_redis::redis::Client::open(url).expect("redis url");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
        for p in patterns {
            pubsub.psubscribe(p).await.expect("psubscribe");
        }
        for c in channels {
            pubsub.subscribe(c).await.expect("subscribe");
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.on_message();
            while let Some(msg) = stream.next().await {
                if tx.send((msg.get_channel_name().to_owned(), msg.get_payload_bytes().to_vec())).is_err() {
                    return;
                }
            }
        });
        Self { rx, _task: task }
    }

    /// The next message, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        tokio::time::timeout(timeout, self.rx.recv()).await.ok().flatten()
    }

    /// Messages until none arrives for `quiet`. Panics if messages keep
    /// coming for a minute (something publishes without end).
    pub async fn drain(&mut self, quiet: Duration) -> Vec<(String, Vec<u8>)> {
        let until = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        while let Some(m) = self.next(quiet).await {
            out.push(m);
            assert!(Instant::now() < until, "messages kept coming for 60 s: {} drained", out.len());
        }
        out
    }
}

/// Log to stderr when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Writes events of `sources` round-robin, `per_tick` every 10 ms (30: about
/// 3,000/s), until the flag is set; resolves to how many were written, each
/// acknowledged.
pub fn start_load(
    engine: &BatchEngine,
    sources: &[dualstream::Source],
    per_tick: usize,
) -> (Arc<std::sync::atomic::AtomicBool>, tokio::task::JoinHandle<usize>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let (engine, flag, sources) = (engine.clone(), stop.clone(), sources.to_vec());
    let handle = tokio::spawn(async move {
        let mut i = 0usize;
        let mut tasks = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            for _ in 0..per_tick {
                let s = &sources[i % sources.len()];
                let e = Event::builder("reading", s.source_type(), s.source_id())
                    .payload(format!("{i}"))
                    .build()
                    .expect("valid");
                let engine = engine.clone();
                tasks.push(tokio::spawn(async move { engine.submit(e).await }));
                i += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for t in tasks {
            t.await.expect("task").expect("every event stored");
        }
        i
    });
    (stop, handle)
}
