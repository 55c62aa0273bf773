//! `cargo xtask chaos` and `cargo xtask soak`: the reliability promises
//! under mixed faults, checked afterwards by an independent reader.
//!
//! The run owns every process it harms: a durable tansu (PostgreSQL, or
//! SQLite with `--sqlite`) behind a TCP proxy that the broker advertises (so
//! the proxy can cut every client connection), and a redis-server behind a
//! delay proxy. Publishers submit through the batching engine from many
//! sources; catch-up joins come and go at random; an independent Redis
//! subscriber records the notifications. Faults come from a seeded schedule,
//! so a failure can be replayed from its seed. Clients of a gateway process
//! of the run's own (SSE and WebSocket, notify and full mode) disconnect
//! and resume with their tokens throughout, and the gateway's kill -9 and
//! restart is one of the faults.
//!
//! Afterwards a plain rdkafka consumer reads the topic and the checker
//! counts, in the spirit of Jepsen's Kafka checker: lost writes, duplicates,
//! order violations, failed-but-stored events (apart from those whose
//! outcome the caller was told is unknown), notifications whose position
//! does not hold their event, and gaps and duplicates in every join and in
//! every gateway client's channel across its reconnects. It exits 1 on any
//! anomaly.
//!
//! `--soak` runs a steady load with a Redis fault every minute and samples
//! RSS, the engine's queue, open descriptors and the Kafka and Redis
//! connections every 5 s; it fails when one of them keeps growing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Parser;
use dualstream::batch::{BatchConfig, BatchEngine, BatchError};
use dualstream::consumer::{CatchUp, Hub, HubConfig, JoinConfig, Replay, ReplayConfig};
use dualstream::kafka::{KafkaSink, KafkaSinkConfig, TopicRouting};
use dualstream::redis::{RedisNotifier, RedisNotifierConfig};
use dualstream::{DualPublisher, Event, PublishError, SinkError};
use dualstream_devstack::clients::create_topic;
use dualstream_devstack::proxy::DelayProxy;
use dualstream_devstack::{DurableEngine, OwnedBroker, OwnedGateway, OwnedRedis};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::task::JoinHandle;

use knobs::env_knob;

mod checker;
#[path = "../../knobs.rs"]
mod knobs;
mod clients;
mod faults;
mod gateway;
mod soak;
mod wire;

use checker::{Finding, Window};
use faults::{attribute_to_broker, print_faults, Fault, Services, Timeline};

/// mimalloc, counted: the soak samples the Rust heap's live bytes beside
/// the RSS, so a leak (live bytes grow) shows apart from an allocator that
/// keeps freed pages (RSS grows, live bytes do not).
#[global_allocator]
static GLOBAL: cap::Cap<mimalloc::MiMalloc> = cap::Cap::new(mimalloc::MiMalloc, usize::MAX);

const TOPIC: &str = "chaos";
const PARTITIONS: i32 = 3;
const PREFIX: &str = "chaos";

/// Publish through the batching engine under seeded faults, then check Kafka with an independent
/// reader. Exit status: 0 when no anomaly was found, 1 when one was, 2 on a usage error.
#[derive(Parser, Debug)]
#[command(name = "chaos")]
struct Cli {
    /// The fault schedule's seed (default: from the clock; printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// How long the load and the faults run, in minutes (fractions allowed).
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
    /// Events per second offered.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Sources the events are spread over.
    #[arg(long, default_value_t = 64)]
    sources: usize,
    /// Catch-up join clients connecting and disconnecting at random.
    #[arg(long, default_value_t = 12)]
    joins: usize,
    /// join_events clients (whole events, as the gateway's full mode) beside them.
    #[arg(long, default_value_t = 6)]
    event_joins: usize,
    /// Clients of a dualstream-gateway process of the run's own, SSE and WebSocket in notify and full
    /// mode in turn, each on 2 channels, disconnecting and resuming at random (0 runs no gateway). The
    /// gateway's kill -9 and restart is then one of the faults. The binary is DUALSTREAM_GATEWAY_BIN,
    /// or dualstream-gateway beside this one.
    #[arg(long, default_value_t = 8)]
    gateway_clients: usize,
    /// Steady load, a Redis fault every minute, and resource samples every 5 s; fails when a resource
    /// keeps growing (RSS, queue depth, descriptors, Kafka or Redis connections).
    #[arg(long)]
    soak: bool,
    /// The broker keeps its log in SQLite instead of PostgreSQL.
    #[arg(long)]
    sqlite: bool,
    /// Leave these fault kinds out (comma-separated: redis-kill, redis-hang, redis-slow,
    /// redis-debug-sleep, broker-hang, broker-kill, broker-cut, gateway-kill).
    #[arg(long, value_name = "KINDS")]
    without: Vec<String>,
}

/// A run's settings, checked.
#[derive(Debug)]
struct Args {
    seed: u64,
    minutes: f64,
    rate: u64,
    sources: usize,
    joins: usize,
    /// `join_events` clients, beside the `join` clients.
    event_joins: usize,
    /// Clients of the run's own gateway process (SSE and WebSocket, notify and full mode).
    gateway_clients: usize,
    soak: bool,
    sqlite: bool,
    /// The fault kinds left out of the schedule.
    without: Vec<Fault>,
}

/// Check the arguments' ranges and turn `--without` into fault kinds.
fn args(cli: Cli) -> Result<Args, String> {
    let mut without = Vec::new();
    for name in cli.without.iter().flat_map(|w| w.split(',')).filter(|n| !n.is_empty()) {
        let f = Fault::ALL.into_iter().find(|f| f.flag() == name).ok_or_else(|| {
            let known: Vec<&str> = Fault::ALL.iter().map(|f| f.flag()).collect();
            format!("--without: unknown fault kind {name:?}; known: {}", known.join(", "))
        })?;
        without.push(f);
    }
    let mut a = Args {
        seed: cli.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        }),
        minutes: cli.minutes,
        rate: cli.rate,
        sources: cli.sources,
        joins: cli.joins,
        event_joins: cli.event_joins,
        gateway_clients: cli.gateway_clients,
        soak: cli.soak,
        sqlite: cli.sqlite,
        without,
    };
    if !(a.minutes > 0.0 && a.minutes <= 24.0 * 60.0) {
        return Err(format!("--minutes: {} is outside (0, 1440]", a.minutes));
    }
    if a.rate == 0 || a.rate > 200_000 {
        return Err(format!("--rate: {} is outside 1..=200000", a.rate));
    }
    if a.gateway_clients > 64 {
        return Err(format!("--gateway-clients: {} is outside 0..=64", a.gateway_clients));
    }
    if a.soak || a.gateway_clients == 0 {
        // No gateway, so no gateway to kill.
        if !a.without.contains(&Fault::GatewayKill) {
            a.without.push(Fault::GatewayKill);
        }
        a.gateway_clients = 0;
    }
    if a.without.len() >= Fault::ALL.len() {
        return Err("--without: at least one fault kind must stay".to_owned());
    }
    if a.sources == 0 || a.sources > 100_000 {
        return Err(format!("--sources: {} is outside 1..=100000", a.sources));
    }
    Ok(a)
}

/// What the caller was told about one event.
#[derive(Clone, Debug)]
enum Told {
    /// Stored at this position.
    Acked { partition: i32, offset: i64 },
    /// Stored; the broker's acknowledgement did not say where (the receipt
    /// has no position).
    AckedSomewhere,
    /// Not stored: the error says it was never handed over or was refused.
    Failed(String),
    /// The outcome is unknown (timed out after hand-over, broker error, a
    /// worker died): stored or not, both are allowed.
    Unknown(String),
}

