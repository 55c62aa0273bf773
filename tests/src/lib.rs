//! Shared fixtures of dualstream's integration tests, demo and benchmarks:
//! the services from `cargo xtask up` (`KAFKA_BROKERS`, `REDIS_URL`),
//! test-owned `redis-server` and `tansu` processes for fault tests, topic
//! creation, an independent Kafka read-back and a Redis subscriber, and a
//! test-owned 3-master Redis Cluster ([`cluster::RedisCluster`]).

pub mod browser;
pub mod cluster;
pub mod gateway;
mod ports;
pub mod proxy;
mod tansu_pg;

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

/// Each partition's high watermark as it is now (partitions with records
/// only), asked by a client of its own at `read_committed`'s alternative
/// (tansu on PostgreSQL 15 drops a connection that asks for the latest
/// offset at `read_committed`), within about 5 s in all. A broker that
/// does not answer (tansu 0.6 on SQLite, right after a kill, sometimes
/// never does) leaves the partition out: the read then relies on the
/// expected count, and says so.
fn high_watermarks(brokers: &str, topic: &str, metadata: &rdkafka::metadata::Metadata) -> std::collections::HashMap<i32, i64> {
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
            Err(e) => eprintln!("read_topic({topic}): no watermark for partition {} ({e}): reading to the expected count", p.id()),
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
        eprintln!("read_topic({topic}): partitions {behind:?} (partition: high watermark) not read to their watermarks");
    }
    out
}

/// A loopback port reserved for one fixture server for the fixture's whole
/// life, restarts included: a listener on `127.0.0.2` and the same port. The
/// server listens on `127.0.0.1`, which the reservation does not block, while
/// every other fixture, in this process or another, starts by reserving and
/// so skips the port; the kernel releases it when the process dies.
///
/// Ports are drawn from below the kernel's ephemeral range, so neither
/// `bind(0)` nor an outgoing connection's local port can land on one while
/// its server is down between a kill and a restart.
#[derive(Debug)]
struct PortHold {
    port: u16,
    _hold: TcpListener,
}

impl PortHold {
    fn new() -> Self {
        let range = fixture_ports();
        let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::process::id());
        let span = u64::from(range.end - range.start);
        for i in 0..span {
            let port = range.start + ((seed.wrapping_add(i * 7_919)) % span) as u16;
            // Skip a port someone already listens on, and take the reservation.
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            if let Ok(hold) = TcpListener::bind(("127.0.0.2", port)) {
                return Self { port, _hold: hold };
            }
        }
        panic!("no free port in {range:?} for a test server")
    }
}

/// Where fixture ports come from: below the ephemeral range (usually
/// 10000..32768), or above it if it starts too low.
fn fixture_ports() -> std::ops::Range<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = text.split_whitespace().filter_map(|v| v.parse::<u16>().ok());
    let (low, high) = (bounds.next().unwrap_or(32_768), bounds.next().unwrap_or(60_999));
    if low > 11_000 {
        10_000..low
    } else {
        high.saturating_add(1).min(64_000)..u16::MAX
    }
}

/// How often a fixture server is started on another port after it could
/// not listen on the one it was given.
const START_ATTEMPTS: usize = 5;

/// Start a server on a port reserved for it: `spawn(port)` starts the
/// process, which counts as up once it listens on the port itself. If it
/// exits first (a process outside the fixtures listens there) or never
/// listens, it is killed and another port is tried.
fn start_on_own_port(what: &str, timeout: Duration, spawn: impl Fn(u16) -> Child) -> (PortHold, Child) {
    let mut failures = Vec::new();
    for _ in 0..START_ATTEMPTS {
        let hold = PortHold::new();
        let mut child = spawn(hold.port);
        match until_listening(&mut child, hold.port, timeout) {
            Ok(()) => return (hold, child),
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                failures.push(format!("port {}: {why}", hold.port));
            }
        }
    }
    panic!("{what} did not start in {START_ATTEMPTS} attempts: {failures:?}")
}

/// Wait until `child` itself listens on `port`.
fn until_listening(child: &mut Child, port: u16, timeout: Duration) -> Result<(), String> {
    match ports::wait_listening(child.id(), port, timeout, || !matches!(child.try_wait(), Ok(None))) {
        ports::Came::Listening => Ok(()),
        ports::Came::Exited => Err("exited before listening (port in use?)".into()),
        ports::Came::TimedOut => Err(format!("did not listen within {timeout:?}")),
    }
}

/// Start `child` again on the port its fixture holds; panics if it cannot
/// listen there.
fn restart_on(what: &str, port: u16, timeout: Duration, mut child: Child) -> Child {
    if let Err(why) = until_listening(&mut child, port, timeout) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} could not listen on its port {port} again: {why} (it is reserved against other fixtures only)");
    }
    child
}

/// Send `sig` (`-STOP`, `-CONT`) to a running child process.
fn signal(child: Option<&Child>, sig: &str) {
    let pid = child.expect("running").id();
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill {sig} {pid}");
}

