//! `cargo xtask bench`: dualstream against the raw clients, in one run, on
//! the same broker and Redis, with the same payloads and producer settings.
//!
//! Writes `docs/benchmarks.md` and `target/bench/results.json`. Goals that
//! are not met are reported as not met; nothing here is asserted.
//!
//! A module per group: [`publish`] (durable, dual, realtime, slow, outage,
//! naive, memory), [`latency`], [`fanout`], [`cluster`], [`joins`],
//! [`gateway`] (with [`idle`], its idle connections held by a child
//! process); [`measure`] (CPU and process look-ups shared by the groups)
//! and [`report`] (the Markdown and JSON).

#[cfg(not(feature = "heap-domains"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "heap-domains")]
#[global_allocator]
static ALLOC: domains::Domains = domains::Domains;

/// The `heap-domains` build's allocator: mimalloc, with a header before
/// each block naming the domain of the thread that allocated it (0: the
/// bench and its clients, 1: the gateway's runtime, set by
/// [`domains::enter_gateway`]), and the live bytes of each domain.
#[cfg(feature = "heap-domains")]
#[allow(unsafe_code)] // a global allocator is unsafe by its trait; a diagnostic build only
pub(crate) mod domains {
    use std::alloc::{GlobalAlloc, Layout};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicIsize, Ordering};

    thread_local! {
        static DOMAIN: Cell<u8> = const { Cell::new(0) };
    }

    /// Live bytes allocated by each domain's threads.
    static LIVE: [AtomicIsize; 2] = [AtomicIsize::new(0), AtomicIsize::new(0)];
    /// The gateway's live bytes by the size of their blocks: class k holds
    /// sizes in [2^k, 2^(k+1)).
    static CLASSES: [AtomicIsize; 48] = [const { AtomicIsize::new(0) }; 48];

    fn class(size: usize) -> usize {
        (usize::BITS - 1 - size.max(1).leading_zeros()) as usize % 48
    }

    /// The gateway's live MiB by block size, the largest classes first.
    pub(crate) fn classes() -> String {
        let mut v: Vec<(usize, isize)> =
            CLASSES.iter().enumerate().map(|(k, c)| (k, c.load(Ordering::Relaxed))).filter(|(_, b)| *b > 1 << 20).collect();
        v.sort_by_key(|(_, b)| -b);
        v.iter().map(|(k, b)| format!("{}B..: {} MiB", 1usize << k, b >> 20)).collect::<Vec<_>>().join(", ")
    }

    /// This thread allocates for the gateway from now on.
    pub(crate) fn enter_gateway() {
        DOMAIN.with(|d| d.set(1));
    }

    /// Live bytes of the gateway's allocations and of the rest, in MiB.
    pub(crate) fn live_mib() -> (i64, i64) {
        let get = |i: usize| (LIVE[i].load(Ordering::Relaxed) >> 20) as i64;
        (get(1), get(0))
    }

    pub(crate) struct Domains;

    fn outer(l: Layout) -> (Layout, usize) {
        let head = l.align().max(16);
        // SAFETY (of the callers): the size plus a power-of-two header
        // cannot overflow for a layout the caller could allocate.
        (unsafe { Layout::from_size_align_unchecked(l.size() + head, head) }, head)
    }

    unsafe impl GlobalAlloc for Domains {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let (o, head) = outer(l);
            let p = unsafe { mimalloc::MiMalloc.alloc(o) };
            if p.is_null() {
                return p;
            }
            let d = DOMAIN.try_with(Cell::get).unwrap_or(0);
            LIVE[usize::from(d)].fetch_add(l.size() as isize, Ordering::Relaxed);
            if d == 1 {
                CLASSES[class(l.size())].fetch_add(l.size() as isize, Ordering::Relaxed);
            }
            unsafe {
                *p.add(head - 1) = d;
                p.add(head)
            }
        }

        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            let (o, head) = outer(l);
            let d = unsafe { *p.sub(1) };
            LIVE[usize::from(d)].fetch_sub(l.size() as isize, Ordering::Relaxed);
            if d == 1 {
                CLASSES[class(l.size())].fetch_sub(l.size() as isize, Ordering::Relaxed);
            }
            unsafe { mimalloc::MiMalloc.dealloc(p.sub(head), o) }
        }
    }
}

