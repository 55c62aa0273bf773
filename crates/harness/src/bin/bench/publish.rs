//! Publishing throughput: the engine in durable-only mode against a raw
//! `FutureProducer` (`durable`), in dual mode against a hand-written dual
//! publisher (`dual`), the notifier against raw pipelined PUBLISH
//! (`realtime`), Redis slow and hung (`slow`), down (`outage`), awaiting
//! each write in turn (`naive`), and the peak memory of many submitters
//! (`memory`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use dualstream::core::record::{self, HeaderScratch};
use dualstream::kafka::KafkaSinkConfig;
use dualstream::prelude::*;
use dualstream_devstack::clients::*;
use dualstream_devstack::OwnedRedis;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, FutureProducer, FutureRecord, Producer, ThreadedProducer};

use crate::measure::{CpuPerEvent, CpuSnap, Pids};
use crate::{env_knob, events, notifications, payload, percentile, sink_config, Profile, Row};

pub(super) async fn raw_producer(brokers: &str, topic: &str) -> FutureProducer {
    let p: FutureProducer = sink_config(brokers, topic).client_config().expect("config").create().expect("producer");
    // Warm up: the first idempotent ack takes about half a second.
    raw_send(&p, topic, &events(1, 10)[0]).await.expect("warm-up");
    p
}

pub(super) fn raw_record<'a>(
    topic: &'a str,
    e: &'a Event,
    scratch: &'a mut HeaderScratch,
) -> FutureRecord<'a, [u8], [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(5);
    for (key, value) in record::headers(e, scratch) {
        headers = headers.insert(Header { key, value: Some(value) });
    }
    FutureRecord::to(topic).key(record::key(e)).payload(e.payload().as_ref()).headers(headers)
}

pub(super) async fn raw_send(p: &FutureProducer, topic: &str, e: &Event) -> Result<(), String> {
    let mut scratch = HeaderScratch::default();
    p.send(raw_record(topic, e, &mut scratch), Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e.to_string())
}

