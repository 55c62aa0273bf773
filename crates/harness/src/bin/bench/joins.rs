//! The `joins` group: many catch-up joins in one process sharing the Kafka
//! side (issue #11). Idle joins first, then joins that start at once from
//! random offsets while the publisher writes; every join's sequence is
//! checked against a plain rdkafka consumer's reading of the topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dualstream::consumer::{
    partition_for_key, CatchUp, Delivery, HistoryStats, Hub, HubConfig, JoinConfig, Replay, ReplayConfig, StartAt,
};
use dualstream::prelude::*;
use dualstream::Source;
use dualstream_devstack::clients::*;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::measure::{clock_ticks, CpuSnap, Pids};
use super::{Profile, Row};

/// Sources, hence Redis channels.
const CHANNELS: usize = 1_000;
const PARTITIONS: i32 = 8;
/// Events per source stored before any join opens.
const PREFILL_PER_SOURCE: usize = 20;
/// The publish load while the busy joins start, events/s.
const LOAD_RATE: usize = 5_000;
const LOAD_SECS: u64 = 12;
/// How long the idle joins are watched for broker requests.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

fn rss_kib() -> u64 {
    super::measure::rss_kib_of("self")
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// What one join received.
#[derive(Default)]
struct Seen {
    offsets: Vec<i64>,
    first_live: Option<Duration>,
    odd: Vec<String>,
}

/// Follow one join's stream into `seen`.
fn collect(
    mut stream: dualstream::consumer::JoinStream,
    seen: Arc<Mutex<Seen>>,
    opened: Instant,
    delivered: Arc<AtomicUsize>,
) {
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let mut s = seen.lock().expect("lock");
            match item {
                Ok(d @ (Delivery::History(_) | Delivery::Live(_))) => {
                    if matches!(d, Delivery::Live(_)) && s.first_live.is_none() {
                        s.first_live = Some(opened.elapsed());
                    }
                    s.offsets.push(d.position().map_or(-1, |p| p.offset));
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(other) => s.odd.push(format!("{other:?}")),
                Err(e) => s.odd.push(e.to_string()),
            }
        }
    });
}

fn event(kind: &str, s: &Source, i: usize) -> Event {
    Event::builder(kind, s.source_type(), s.source_id()).payload(format!("{i:0>150}")).build().expect("valid")
}

/// A join and what it saw: its source's index, its start offset (`None`:
/// the end), its items.
type Joined = (usize, Option<i64>, Arc<Mutex<Seen>>);

/// The idle phase's figures.
struct Idle {
    open_secs: f64,
    rss_before: u64,
    rss_idle: u64,
    threads_before: usize,
    threads_idle: usize,
    requests_per_s: f64,
    broker_cores: Option<f64>,
}

/// Phase 1: `p.idle_joins` joins from the end, opened 500 at a time; then
/// the broker requests and CPU of an idle window.
async fn idle_phase(
    joiner: &CatchUp,
    sources: &[Source],
    p: &Profile,
    pids: &Pids,
    delivered: &Arc<AtomicUsize>,
    joins: &mut Vec<Joined>,
) -> Idle {
    let (rss_before, threads_before) = (rss_kib(), threads());
    let started = Instant::now();
    for chunk in (0..p.idle_joins).collect::<Vec<_>>().chunks(500) {
        let opened = futures::future::join_all(chunk.iter().map(|j| {
            let joiner = joiner.clone();
            let s = sources[j % CHANNELS].clone();
            async move { joiner.join(s, StartAt::End).await.expect("join") }
        }))
        .await;
        for (j, stream) in chunk.iter().zip(opened) {
            let seen = Arc::new(Mutex::new(Seen::default()));
            collect(stream, seen.clone(), Instant::now(), delivered.clone());
            joins.push((j % CHANNELS, None, seen));
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_idle, threads_idle) = (rss_kib(), threads());
    let (s0, c0) = (joiner.stats(), CpuSnap::take(pids));
    tokio::time::sleep(IDLE_WINDOW).await;
    let (s1, c1) = (joiner.stats(), CpuSnap::take(pids));
    let secs = IDLE_WINDOW.as_secs_f64();
    // A watermark look-up is two list-offsets requests.
    let requests_per_s =
        ((s1.watermark_lookups - s0.watermark_lookups) * 2 + (s1.metadata_lookups - s0.metadata_lookups)) as f64 / secs;
    let broker_cores = c1.broker.zip(c0.broker).map(|(a, b)| (a - b) as f64 / clock_ticks() / secs);
    println!(
        "  {} idle joins opened in {open_secs:.1} s; RSS {} → {} MiB; threads {threads_before} → {threads_idle}; {requests_per_s:.1} requests/s; broker {:?} cores; {:?}",
        p.idle_joins,
        rss_before >> 10,
        rss_idle >> 10,
        broker_cores,
        s1
    );
    Idle { open_secs, rss_before, rss_idle, threads_before, threads_idle, requests_per_s, broker_cores }
}

/// The load: `LOAD_RATE` events a second until `stop`; resolves to how many
/// were submitted and how many failed.
fn load(engine: BatchEngine, stop: Arc<AtomicBool>, sources: Vec<Source>) -> tokio::task::JoinHandle<(usize, usize)> {
    tokio::spawn(async move {
        let mut i = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut pending = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let batch: Vec<Event> =
                (0..LOAD_RATE / 100).map(|k| event("bench.load", &sources[(i + k) % CHANNELS], i + k)).collect();
            i += batch.len();
            let engine = engine.clone();
            pending.push(tokio::spawn(
                async move { engine.submit_many(batch).await.iter().filter(|r| r.is_err()).count() },
            ));
        }
        let mut errors = 0;
        for t in pending {
            errors += t.await.expect("load task");
        }
        (i, errors)
    })
}