/// The live heap of the gateway's runtime and of the rest of this process,
/// for the `heap-domains` build's notes.
#[cfg(feature = "heap-domains")]
pub(crate) fn heap_note() -> String {
    let (gw, rest) = domains::live_mib();
    // SAFETY: mallinfo2 takes no arguments and only reads glibc's counters
    // (glibc 2.33 and later).
    #[allow(unsafe_code)]
    let c = unsafe { libc::mallinfo2() };
    format!(
        " (live heap: gateway {gw} MiB, the rest {rest} MiB; glibc's (librdkafka's) {} MiB; the gateway's by block size: {})",
        (c.uordblks + c.hblkhd) >> 20,
        domains::classes()
    )
}

use std::time::{Duration, Instant};

use clap::Parser;
use dualstream::kafka::KafkaSinkConfig;
use dualstream::prelude::*;
use dualstream_devstack::clients::*;
use knobs::{env_knob, env_list};

#[path = "../../knobs.rs"]
mod knobs;
mod cluster;
mod fanout;
mod gateway;
mod idle;
mod joins;
mod latency;
mod measure;
mod publish;
mod report;

use fanout::FANOUT_SUBSCRIBERS;
use measure::{CpuPerEvent, Pids};

/// Benchmarks against the raw clients, on the broker of `KAFKA_BROKERS` and the Redis of `REDIS_URL`.
#[derive(Parser)]
#[command(name = "bench")]
struct Args {
    /// Longer runs.
    #[arg(long)]
    full: bool,
    /// Run only the groups whose name contains one of these words (memory, latency, durable, dual,
    /// realtime, slow, outage, naive, fanout, cluster, joins, gateway).
    #[arg(long)]
    filter: Vec<String>,
}

struct Profile {
    throughput_events: usize,
    notify_events: usize,
    latency_secs: u64,
    outage_events: usize,
    memory_events: usize,
    naive_events: usize,
    fanout_events: usize,
    slow_events: usize,
    idle_joins: usize,
    busy_joins: usize,
}