#[derive(Clone, Debug)]
struct Sent {
    source: usize,
    seq: u64,
    told: Told,
    /// When its `submit_many` call began and returned, in ms since the start.
    submitted_ms: u32,
    told_ms: u32,
}

fn classify(r: Result<dualstream::Receipt, BatchError>) -> Told {
    match r {
        Ok(receipt) => match receipt.position {
            Some(p) => Told::Acked { partition: p.partition, offset: p.offset },
            None => Told::AckedSomewhere,
        },
        Err(e) => {
            let definite = match &e {
                BatchError::QueueFull { .. }
                | BatchError::TooLarge { .. }
                | BatchError::Closed { .. }
                | BatchError::LaneDead { .. } => true,
                BatchError::Publish(PublishError::Durable(d)) => matches!(
                    d.error,
                    SinkError::QueueFull { .. }
                        | SinkError::Rejected { .. }
                        | SinkError::RecordTooLarge { .. }
                        | SinkError::Closed
                        | SinkError::EarlierFailed { .. }
                        | SinkError::Unavailable { .. }
                ),
                _ => false,
            };
            if definite {
                Told::Failed(short_error(&e))
            } else {
                Told::Unknown(short_error(&e))
            }
        }
    }
}

/// The error's kind and reason, without the event's id, so the run's table
/// counts reasons rather than events.
fn short_error(e: &BatchError) -> String {
    let s = match e {
        BatchError::Publish(PublishError::Durable(d)) => d.error.to_string(),
        other => other.to_string(),
    };
    s.chars().take(100).collect()
}

/// What the soak keeps instead of a log.
#[derive(Default)]
struct Counts {
    acked: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    unknown: std::sync::atomic::AtomicU64,
    notifications: std::sync::atomic::AtomicU64,
}