/// A `redis-server` owned by one test, on a port reserved for it until the
/// fixture is dropped (see `PortHold`). Killed on drop.
#[derive(Debug)]
pub struct OwnedRedis {
    pub port: u16,
    child: Option<Child>,
    _hold: PortHold,
}

fn spawn_redis(port: u16) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server on PATH (apt-get install redis-server)")
}

impl OwnedRedis {
    const START_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn start() -> Self {
        let (hold, child) = start_on_own_port("test redis", Self::START_TIMEOUT, spawn_redis);
        Self { port: hold.port, child: Some(child), _hold: hold }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start again on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.child = Some(restart_on("test redis", self.port, Self::START_TIMEOUT, spawn_redis(self.port)));
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

/// A `dualstream-gateway` process owned by one run (the chaos harness's),
/// on a port reserved for it until the fixture is dropped (see `PortHold`).
/// Its log goes to a file beside its configuration. Killed on drop.
#[derive(Debug)]
pub struct OwnedGateway {
    pub port: u16,
    bin: PathBuf,
    config: PathBuf,
    /// The gateway's stderr (appended across restarts).
    pub log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    _hold: PortHold,
}

fn spawn_gateway(bin: &std::path::Path, config: &std::path::Path, log: &std::path::Path, env: &[(String, String)], port: u16) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("the gateway's log file");
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(config).args(["--listen", &format!("127.0.0.1:{port}")]);
    // Explicit settings win over the harness's own environment (KAFKA_BROKERS, REDIS_URL...).
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (build it with cargo build -p dualstream-gateway)", bin.display()))
}

impl OwnedGateway {
    const START_TIMEOUT: Duration = Duration::from_secs(30);

    /// Start `bin` with this TOML configuration (its `listen` is set here)
    /// and these environment variables (`KAFKA_BROKERS`, `REDIS_URL`,
    /// `DUALSTREAM_GATEWAY_SECRET`, ...).
    pub fn start(bin: &std::path::Path, config_toml: &str, env: &[(&str, &str)]) -> Self {
        let stem = format!("dualstream-gateway-{}-{}", std::process::id(), dualstream::EventId::new().as_uuid().simple());
        let config = std::env::temp_dir().join(format!("{stem}.toml"));
        let log = std::env::temp_dir().join(format!("{stem}.log"));
        std::fs::write(&config, config_toml).expect("the gateway's configuration file");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let (hold, child) = start_on_own_port("test gateway", Self::START_TIMEOUT, |port| spawn_gateway(bin, &config, &log, &env, port));
        Self { port: hold.port, bin: bin.to_owned(), config, log, env, child: Some(child), _hold: hold }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kill -9: every connection drops without a close.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port; returns when it listens.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = spawn_gateway(&self.bin, &self.config, &self.log, &self.env, self.port);
        self.child = Some(restart_on("test gateway", self.port, Self::START_TIMEOUT, child));
    }
}

impl Drop for OwnedGateway {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Where a durable test broker ([`OwnedBroker::start_durable`]) keeps its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurableEngine {
    /// tansu's PostgreSQL engine, in a database of the broker's own (created
    /// with our schema, dropped with the fixture) on the server of
    /// `DUALSTREAM_TANSU_PG`, by default the local one.
    Postgres,
    /// tansu's SQLite engine, in a file in a folder of the broker's own
    /// (removed with the fixture).
    Sqlite,
}

/// A tansu broker owned by one test (in-memory storage, or a durable log
/// with [`OwnedBroker::start_durable`]), on a port reserved for it until the
/// fixture is dropped (see `PortHold`).
#[derive(Debug)]
pub struct OwnedBroker {
    pub port: u16,
    child: Option<Child>,
    tansu: PathBuf,
    storage: String,
    /// The broker's working directory (its SQLite file, when durable).
    dir: PathBuf,
    /// What the fixture removes when dropped: the broker's own folder, its
    /// own database (URL).
    own_dir: bool,
    own_database: Option<String>,
    /// The port clients are told to use, when it is not the broker's own (a
    /// proxy in front of it).
    advertised: Option<u16>,
    _hold: PortHold,
}

fn spawn_tansu(tansu: &std::path::Path, port: u16, storage: &str, dir: &std::path::Path, advertised: Option<u16>) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    let advertised = format!("tcp://127.0.0.1:{}", advertised.unwrap_or(port));
    Command::new(tansu)
        .current_dir(dir)
        .args(["broker", "--storage-engine", storage])
        .args(["--listener-url", &url, "--advertised-listener-url", &advertised])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu")
}

impl OwnedBroker {
    const START_TIMEOUT: Duration = Duration::from_secs(20);

    /// Run `sql` on the broker's own PostgreSQL database (a durable broker
    /// on PostgreSQL only): psql's unaligned output, `|` between columns.
    /// For a witness that reads what the broker stored, beside the Kafka
    /// protocol.
    pub fn query_own_database(&self, sql: &str) -> Result<String, String> {
        let url = self.own_database.as_deref().ok_or("this broker keeps no PostgreSQL database of its own")?;
        tansu_pg::query(url, sql).map_err(|e| e.to_string())
    }

    pub fn start() -> Self {
        Self::start_with("memory://tansu/".to_owned(), std::env::temp_dir(), None)
    }

