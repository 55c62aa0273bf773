//! `cargo xtask bench`: dualstream against the raw clients, in one run, on
//! the same broker and Redis, with the same payloads and producer settings.
//!
//! Writes `docs/benchmarks.md` and `target/bench/results.json`. Goals that
//! are not met are reported as not met; nothing here is asserted.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use dualstream::core::record::{self, HeaderScratch};
use dualstream::kafka::KafkaSinkConfig;
use dualstream::prelude::*;
use dualstream_devstack::clients::*;
use dualstream_devstack::OwnedRedis;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

mod gateway;
mod joins;

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

fn args() -> (bool, Vec<String>) {
    let a: Vec<String> = std::env::args().collect();
    let full = a.iter().any(|x| x == "--full");
    let filters = a.windows(2).filter(|w| w[0] == "--filter").map(|w| w[1].clone()).collect();
    (full, filters)
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

fn sink_config(brokers: &str, topic: &str) -> KafkaSinkConfig {
    KafkaSinkConfig {
        bootstrap_servers: brokers.to_owned(),
        topic: dualstream::kafka::TopicRouting::Single { topic: topic.to_owned() },
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

async fn raw_producer(brokers: &str, topic: &str) -> FutureProducer {
    let p: FutureProducer = sink_config(brokers, topic).client_config().expect("config").create().expect("producer");
    // Warm up: the first idempotent ack takes about half a second.
    raw_send(&p, topic, &events(1, 10)[0]).await.expect("warm-up");
    p
}

fn raw_record<'a>(topic: &'a str, e: &'a Event, scratch: &'a mut HeaderScratch) -> FutureRecord<'a, [u8], [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(5);
    for (key, value) in record::headers(e, scratch) {
        headers = headers.insert(Header { key, value: Some(value) });
    }
    FutureRecord::to(topic).key(record::key(e)).payload(e.payload().as_ref()).headers(headers)
}

async fn raw_send(p: &FutureProducer, topic: &str, e: &Event) -> Result<(), String> {
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
async fn default_dual_engine(brokers: &str, topic: &str, redis_url: &str) -> (BatchEngine, Arc<RedisNotifier>) {
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
    BatchEngine::new(publisher, BatchConfig::default()).expect("engine")
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

/// The best dual publisher a user could write by hand: enqueue every record,
/// await the acks in order, and send the same notification bytes in
/// pipelined PUBLISH (512 per pipeline, two in flight). The clock stops at
/// the last Redis reply.
async fn hand_written_dual(
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

async fn durable_throughput(brokers: &str, p: &Profile, pids: &Pids, rows: &mut Vec<Row>) {
    for size in [150, 1024] {
        let n = p.throughput_events;
        let (mut raw, mut ours, mut per_event, mut errors) = (Best::default(), Best::default(), Best::default(), 0);
        for _ in 0..ROUNDS {
            let (rate, cpu) = raw_round(brokers, pids, n, size).await;
            raw.keep(rate, cpu);

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
            note: format!("{n} events a round, best of {ROUNDS} alternating rounds on fresh topics, both sides from one task; raw = FutureProducer, every record enqueued then every ack awaited; {errors} errors"),
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

async fn dual_throughput(brokers: &str, redis_url: &str, p: &Profile, pids: &Pids, rows: &mut Vec<Row>) {
    let client = redis::Client::open(redis_url).expect("url");
    let conn = client.get_multiplexed_async_connection().await.expect("redis");
    for size in [150, 1024] {
        let n = p.throughput_events;
        let (mut hand, mut ours, mut raw_only, mut errors) = (Best::default(), Best::default(), Best::default(), 0);
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
            let (engine, _) = default_dual_engine(brokers, &topic, redis_url).await;
            let (rate, cpu, e) = submit_many_round(&engine, pids, n, size).await;
            errors += e;
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
            note: format!("{n} events a round, best of {ROUNDS} alternating rounds on fresh topics; hand-written = FutureProducer, every record enqueued, acks awaited in order, the same notification bytes in pipelined PUBLISH (512 a pipeline, two in flight), clock stopped at the last Redis reply; {errors} errors"),
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

async fn realtime_throughput(redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    let notifier = redis_notifier(redis_url);
    let evs = events(p.notify_events, 150);
    let notes: Vec<Notification> = evs
        .iter()
        .enumerate()
        .map(|(i, e)| Notification::for_event(e, Some(Position::new("t", 0, i as i64))))
        .collect();
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

/// Send → notification at a subscriber, for every event of a run at `rate`;
/// `send` publishes one event by whatever path is measured. Sorted.
async fn to_subscriber<F, Fut>(redis_url: &str, rate: u64, n: usize, send: F) -> Vec<Duration>
where
    F: Fn(Event) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let pattern = ChannelNamer::default().pattern_for_type("account").expect("pattern");
    let sent_at: Arc<Mutex<HashMap<dualstream::EventId, Instant>>> = Arc::default();
    let arrived: Arc<Mutex<Vec<Duration>>> = Arc::default();
    // The subscriber runs on a thread and runtime of its own, as a gateway
    // would run in a process of its own: its arrival times do not wait for
    // the publishing tasks' scheduling.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let listener = {
        let (sent_at, arrived, url) = (sent_at.clone(), arrived.clone(), redis_url.to_owned());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let mut sub = Subscriber::new(&url, &[pattern], &[]).await;
                let _ = ready_tx.send(());
                while let Some((_, payload)) = sub.next(Duration::from_secs(5)).await {
                    let now = Instant::now();
                    let n = Notification::from_json(&payload).expect("json");
                    if let Some(t) = sent_at.lock().expect("lock").remove(&n.id) {
                        arrived.lock().expect("lock").push(now - t);
                    }
                }
            })
        })
    };
    ready_rx.await.expect("subscriber ready");
    let send = Arc::new(send);
    let _ = paced(rate, events(n, 150), {
        let sent_at = sent_at.clone();
        move |e: Event| {
            let (send, sent_at) = (send.clone(), sent_at.clone());
            async move {
                let t = Instant::now();
                sent_at.lock().expect("lock").insert(e.id(), t);
                send(e).await;
                t.elapsed()
            }
        }
    })
    .await;
    tokio::task::spawn_blocking(move || listener.join().expect("listener")).await.expect("join");
    let mut ours = arrived.lock().expect("lock").clone();
    ours.sort();
    ours
}

async fn latency(brokers: &str, redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    for rate in [2_000u64, 20_000] {
        let topic = unique_topic("bench-lat");
        create_topic(brokers, &topic, 3).await;
        let n = (rate * p.latency_secs) as usize;
        // Baseline: the hand-written dual publisher, per event: produce →
        // ack → PUBLISH of the same notification bytes → the same subscriber.
        let raw = Arc::new(raw_producer(brokers, &topic).await);
        let conn =
            redis::Client::open(redis_url).expect("url").get_multiplexed_async_connection().await.expect("redis");
        let hand = to_subscriber(redis_url, rate, n, {
            let (raw, topic, conn) = (raw.clone(), Arc::<str>::from(topic.as_str()), conn);
            move |e: Event| {
                let (raw, topic, mut conn) = (raw.clone(), topic.clone(), conn.clone());
                async move {
                    let mut scratch = HeaderScratch::default();
                    let (partition, offset) = raw
                        .send(raw_record(&topic, &e, &mut scratch), Duration::from_secs(30))
                        .await
                        .map(|d| (d.partition, d.offset))
                        .expect("ack");
                    let n = Notification::for_event(&e, Some(Position { topic, partition, offset }));
                    redis::cmd("PUBLISH")
                        .arg(ChannelNamer::default().channel_for(e.source()))
                        .arg(n.to_json())
                        .query_async::<i64>(&mut conn)
                        .await
                        .expect("publish");
                }
            }
        })
        .await;
        drop(raw);
        // Ours: through the engine (submit), and the direct publish() in dual
        // mode; above 10,000 events/s also the high-volume mode, which
        // docs/design.md, "Choosing streams", suggests there.
        let mut variants = vec![("engine submit()", Mode::Dual, true), ("publish()", Mode::Dual, false)];
        if rate > 10_000 {
            variants.push(("publish(), high-volume mode", Mode::HighVolume, false));
        }
        for (label, mode, through_engine) in variants {
            let sink = KafkaSink::new(sink_config(brokers, &topic)).expect("sink");
            let publisher = DualPublisher::builder()
                .durable(Arc::new(sink))
                .notifier(Arc::new(redis_notifier(redis_url)))
                .mode(mode)
                .build()
                .expect("publisher");
            publisher.publish(events(1, 10).remove(0)).await.expect("warm-up");
            let ours = if through_engine {
                let engine = BatchEngine::new(publisher, BatchConfig::default()).expect("engine");
                let lat = to_subscriber(redis_url, rate, n, {
                    let engine = engine.clone();
                    move |e: Event| {
                        let engine = engine.clone();
                        async move {
                            engine.submit(e).await.expect("published");
                        }
                    }
                })
                .await;
                engine.shutdown().await;
                lat
            } else {
                let lat = to_subscriber(redis_url, rate, n, {
                    let publisher = publisher.clone();
                    move |e: Event| {
                        let publisher = publisher.clone();
                        async move {
                            publisher.publish(e).await.expect("published");
                        }
                    }
                })
                .await;
                let _ = publisher.shutdown(Duration::from_secs(10)).await;
                lat
            };
            for (q_label, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
                let (o, b) = (percentile(&ours, q), percentile(&hand, q));
                rows.push(Row {
                    group: "latency",
                    name: format!("latency at {rate}/s, {label}, {q_label}, ms"),
                    ours: o,
                    baseline: b,
                    unit: "ms",
                    goal: if q_label == "p99" { "≤ hand-written + 1 ms".into() } else { "-".into() },
                    met: (q_label == "p99").then_some(o <= b + 1.0),
                    cpu: None,
                    note: format!(
                        "{}-second run; send → notification at a PSUBSCRIBE subscriber on its own thread ({} of {n} measured; hand-written {} of {n}); baseline = hand-written dual publisher per event: produce → ack → PUBLISH",
                        p.latency_secs,
                        ours.len(),
                        hand.len()
                    ),
                });
            }
            println!(
                "  latency {rate}/s {label}: ours p50 {:.2} p99 {:.2} ms; hand-written p50 {:.2} p99 {:.2} ms",
                percentile(&ours, 0.5),
                percentile(&ours, 0.99),
                percentile(&hand, 0.5),
                percentile(&hand, 0.99)
            );
        }
    }
}

/// Start `f(event)` at a fixed rate (in ticks of 1 ms), await all; sorted
/// durations.
async fn paced<F, Fut>(rate: u64, evs: Vec<Event>, f: F) -> Vec<Duration>
where
    F: Fn(Event) -> Fut,
    Fut: std::future::Future<Output = Duration> + Send + 'static,
{
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(evs.len());
    for (i, e) in evs.into_iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        if due > Instant::now() + Duration::from_millis(1) {
            tokio::time::sleep_until(due.into()).await;
        }
        tasks.push(tokio::spawn(f(e)));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out.sort();
    out
}

async fn outage(brokers: &str, p: &Profile, rows: &mut Vec<Row>) {
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

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Concurrent submitters in the memory row.
const MEMORY_SUBMITTERS: usize = 16_384;

async fn memory(brokers: &str, redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
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

async fn naive(brokers: &str, redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
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

fn write_report(rows: &[Row], full: bool, filters: &[String], took: Duration) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("root").to_path_buf();
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str("Produced by `cargo xtask bench");
    if full {
        md.push_str(" --full");
    }
    for f in filters {
        md.push_str(&format!(" --filter {f}"));
    }
    md.push_str("`, which overwrites this file; machine-readable results are in `target/bench/results.json`.\n\n");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    md.push_str(&format!(
        "- machine: {} cores ({cpu}), {} \n- broker: `{}` (tansu when started by `cargo xtask`), Redis: `{}`\n- producer settings (both sides): dualstream's `KafkaSinkConfig::default()` (acks=all, idempotent, linger 5 ms, no compression)\n- run took {:.0} s\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| s.lines().next().map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))).map(|m| format!("{m} memory")).unwrap_or_default(),
        kafka_brokers(),
        redis_url(),
        took.as_secs_f64()
    ));
    md.push_str("CPU: core-µs per event, `bench process + broker + redis-server` (from /proc; `?` where the process is not on this machine), ours / baseline.\n\n");
    md.push_str(
        "| figure | ours | baseline | ratio | goal | met | CPU ours / baseline |\n|---|---:|---:|---:|---|---|---|\n",
    );
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let cpu = r.cpu.map(|(o, b)| format!("{o} / {b}")).unwrap_or_else(|| "-".into());
        // Rows without a baseline (NaN) show none and no ratio.
        let (baseline, ratio) = if r.baseline.is_nan() {
            ("-".to_owned(), "-".to_owned())
        } else {
            (format!("{:.2}", r.baseline), format!("{:.2}", r.ours / r.baseline))
        };
        md.push_str(&format!(
            "| {} | {:.2} | {baseline} | {ratio} | {} | {} | {} |\n",
            r.name, r.ours, r.goal, met, cpu
        ));
    }
    let micro = criterion_figures(&root.join("target/criterion"));
    if !micro.is_empty() {
        md.push_str("\nMicro benchmarks (criterion, `cargo bench -p dualstream --bench micro`, mean time per iteration):\n\n| benchmark | mean | throughput |\n|---|---:|---:|\n");
        for (name, ns, elements) in &micro {
            let shown = if *ns >= 1e6 { format!("{:.3} ms", ns / 1e6) } else { format!("{ns:.1} ns") };
            let rate = elements.map(|n| format!("{:.0} events/s", n as f64 / (ns / 1e9))).unwrap_or_else(|| "-".into());
            md.push_str(&format!("| {name} | {shown} | {rate} |\n"));
        }
    }
    md.push_str("\nNotes per row:\n\n");
    for r in rows {
        md.push_str(&format!("- *{}*: {}\n", r.name, r.note));
    }
    std::fs::write(root.join("docs/benchmarks.md"), &md).expect("write report");
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let baseline = (!r.baseline.is_nan()).then_some(r.baseline);
            serde_json::json!({"group": r.group, "name": r.name, "ours": r.ours, "baseline": baseline,
                "unit": r.unit, "ratio": baseline.map(|b| r.ours / b), "goal": r.goal, "met": r.met, "note": r.note,
                "cpu_us_per_event": r.cpu.map(|(o, b)| serde_json::json!({"ours": o.json(), "baseline": b.json()}))})
        })
        .collect();
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&json).expect("json")).expect("write json");
    println!("{md}");
}

/// Every criterion result under `dir`: (benchmark id, mean ns per
/// iteration, elements per iteration when the benchmark declares a
/// throughput).
fn criterion_figures(dir: &std::path::Path) -> Vec<(String, f64, Option<u64>)> {
    let mut out = Vec::new();
    let Ok(groups) = std::fs::read_dir(dir) else { return out };
    for group in groups.flatten() {
        let Ok(benches) = std::fs::read_dir(group.path()) else { continue };
        for bench in benches.flatten() {
            let new = bench.path().join("new");
            let read = |f: &str| {
                std::fs::read_to_string(new.join(f))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            };
            if let (Some(meta), Some(est)) = (read("benchmark.json"), read("estimates.json")) {
                if let (Some(id), Some(mean)) = (meta["full_id"].as_str(), est["mean"]["point_estimate"].as_f64()) {
                    out.push((id.to_owned(), mean, meta["throughput"]["Elements"].as_u64()));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[tokio::main]
async fn main() {
    init_tracing();
    let (full, filters) = args();
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
    let mut rows = Vec::new();
    // Memory first, so the peak is not an earlier group's.
    if want("memory") {
        println!("[memory] peak RSS over {} events", p.memory_events);
        memory(&brokers, &redis_url, &p, &mut rows).await;
    }
    // Latency before the throughput groups: they leave tens of millions
    // of records in an in-memory broker, which slows it down.
    if want("latency") {
        println!("[latency] send→notification at a subscriber, ours vs a hand-written dual publisher, at fixed rates");
        latency(&brokers, &redis_url, &p, &mut rows).await;
    }
    if want("durable") {
        println!("[durable] the engine in durable-only mode vs raw FutureProducer");
        durable_throughput(&brokers, &p, &pids, &mut rows).await;
    }
    if want("dual") || want("naive") {
        println!("[dual] the engine in dual mode vs a hand-written dual publisher");
        dual_throughput(&brokers, &redis_url, &p, &pids, &mut rows).await;
    }
    if want("realtime") {
        println!("[realtime] Redis notifier vs raw pipelined PUBLISH");
        realtime_throughput(&redis_url, &p, &mut rows).await;
    }
    if want("slow") {
        println!("[slow] Redis behind a delay proxy, and hung");
        slow_redis(&brokers, &p, &mut rows).await;
    }
    if want("outage") {
        println!("[outage] Redis down vs up");
        outage(&brokers, &p, &mut rows).await;
    }
    if want("naive") {
        println!("[naive] await produce, then await PUBLISH, per event");
        naive(&brokers, &redis_url, &p, &mut rows).await;
    }
    if want("fanout") {
        println!(
            "[fanout] {FANOUT_SUBSCRIBERS} local subscribers through the hub vs {FANOUT_SUBSCRIBERS} Redis connections"
        );
        fanout(&redis_url, &p, &mut rows).await;
    }
    if want("cluster") {
        println!("[cluster] the notifier on a local 3-master Redis Cluster (SPUBLISH) vs one Redis (PUBLISH)");
        cluster_throughput(&redis_url, &p, &mut rows).await;
    }
    if want("joins") {
        println!(
            "[joins] {} idle catch-up joins, then {} joins from random offsets under load",
            p.idle_joins, p.busy_joins
        );
        joins::run(&brokers, &redis_url, &p, &pids, &mut rows).await;
    }
    if want("gateway") {
        println!("[gateway] SSE and WebSocket clients of an in-process gateway under HTTP ingest, a reconnect storm, and a naive gateway");
        gateway::run(&brokers, &redis_url, &pids, &mut rows).await;
    }
    write_report(&rows, full, &filters, started.elapsed());
}

/// The notifier's throughput on a 3-master Redis Cluster on loopback
/// (sharded Pub/Sub: pipelines grouped by slot, SPUBLISH) against the same
/// notifier on one Redis (PUBLISH). All the Redis processes share this
/// machine's cores.
async fn cluster_throughput(redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    let cluster = dualstream_devstack::cluster::RedisCluster::start();
    let on_cluster =
        RedisNotifier::new(RedisNotifierConfig { cluster_urls: cluster.urls(), ..RedisNotifierConfig::default() })
            .expect("cluster notifier");
    let single = redis_notifier(redis_url);
    let evs = events(p.notify_events, 150);
    let notes: Vec<Notification> = evs
        .iter()
        .enumerate()
        .map(|(i, e)| Notification::for_event(e, Some(Position::new("t", 0, i as i64))))
        .collect();
    let run = |n: RedisNotifier| {
        let notes = &notes;
        async move {
            n.notify_batch(&notes[..10]).await.expect("warm-up");
            let started = Instant::now();
            for chunk in notes.chunks(512) {
                n.notify_batch(chunk).await.expect("pipeline");
            }
            notes.len() as f64 / started.elapsed().as_secs_f64()
        }
    };
    let ours = run(on_cluster).await;
    let baseline = run(single).await;
    let sources: std::collections::HashSet<_> = notes.iter().map(|n| n.source_id.clone()).collect();
    rows.push(Row {
        group: "cluster",
        name: "notifications/s on a 3-master Redis Cluster vs one Redis".into(),
        ours,
        baseline,
        unit: "n/s",
        goal: "-".into(),
        cpu: None,
        met: None,
        note: format!(
            "{} notifications of {} sources, notify_batch of 512; ours = SPUBLISH, one pipeline per slot, 3 masters on loopback; baseline = PUBLISH to one redis-server; every Redis on the same 2 cores",
            notes.len(),
            sources.len()
        ),
    });
    println!("  cluster: {ours:.0}/s on 3 masters, {baseline:.0}/s on one Redis");
}

/// Subscribers of one channel in the fan-out group.
const FANOUT_SUBSCRIBERS: usize = 1_000;

/// Count what each of `streams` receives until it accounted for `n`
/// notifications (received or reported missed); returns (received, missed).
async fn count_all<S, F>(streams: Vec<S>, n: usize, classify: F) -> (usize, usize)
where
    S: futures::Stream + Unpin + Send + 'static,
    F: Fn(&S::Item) -> (usize, usize) + Copy + Send + 'static,
{
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let (mut got, mut missed) = (0, 0);
                while got + missed < n {
                    match tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut s)).await {
                        Ok(Some(item)) => {
                            let (g, m) = classify(&item);
                            got += g;
                            missed += m;
                        }
                        _ => break,
                    }
                }
                (got, missed)
            })
        })
        .collect();
    let mut total = (0, 0);
    for t in tasks {
        let (g, m) = t.await.expect("counter");
        total = (total.0 + g, total.1 + m);
    }
    total
}