impl Counts {
    fn add(&self, told: &Told) {
        let c = match told {
            Told::Acked { .. } | Told::AckedSomewhere => &self.acked,
            Told::Failed(_) => &self.failed,
            Told::Unknown(_) => &self.unknown,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// One line per anomalous write: its receipt, partition and sequence, when
/// it was submitted and answered, and the faults around that.
fn print_findings(findings: &[Finding], sent: &[Sent], ids: &[u128], faults: &[(Fault, Duration, Duration)]) {
    if findings.is_empty() {
        return;
    }
    let mut by: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for f in findings {
        let receipt = f.sent.map_or("not submitted by this run", |i| match sent[i].told {
            Told::Acked { .. } => "acknowledged at a position",
            Told::AckedSomewhere => "acknowledged without a position",
            Told::Failed(_) => "failed (told: not stored)",
            Told::Unknown(_) => "outcome unknown",
        });
        *by.entry((f.kind, receipt)).or_default() += 1;
    }
    println!("\n| anomaly | receipt the caller got | count |\n|---|---|---|");
    for ((kind, receipt), n) in &by {
        println!("| {kind} | {receipt} | {n} |");
    }
    const SHOWN: usize = 60;
    println!("\nanomalous writes (the first {SHOWN}; times in ms since the start; faults within 2 s before the submit to 1 s after the answer):");
    for f in findings.iter().take(SHOWN) {
        let Some(i) = f.sent else {
            println!("  {}: stored at {:?}, not an event this run submitted", f.kind, f.stored_at);
            continue;
        };
        let s = &sent[i];
        let (from, to) = (
            Duration::from_millis(s.submitted_ms.saturating_sub(2_000).into()),
            Duration::from_millis(u64::from(s.told_ms) + 1_000),
        );
        let around: Vec<String> = faults
            .iter()
            .filter(|(_, a, b)| *a <= to && *b >= from)
            .map(|(k, a, b)| format!("{} {}..{}", k.name(), a.as_millis(), b.as_millis()))
            .collect();
        println!(
            "  {}: {} s{} seq {} · told {:?} · submitted {} answered {} · stored at {:?} · faults: {}",
            f.kind,
            wire::uuid_text(ids[i]),
            s.source,
            s.seq,
            s.told,
            s.submitted_ms,
            s.told_ms,
            f.stored_at,
            if around.is_empty() { "none".to_owned() } else { around.join(", ") }
        );
    }
}

fn rss_kib() -> u64 {
    status_field("VmRSS:")
}

/// A number from this process's `/proc/self/status` line `name`.
fn status_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The Rust heap's live bytes, in KiB (every Rust allocation goes through
/// the counted mimalloc).
fn rust_heap_kib() -> u64 {
    (GLOBAL.allocated() / 1_024) as u64
}

/// glibc's heap in use, in KiB: librdkafka's allocations (C code does not go
/// through Rust's global allocator).
#[allow(unsafe_code)]
fn c_heap_kib() -> u64 {
    // SAFETY: mallinfo2 takes no arguments and only reads the allocator's
    // counters (glibc 2.33 and later).
    let m = unsafe { libc::mallinfo2() };
    ((m.uordblks + m.hblkhd) / 1_024) as u64
}

/// The process's threads.
fn threads() -> u64 {
    status_field("Threads:")
}

/// Open descriptors, and this process's TCP connections to each port.
fn fds_and_connections(ports: &[u16]) -> (u64, Vec<u64>) {
    let mut inodes = HashSet::new();
    let mut fds = 0;
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for fd in dir.flatten() {
            fds += 1;
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().into_owned();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut counts = vec![0; ports.len()];
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else {
                continue;
            };
            if *state != "01" || !inodes.contains(*inode) {
                continue;
            }
            let port = remote.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            for (i, want) in ports.iter().enumerate() {
                if port == Some(*want) {
                    counts[i] += 1;
                }
            }
        }
    }
    (fds, counts)
}

/// The run's addresses: the broker and Redis through their proxies, and
/// Redis directly (the witness's).
struct Net {
    brokers: String,
    redis_url: String,
    direct_redis: String,
}

/// The run's own services: the broker behind a proxy it advertises, Redis
/// behind a delay proxy, the gateway when it has clients; the topic.
async fn start_services(a: &Args) -> (Arc<Services>, Net) {
    let kafka_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
    let advertised = kafka_listener.local_addr().expect("addr").port();
    let engine = if a.sqlite { DurableEngine::Sqlite } else { DurableEngine::Postgres };
    let broker = tokio::task::spawn_blocking(move || OwnedBroker::start_durable_advertised(engine, Some(advertised)))
        .await
        .expect("broker");
    let broker_addr = format!("127.0.0.1:{}", broker.port).parse().expect("addr");
    let kafka_proxy = DelayProxy::start_on(kafka_listener, broker_addr, Duration::ZERO).expect("kafka proxy");
    let redis = tokio::task::spawn_blocking(OwnedRedis::start).await.expect("redis");
    let redis_addr = format!("127.0.0.1:{}", redis.port).parse().expect("addr");
    let redis_proxy = DelayProxy::start(redis_addr, Duration::ZERO).await.expect("redis proxy");
    let brokers = kafka_proxy.addr().to_string();
    let redis_url = redis_proxy.redis_url();
    let direct_redis = redis.url();
    create_topic(&brokers, TOPIC, PARTITIONS).await;
    let gateway = if a.gateway_clients > 0 {
        let (b, r) = (brokers.clone(), redis_url.clone());
        match tokio::task::spawn_blocking(move || start_gateway(&b, &r)).await.expect("gateway") {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("chaos: {e}");
                std::process::exit(2);
            }
        }
    } else {
        None
    };
    let services = Arc::new(Services {
        broker: Mutex::new(broker),
        redis: Mutex::new(redis),
        redis_proxy,
        kafka_proxy,
        gateway: Mutex::new(gateway),
    });

    (services, Net { brokers, redis_url, direct_redis })
}

/// The engine under test: the Kafka sink and the Redis notifier, through the proxies.
fn start_engine(net: &Net) -> Arc<BatchEngine> {
    let (brokers, redis_url) = (&net.brokers, &net.redis_url);
    let sink = KafkaSink::new(KafkaSinkConfig {
        bootstrap_servers: brokers.clone(),
        topic: TopicRouting::Single { topic: TOPIC.into() },
        message_timeout_ms: 15_000,
        ..KafkaSinkConfig::default()
    })
    .expect("sink");
    let notifier = RedisNotifier::new(RedisNotifierConfig {
        url: redis_url.clone(),
        channel_prefix: PREFIX.into(),
        timeout_ms: 200,
        ..RedisNotifierConfig::default()
    })
    .expect("notifier");
    let publisher =
        DualPublisher::builder().durable(Arc::new(sink)).notifier(Arc::new(notifier)).build().expect("publisher");

    Arc::new(BatchEngine::new(publisher, BatchConfig::default()).expect("engine"))
}

/// The joins' catch-up, reading uncommitted.
fn start_catchup(net: &Net) -> CatchUp {
    let (brokers, redis_url) = (&net.brokers, &net.redis_url);
    let reader_options: BTreeMap<String, String> =
        [("isolation.level".to_owned(), "read_uncommitted".to_owned())].into_iter().collect();
    // 30 s, not the default 10 s, before a read that gets no record is an error: on tansu with
    // PostgreSQL on 2 cores, a restarted gateway's catch-up has held every reader's fetches for
    // about 10 s (docs/reliability.md, "The CI profile"). A join that waits longer still fails the run.
    let replay = Replay::new(ReplayConfig {
        bootstrap_servers: brokers.clone(),
        topic: TopicRouting::Single { topic: TOPIC.into() },
        librdkafka_options: reader_options,
        timeout_ms: 30_000,
        ..ReplayConfig::default()
    })
    .expect("replay");
    let hub = Hub::new(HubConfig {
        url: redis_url.clone(),
        channel_prefix: PREFIX.into(),
        timeout_ms: 500,
        ..HubConfig::default()
    })
    .expect("hub");

    let join = JoinConfig { idle_check_ms: 300, backfill_records_per_sec: backfill_rate(), ..JoinConfig::default() };
    CatchUp::new(replay, hub, join).expect("joins")
}

/// What the publishers, the witness and the joins share.
#[derive(Clone)]
struct Load {
    stop: Arc<AtomicBool>,
    started: Instant,
    timeline: Arc<Timeline>,
    sent: Arc<Mutex<Vec<Sent>>>,
    sent_ids: Arc<Mutex<Vec<u128>>>,
    outcomes: Arc<soak::Outcomes>,
    /// The soak keeps no per-event log (its RSS would be the log's): counts
    /// only, and the checker compares counts with the topic's watermarks.
    retain: bool,
    counts: Arc<Counts>,
}

/// Publisher `t` of `tasks`: it owns a share of the sources and makes one
/// submit_many per tick, each awaited (so a source's events go in order).
fn publisher(t: usize, tasks: usize, a: &Args, engine: Arc<BatchEngine>, load: Load) -> JoinHandle<()> {
    let Load { stop, started, timeline, sent, sent_ids, outcomes, retain, counts } = load;
    let mine: Vec<usize> = (0..a.sources).filter(|s| s % tasks == t).collect();
    let per_sec = a.rate as f64 / tasks as f64;
    tokio::spawn(async move {
        let mut seqs = vec![0u64; mine.len()];
        // Open loop: what is owed follows the clock, not the calls, so a
        // slow call is followed by a larger one (up to 2 s of events)
        // rather than by a lower rate.
        let mut submitted = 0f64;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut i = 0usize;
        let begun = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let due = per_sec * begun.elapsed().as_secs_f64();
            submitted = submitted.max(due - 2.0 * per_sec);
            let n = (due - submitted).floor().max(0.0) as usize;
            submitted += n as f64;
            let mut events = Vec::with_capacity(n);
            let mut meta = Vec::with_capacity(n);
            for _ in 0..n {
                let k = i % mine.len();
                i += 1;
                let (source, seq) = (mine[k], seqs[k]);
                seqs[k] += 1;
                let payload = serde_json::json!({"seq": seq, "pad": "x".repeat(100)}).to_string();
                let e = Event::builder(checker::EVENT_TYPE, checker::SOURCE_TYPE, format!("s{source}"))
                    .payload(payload)
                    .header(checker::SEQ_HEADER, seq.to_string())
                    .build()
                    .expect("valid");
                let id = wire::parse_uuid7(&e.id().to_string()).expect("dualstream's event ids are UUIDv7 text");
                meta.push((source, seq, id));
                events.push(e);
            }
            if events.is_empty() {
                continue;
            }
            let submitted_ms = started.elapsed().as_millis() as u32;
            let results = engine.submit_many(events).await;
            let told_ms = started.elapsed().as_millis() as u32;
            let mut acked = 0;
            let mut s = sent.lock().unwrap_or_else(PoisonError::into_inner);
            let mut ids = sent_ids.lock().unwrap_or_else(PoisonError::into_inner);
            for ((source, seq, id), r) in meta.into_iter().zip(results) {
                let told = classify(r);
                acked += u64::from(matches!(told, Told::Acked { .. } | Told::AckedSomewhere));
                if retain {
                    s.push(Sent { source, seq, told, submitted_ms, told_ms });
                    ids.push(id);
                } else {
                    counts.add(&told);
                    outcomes.record(source, seq, &told);
                }
            }
            timeline.add(started.elapsed(), acked);
        }
    })
}

/// `join` clients, and `join_events` clients beside them (the gateway's full events).
fn start_joiners(a: &Args, catchup: &CatchUp, load: &Load) -> Vec<JoinHandle<Vec<checker::JoinLog>>> {
    let (sent, stop, started) = (&load.sent, &load.stop, load.started);
    let clients = if a.soak { 0 } else { a.joins + a.event_joins };
    (0..clients)
        .map(|j| {
            let (sent, stop) = (Arc::clone(sent), Arc::clone(stop));
            let events = j >= a.joins;
            tokio::spawn(clients::join_client(
                catchup.clone(),
                a.sources,
                sent,
                stop,
                a.seed ^ (j as u64 + 1),
                events,
                started,
            ))
        })
        .collect()
}

/// The gateway's clients, their stop flag, and where their catch-up targets go.
struct GatewayClients {
    stop: Arc<AtomicBool>,
    targets: tokio::sync::watch::Sender<Option<Arc<HashMap<usize, i64>>>>,
    handles: Vec<JoinHandle<gateway::GatewayLog>>,
    /// Prints the gateway's shared-reader counters every 30 s.
    monitor: Option<JoinHandle<()>>,
}