/// The busy phase's figures.
struct Busy {
    published: usize,
    load_errors: usize,
    secs: f64,
    deliveries: usize,
    rss: u64,
}

/// Phase 2: the load, and `p.busy_joins` joins from random offsets once it
/// runs.
#[allow(clippy::too_many_arguments)]
async fn busy_phase(
    brokers: &str,
    topic: &str,
    engine: &BatchEngine,
    joiner: &CatchUp,
    sources: &[Source],
    p: &Profile,
    delivered: &Arc<AtomicUsize>,
    joins: &mut Vec<Joined>,
) -> Busy {
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(engine.clone(), stop.clone(), sources.to_vec());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let highs = high_watermarks(brokers, topic);
    let phase2 = Instant::now();
    let delivered_before = delivered.load(Ordering::Relaxed);
    let busy: Vec<_> = (0..p.busy_joins)
        .map(|j| {
            let source = (j * 7_919 + 13) % CHANNELS;
            let partition = partition_for_key(sources[source].source_id().as_bytes(), PARTITIONS);
            let from = ((j as i64 * 104_729) % highs[partition as usize].max(1)).max(0);
            let (joiner, s) = (joiner.clone(), sources[source].clone());
            let seen = Arc::new(Mutex::new(Seen::default()));
            let (task_seen, delivered) = (seen.clone(), delivered.clone());
            let task = tokio::spawn(async move {
                let opened = Instant::now();
                let stream = joiner.join(s, StartAt::Offset(from)).await.expect("join");
                collect(stream, task_seen, opened, delivered);
            });
            (source, from, seen, task)
        })
        .collect();
    for (source, from, seen, task) in busy {
        task.await.expect("join task");
        joins.push((source, Some(from), seen));
    }
    tokio::time::sleep(Duration::from_secs(LOAD_SECS)).await;
    stop.store(true, Ordering::Relaxed);
    let (published, load_errors) = load.await.expect("load");
    let secs = phase2.elapsed().as_secs_f64();
    let deliveries = delivered.load(Ordering::Relaxed) - delivered_before;
    Busy { published, load_errors, secs, deliveries, rss: rss_kib() }
}

/// The joins against the witness.
struct Checked {
    exact: usize,
    odd: usize,
    head_extra: usize,
    example: Option<String>,
}