async fn fanout(redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    use dualstream::consumer::{Hub, HubConfig, LiveItem, Target};
    let n = p.fanout_events;
    let notifier = redis_notifier(redis_url);
    let run = |channel: String| {
        let notifier = notifier.clone();
        async move {
            let notes: Vec<Notification> = events(n, 10)
                .iter()
                .enumerate()
                .map(|(i, e)| Notification::for_event(e, Some(Position::new("events", 0, i as i64))))
                .collect();
            // Every notification goes to `channel`: publish raw, so the
            // notifier's own channel naming does not get in the way.
            let mut conn = notifier.pool().get().await.expect("redis");
            for chunk in notes.chunks(64) {
                let mut pipe = redis::pipe();
                for note in chunk {
                    pipe.cmd("PUBLISH").arg(&channel).arg(note.to_json()).ignore();
                }
                pipe.query_async::<()>(&mut *conn).await.expect("publish");
            }
        }
    };

    // Ours: one hub connection, FANOUT_SUBSCRIBERS local subscribers.
    let channel = format!("bench:fanout:{}", dualstream::EventId::new());
    let hub = Hub::new(HubConfig { url: redis_url.to_owned(), subscriber_buffer: 4_096, ..HubConfig::default() })
        .expect("hub");
    let mut streams = Vec::with_capacity(FANOUT_SUBSCRIBERS);
    for _ in 0..FANOUT_SUBSCRIBERS {
        streams.push(hub.subscribe(Target::Channel(channel.clone())).await.expect("subscribe"));
    }
    let started = Instant::now();
    let counting = tokio::spawn(count_all(streams, n, |item: &LiveItem| match item {
        LiveItem::Notification(_) => (1, 0),
        LiveItem::Lagged { missed } => (0, *missed as usize),
        _ => (0, 0),
    }));
    run(channel).await;
    let (got, missed) = counting.await.expect("count");
    let ours = got as f64 / started.elapsed().as_secs_f64();

    // Baseline: FANOUT_SUBSCRIBERS Redis connections, one subscriber each.
    let channel = format!("bench:fanout:{}", dualstream::EventId::new());
    let client = redis::Client::open(redis_url).expect("url");
    let mut raw_streams = Vec::with_capacity(FANOUT_SUBSCRIBERS);
    for _ in 0..FANOUT_SUBSCRIBERS {
        let mut ps = client.get_async_pubsub().await.expect("pubsub");
        ps.subscribe(&channel).await.expect("subscribe");
        raw_streams.push(ps.into_on_message());
    }
    let started = Instant::now();
    let counting = tokio::spawn(count_all(raw_streams, n, |_msg: &redis::Msg| (1, 0)));
    run(channel).await;
    let (raw_got, _) = counting.await.expect("count");
    let baseline = raw_got as f64 / started.elapsed().as_secs_f64();
    rows.push(Row {
        group: "fanout",
        name: format!("fan-out to {FANOUT_SUBSCRIBERS} subscribers of one channel, deliveries/s"),
        ours,
        baseline,
        unit: "deliveries/s",
        goal: "-".into(),
        cpu: None,
        met: None,
        note: format!(
            "{n} notifications; ours = one Hub connection and {FANOUT_SUBSCRIBERS} local subscribers ({got} delivered, {missed} reported as lagged); baseline = {FANOUT_SUBSCRIBERS} redis-rs Pub/Sub connections ({raw_got} delivered), Redis on the same cores"
        ),
    });
    println!("  fan-out: ours {ours:.0}/s ({missed} lagged), {FANOUT_SUBSCRIBERS} connections {baseline:.0}/s");
}