/// The gateway's shared Kafka readers' counters, from `/readyz` with an admin token, printed as one
/// line (how its clients' joins were served: a slow catch-up shows here).
async fn print_gateway_history(http: &reqwest::Client, base: &str, started: Instant) {
    let auth = gateway_auth();
    let mut claims = auth.claims(Some("chaos-admin".into()), Vec::new(), Vec::new(), 3_600);
    claims.admin = true;
    let jwt = auth.mint(&claims).expect("token");
    let at = started.elapsed().as_secs();
    let answer = http.get(format!("{base}/readyz")).bearer_auth(jwt).timeout(Duration::from_secs(5)).send().await;
    match answer {
        Ok(r) => match r.json::<serde_json::Value>().await {
            Ok(v) => println!("gateway history at {at} s: {}", v["history"]),
            Err(e) => println!("gateway history at {at} s: unreadable ({e})"),
        },
        Err(e) => println!("gateway history at {at} s: no answer ({e})"),
    }
}

/// Gateway clients: SSE and WebSocket, notify and full mode, in turn.
fn start_gateway_clients(a: &Args, services: &Services, started: Instant) -> GatewayClients {
    let gateway_stop = Arc::new(AtomicBool::new(false));
    let (targets_tx, targets_rx) = tokio::sync::watch::channel(None);
    let gateway_base = services.gateway.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(OwnedGateway::base);
    let mut gateway_rng = StdRng::seed_from_u64(a.seed ^ 0x6761_7465);
    let handles: Vec<_> = gateway_base
        .iter()
        .flat_map(|base| (0..a.gateway_clients).map(move |c| (base.clone(), c)))
        .map(|(base, c)| {
            let spec = gateway::Spec {
                client: c,
                transport: if c % 2 == 0 { gateway::Transport::Sse } else { gateway::Transport::Ws },
                full: c % 4 >= 2,
                sources: (0..2)
                    .map(|_| gateway_rng.random_range(0..a.sources))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect(),
            };
            let jwt = gateway_token(c);
            tokio::spawn(gateway::client(
                base,
                jwt,
                spec,
                Arc::clone(&gateway_stop),
                targets_rx.clone(),
                a.seed ^ (0x1000 + c as u64),
                started,
            ))
        })
        .collect();

    let monitor = gateway_base.map(|base| {
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                print_gateway_history(&http, &base, started).await;
            }
        })
    });
    GatewayClients { stop: gateway_stop, targets: targets_tx, handles, monitor }
}

/// What the run's tasks left when they ended.
struct Ended {
    /// Harness tasks that panicked: their logs are missing.
    harness_panics: usize,
    join_logs: Vec<checker::JoinLog>,
    gateway_logs: Vec<gateway::GatewayLog>,
    witnessed: clients::Witnessed,
    elapsed: Duration,
}

/// Stop the load, shut the engine down, send the gateway's clients their
/// catch-up targets (each source's last acknowledged offset), and collect
/// every task's log.
async fn wind_down(
    load: &Load,
    engine: &BatchEngine,
    publishers: Vec<JoinHandle<()>>,
    joiners: Vec<JoinHandle<Vec<checker::JoinLog>>>,
    gw: GatewayClients,
    witness_task: JoinHandle<clients::Witnessed>,
) -> Ended {
    let (stop, sent, started) = (&load.stop, &load.sent, load.started);
    let GatewayClients { stop: gateway_stop, targets: targets_tx, handles: gateway_clients, monitor } = gw;
    stop.store(true, Ordering::Relaxed);
    // A harness task that panicked took its log with it: the run fails.
    let mut harness_panics = 0;
    for p in publishers {
        harness_panics += usize::from(p.await.is_err());
    }
    let mut join_logs = Vec::new();
    for j in joiners {
        match j.await {
            Ok(logs) => join_logs.extend(logs),
            Err(_) => harness_panics += 1,
        }
    }
    engine.shutdown().await;
    // Let the last notifications arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The gateway's clients catch up: each source's last acknowledged offset.
    let mut last_acked: HashMap<usize, i64> = HashMap::new();
    for s in sent.lock().unwrap_or_else(PoisonError::into_inner).iter() {
        if let Told::Acked { offset, .. } = s.told {
            let o = last_acked.entry(s.source).or_insert(offset);
            *o = (*o).max(offset);
        }
    }
    targets_tx.send_replace(Some(Arc::new(last_acked)));
    gateway_stop.store(true, Ordering::Relaxed);
    let mut gateway_logs = Vec::new();
    for g in gateway_clients {
        match g.await {
            Ok(log) => gateway_logs.push(log),
            Err(_) => harness_panics += 1,
        }
    }
    if let Some(m) = monitor {
        m.abort();
    }
    let witnessed = witness_task.await.unwrap_or_else(|_| {
        harness_panics += 1;
        clients::Witnessed::default()
    });
    let elapsed = started.elapsed();
    Ended { harness_panics, join_logs, gateway_logs, witnessed, elapsed }
}
/// Everything the run's report is made of.
struct Report {
    mode: &'static str,
    faults: faults::Applied,
    samples: Vec<faults::Sample>,
    sent: Vec<Sent>,
    ids: Vec<u128>,
    ended: Ended,
    checked: Checked,
    stored_len: usize,
    totals: Totals,
    unknown_calm: u64,
    counts: Arc<Counts>,
    timeline: Arc<Timeline>,
    retain: bool,
}

impl Report {
    fn join_deliveries(&self) -> usize {
        self.ended.join_logs.iter().map(|j| j.got.len()).sum()
    }

    fn gateway_items(&self) -> usize {
        self.ended.gateway_logs.iter().flat_map(|g| &g.channels).map(|c| c.got.len()).sum()
    }

    /// The faults, and the table of events, notifications and joins.
    fn print_events(&self, a: &Args) {
        let Report { mode, faults, ended, totals, counts, timeline, checked, .. } = self;
        let Ended { join_logs, witnessed, .. } = ended;
        let (unknown_stored, join_errors_in_outage) = (checked.unknown_stored, checked.join_errors_in_outage);
        let (elapsed, unknown_calm, stored_len) = (ended.elapsed, self.unknown_calm, self.stored_len);
        println!(
            "\n## {mode} run: seed {}, {:.1} min, offered {} events/s",
            a.seed,
            elapsed.as_secs_f64() / 60.0,
            a.rate
        );
        print_faults(faults, timeline, elapsed);
        let join_deliveries: usize = join_logs.iter().map(|j| j.got.len()).sum();
        println!("\n| events | count |\n|---|---|");
        println!("| submitted | {} |", totals.submitted());
        println!("| acknowledged | {} |", totals.acked);
        println!("| acknowledged without a usable offset (receipt without position) | {} |", totals.somewhere);
        println!("| failed (told: not stored) | {} |", totals.failed);
        println!("| outcome unknown (told so) | {} |", totals.unknown);
        println!("| outcome unknown, found stored | {unknown_stored} |");
        println!(
            "| outcome unknown, not stored | {} |",
            totals.unknown as u64 - unknown_stored.min(totals.unknown as u64)
        );
        println!("| outcome unknown or positionless with no broker fault around | {unknown_calm} |");
        println!("| records read back | {stored_len} |");
        println!(
            "| notifications seen | {} ({} without a position, {} malformed) |",
            counts.notifications.load(Ordering::Relaxed),
            witnessed.notes.iter().filter(|n| n.position.is_none()).count(),
            witnessed.malformed
        );
        let events_joins = join_logs.iter().filter(|j| j.events).count();
        println!("| join connections | {} ({} of them join_events) |", join_logs.len(), events_joins);
        println!("| join errors inside a broker outage (counted apart) | {join_errors_in_outage} |");
        println!("| join deliveries | {join_deliveries} |");
    }