/// The witness: every record of the topic, read by a plain consumer; each
/// join's items against it, once every join has its source's last event (or
/// a minute passed).
async fn check(brokers: &str, topic: &str, total: usize, sources: &[Source], joins: &[Joined]) -> (Checked, usize) {
    let records = read_topic(brokers, topic, total, Duration::from_secs(180));
    let mut by_source: HashMap<String, Vec<(i64, bool)>> = HashMap::new();
    for r in &records {
        let e = r.event();
        by_source
            .entry(e.source().source_id().to_string())
            .or_default()
            .push((r.offset, e.event_type() == "bench.load"));
    }
    for v in by_source.values_mut() {
        v.sort();
    }
    // What a join must deliver: its source's events from its start. A join
    // that started at the end (`from` = None) must deliver every event of
    // the load; on tansu it may also deliver the last stored batch's events
    // first (tansu's high watermark is the last batch's base offset + 1),
    // which is then checked as part of the same contiguous sequence.
    let want = |source: usize, from: Option<i64>, first_seen: Option<i64>| -> Vec<i64> {
        let Some(v) = by_source.get(sources[source].source_id()) else { return Vec::new() };
        let start = match from {
            Some(f) => f,
            None => {
                let first_load = v.iter().find(|(_, load)| *load).map_or(i64::MAX, |(o, _)| *o);
                first_seen.map_or(first_load, |s| s.min(first_load))
            }
        };
        v.iter().filter(|(o, _)| *o >= start).map(|(o, _)| *o).collect()
    };
    let first_seen = |seen: &Arc<Mutex<Seen>>| seen.lock().expect("lock").offsets.first().copied();
    // Wait (bounded) until every join has its source's last event.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let behind = joins
            .iter()
            .filter(|(s, from, seen)| {
                want(*s, *from, first_seen(seen)).last() != seen.lock().expect("lock").offsets.last()
            })
            .count();
        if behind == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut c = Checked { exact: 0, odd: 0, head_extra: 0, example: None };
    for (s, from, seen) in joins {
        let w = want(*s, *from, first_seen(seen));
        let seen = seen.lock().expect("lock");
        if from.is_none() {
            c.head_extra += w.len().saturating_sub(want(*s, *from, None).len());
        }
        if seen.offsets == w {
            c.exact += 1;
        } else if c.example.is_none() {
            c.example = Some(format!("source {s} from {from:?}: want {} offsets, got {}", w.len(), seen.offsets.len()));
        }
        c.odd += seen.odd.len();
    }
    (c, records.len())
}

pub(super) async fn run(brokers: &str, redis_url: &str, p: &Profile, pids: &Pids, rows: &mut Vec<Row>) {
    let topic = unique_topic("bench-joins");
    create_topic(brokers, &topic, PARTITIONS).await;
    let (engine, _) = dual_engine(brokers, &topic, redis_url);
    let run = dualstream::EventId::new().as_uuid().simple().to_string();
    let sources: Vec<Source> =
        (0..CHANNELS).map(|i| Source::new("sensor", format!("{run}-{i}")).expect("valid")).collect();
    let prefill: Vec<Event> =
        (0..CHANNELS * PREFILL_PER_SOURCE).map(|i| event("bench.prefill", &sources[i % CHANNELS], i)).collect();
    let stored = engine.submit_many(prefill).await.iter().filter(|r| r.is_ok()).count();
    assert_eq!(stored, CHANNELS * PREFILL_PER_SOURCE, "history stored");

    let replay = Replay::new(ReplayConfig {
        bootstrap_servers: brokers.to_owned(),
        topic: TopicRouting::Single { topic: topic.clone() },
        ..ReplayConfig::default()
    })
    .expect("replay");
    let hub = Hub::new(HubConfig { url: redis_url.to_owned(), ..HubConfig::default() }).expect("hub");
    let joiner = CatchUp::new(replay, hub.clone(), JoinConfig::default()).expect("joiner");
    let delivered = Arc::new(AtomicUsize::new(0));
    let mut joins: Vec<Joined> = Vec::new();
    let idle = idle_phase(&joiner, &sources, p, pids, &delivered, &mut joins).await;
    let busy = busy_phase(brokers, &topic, &engine, &joiner, &sources, p, &delivered, &mut joins).await;
    let stats = joiner.stats();
    let total = CHANNELS * PREFILL_PER_SOURCE + busy.published;
    let (checked, _) = check(brokers, &topic, total, &sources, &joins).await;
    let mut first_live: Vec<Duration> =
        joins[p.idle_joins..].iter().filter_map(|(_, _, seen)| seen.lock().expect("lock").first_live).collect();
    first_live.sort();
    let hub_stats = hub.stats().await.expect("hub stats");
    let (p50, p99) = (super::percentile(&first_live, 0.50), super::percentile(&first_live, 0.99));
    println!(
        "  busy: {} joins; first live p50 {p50:.1} ms p99 {p99:.1} ms ({} with a live item); {:.0} deliveries/s; RSS {} MiB; exact {}/{}; {} odd items; {stats:?}; {hub_stats:?}",
        p.busy_joins,
        first_live.len(),
        busy.deliveries as f64 / busy.secs,
        busy.rss >> 10,
        checked.exact,
        joins.len(),
        checked.odd
    );
    if let Some(e) = &checked.example {
        println!("  first mismatch: {e}");
    }
    engine.shutdown().await;
    idle_rows(rows, p, &idle, &stats);
    busy_rows(rows, p, &busy, &stats, &first_live, joins.len(), checked);
}

#[allow(clippy::too_many_arguments)]
fn row(
    rows: &mut Vec<Row>,
    name: String,
    ours: f64,
    baseline: f64,
    unit: &'static str,
    goal: &str,
    met: Option<bool>,
    note: String,
) {
    rows.push(Row { group: "joins", name, ours, baseline, unit, goal: goal.into(), met, cpu: None, note })
}