/// Redis behind a TCP delay proxy (each way) and hung (SIGSTOP), against the
/// same engine with a fast Redis: durable throughput, the longest a caller
/// waited, and the notifications that reached a subscriber. A Redis of the
/// run's own, so the shared one is never slowed or stopped.
async fn slow_redis(brokers: &str, p: &Profile, rows: &mut Vec<Row>) {
    use dualstream_devstack::proxy::DelayProxy;
    let redis = OwnedRedis::start();
    let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", redis.port).parse().expect("addr");
    let n = p.slow_events;
    let bound = dualstream::publisher::PublisherConfig::default().notify_timeout_ms as f64;
    // One run: (durable events/s, longest submit→receipt in ms,
    // notifications seen, errors, receipts/s).
    let run = |notifier_url: String, count: bool| {
        let direct = redis.url();
        async move {
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
    };
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

/// CPU spent per event, in core-µs: this process (every thread, librdkafka's
/// included), the broker, redis-server.
#[derive(Clone, Copy, Default, Debug)]
struct CpuPerEvent {
    bench: f64,
    broker: Option<f64>,
    redis: Option<f64>,
}

impl std::fmt::Display for CpuPerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.2}"));
        write!(f, "{:.2}+{}+{}", self.bench, opt(self.broker), opt(self.redis))
    }
}