    /// The gateway clients' rows, when the run had a gateway.
    fn print_gateway(&self) {
        let (gateway_logs, faults) = (&self.ended.gateway_logs, &self.faults);
        let gateway_errors_in_outage = self.checked.gateway_errors_in_outage;
        let gateway_items: usize = gateway_logs.iter().flat_map(|g| &g.channels).map(|c| c.got.len()).sum();
        if !gateway_logs.is_empty() {
            println!(
                "| gateway clients, connections | {}, {} |",
                gateway_logs.len(),
                gateway_logs.iter().map(|g| g.connections).sum::<u32>()
            );
            println!("| gateway items delivered | {gateway_items} |");
            let mut waits: Vec<u32> = gateway_logs
                .iter()
                .flat_map(|g| &g.sessions)
                .filter_map(|s| s.first_item_ms.map(|f| f - s.began_ms))
                .collect();
            waits.sort_unstable();
            let quantile = |q: f64| waits.get(((waits.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
            println!(
                "| gateway connect to first item, ms: p50 / p90 / max (connections with an item: {} of {}) | {} / {} / {} |",
                waits.len(),
                gateway_logs.iter().map(|g| g.sessions.len()).sum::<usize>(),
                quantile(0.5),
                quantile(0.9),
                quantile(1.0)
            );
            let catch_up: Vec<String> = gateway_logs
                .iter()
                .map(|g| {
                    g.caught_up_ms.map_or("not within the bound".to_owned(), |t| format!("{} ms", t - g.final_began_ms))
                })
                .collect();
            println!(
                "| gateway catch-up after the run (every acknowledged event of the client's channels delivered; bound {} s) | {} |",
                gateway::CATCH_UP_BOUND.as_secs(),
                catch_up.join(", ")
            );
            println!("| gateway client errors inside a broker outage or gateway restart (counted apart) | {gateway_errors_in_outage} |");
            println!(
                "| gateway connections closed as a slow client (resumed; counted apart) | {} |",
                gateway_logs.iter().map(|g| g.slow_closes).sum::<u32>()
            );
            // What the clients' errors were, by the kind of fault around them.
            let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
            for (at, e) in gateway_logs.iter().flat_map(|g| &g.errors) {
                let around = faults
                    .iter()
                    .filter(|(_, from, to)| from.as_millis() as u32 <= *at && *at <= to.as_millis() as u32 + 20_000)
                    .map(|(f, ..)| f.flag())
                    .next_back()
                    .unwrap_or("no fault");
                let e: String = e.split(" (").next().unwrap_or(e).chars().take(70).collect();
                *reasons.entry(format!("gateway client error after {around}: {e}")).or_default() += 1;
            }
            for (r, n) in reasons.iter().take(12) {
                println!("| {r} | {n} |");
            }
        }
    }

    /// How far behind each gateway client was, once a minute: the acknowledged events of its
    /// channels it had not yet received, and how long ago the oldest of them was acknowledged. A
    /// backlog that grows from minute to minute shows where a catch-up falls behind.
    fn print_gateway_lag(&self) {
        let logs = &self.ended.gateway_logs;
        if logs.is_empty() {
            return;
        }
        // Each source's acknowledged events: (when acknowledged, offset), by acknowledgement.
        let mut acked: HashMap<usize, Vec<(u32, i64)>> = HashMap::new();
        for s in &self.sent {
            if let Told::Acked { offset, .. } = s.told {
                acked.entry(s.source).or_default().push((s.told_ms, offset));
            }
        }
        for v in acked.values_mut() {
            v.sort_unstable();
        }
        let end_ms = logs.iter().map(|g| g.final_began_ms).max().unwrap_or(0);
        println!("\n| gateway clients behind, at minute: events owed / oldest owed, s | {} |", {
            let header: Vec<String> = logs.iter().map(|g| format!("client {}", g.client)).collect();
            header.join(" | ")
        });
        for minute in 1..=end_ms.div_ceil(60_000) {
            let t = (minute * 60_000).min(end_ms);
            let cells: Vec<String> = logs
                .iter()
                .map(|g| {
                    let (mut owed, mut oldest) = (0usize, None::<u32>);
                    for c in g.channels.iter().filter(|c| c.ready_ms.is_some_and(|r| r <= t)) {
                        let delivered = c.got_ms.partition_point(|&ms| ms <= t);
                        let last = c.got[..delivered].last().map(|g| g.0).or(c.start.map(|s| s - 1)).unwrap_or(-1);
                        let events = acked.get(&c.source).map(Vec::as_slice).unwrap_or_default();
                        for &(ms, offset) in events.iter().take_while(|(ms, _)| *ms <= t) {
                            if offset > last {
                                owed += 1;
                                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
                            }
                        }
                    }
                    match oldest {
                        Some(o) => format!("{owed} / {:.0}", f64::from(t - o) / 1000.0),
                        None => "0".to_owned(),
                    }
                })
                .collect();
            println!("| {:.1} | {} |", f64::from(t) / 60_000.0, cells.join(" | "));
        }
    }

    /// Why events failed or went unknown, the anomalies, and the lines that show them.
    fn print_reasons(&self) {
        let Report { sent, checked, ended, .. } = self;
        let Checked { anomalies, malformed_lines, join_lines, gateway_lines, .. } = checked;
        let (witnessed, retain) = (&ended.witnessed, self.retain);
        let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
        for s in sent {
            match &s.told {
                Told::Failed(r) => *reasons.entry(format!("failed: {r}")).or_default() += 1,
                Told::Unknown(r) => *reasons.entry(format!("unknown: {r}")).or_default() += 1,
                Told::Acked { .. } | Told::AckedSomewhere => {}
            }
        }
        for (r, n) in reasons.iter().take(8) {
            println!("| {r} | {n} |");
        }
        print_anomalies(anomalies, retain);
        for line in malformed_lines
            .iter()
            .chain(&witnessed.examples.iter().map(|e| format!("malformed notification: {e}")).collect::<Vec<_>>())
        {
            println!("  {line}");
        }
        for line in join_lines.iter().chain(gateway_lines) {
            println!("  {line}");
        }
    }

    /// The findings, and whether the run failed; the duplicates and order
    /// violations proven the broker's.
    fn verdict(&self, a: &Args, services: &Services) -> (bool, (u64, u64)) {
        let Report { faults, sent, ids, samples, totals, checked, ended, .. } = self;
        let Checked { anomalies, findings, .. } = checked;
        let (retain, unknown_calm, harness_panics) = (self.retain, self.unknown_calm, ended.harness_panics);
        let (gateway_logs, join_deliveries) = (&ended.gateway_logs, self.join_deliveries());
        print_findings(findings, sent, ids, faults);
        let (broker_duplicates, broker_order) = if a.sqlite || findings.is_empty() {
            (0, 0)
        } else {
            attribute_to_broker(&services.broker.lock().unwrap_or_else(PoisonError::into_inner), findings)
        };
        if broker_duplicates + broker_order > 0 {
            println!(
                "\nproven the broker's: {broker_duplicates} of {} duplicates and {broker_order} of {} order violations \
                 (one produce batch committed twice by two broker transactions: the broker's idempotence let a retried \
                 batch through; see docs/reliability.md). The run still fails on them.",
                anomalies.duplicates, anomalies.order
            );
        }

        let mut failed_run = anomalies.total() > 0;
        if harness_panics > 0 {
            println!("\n{harness_panics} harness tasks panicked: their logs are missing, so the run proves nothing");
            failed_run = true;
        }
        failed_run |= totals.out_of_bounds(unknown_calm);
        if retain && a.joins + a.event_joins > 0 && join_deliveries == 0 {
            println!("\nno join delivered anything: the join check proves nothing");
            failed_run = true;
        }
        if retain
            && !gateway_logs.is_empty()
            && gateway_logs.iter().any(|g| g.channels.iter().all(|c| c.got.is_empty()))
        {
            println!("\na gateway client received nothing: the gateway check proves nothing for it");
            failed_run = true;
        }
        if a.soak {
            failed_run |= print_soak(samples);
        }
        (failed_run, (broker_duplicates, broker_order))
    }

    /// One line for `cargo xtask chaos --seeds N` to collect.
    fn print_summary(&self, a: &Args, (broker_duplicates, broker_order): (u64, u64), failed_run: bool) {
        let Report { faults, totals, checked, ended, .. } = self;
        let Checked { anomalies, unknown_stored, join_errors_in_outage, gateway_errors_in_outage, .. } = checked;
        let Ended { join_logs, gateway_logs, elapsed, .. } = ended;
        let (unknown_calm, join_deliveries, gateway_items) =
            (self.unknown_calm, self.join_deliveries(), self.gateway_items());
        println!(
            "\nsummary: seed={} minutes={:.1} faults={} submitted={} acked={} failed={} unknown={} \
             unknown_stored={unknown_stored} positionless={} lost={} duplicates={} order={} failed_but_stored={} \
             wrong_position={} bad_notifications={} join_gaps={} join_duplicates={} broker_duplicates={broker_duplicates} \
             broker_order={broker_order} unknown_calm={unknown_calm} malformed_records={} malformed_notifications={} \
             join_order={} join_wrong={} join_foreign={} join_errors={} join_errors_in_outage={join_errors_in_outage} \
             joins={} join_deliveries={join_deliveries} gateway_gaps={} gateway_duplicates={} gateway_order={} \
             gateway_wrong={} gateway_errors={} gateway_resets={} gateway_errors_in_outage={gateway_errors_in_outage} \
             gateway_items={gateway_items} gateway_catch_up_max_ms={} result={}",
            a.seed,
            elapsed.as_secs_f64() / 60.0,
            faults.len(),
            totals.submitted(),
            totals.acked,
            totals.failed,
            totals.unknown,
            totals.somewhere,
            anomalies.lost,
            anomalies.duplicates,
            anomalies.order,
            anomalies.failed_but_stored,
            anomalies.wrong_position,
            anomalies.bad_notifications,
            anomalies.join_gaps,
            anomalies.join_duplicates,
            anomalies.malformed_records,
            anomalies.malformed_notifications,
            anomalies.join_order,
            anomalies.join_wrong,
            anomalies.join_foreign,
            anomalies.join_errors,
            join_logs.len(),
            anomalies.gateway_gaps,
            anomalies.gateway_duplicates,
            anomalies.gateway_order,
            anomalies.gateway_wrong,
            anomalies.gateway_errors,
            anomalies.gateway_resets,
            gateway_logs
                .iter()
                .map(|g| g.caught_up_ms.map_or(u32::MAX, |t| t - g.final_began_ms))
                .max()
                .map_or("-".to_owned(), |m| if m == u32::MAX { "unbounded".to_owned() } else { m.to_string() }),
            if failed_run { "FAILED" } else { "ok" }
        );
    }
}

/// The faults make librdkafka and the notifier log every broken
/// connection; the run's own report is what matters. RUST_LOG overrides.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,rdkafka=off,librdkafka=off"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let a = match args(Cli::parse()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chaos: {e} (see --help)");
            std::process::exit(2);
        }
    };
    init_logging();
    let mode = if a.soak { "soak" } else { "chaos" };
    println!(
        "{mode}: seed {} · {} min · {} events/s · {} sources · {} joins + {} join_events · {} gateway clients · broker log in {} · faults left out: {:?}",
        a.seed,
        a.minutes,
        a.rate,
        a.sources,
        a.joins,
        a.event_joins,
        a.gateway_clients,
        if a.sqlite { "SQLite" } else { "PostgreSQL" },
        a.without.iter().map(|f| f.flag()).collect::<Vec<_>>()
    );