#[derive(Clone)]
struct Row {
    group: &'static str,
    name: String,
    ours: f64,
    baseline: f64,
    unit: &'static str,
    /// Ratio shown as ours/baseline.
    goal: String,
    met: Option<bool>,
    /// CPU per event of (ours, baseline), for throughput rows.
    cpu: Option<(CpuPerEvent, CpuPerEvent)>,
    note: String,
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

fn events(n: usize, size: usize) -> Vec<Event> {
    let body = bytes::Bytes::from(payload(size));
    (0..n)
        .map(|i| {
            Event::builder("bench.event", "account", format!("acct-{}", i % 64))
                .payload(body.clone())
                .build()
                .expect("valid")
        })
        .collect()
}

/// `n` notifications of 150-byte events, at offsets 0, 1, … of partition 0 of topic `t`.
fn notifications(n: usize) -> Vec<Notification> {
    events(n, 150)
        .iter()
        .enumerate()
        .map(|(i, e)| Notification::for_event(e, Some(Position::new("t", 0, i as i64))))
        .collect()
}

fn sink_config(brokers: &str, topic: &str) -> KafkaSinkConfig {
    KafkaSinkConfig {
        bootstrap_servers: brokers.to_owned(),
        topic: dualstream::kafka::TopicRouting::Single { topic: topic.to_owned() },
        // Both sides' linger (default: the sink's own 5 ms); docs/benchmark-analysis.md, "Produce requests per side".
        linger_ms: env_knob("DUALSTREAM_BENCH_LINGER_MS").unwrap_or(KafkaSinkConfig::default().linger_ms),
        ..KafkaSinkConfig::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    // The gateway group's idle clients, and its gateways, in processes of
    // their own. Their stdout is a pipe the bench reads only when it asks
    // them something: their logs go to stderr (a gateway whose warnings
    // filled that pipe stopped in its write).
    let [idle_spec, gateway_spec] = [idle::CHILD_ENV, gateway::GATEWAY_ENV].map(|var| std::env::var(var).ok());
    if idle_spec.is_some() || gateway_spec.is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    if let Some(spec) = idle_spec {
        idle::child(&spec).await;
        return;
    }
    if let Some(spec) = gateway_spec {
        gateway::gateway_process(&spec).await;
        return;
    }
    init_tracing();
    let Args { full, filter: filters } = Args::parse();
    let p = if full {
        Profile {
            throughput_events: 1_000_000,
            notify_events: 1_000_000,
            latency_secs: 30,
            outage_events: 200_000,
            memory_events: 2_000_000,
            naive_events: 10_000,
            fanout_events: 10_000,
            slow_events: 300_000,
            idle_joins: 10_000,
            busy_joins: 1_000,
        }
    } else {
        Profile {
            throughput_events: 500_000,
            notify_events: 200_000,
            latency_secs: 10,
            outage_events: 30_000,
            memory_events: 1_000_000,
            naive_events: 1_000,
            fanout_events: 2_000,
            slow_events: 100_000,
            idle_joins: 10_000,
            busy_joins: 1_000,
        }
    };
    let (brokers, redis_url) = (kafka_brokers(), redis_url());
    let want = |g: &str| filters.is_empty() || filters.iter().any(|f| g.contains(f.as_str()));
    let started = Instant::now();
    let pids = Pids::find(&brokers, &redis_url);
    if let Ok(side) = std::env::var("DUALSTREAM_BENCH_PROFILE_SIDE") {
        publish::profile_side(&side, &brokers, &redis_url, &p, &pids).await;
        return;
    }
    let mut rows = Vec::new();
    // Memory first, so the peak is not an earlier group's.
    if want("memory") {
        println!("[memory] peak RSS over {} events", p.memory_events);
        publish::memory(&brokers, &redis_url, &p, &mut rows).await;
    }
    // Latency before the throughput groups: they leave tens of millions
    // of records in an in-memory broker, which slows it down.
    if want("latency") {
        println!("[latency] send→notification at a subscriber, ours vs a hand-written dual publisher, at fixed rates");
        latency::latency(&brokers, &redis_url, &p, &mut rows).await;
    }
    if want("durable") {
        println!("[durable] the engine in durable-only mode vs raw FutureProducer");
        publish::durable_throughput(&brokers, &p, &pids, &mut rows).await;
    }
    if want("dual") || want("naive") {
        println!("[dual] the engine in dual mode vs a hand-written dual publisher");
        publish::dual_throughput(&brokers, &redis_url, &p, &pids, &mut rows).await;
    }
    if want("realtime") {
        println!("[realtime] Redis notifier vs raw pipelined PUBLISH");
        publish::realtime_throughput(&redis_url, &p, &mut rows).await;
    }
    if want("slow") {
        println!("[slow] Redis behind a delay proxy, and hung");
        publish::slow_redis(&brokers, &p, &mut rows).await;
    }
    if want("outage") {
        println!("[outage] Redis down vs up");
        publish::outage(&brokers, &p, &mut rows).await;
    }
    if want("naive") {
        println!("[naive] await produce, then await PUBLISH, per event");
        publish::naive(&brokers, &redis_url, &p, &mut rows).await;
    }
    if want("fanout") {
        println!(
            "[fanout] {FANOUT_SUBSCRIBERS} local subscribers through the hub vs {FANOUT_SUBSCRIBERS} Redis connections"
        );
        fanout::fanout(&redis_url, &p, &mut rows).await;
    }
    if want("cluster") {
        println!("[cluster] the notifier on a local 3-master Redis Cluster (SPUBLISH) vs one Redis (PUBLISH)");
        cluster::cluster_throughput(&redis_url, &p, &mut rows).await;
    }
    if want("joins") {
        println!(
            "[joins] {} idle catch-up joins, then {} joins from random offsets under load",
            p.idle_joins, p.busy_joins
        );
        joins::run(&brokers, &redis_url, &p, &pids, &mut rows).await;
    }
    if want("gateway") {
        println!("[gateway] SSE and WebSocket clients of a gateway process under HTTP ingest, a reconnect storm, and a naive gateway");
        gateway::run(&brokers, &redis_url, &pids, &mut rows).await;
    }
    report::write_report(&rows, full, &filters, started.elapsed());
}