impl CpuPerEvent {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"bench": self.bench, "broker": self.broker, "redis": self.redis})
    }
}

/// The broker's and redis-server's process ids, found by the port they
/// listen on (when they run on this machine).
struct Pids {
    broker: Option<u32>,
    redis: Option<u32>,
}

impl Pids {
    fn find(brokers: &str, redis_url: &str) -> Self {
        let port = |s: &str| s.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse::<u16>().ok());
        let first_broker = brokers.split(',').next().unwrap_or_default();
        let pids = Self {
            broker: port(first_broker).and_then(pid_listening_on),
            redis: port(redis_url).and_then(pid_listening_on),
        };
        println!("  CPU accounting: broker pid {:?}, redis-server pid {:?}", pids.broker, pids.redis);
        pids
    }
}

/// CPU ticks (user + system) of this process and the services, now.
struct CpuSnap {
    bench: u64,
    broker: Option<u64>,
    redis: Option<u64>,
}

impl CpuSnap {
    fn take(pids: &Pids) -> Self {
        Self {
            bench: proc_ticks("self").unwrap_or(0),
            broker: pids.broker.and_then(|p| proc_ticks(&p.to_string())),
            redis: pids.redis.and_then(|p| proc_ticks(&p.to_string())),
        }
    }

    fn per_event_since(&self, before: &CpuSnap, events: usize) -> CpuPerEvent {
        let us = |now: u64, then: u64| (now.saturating_sub(then)) as f64 * 1e6 / clock_ticks() / events.max(1) as f64;
        CpuPerEvent {
            bench: us(self.bench, before.bench),
            broker: self.broker.zip(before.broker).map(|(n, t)| us(n, t)),
            redis: self.redis.zip(before.redis).map(|(n, t)| us(n, t)),
        }
    }
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of
/// /proc/PID/stat, counted after the command name's closing parenthesis).
fn proc_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The process listening on a local TCP port: the socket's inode from
/// /proc/net/tcp{,6}, then the process holding it among /proc/*/fd.
fn pid_listening_on(port: u16) -> Option<u32> {
    let hex = format!(":{port:04X}");
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|f| {
        std::fs::read_to_string(f).ok()?.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() > 9 && cols[1].ends_with(&hex) && cols[3] == "0A").then(|| cols[9].to_owned())
        })
    })?;
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|d| {
        let pid: u32 = d.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(d.path().join("fd")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_str() == Some(target.as_str())))
            .then_some(pid)
    })
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