    let (services, net) = start_services(&a).await;
    let engine = start_engine(&net);
    let catchup = start_catchup(&net);
    let load = Load {
        stop: Arc::new(AtomicBool::new(false)),
        started: Instant::now(),
        timeline: Arc::default(),
        sent: Arc::default(),
        sent_ids: Arc::default(),
        outcomes: Arc::default(),
        retain: !a.soak,
        counts: Arc::default(),
    };
    let run_began_ms = checker::now_ms();
    let publishers: Vec<_> = (0..8).map(|t| publisher(t, 8, &a, Arc::clone(&engine), load.clone())).collect();
    let (stop, counts) = (Arc::clone(&load.stop), Arc::clone(&load.counts));
    let witness_task = tokio::spawn(clients::witness(net.direct_redis.clone(), stop, load.retain, counts));
    let joiners = start_joiners(&a, &catchup, &load);
    let gateway_clients = start_gateway_clients(&a, &services, load.started);
    let (faults, samples) = faults::schedule(&a, &services, &engine, load.started).await;
    let ended = wind_down(&load, &engine, publishers, joiners, gateway_clients, witness_task).await;
    let windows: Vec<Window> = faults
        .iter()
        .map(|(f, from, to)| Window {
            from: from.as_millis() as u32,
            to: to.as_millis() as u32,
            broker: f.is_broker(),
            gateway: *f == Fault::GatewayKill,
        })
        .collect();

    // The checker: an independent read of the whole topic.
    let sent = std::mem::take(&mut *load.sent.lock().unwrap_or_else(PoisonError::into_inner));
    let ids = std::mem::take(&mut *load.sent_ids.lock().unwrap_or_else(PoisonError::into_inner));
    let (mut checked, stored_len) = if load.retain {
        let (witnessed, joins, gateways) = (&ended.witnessed, &ended.join_logs, &ended.gateway_logs);
        check_run(&net.brokers, run_began_ms, &sent, &ids, witnessed, joins, gateways, &windows).await
    } else {
        check_soak(&net.brokers, run_began_ms, &load.outcomes, &load.counts).await
    };
    checked.anomalies.malformed_notifications += ended.witnessed.malformed;
    let totals = Totals::of(&sent, &load.counts, load.retain);
    let unknown_calm = if load.retain { outcomes_outside_faults(&sent, &windows) } else { 0 };
    let (counts, timeline, retain) = (Arc::clone(&load.counts), Arc::clone(&load.timeline), load.retain);
    let report = Report {
        mode,
        faults,
        samples,
        sent,
        ids,
        ended,
        checked,
        stored_len,
        totals,
        unknown_calm,
        counts,
        timeline,
        retain,
    };
    report.print_events(&a);
    report.print_gateway();
    report.print_gateway_lag();
    report.print_reasons();
    let (failed_run, broker) = report.verdict(&a, &services);
    report.print_summary(&a, broker, failed_run);
    println!("\nresult: {}", if failed_run { "FAILED" } else { "ok" });
    // exit() runs no destructors: stop the run's broker and Redis (and drop
    // the broker's database) first.
    drop(services);
    std::process::exit(i32::from(failed_run));
}