/// The shared readers' consumers, and the idle joins' memory and requests.
fn idle_rows(rows: &mut Vec<Row>, p: &Profile, idle: &Idle, stats: &HistoryStats) {
    let Idle {
        open_secs,
        rss_before,
        rss_idle,
        threads_before,
        threads_idle,
        requests_per_s: idle_requests,
        broker_cores,
    } = *idle;
    let setup = format!(
        "{CHANNELS} sources on {PARTITIONS} partitions of one topic, {PREFILL_PER_SOURCE} events each stored first; one CatchUp, one Hub"
    );
    row(
        rows,
        "joins: Kafka consumers open".into(),
        stats.consumers as f64,
        // One topic: metadata, the tail reader, the backfill readers.
        (2 + JoinConfig::default().backfill_readers) as f64,
        "consumers",
        "≤ 1 + topics × (1 + backfill_readers) (ratio ≤ 1)",
        Some(stats.consumers as usize <= 2 + JoinConfig::default().backfill_readers),
        format!("baseline column = the target for one topic; {setup}"),
    );
    row(
        rows,
        format!("joins: RSS with {} idle joins, MiB", p.idle_joins),
        rss_idle as f64 / 1024.0,
        300.0,
        "MiB",
        "≤ 300 MiB (ratio ≤ 1)",
        Some(rss_idle <= 300 * 1024),
        format!(
            "baseline column = the target; RSS before the joins {} MiB; opened 500 at a time in {open_secs:.1} s; threads {threads_before} → {threads_idle}",
            rss_before >> 10
        ),
    );
    row(
        rows,
        format!("joins: broker requests/s while {} joins are idle", p.idle_joins),
        idle_requests,
        f64::NAN,
        "requests/s",
        "no request per idle join",
        Some(idle_requests <= 2.0 * PARTITIONS as f64 * 2.0),
        format!(
            "list-offsets and metadata requests counted by the shared readers over {} s (a watermark look-up = 2 requests; one poll per partition per idle_check_ms); broker CPU {} cores",
            IDLE_WINDOW.as_secs(),
            broker_cores.map_or("?".into(), |c| format!("{c:.2}"))
        ),
    );
}

/// The busy joins: time to the first live item, deliveries, exactness.
fn busy_rows(
    rows: &mut Vec<Row>,
    p: &Profile,
    busy: &Busy,
    stats: &HistoryStats,
    first_live: &[Duration],
    joins: usize,
    checked: Checked,
) {
    let (p50, p99, with_live) =
        (super::percentile(first_live, 0.50), super::percentile(first_live, 0.99), first_live.len());
    let Busy { published, load_errors, secs: phase2_secs, deliveries, rss: rss_busy } = *busy;
    let Checked { exact, odd, head_extra, example } = checked;
    row(
        rows,
        format!("joins: time to first live item, p50, {} joins at once under load", p.busy_joins),
        p50,
        f64::NAN,
        "ms",
        "-",
        None,
        format!("each from a random offset of its source's partition, while the engine writes {LOAD_RATE} events/s; {with_live} of {} got a live item", p.busy_joins),
    );
    row(rows, "joins: time to first live item, p99".into(), p99, f64::NAN, "ms", "-", None, "as above".into());
    row(
        rows,
        "joins: deliveries/s to all joins under load".into(),
        deliveries as f64 / phase2_secs,
        f64::NAN,
        "deliveries/s",
        "-",
        None,
        format!(
            "{} joins in all; {published} events published in {phase2_secs:.0} s ({load_errors} errors); RSS {} MiB at the end; shared readers: {} range reads ({} from the cache), {} seeks, {} records read",
            joins,
            rss_busy >> 10,
            stats.range_reads,
            stats.range_reads_cached,
            stats.seeks,
            stats.records_read
        ),
    );
    row(
        rows,
        "joins: joins whose sequence is exactly Kafka's".into(),
        exact as f64,
        joins as f64,
        "joins",
        "all (ratio = 1)",
        Some(exact == joins),
        format!(
            "checked against a plain rdkafka consumer's reading of the whole topic (idle joins: every event of the load, plus {head_extra} events of the last stored batch in all, delivered first because of tansu's high watermark); {odd} non-event items (truncation, errors){}",
            example.map(|e| format!("; first mismatch: {e}")).unwrap_or_default()
        ),
    );
}

/// Each partition's high watermark, by a plain consumer.
fn high_watermarks(brokers: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().expect("consumer");
    (0..PARTITIONS).map(|p| c.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks").1).collect()
}