/// Hand every record to the producer, waiting 1 ms whenever its queue is
/// full, as a hand-written producer loop does; the delivery futures.
async fn enqueue_all(p: &FutureProducer, topic: &str, evs: &[Event]) -> Vec<rdkafka::producer::DeliveryFuture> {
    let mut futures = Vec::with_capacity(evs.len());
    for e in evs {
        let mut scratch = HeaderScratch::default();
        let mut rec = raw_record(topic, e, &mut scratch);
        loop {
            match p.send_result(rec) {
                Ok(f) => {
                    futures.push(f);
                    break;
                }
                Err((_, back)) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    futures
}

/// Raw baseline: every record handed to the producer, then all acks awaited.
/// It owns its events and drops each once acknowledged, inside the clock,
/// as the engine does with the events it is handed.
async fn raw_burst(p: &FutureProducer, topic: &str, evs: Vec<Event>) -> f64 {
    let started = Instant::now();
    let n = evs.len();
    let acks = enqueue_all(p, topic, &evs).await;
    for (f, e) in acks.into_iter().zip(evs) {
        f.await.expect("delivery").expect("acked");
        drop(e);
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// The dual engine as users get it: default notifier settings, warmed up.
pub(super) async fn default_dual_engine(
    brokers: &str,
    topic: &str,
    redis_url: &str,
) -> (BatchEngine, Arc<RedisNotifier>) {
    let sink = KafkaSink::new(sink_config(brokers, topic)).expect("sink");
    let notifier = Arc::new(redis_notifier(redis_url));
    let publisher =
        DualPublisher::builder().durable(Arc::new(sink)).notifier(notifier.clone()).build().expect("publisher");
    // Warm up the idempotent producer and the Redis connection.
    publisher.publish(events(1, 10).remove(0)).await.expect("warm-up");
    (BatchEngine::new(publisher, BatchConfig::default()).expect("engine"), notifier)
}

/// The engine in durable-only mode, warmed up.
async fn durable_engine(brokers: &str, topic: &str) -> BatchEngine {
    let sink = KafkaSink::new(sink_config(brokers, topic)).expect("sink");
    let publisher =
        DualPublisher::builder().durable(Arc::new(sink)).mode(Mode::DurableOnly).build().expect("publisher");
    publisher.publish(events(1, 10).remove(0)).await.expect("warm-up");
    let mut config = BatchConfig::default();
    // Diagnostic knobs, not for committed runs: the engine's lane count and
    // batch size.
    if let Some(lanes) = env_knob("DUALSTREAM_BENCH_DURABLE_LANES") {
        config.lanes = lanes;
    }
    if let Some(max) = env_knob("DUALSTREAM_BENCH_DURABLE_MAX_BATCH") {
        config.max_batch_events = max;
    }
    BatchEngine::new(publisher, config).expect("engine")
}

/// Submit every event concurrently from one task, one `submit` per event;
/// returns events/s and per-event submit→receipt latencies.
async fn through_engine(engine: &BatchEngine, evs: Vec<Event>) -> (f64, Vec<Duration>, usize) {
    let started = Instant::now();
    let n = evs.len();
    let calls = evs.into_iter().map(|e| async move {
        let t = Instant::now();
        let r = engine.submit(e).await;
        (t.elapsed(), r.is_ok())
    });
    let results = futures::future::join_all(calls).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0;
    for (d, ok) in results {
        lat.push(d);
        errors += usize::from(!ok);
    }
    lat.sort();
    (rate, lat, errors)
}

/// Hand every event to the engine with one `submit_many` from one task, as
/// the raw side enqueues every record from one task; events/s and errors.
async fn through_submit_many(engine: &BatchEngine, evs: Vec<Event>) -> (f64, usize) {
    let n = evs.len();
    let started = Instant::now();
    let results = engine.submit_many(evs).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    (rate, results.iter().filter(|r| r.is_err()).count())
}

/// The receipts' notification outcomes, counted: `sent 5, skipped 2, ...`
/// (the engine's own shedding shows here as skipped, not in the notifier's
/// counters: those notifications never reached it).
fn notification_outcomes(results: &[Result<Receipt, BatchError>]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for r in results {
        let name = match r {
            Ok(r) => format!("{:?}", r.notification).to_lowercase(),
            Err(_) => "error".to_owned(),
        };
        *counts.entry(name).or_insert(0u64) += 1;
    }
    counts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

/// The best dual publisher a user could write by hand: enqueue every record,
/// await the acks in order, and send the same notification bytes in
/// pipelined PUBLISH (512 per pipeline, two in flight). The clock stops at
/// the last Redis reply.
pub(super) async fn hand_written_dual(
    p: &FutureProducer,
    conn: &redis::aio::MultiplexedConnection,
    topic: &str,
    evs: Vec<Event>,
) -> f64 {
    const PIPELINE: usize = 512;
    let names = ChannelNamer::default();
    let started = Instant::now();
    let n = evs.len();
    let acks = enqueue_all(p, topic, &evs).await;
    let topic: Arc<str> = topic.into();
    let mut in_flight: std::collections::VecDeque<tokio::task::JoinHandle<()>> = Default::default();
    let mut pipe = redis::pipe();
    let mut queued = 0;
    let mut channel = String::with_capacity(64);
    for (e, ack) in evs.into_iter().zip(acks) {
        let d = ack.await.expect("delivery").expect("acked");
        let note = Notification::for_event(
            &e,
            Some(Position { topic: topic.clone(), partition: d.partition, offset: d.offset }),
        );
        drop(e);
        channel.clear();
        names.write_channel(&note.source_type, &note.source_id, &mut channel);
        pipe.cmd("PUBLISH").arg(channel.as_str()).arg(note.to_json()).ignore();
        queued += 1;
        if queued == PIPELINE {
            if in_flight.len() == 2 {
                in_flight.pop_front().expect("in flight").await.expect("pipeline");
            }
            let (full, mut conn) = (std::mem::replace(&mut pipe, redis::pipe()), conn.clone());
            in_flight.push_back(tokio::spawn(async move { full.query_async::<()>(&mut conn).await.expect("publish") }));
            queued = 0;
        }
    }
    if queued > 0 {
        let mut conn = conn.clone();
        pipe.query_async::<()>(&mut conn).await.expect("publish");
    }
    for t in in_flight {
        t.await.expect("pipeline");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Rounds of the throughput groups; each figure is the best of its rounds,
/// every run on a fresh topic, the sides alternating, so that neither the
/// order nor a topic's size favours one side on this noisy shared machine.
const ROUNDS: usize = 3;

/// The best (highest-rate) run of one side, with its CPU accounting.
#[derive(Clone, Copy, Default)]
struct Best {
    rate: f64,
    cpu: CpuPerEvent,
}

impl Best {
    fn keep(&mut self, rate: f64, cpu: CpuPerEvent) {
        if rate > self.rate {
            *self = Best { rate, cpu };
        }
    }
}

/// Run `f` and return its events/s together with the CPU it, the broker
/// and redis-server spent per event.
async fn measured<F: std::future::Future<Output = f64>>(pids: &Pids, n: usize, f: F) -> (f64, CpuPerEvent) {
    let before = CpuSnap::take(pids);
    let rate = f.await;
    (rate, CpuSnap::take(pids).per_event_since(&before, n))
}

/// One raw-rdkafka round on a fresh topic: events/s and CPU per event.
async fn raw_round(brokers: &str, pids: &Pids, n: usize, size: usize) -> (f64, CpuPerEvent) {
    let topic = unique_topic("bench-raw");
    create_topic(brokers, &topic, 3).await;
    let producer = raw_producer(brokers, &topic).await;
    let evs = events(n, size);
    measured(pids, n, raw_burst(&producer, &topic, evs)).await
}

/// Counts a `ThreadedProducer`'s delivery reports (called on librdkafka's
/// poll thread).
#[derive(Default)]
struct Acks {
    ok: std::sync::atomic::AtomicUsize,
    failed: std::sync::atomic::AtomicUsize,
}

impl rdkafka::ClientContext for Acks {}

impl rdkafka::producer::ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, r: &rdkafka::message::DeliveryResult<'_>, (): ()) {
        use std::sync::atomic::Ordering::Relaxed;
        match r {
            Ok(_) => self.ok.fetch_add(1, Relaxed),
            Err(_) => self.failed.fetch_add(1, Relaxed),
        };
    }
}

impl Acks {
    fn reported(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        self.ok.load(Relaxed) + self.failed.load(Relaxed)
    }
}

/// Hand `evs` to a `ThreadedProducer`, waiting 1 ms whenever its queue is
/// full, dropping each event once handed over (librdkafka copied it).
async fn threaded_enqueue(p: &ThreadedProducer<Acks>, topic: &str, evs: Vec<Event>) {
    for e in evs {
        let mut scratch = HeaderScratch::default();
        let mut headers = OwnedHeaders::new_with_capacity(5);
        for (key, value) in record::headers(&e, &mut scratch) {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        let mut rec = BaseRecord::to(topic).key(record::key(&e)).payload(e.payload().as_ref()).headers(headers);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}

/// Wait until the producer reported `n` deliveries in all.
async fn reported(p: &ThreadedProducer<Acks>, n: usize) {
    while p.context().reported() < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// The raw baseline written the other way: a `ThreadedProducer` whose poll
/// thread counts delivery reports in a callback (no future per record),
/// every record handed over, then the count awaited. Same settings as the
/// sink's; one warm-up record first.
async fn raw_threaded_round(brokers: &str, pids: &Pids, n: usize, size: usize) -> (f64, CpuPerEvent) {
    let topic = unique_topic("bench-raw-threaded");
    create_topic(brokers, &topic, 3).await;
    let p: ThreadedProducer<Acks> = sink_config(brokers, &topic)
        .client_config()
        .expect("config")
        .create_with_context(Acks::default())
        .expect("producer");
    threaded_enqueue(&p, &topic, events(1, 10)).await;
    reported(&p, 1).await;
    let evs = events(n, size);
    let (rate, cpu) = measured(pids, n, async {
        let started = Instant::now();
        threaded_enqueue(&p, &topic, evs).await;
        reported(&p, n + 1).await;
        n as f64 / started.elapsed().as_secs_f64()
    })
    .await;
    let failed = p.context().failed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failed, 0, "raw threaded producer: {failed} deliveries failed");
    (rate, cpu)
}

/// One `submit_many` round through `engine`, which is shut down after:
/// events/s, CPU per event and errors.
async fn submit_many_round(engine: &BatchEngine, pids: &Pids, n: usize, size: usize) -> (f64, CpuPerEvent, usize) {
    let evs = events(n, size);
    let mut errors = 0;
    let (rate, cpu) = measured(pids, n, async {
        let (rate, e) = through_submit_many(engine, evs).await;
        errors = e;
        rate
    })
    .await;
    engine.shutdown().await;
    (rate, cpu, errors)
}

pub(super) async fn durable_throughput(brokers: &str, p: &Profile, pids: &Pids, rows: &mut Vec<Row>) {
    for size in [150, 1024] {
        let n = p.throughput_events;
        let (mut raw, mut ours, mut per_event, mut errors) = (Best::default(), Best::default(), Best::default(), 0);
        let mut threaded = Best::default();
        for _ in 0..ROUNDS {
            let (rate, cpu) = raw_round(brokers, pids, n, size).await;
            raw.keep(rate, cpu);
            let (rate, cpu) = raw_threaded_round(brokers, pids, n, size).await;
            threaded.keep(rate, cpu);

            let topic = unique_topic("bench-dur-ours");
            create_topic(brokers, &topic, 3).await;
            let engine = durable_engine(brokers, &topic).await;
            let (rate, cpu, e) = submit_many_round(&engine, pids, n, size).await;
            errors += e;
            ours.keep(rate, cpu);

            // Diagnostic: the per-event path (one `submit` per event).
            let topic = unique_topic("bench-dur-submit");
            create_topic(brokers, &topic, 3).await;
            let engine = durable_engine(brokers, &topic).await;
            let evs = events(n, size);
            let (rate, cpu) = measured(pids, n, async { through_engine(&engine, evs).await.0 }).await;
            engine.shutdown().await;
            per_event.keep(rate, cpu);
        }
        // The baseline is the faster of the two ways to write it.
        let (future_rate, threaded_rate) = (raw.rate, threaded.rate);
        let style = if threaded.rate > raw.rate {
            raw = threaded;
            "ThreadedProducer with a counting delivery callback"
        } else {
            "FutureProducer, every record enqueued then every ack awaited"
        };
        let ratio = ours.rate / raw.rate;
        rows.push(Row {
            group: "durable",
            name: format!("durable throughput, {size} B: engine (durable-only, submit_many) vs raw rdkafka, events/s"),
            ours: ours.rate,
            baseline: raw.rate,
            unit: "ev/s",
            goal: "ratio ≥ 0.90".into(),
            met: Some(ratio >= 0.90),
            cpu: Some((ours.cpu, raw.cpu)),
            note: format!("{n} events a round, best of {ROUNDS} alternating rounds on fresh topics, both sides from one task; raw = the faster of FutureProducer ({future_rate:.0}/s) and ThreadedProducer ({threaded_rate:.0}/s): {style}; {errors} errors"),
        });
        rows.push(Row {
            group: "durable",
            name: format!("durable throughput, {size} B: engine, one submit per event (diagnostic), events/s"),
            ours: per_event.rate,
            baseline: raw.rate,
            unit: "ev/s",
            goal: "none (diagnostic)".into(),
            met: None,
            cpu: Some((per_event.cpu, raw.cpu)),
            note: format!("{n} concurrent `submit` calls from one task (join_all): the per-event path's own cost"),
        });
        println!(
            "  durable {size} B: ours {:.0}/s, per-event submit {:.0}/s, raw {:.0}/s, ratio {ratio:.2}",
            ours.rate, per_event.rate, raw.rate
        );
    }
}

/// One side of the durable or dual 150 B row alone, `ROUNDS` rounds, for a
/// profiler attached to this process (`DUALSTREAM_BENCH_PROFILE_SIDE`:
/// `durable-ours`, `durable-raw` (the `ThreadedProducer`), `dual-ours` or
/// `dual-hand`; docs/benchmark-analysis.md, "One profile per side"). Prints
/// each round's rate and CPU per event; writes no row.
pub(super) async fn profile_side(side: &str, brokers: &str, redis_url: &str, p: &Profile, pids: &Pids) {
    let (n, size) = (p.throughput_events, 150);
    // Diagnostic: more rounds, to see a side's rate round after round.
    let rounds = env_knob("DUALSTREAM_BENCH_PROFILE_ROUNDS").unwrap_or(ROUNDS);
    for round in 0..rounds {
        let (rate, cpu) = match side {
            "durable-ours" => {
                let topic = unique_topic("bench-dur-ours");
                create_topic(brokers, &topic, 3).await;
                let engine = durable_engine(brokers, &topic).await;
                let (rate, cpu, _) = submit_many_round(&engine, pids, n, size).await;
                (rate, cpu)
            }
            "durable-raw" => raw_threaded_round(brokers, pids, n, size).await,
            "dual-ours" => {
                let topic = unique_topic("bench-dual-ours");
                create_topic(brokers, &topic, 3).await;
                let (engine, _) = default_dual_engine(brokers, &topic, redis_url).await;
                let evs = events(n, size);
                measured(pids, n, async {
                    let started = Instant::now();
                    let results = engine.submit_many(evs).await;
                    engine.shutdown().await;
                    assert!(results.iter().all(Result::is_ok), "every event stored");
                    n as f64 / started.elapsed().as_secs_f64()
                })
                .await
            }
            "dual-hand" => {
                let client = redis::Client::open(redis_url).expect("url");
                let conn = client.get_multiplexed_async_connection().await.expect("redis");
                let topic = unique_topic("bench-dual-hand");
                create_topic(brokers, &topic, 3).await;
                let producer = raw_producer(brokers, &topic).await;
                measured(pids, n, hand_written_dual(&producer, &conn, &topic, events(n, size))).await
            }
            other => {
                eprintln!(
                    "DUALSTREAM_BENCH_PROFILE_SIDE={other}: one of durable-ours, durable-raw, dual-ours, dual-hand"
                );
                std::process::exit(2);
            }
        };
        println!("[profile] {side} 150 B, round {}: {rate:.0} events/s, CPU {cpu} core-µs an event", round + 1);
    }
}

pub(super) async fn dual_throughput(brokers: &str, redis_url: &str, p: &Profile, pids: &Pids, rows: &mut Vec<Row>) {
    let client = redis::Client::open(redis_url).expect("url");
    let conn = client.get_multiplexed_async_connection().await.expect("redis");
    for size in [150, 1024] {
        let n = p.throughput_events;
        let (mut hand, mut ours, mut raw_only, mut errors) = (Best::default(), Best::default(), Best::default(), 0);
        // Our notifier's outcomes, a round each.
        let mut outcomes = Vec::new();
        for _ in 0..ROUNDS {
            let topic = unique_topic("bench-dual-hand");
            create_topic(brokers, &topic, 3).await;
            let producer = raw_producer(brokers, &topic).await;
            let evs = events(n, size);
            let (rate, cpu) = measured(pids, n, hand_written_dual(&producer, &conn, &topic, evs)).await;
            hand.keep(rate, cpu);
            drop(producer);

            let topic = unique_topic("bench-dual-ours");
            create_topic(brokers, &topic, 3).await;
            let (engine, notifier) = default_dual_engine(brokers, &topic, redis_url).await;
            let before = notifier.stats();
            let evs = events(n, size);
            let mut receipts = String::new();
            let (rate, cpu) = measured(pids, n, async {
                let started = Instant::now();
                let results = engine.submit_many(evs).await;
                // The fair clock: it stops once every notification was sent
                // or finally skipped (the shutdown drains them), as the
                // hand-written side's stops at its last Redis reply.
                engine.shutdown().await;
                let rate = n as f64 / started.elapsed().as_secs_f64();
                errors += results.iter().filter(|r| r.is_err()).count();
                receipts = notification_outcomes(&results);
                rate
            })
            .await;
            let after = notifier.stats();
            outcomes.push(format!(
                "receipts {receipts}; the notifier: {} published, {} skipped, {} failed, {} timed out",
                after.published - before.published,
                after.skipped - before.skipped,
                after.failed - before.failed,
                after.timed_out - before.timed_out
            ));
            ours.keep(rate, cpu);

            // Information: raw rdkafka alone, no notifications.
            let (rate, cpu) = raw_round(brokers, pids, n, size).await;
            raw_only.keep(rate, cpu);
        }
        let ratio = ours.rate / hand.rate;
        rows.push(Row {
            group: "dual",
            name: format!("dual throughput, {size} B: engine (dual mode, submit_many) vs hand-written dual publisher, events/s"),
            ours: ours.rate,
            baseline: hand.rate,
            unit: "ev/s",
            goal: "ratio ≥ 0.90 (aim ≥ 1.0)".into(),
            met: Some(ratio >= 0.90),
            cpu: Some((ours.cpu, hand.cpu)),
            note: format!("{n} events a round, best of {ROUNDS} alternating rounds on fresh topics; hand-written = FutureProducer, every record enqueued, acks awaited in order, the same notification bytes in pipelined PUBLISH (512 a pipeline, two in flight), clock stopped at the last Redis reply, every PUBLISH answered ({n} published, 0 skipped, 0 failed a round, or the run stops); ours: clock stopped once the engine's shutdown drained every notification (published or finally skipped), per round: {}; {errors} publish errors", outcomes.join(" / ")),
        });
        rows.push(Row {
            group: "dual",
            name: format!("dual throughput, {size} B: engine (dual) vs raw rdkafka alone (information), events/s"),
            ours: ours.rate,
            baseline: raw_only.rate,
            unit: "ev/s",
            goal: "-".into(),
            met: None,
            cpu: Some((ours.cpu, raw_only.cpu)),
            note: "raw = FutureProducer with no notifications at all: the ceiling of the durable path alone".into(),
        });
        println!(
            "  dual {size} B: ours {:.0}/s, hand-written {:.0}/s, raw alone {:.0}/s, ratio {ratio:.2}",
            ours.rate, hand.rate, raw_only.rate
        );
    }
}

pub(super) async fn realtime_throughput(redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    let notifier = redis_notifier(redis_url);
    let notes = notifications(p.notify_events);
    notifier.notify_batch(&notes[..10]).await.expect("warm-up");
    let started = Instant::now();
    for chunk in notes.chunks(512) {
        notifier.notify_batch(chunk).await.expect("pipeline");
    }
    let ours = notes.len() as f64 / started.elapsed().as_secs_f64();

    let client = redis::Client::open(redis_url).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("conn");
    let names = ChannelNamer::default();
    let started = Instant::now();
    for chunk in notes.chunks(512) {
        let mut pipe = redis::pipe();
        for n in chunk {
            pipe.cmd("PUBLISH").arg(names.channel(&n.source_type, &n.source_id).expect("ch")).arg(n.to_json()).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.expect("raw pipeline");
    }
    let baseline = notes.len() as f64 / started.elapsed().as_secs_f64();
    let ratio = ours / baseline;
    rows.push(Row {
        group: "realtime",
        name: "real-time throughput, notifications/s".into(),
        ours,
        baseline,
        unit: "n/s",
        goal: "ratio ≥ 0.90".into(),
        cpu: None,
        met: Some(ratio >= 0.90),
        note: format!("{} notifications, pipelines of 512; baseline = raw pipelined PUBLISH, same client", notes.len()),
    });
    println!("  realtime: ours {ours:.0}/s, raw {baseline:.0}/s, ratio {ratio:.2}");
}

pub(super) async fn outage(brokers: &str, p: &Profile, rows: &mut Vec<Row>) {
    let mut redis = OwnedRedis::start();
    let topic = unique_topic("bench-out");
    create_topic(brokers, &topic, 3).await;
    let (engine, notifier) = default_dual_engine(brokers, &topic, &redis.url()).await;
    let (up_rate, up_lat, _) = through_engine(&engine, events(p.outage_events, 150)).await;
    redis.kill();
    // Let the breaker open before measuring.
    for _ in 0..5 {
        let _ = engine.submit(events(1, 150).remove(0)).await;
    }
    let (down_rate, down_lat, errors) = through_engine(&engine, events(p.outage_events, 150)).await;
    engine.shutdown().await;
    let stats = notifier.stats();
    let ratio = down_rate / up_rate;
    rows.push(Row {
        group: "outage",
        name: "throughput with Redis down vs up, events/s".into(),
        ours: down_rate,
        baseline: up_rate,
        unit: "ev/s",
        goal: "ratio ≥ 0.95".into(),
        cpu: None,
        met: Some(ratio >= 0.95),
        note: format!("{} events each; {errors} publish errors while down; skipped {}", p.outage_events, stats.skipped),
    });
    let (pd, pu) = (percentile(&down_lat, 0.99), percentile(&up_lat, 0.99));
    rows.push(Row {
        group: "outage",
        name: "p99 submit→receipt with Redis down vs up, ms".into(),
        ours: pd,
        baseline: pu,
        unit: "ms",
        goal: "ratio ≤ 1.1".into(),
        cpu: None,
        met: Some(pd / pu <= 1.1),
        note: "all events submitted at once: latency includes queueing".into(),
    });
    println!("  outage: down {down_rate:.0}/s vs up {up_rate:.0}/s; p99 {pd:.1} vs {pu:.1} ms");
}

pub(super) fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Concurrent submitters in the memory row.
const MEMORY_SUBMITTERS: usize = 16_384;

pub(super) async fn memory(brokers: &str, redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    let topic = unique_topic("bench-mem");
    create_topic(brokers, &topic, 3).await;
    let (engine, _) = default_dual_engine(brokers, &topic, redis_url).await;
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // reset the peak
    let before = peak_rss_kib();
    let started = Instant::now();
    // Offer as fast as the engine accepts: a fixed pool of submitters, large
    // enough to keep every lane sending full batches (so the run goes at the
    // highest rate the broker takes), and bounded so memory is the engine's
    // and the producer's, not the benchmark's.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let total = p.memory_events;
    let body = bytes::Bytes::from(payload(150));
    let workers: Vec<_> = (0..MEMORY_SUBMITTERS)
        .map(|_| {
            let (engine, next, body) = (engine.clone(), next.clone(), body.clone());
            tokio::spawn(async move {
                let mut errors = 0usize;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return errors;
                    }
                    let e = Event::builder("bench.event", "account", format!("acct-{}", i % 64))
                        .payload(body.clone())
                        .build()
                        .expect("valid");
                    errors += usize::from(engine.submit(e).await.is_err());
                }
            })
        })
        .collect();
    let mut errors = 0;
    for w in workers {
        errors += w.await.expect("worker");
    }
    engine.shutdown().await;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let peak = peak_rss_kib();
    let cfg = BatchConfig::default();
    let kafka = KafkaSinkConfig::default();
    rows.push(Row {
        group: "memory",
        name: format!("peak RSS over {total} events, MiB"),
        ours: peak as f64 / 1024.0,
        baseline: before as f64 / 1024.0,
        unit: "MiB",
        goal: "bounded by the queues".into(),
        cpu: None,
        met: None,
        note: format!(
            "{rate:.0} events/s from {MEMORY_SUBMITTERS} concurrent submitters, {errors} errors; baseline column = RSS before the run; bounds: engine {} events / {} MiB, producer {} messages / {} MiB",
            cfg.max_queued_events,
            cfg.max_queued_bytes >> 20,
            kafka.queue_max_messages,
            kafka.queue_max_kbytes >> 10
        ),
    });
    println!("  memory: peak {} MiB (before {} MiB) at {rate:.0}/s", peak >> 10, before >> 10);
}

pub(super) async fn naive(brokers: &str, redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    let topic = unique_topic("bench-naive");
    create_topic(brokers, &topic, 3).await;
    let raw = raw_producer(brokers, &topic).await;
    let client = redis::Client::open(redis_url).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("conn");
    let names = ChannelNamer::default();
    let evs = events(p.naive_events, 150);
    let started = Instant::now();
    for e in &evs {
        raw_send(&raw, &topic, e).await.expect("ack");
        let n = Notification::for_event(e, None);
        redis::cmd("PUBLISH")
            .arg(names.channel_for(e.source()))
            .arg(n.to_json())
            .query_async::<i64>(&mut conn)
            .await
            .expect("publish");
    }
    let naive = evs.len() as f64 / started.elapsed().as_secs_f64();
    let ours =
        rows.iter().find(|r| r.group == "dual" && r.goal.starts_with("ratio")).map(|r| r.ours).unwrap_or(f64::NAN);
    rows.push(Row {
        group: "naive",
        name: "naive pattern (await produce, then await PUBLISH, per event), events/s".into(),
        ours,
        baseline: naive,
        unit: "ev/s",
        goal: "-".into(),
        cpu: None,
        met: None,
        note: format!("ours = the dual-mode engine row, 150 B; naive measured over {} events", evs.len()),
    });
    println!("  naive: {naive:.0}/s");
}

/// One run of the `slow` group through a notifier on `notifier_url`, a
/// subscriber on `direct` counting when `count`: (durable events/s, longest
/// submit→receipt in ms, notifications seen, errors, receipts/s).
async fn slow_run(
    brokers: &str,
    direct: String,
    notifier_url: String,
    n: usize,
    count: bool,
) -> (f64, f64, usize, usize, f64) {
    let topic = unique_topic("bench-slow");
    create_topic(brokers, &topic, 3).await;
    let sink = Arc::new(TimedSink::new(KafkaSink::new(sink_config(brokers, &topic)).expect("sink")));
    let notifier = Arc::new(redis_notifier(&notifier_url));
    let publisher =
        DualPublisher::builder().durable(sink.clone()).notifier(notifier.clone()).build().expect("publisher");
    publisher.publish(events(1, 10).remove(0)).await.expect("warm-up");
    let engine = BatchEngine::new(publisher, BatchConfig::default()).expect("engine");
    let pattern = ChannelNamer::default().pattern_for_type("account").expect("pattern");
    let mut sub = if count { Some(Subscriber::new(&direct, &[pattern], &[]).await) } else { None };
    let started = Instant::now();
    let (receipts, lat, errors) = through_engine(&engine, events(n, 150)).await;
    let durable = n as f64 / sink.last_ack().map_or(f64::NAN, |t| (t - started).as_secs_f64());
    engine.shutdown().await;
    let seen = match sub.as_mut() {
        Some(s) => s.drain(Duration::from_secs(2)).await.len(),
        None => 0,
    };
    let st = notifier.stats();
    println!("    notifier: {} published, {} failed, {} skipped", st.published, st.failed, st.skipped);
    (durable, lat.last().map_or(0.0, |d| d.as_secs_f64() * 1e3), seen, errors, receipts)
}

/// Redis behind a TCP delay proxy (each way) and hung (SIGSTOP), against the
/// same engine with a fast Redis: durable throughput, the longest a caller
/// waited, and the notifications that reached a subscriber. A Redis of the
/// run's own, so the shared one is never slowed or stopped.
pub(super) async fn slow_redis(brokers: &str, p: &Profile, rows: &mut Vec<Row>) {
    use dualstream_devstack::proxy::DelayProxy;
    let redis = OwnedRedis::start();
    let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", redis.port).parse().expect("addr");
    let n = p.slow_events;
    let bound = dualstream::publisher::PublisherConfig::default().notify_timeout_ms as f64;
    let run = |notifier_url: String, count: bool| slow_run(brokers, redis.url(), notifier_url, n, count);
    // Rounds alternate fast, 20 ms and 50 ms; per setting the best durable
    // rate, the longest wait and the fewest notifications seen of its rounds
    // (the proxy shares the benchmark's cores, and runs vary).
    const SLOW_ROUNDS: usize = 2;
    let delays = [0u64, 20, 50];
    let mut agg: Vec<(f64, f64, usize, usize, f64)> = vec![(0.0, 0.0, usize::MAX, 0, 0.0); delays.len()];
    for _ in 0..SLOW_ROUNDS {
        for (i, delay) in delays.iter().enumerate() {
            let (rate, max, seen, errors, receipts) = if *delay == 0 {
                run(redis.url(), true).await
            } else {
                let proxy = DelayProxy::start(upstream, Duration::from_millis(*delay)).await.expect("proxy");
                run(proxy.redis_url(), true).await
            };
            let a = &mut agg[i];
            if rate > a.0 {
                (a.0, a.4) = (rate, receipts);
            }
            a.1 = a.1.max(max);
            a.2 = a.2.min(seen);
            a.3 += errors;
            println!("  Redis {delay} ms away: durable {rate:.0}/s (receipts {receipts:.0}/s), longest wait {max:.0} ms, {seen} of {n} seen");
        }
    }
    let (fast_rate, fast_max, _, _, fast_receipts) = agg[0];
    for (i, delay) in delays.iter().enumerate().skip(1) {
        let (rate, max, seen, errors, receipts) = agg[i];
        let share = seen as f64 / n as f64;
        rows.push(Row {
            group: "slow",
            name: format!("durable throughput with Redis {delay} ms away (each way) vs fast Redis, events/s"),
            ours: rate,
            baseline: fast_rate,
            unit: "ev/s",
            goal: "ratio ≥ 0.95".into(),
            met: Some(rate / fast_rate >= 0.95),
            cpu: None,
            note: format!("{n} events a run, one `submit` each from one task, best of {SLOW_ROUNDS} alternating rounds; durable = until the last Kafka acknowledgement; callers had every receipt at {receipts:.0}/s (fast Redis: {fast_receipts:.0}/s); {errors} errors"),
        });
        rows.push(Row {
            group: "slow",
            name: format!("longest submit→receipt with Redis {delay} ms away vs fast Redis, ms"),
            ours: max,
            baseline: fast_max,
            unit: "ms",
            goal: format!("≤ fast + {bound:.0} ms (the notify bound)"),
            met: Some(max <= fast_max + bound),
            cpu: None,
            note: "all events submitted at once, so both include queueing; the difference is what waiting for the slow Redis added".into(),
        });
        rows.push(Row {
            group: "slow",
            name: format!("notifications seen by a subscriber with Redis {delay} ms away, %"),
            ours: share * 100.0,
            baseline: 100.0,
            unit: "%",
            goal: "≥ 99 % (round trip under the notifier's timeout)".into(),
            met: Some(share >= 0.99),
            cpu: None,
            note: format!("{seen} of {n} in the worse round; the subscriber connects to Redis directly, the notifier through the proxy"),
        });
    }
    redis.stop();
    let (rate, max, _, errors, receipts) = run(redis.url(), false).await;
    redis.resume();
    rows.push(Row {
        group: "slow",
        name: "durable throughput with Redis hung (SIGSTOP) vs fast Redis, events/s".into(),
        ours: rate,
        baseline: fast_rate,
        unit: "ev/s",
        goal: "ratio ≥ 0.95".into(),
        met: Some(rate / fast_rate >= 0.95),
        cpu: None,
        note: format!("{n} events; durable = until the last Kafka acknowledgement (receipts {receipts:.0}/s); {errors} errors; the breaker opens after the first timeouts"),
    });
    rows.push(Row {
        group: "slow",
        name: "longest submit→receipt with Redis hung vs fast Redis, ms".into(),
        ours: max,
        baseline: fast_max,
        unit: "ms",
        goal: format!("≤ fast + {bound:.0} ms (the notify bound)"),
        met: Some(max <= fast_max + bound),
        cpu: None,
        note: "all events submitted at once; includes queueing".into(),
    });
    println!("  Redis hung: {rate:.0}/s, longest wait {max:.0} ms");
}

/// The Kafka sink, noting when the last acknowledgement arrived: the durable
/// path's own finish line, apart from the notifications that follow. A
/// custom sink wrapping the built-in one, as users write them.
struct TimedSink {
    inner: KafkaSink,
    last_ack: Arc<Mutex<Option<Instant>>>,
}

impl TimedSink {
    fn new(inner: KafkaSink) -> Self {
        Self { inner, last_ack: Arc::default() }
    }

    fn last_ack(&self) -> Option<Instant> {
        *self.last_ack.lock().expect("lock")
    }
}

#[async_trait::async_trait]
impl DurableSink for TimedSink {
    async fn publish(&self, event: Event) -> Result<Position, dualstream::DeliveryError> {
        self.enqueue_batch(vec![event]).await.await.pop().expect("one result")
    }

    async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<Position, dualstream::DeliveryError>> {
        self.enqueue_batch(events).await.await
    }

    async fn enqueue_batch(&self, events: Vec<Event>) -> dualstream::core::PendingAcks {
        let acks = self.inner.enqueue_batch(events).await;
        let last = self.last_ack.clone();
        Box::pin(async move {
            let results = acks.await;
            *last.lock().expect("lock") = Some(Instant::now());
            results
        })
    }

    async fn health_check(&self) -> Result<(), dualstream::SinkError> {
        self.inner.health_check().await
    }

    async fn flush(&self, timeout: Duration) -> Result<(), dualstream::SinkError> {
        self.inner.flush(timeout).await
    }
}