/// Records a second the backfill readers of the harness's joins and of the gateway may read, each:
/// tansu on PostgreSQL reads about 10,000 records a second in all, and unbounded reads from far back
/// held the tail readers' fetches past their timeout (docs/operations.md).
/// `DUALSTREAM_CHAOS_BACKFILL_RATE` sets another (0: unbounded), for runs that measure it.
const TANSU_BACKFILL_RATE: u32 = 3_000;

fn backfill_rate() -> u32 {
    env_knob("DUALSTREAM_CHAOS_BACKFILL_RATE").unwrap_or(TANSU_BACKFILL_RATE)
}

/// The secret the run's gateway signs with.
const GATEWAY_SECRET: &str = "chaos-gateway-secret-of-at-least-32-bytes";

/// The gateway's tail cache, records per partition (`join.cache_records`): 65,536, about 100 s of
/// one of the run's partitions, or `DUALSTREAM_CHAOS_CACHE_RECORDS` for runs that measure another.
/// Its clients come back from a gateway kill or a burst of broker faults tens of seconds behind;
/// with the default 4,096 (about 6 s here) those resumes went to the budgeted backfill readers,
/// which on tansu cannot outrun the writes, and the clients fell behind for good
/// (docs/reliability.md, "Gateway clients under chaos"; docs/operations.md).
fn tail_cache_records() -> usize {
    env_knob("DUALSTREAM_CHAOS_CACHE_RECORDS").unwrap_or(65_536)
}

/// The run's gateway: `DUALSTREAM_GATEWAY_BIN`, or `dualstream-gateway`
/// beside this binary, on the run's broker (through its proxy) and Redis
/// (through its delay proxy), reading uncommitted as the joins do.
fn start_gateway(brokers: &str, redis_url: &str) -> Result<OwnedGateway, String> {
    let bin = match std::env::var_os("DUALSTREAM_GATEWAY_BIN") {
        Some(b) => std::path::PathBuf::from(b),
        None => std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("dualstream-gateway"),
    };
    if !bin.exists() {
        return Err(format!(
            "no gateway binary at {} (cargo build -p dualstream-gateway, or set DUALSTREAM_GATEWAY_BIN; \
             --gateway-clients 0 runs without)",
            bin.display()
        ));
    }
    let config = format!(
        "topic = \"{TOPIC}\"\ndashboard = false\n\
         [redis]\nchannel_prefix = \"{PREFIX}\"\n\
         [join]\nidle_check_ms = 300\nbackfill_records_per_sec = {}\ncache_records = {}\n\
         [replay.librdkafka_options]\n\"isolation.level\" = \"read_uncommitted\"\n",
        backfill_rate(),
        tail_cache_records()
    );
    // DUALSTREAM_CHAOS_GATEWAY_LOG: the gateway's RUST_LOG (its log file is named at the end).
    let log =
        std::env::var("DUALSTREAM_CHAOS_GATEWAY_LOG").unwrap_or_else(|_| "warn,rdkafka=off,librdkafka=off".to_owned());
    let env = [
        ("KAFKA_BROKERS", brokers),
        ("REDIS_URL", redis_url),
        ("DUALSTREAM_GATEWAY_SECRET", GATEWAY_SECRET),
        ("RUST_LOG", log.as_str()),
    ];
    Ok(OwnedGateway::start(&bin, &config, &env))
}

/// The run's gateway's token signer.
fn gateway_auth() -> dualstream_gateway::Auth {
    dualstream_gateway::Auth::new(&dualstream_gateway::AuthConfig {
        secret: GATEWAY_SECRET.into(),
        ..dualstream_gateway::AuthConfig::default()
    })
    .expect("auth")
}

/// A token for gateway client `c`, reading every channel of the run.
fn gateway_token(c: usize) -> String {
    let auth = gateway_auth();
    auth.mint(&auth.claims(Some(format!("chaos-{c}")), vec![format!("{PREFIX}:*")], Vec::new(), 24 * 3_600))
        .expect("token")
}

/// What the checker found.
#[derive(Default)]
struct Checked {
    anomalies: checker::Anomalies,
    unknown_stored: u64,
    findings: Vec<Finding>,
    join_errors_in_outage: u64,
    join_lines: Vec<String>,
    /// The first malformed records, with the reason.
    malformed_lines: Vec<String>,
    gateway_errors_in_outage: u64,
    gateway_lines: Vec<String>,
}

/// The chaos run's checker: the whole topic read back, every record decoded
/// by the checker's own parser and held to what the harness sent.
async fn check_run(
    brokers: &str,
    run_began_ms: u64,
    sent: &[Sent],
    ids: &[u128],
    witnessed: &clients::Witnessed,
    joins: &[checker::JoinLog],
    gateway: &[gateway::GatewayLog],
    windows: &[Window],
) -> (Checked, usize) {
    let b = brokers.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let mut stored = BTreeMap::new();
        let mut malformed = Vec::new();
        checker::read_back(&b, |pos, r| match r.and_then(|e| checker::expect_chaos(&e, run_began_ms)) {
            Ok(s) => {
                stored.insert(pos, s);
            }
            Err(e) => malformed.push(format!("malformed record at {pos:?}: {e}")),
        })
        .map(|()| (stored, malformed))
    })
    .await
    .expect("read back");
    let (stored, malformed) = match read {
        Ok(r) => r,
        Err(e) => {
            eprintln!("checker: {e}");
            println!("\nsummary: result=FAILED (the checker could not read the topic: {e})");
            std::process::exit(1);
        }
    };
    let input = checker::Input { stored: &stored, sent, ids, notes: &witnessed.notes, joins, gateway, faults: windows };
    let mut out = checker::check(&input);
    out.anomalies.malformed_records += malformed.len() as u64;
    let read = stored.len() + malformed.len();
    let checked = Checked {
        anomalies: out.anomalies,
        unknown_stored: out.unknown_stored,
        findings: out.findings,
        join_errors_in_outage: out.join_errors_in_outage,
        join_lines: out.join_lines,
        malformed_lines: malformed.into_iter().take(10).collect(),
        gateway_errors_in_outage: out.gateway_errors_in_outage,
        gateway_lines: out.gateway_lines,
    };
    (checked, read)
}

/// The soak's checker: every event's outcome (two bits each) against the
/// topic read back, so lost and duplicated writes are counted apart.
async fn check_soak(
    brokers: &str,
    run_began_ms: u64,
    outcomes: &Arc<soak::Outcomes>,
    counts: &Counts,
) -> (Checked, usize) {
    let (b, o) = (brokers.to_owned(), Arc::clone(outcomes));
    let stored = {
        let b = b.clone();
        tokio::task::spawn_blocking(move || checker::stored_count(&b)).await.expect("watermarks") as usize
    };
    match tokio::task::spawn_blocking(move || o.check(&b, run_began_ms)).await.expect("read back") {
        Ok((anomalies, unknown_stored)) => {
            let acked = counts.acked.load(Ordering::Relaxed) as usize;
            let unknown = counts.unknown.load(Ordering::Relaxed) as usize;
            println!(
                "\nsoak counts: {stored} records in the topic; stored < acknowledged: {}; stored > acknowledged + unknown: {}",
                stored < acked,
                stored > acked + unknown
            );
            (Checked { anomalies, unknown_stored, ..Checked::default() }, stored)
        }
        Err(e) => {
            eprintln!("checker: {e}");
            println!("\nsummary: result=FAILED (the checker could not read the topic: {e})");
            std::process::exit(1);
        }
    }
}