    /// A broker that keeps its log in storage of its own, in PostgreSQL or
    /// in SQLite: a restart keeps topics, records and producer state, as a
    /// real Kafka broker's disk does.
    pub fn start_durable(engine: DurableEngine) -> Self {
        Self::start_durable_advertised(engine, None)
    }

    /// Like [`start_durable`](Self::start_durable), telling clients (in its
    /// metadata) to connect to `advertised` on loopback instead of its own
    /// port: a proxy there ([`proxy::DelayProxy::start_on`]) then carries
    /// every connection to the broker, so the proxy can cut them.
    pub fn start_durable_advertised(engine: DurableEngine, advertised: Option<u16>) -> Self {
        let id = dualstream::EventId::new().as_uuid().simple().to_string();
        match engine {
            DurableEngine::Postgres => {
                let url = tansu_pg::with_database(&tansu_pg::url_from_env(), &format!("dualstream_test_{id}"))
                    .and_then(|url| tansu_pg::prepare(&url).map(|_| url))
                    .unwrap_or_else(|e| panic!("the durable broker's database: {e}"));
                let mut broker = Self::start_with(url.clone(), std::env::temp_dir(), advertised);
                broker.own_database = Some(url);
                broker
            }
            DurableEngine::Sqlite => {
                let dir = std::env::temp_dir().join(format!("dualstream-broker-{id}"));
                std::fs::create_dir_all(&dir).expect("broker dir");
                // tansu 0.6 reads the SQLite path relative to its working directory.
                let mut broker = Self::start_with("sqlite://tansu.db".to_owned(), dir, advertised);
                broker.own_dir = true;
                broker
            }
        }
    }

    fn start_with(storage: String, dir: PathBuf, advertised: Option<u16>) -> Self {
        let tansu = std::env::var_os("DUALSTREAM_TANSU")
            .map(PathBuf::from)
            .expect("DUALSTREAM_TANSU is not set: run with `cargo xtask test`, which installs tansu");
        let (hold, child) =
            start_on_own_port("test broker", Self::START_TIMEOUT, |port| spawn_tansu(&tansu, port, &storage, &dir, advertised));
        let (own_dir, own_database) = (false, None);
        Self { port: hold.port, child: Some(child), tansu, storage, dir, own_dir, own_database, advertised, _hold: hold }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start again on the same port. In-memory storage: topics must be
    /// created again after a restart.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = spawn_tansu(&self.tansu, self.port, &self.storage, &self.dir, self.advertised);
        self.child = Some(restart_on("test broker", self.port, Self::START_TIMEOUT, child));
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
        if let Some(url) = self.own_database.take() {
            if let Err(e) = tansu_pg::drop_database(&url) {
                eprintln!("the test broker's database is left: {e}");
            }
        }
        if self.own_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_seen_with_its_owner() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(ports::listens(std::process::id(), port), "this process listens on {port}");
        drop(listener);
        assert!(!ports::listens(std::process::id(), port), "no longer after the drop");
    }

    /// Another process takes the port between the reservation and the
    /// server's bind: the server exits (address in use), and the fixture
    /// starts it on another port instead of taking the other process, which
    /// answers on the port, for its own server.
    #[test]
    fn a_server_that_cannot_listen_on_its_port_is_started_on_another() {
        let thief = std::sync::Mutex::new(None::<TcpListener>);
        let (hold, mut child) = start_on_own_port("test redis", Duration::from_secs(10), |port| {
            let mut thief = thief.lock().expect("lock");
            if thief.is_none() {
                *thief = Some(TcpListener::bind(("127.0.0.1", port)).expect("take the port first"));
            }
            spawn_redis(port)
        });
        let stolen = thief.lock().expect("lock").as_ref().and_then(|l| l.local_addr().ok()).expect("taken").port();
        assert_ne!(hold.port, stolen, "started on another port");
        assert!(ports::listens(child.id(), hold.port), "the server itself listens");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// While a fixture lives, its port stays reserved (no other fixture can
    /// reserve it), across a kill, and the server comes back on it.
    #[test]
    fn a_fixture_keeps_its_port_reserved_across_a_restart() {
        let mut redis = OwnedRedis::start();
        let port = redis.port;
        assert!(TcpListener::bind(("127.0.0.2", port)).is_err(), "reserved while up");
        redis.kill();
        assert!(TcpListener::bind(("127.0.0.2", port)).is_err(), "reserved while down");
        assert!((0..50).all(|_| PortHold::new().port != port), "never handed to another fixture");
        redis.restart();
        assert_eq!(redis.port, port);
        assert!(ports::listens(redis.child.as_ref().expect("running").id(), port));
        drop(redis);
        // Other fixtures (tests beside this one, a chaos run) reserve ports
        // too and may take this one the moment it is free: a hold that
        // comes and goes is theirs, one that never goes would be ours.
        let released = (0..100).any(|_| {
            TcpListener::bind(("127.0.0.2", port)).is_ok() || {
                std::thread::sleep(Duration::from_millis(20));
                false
            }
        });
        assert!(released, "released on drop");
    }
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
