//! Shared fixtures of dualstream's integration tests, demo and benchmarks:
//! the services from `cargo xtask up` (`KAFKA_BROKERS`, `REDIS_URL`),
//! test-owned `redis-server` and `tansu` processes for fault tests, topic
//! creation, an independent Kafka read-back and a Redis subscriber.

pub mod proxy;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualstream::core::{record, Event, Limits};
use dualstream::kafka::{KafkaSink, KafkaSinkConfig, TopicRouting};
use dualstream::batch::{BatchConfig, BatchEngine};
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

/// Read every record of `topic` from the beginning of all its partitions,
/// until `expect` records arrived and then one quiet second (so extra
/// records, duplicates included, are seen), or `timeout`.
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
    let mut out = Vec::new();
    let until = Instant::now() + timeout;
    let mut quiet_since = Instant::now();
    while Instant::now() < until {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
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
                if out.len() >= expect && quiet_since.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
        }
    }
    out
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < until, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Send `sig` (`-STOP`, `-CONT`) to a running child process.
fn signal(child: Option<&Child>, sig: &str) {
    let pid = child.expect("running").id();
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill {sig} {pid}");
}

/// A `redis-server` owned by one test, on its own port. Killed on drop.
#[derive(Debug)]
pub struct OwnedRedis {
    pub port: u16,
    child: Option<Child>,
}

impl OwnedRedis {
    pub fn start() -> Self {
        let mut r = Self { port: free_port(), child: None };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_until("test redis answers", Duration::from_secs(10), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
    }

    /// SIGSTOP: Redis hangs (connections stay open, nothing answers).
    pub fn stop(&self) {
        signal(self.child.as_ref(), "-STOP");
    }

    /// SIGCONT: the hung Redis answers again.
    pub fn resume(&self) {
        signal(self.child.as_ref(), "-CONT");
    }


    /// Kill -9: the hard way Redis goes away in production.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnedRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tansu broker owned by one test (in-memory storage), on its own port.
#[derive(Debug)]
pub struct OwnedBroker {
    pub port: u16,
    child: Option<Child>,
    tansu: PathBuf,
}

impl OwnedBroker {
    pub fn start() -> Self {
        let tansu = std::env::var_os("DUALSTREAM_TANSU")
            .map(PathBuf::from)
            .expect("DUALSTREAM_TANSU is not set: run with `cargo xtask test`, which installs tansu");
        let mut b = Self { port: free_port(), child: None, tansu };
        b.restart();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port. In-memory storage: topics must be
    /// created again after a restart.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.tansu)
            .args(["broker", "--storage-engine", "memory://tansu/", "--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu");
        self.child = Some(child);
        let addr = self.brokers();
        wait_until("test broker listens", Duration::from_secs(20), || std::net::TcpStream::connect(&addr).is_ok());
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the broker stops answering but keeps its state (tansu's
    /// in-memory storage would lose the log and the producer state on a
    /// restart, which a real Kafka broker keeps on disk).
    pub fn stop(&self) {
        signal(self.child.as_ref(), "-STOP");
    }

    /// SIGCONT: the stopped broker answers again.
    pub fn resume(&self) {
        signal(self.child.as_ref(), "-CONT");
    }

}

impl Drop for OwnedBroker {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.resume();
        }
        self.kill();
    }
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

    /// Messages until none arrives for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(m) = self.next(quiet).await {
            out.push(m);
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