/// Events whose outcome was unknown, or whose receipt had no position,
/// with no broker fault from 20 s before their submit to their answer: 0
/// allowed. (Only the broker's trouble can leave a Kafka write's outcome
/// open; a Redis or gateway fault cannot.)
fn outcomes_outside_faults(sent: &[Sent], windows: &[Window]) -> u64 {
    sent.iter()
        .filter(|s| matches!(s.told, Told::Unknown(_) | Told::AckedSomewhere))
        .filter(|s| !windows.iter().any(|w| w.broker && w.from <= s.told_ms && s.submitted_ms <= w.to + 20_000))
        .count() as u64
}

/// The run's outcome counts.
struct Totals {
    acked: usize,
    failed: usize,
    unknown: usize,
    somewhere: usize,
}

impl Totals {
    fn of(sent: &[Sent], counts: &Counts, retain: bool) -> Self {
        if !retain {
            return Self {
                acked: counts.acked.load(Ordering::Relaxed) as usize,
                failed: counts.failed.load(Ordering::Relaxed) as usize,
                unknown: counts.unknown.load(Ordering::Relaxed) as usize,
                somewhere: 0,
            };
        }
        let somewhere = sent.iter().filter(|s| matches!(s.told, Told::AckedSomewhere)).count();
        let acked = sent.iter().filter(|s| matches!(s.told, Told::Acked { .. })).count() + somewhere;
        let failed = sent.iter().filter(|s| matches!(s.told, Told::Failed(_))).count();
        Self { acked, failed, unknown: sent.len() - acked - failed, somewhere }
    }

    fn submitted(&self) -> usize {
        self.acked + self.failed + self.unknown
    }

    /// Bounds on what the checker cannot hold to a position: a regression
    /// that turned acknowledgements into errors, or receipts into
    /// positionless ones, would otherwise pass. Prints what is out of bounds.
    fn out_of_bounds(&self, unknown_calm: u64) -> bool {
        let mut out = false;
        if self.acked == 0 {
            println!("\nno event was acknowledged: the run proves nothing");
            out = true;
        }
        // Every unknown outcome must also lie near a broker fault (`unknown_calm`).
        // One broker kill -9 on tansu can leave about 2 s of writes unknown (seed 7:
        // 4,040 of 200,649, none of them stored; docs/reliability.md).
        let unknown_bound = self.submitted() / 20;
        if self.unknown > unknown_bound {
            println!(
                "\noutcome unknown for {} events, over the bound of 5 % of those submitted ({unknown_bound})",
                self.unknown
            );
            out = true;
        }
        if self.somewhere > 0 {
            println!(
                "\n{} receipts without a position: the Kafka sink reports an acknowledgement it cannot reconcile as outcome unknown, never as stored",
                self.somewhere
            );
            out = true;
        }
        if unknown_calm > 0 {
            println!("\n{unknown_calm} outcomes unknown or positionless with no broker fault from 20 s before their submit to their answer");
            out = true;
        }
        out
    }
}

fn print_anomalies(a: &checker::Anomalies, retain: bool) {
    println!("\n| anomaly | count |\n|---|---|");
    if !retain {
        println!("| (a soak keeps two bits per event: lost, duplicated and failed-but-stored writes against the topic read back) | |");
    }
    let rows: [(&str, u64); 20] = [
        ("lost write (acknowledged, not stored)", a.lost),
        ("duplicate (id stored twice)", a.duplicates),
        ("order violation (a source out of publish order)", a.order),
        ("failed but stored (told: not stored)", a.failed_but_stored),
        ("acknowledged at a position that does not hold it", a.wrong_position),
        ("bad notification (its position does not hold its event)", a.bad_notifications),
        ("malformed record (the checker's parser refuses it, or it is not what was sent)", a.malformed_records),
        ("malformed notification", a.malformed_notifications),
        ("join gap (a record of its source from its start not delivered, the tail included)", a.join_gaps),
        ("join duplicate", a.join_duplicates),
        ("join order (an earlier record delivered after a later one)", a.join_order),
        ("join wrong event (another event or payload at the right offset, or unreadable)", a.join_wrong),
        ("join foreign event (another source's)", a.join_foreign),
        ("join error outside a broker outage", a.join_errors),
        (
            "gateway gap (a record of the channel's source from its first token not delivered, the tail included)",
            a.gateway_gaps,
        ),
        ("gateway duplicate", a.gateway_duplicates),
        ("gateway order", a.gateway_order),
        ("gateway wrong event (another event, source or payload, or unreadable)", a.gateway_wrong),
        ("gateway error outside a broker outage or gateway restart", a.gateway_errors),
        ("gateway reset (nothing is deleted during a run)", a.gateway_resets),
    ];
    for (name, n) in rows {
        println!("| {name} | {n} |");
    }
}

/// The soak's resource table; whether one fails its judge.
fn print_soak(samples: &[faults::Sample]) -> bool {
    println!("\n| resource | first | last | slope per minute | judged by | verdict |\n|---|---|---|---|---|---|");
    let mut failed = false;
    for (i, (name, judge)) in soak::RESOURCES.iter().enumerate() {
        let series: Vec<(f64, f64)> = samples.iter().map(|s| (s.0, s.1[i])).collect();
        let fitted = &series[series.len() / 5..];
        let (xs, ys): (Vec<f64>, Vec<f64>) = fitted.iter().copied().unzip();
        let (first, last) = (ys.first().copied().unwrap_or(0.0), ys.last().copied().unwrap_or(0.0));
        let fails = soak::fails(i, &series);
        failed |= fails;
        let (judged, verdict) = match judge {
            soak::Judge::Grows(floor) => {
                (format!("growth floor {floor} a minute"), if fails { "GROWS" } else { "flat" })
            }
            soak::Judge::Ceiling(max) => (format!("ceiling {max}"), if fails { "OVER" } else { "under" }),
        };
        println!("| {name} | {first:.0} | {last:.0} | {:.2} | {judged} | {verdict} |", soak::slope(&xs, &ys) * 60.0);
    }
    println!("\n{} samples, every 5 s; the first fifth is warm-up and not fitted", samples.len());
    failed
}

#[cfg(test)]
mod tests {
    use super::Totals;

    fn totals(acked: usize, unknown: usize, somewhere: usize) -> Totals {
        Totals { acked, failed: 0, unknown, somewhere }
    }

    /// A build whose `OffsetGuard` marked every offset unknown would give
    /// receipts without a position (or unknown outcomes) where the broker
    /// answered: the run fails on either, and on a run that acknowledged
    /// nothing.
    #[test]
    fn excuses_past_their_bounds_fail_the_run() {
        assert!(!totals(10_000, 500, 0).out_of_bounds(0), "5 % unknown is allowed");
        assert!(totals(10_000, 527, 0).out_of_bounds(0), "more than 5 % unknown");
        assert!(totals(10_000, 0, 10_000).out_of_bounds(0), "every receipt without a position");
        assert!(totals(10_000, 0, 1).out_of_bounds(0), "one receipt without a position");
        assert!(totals(10_000, 1, 0).out_of_bounds(1), "an unknown outcome with no fault around it");
        assert!(totals(0, 0, 0).out_of_bounds(0), "nothing acknowledged");
    }
}
