//! The `latency` group: send to notification at a subscriber, ours against a
//! hand-written dual publisher, at fixed rates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use dualstream::core::record::HeaderScratch;
use dualstream::prelude::*;
use dualstream_devstack::clients::*;

use crate::publish::{raw_producer, raw_record};
use crate::{events, percentile, sink_config, Profile, Row};

/// Send → notification at a subscriber, for every event of a run at `rate`;
/// `send` publishes one event by whatever path is measured. Sorted.
pub(super) async fn to_subscriber<F, Fut>(redis_url: &str, rate: u64, n: usize, send: F) -> Vec<Duration>
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
                    split::mark(n.id, split::ARRIVED);
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
                split::mark(e.id(), split::SENT);
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

/// The baseline: the hand-written dual publisher, per event: produce →
/// ack → PUBLISH of the same notification bytes → the same subscriber. An
/// event whose write or PUBLISH failed (at 100,000/s, redis-rs's response
/// timeout) has no sample; the second value counts them.
async fn hand_written(brokers: &str, redis_url: &str, topic: &str, rate: u64, n: usize) -> (Vec<Duration>, usize) {
    let raw = Arc::new(raw_producer(brokers, topic).await);
    let conn = redis::Client::open(redis_url).expect("url").get_multiplexed_async_connection().await.expect("redis");
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hand = to_subscriber(redis_url, rate, n, {
        let (raw, topic, conn, failed) = (raw.clone(), Arc::<str>::from(topic), conn, failed.clone());
        move |e: Event| {
            let (raw, topic, mut conn, failed) = (raw.clone(), topic.clone(), conn.clone(), failed.clone());
            async move {
                let mut scratch = HeaderScratch::default();
                let acked = raw.send(raw_record(&topic, &e, &mut scratch), Duration::from_secs(30)).await;
                let Ok(d) = acked else {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                };
                let n = Notification::for_event(&e, Some(Position { topic, partition: d.partition, offset: d.offset }));
                let published = redis::cmd("PUBLISH")
                    .arg(ChannelNamer::default().channel_for(e.source()))
                    .arg(n.to_json())
                    .query_async::<i64>(&mut conn)
                    .await;
                if published.is_err() {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    })
    .await;
    drop(raw);
    (hand, failed.load(std::sync::atomic::Ordering::Relaxed))
}

/// A diagnostic knob of the group: `DUALSTREAM_BENCH_LAT_<name>`.
fn knob<T: std::str::FromStr>(name: &str) -> Option<T> {
    super::env_knob(&format!("DUALSTREAM_BENCH_LAT_{name}"))
}

/// Rounds of each rate: in each, every side runs once (the hand-written
/// publisher and each of ours), each on a fresh topic, the order turned by
/// one side a round. Each side's row is its round with the lowest p99, as
/// the throughput groups keep each side's best round. One round alone, in a
/// fixed order on one topic, let whichever side ran into the broker's worse
/// moment lose by milliseconds (docs/benchmark-analysis.md).
const ROUNDS: usize = 3;

/// One of our variants of the group.
#[derive(Clone, Copy)]
struct Variant {
    label: &'static str,
    mode: Mode,
    through_engine: bool,
}

/// A side's run: its sorted samples, with the count of failed or
/// notification-less sends.
struct Run<T> {
    lat: Vec<Duration>,
    counts: T,
}

impl<T> Run<T> {
    fn p99(&self) -> f64 {
        percentile(&self.lat, 0.99)
    }
}

/// Keep `run` in `best` when its p99 is lower (or `best` is empty).
fn keep_best<T>(best: &mut Option<Run<T>>, run: Run<T>) {
    if best.as_ref().is_none_or(|b| run.p99() < b.p99()) {
        *best = Some(run);
    }
}

pub(super) async fn latency(brokers: &str, redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    // 100,000 events/s is reported, without a goal. Diagnostic knobs (not
    // for committed runs): RATES (comma-separated), ROUNDS, PARTITIONS, the
    // engine's LANES and PIPELINES (`notify_pipelines`), HV_PIPELINES and
    // HV_MAX_BATCH (the high-volume mode's `high_volume.pipelines` and
    // `max_batch`) and SPLIT (below).
    let rates: Vec<u64> = super::env_list("DUALSTREAM_BENCH_LAT_RATES").unwrap_or_else(|| vec![2_000, 20_000, 100_000]);
    let rounds: usize = knob("ROUNDS").unwrap_or(ROUNDS);
    assert!(rounds > 0, "DUALSTREAM_BENCH_LAT_ROUNDS=0: at least 1 round");
    let partitions: i32 = knob("PARTITIONS").unwrap_or(3);
    let mut engine_config = BatchConfig::default();
    if let Some(lanes) = knob("LANES") {
        engine_config.lanes = lanes;
    }
    if let Some(pipelines) = knob("PIPELINES") {
        engine_config.notify_pipelines = pipelines;
    }
    for rate in rates {
        let n = (rate * p.latency_secs) as usize;
        // Ours: through the engine (submit), and the direct publish() in dual
        // mode; above 10,000 events/s also the high-volume mode, which
        // docs/design.md, "Choosing streams", suggests there.
        let mut variants = vec![
            Variant { label: "engine submit()", mode: Mode::Dual, through_engine: true },
            Variant { label: "publish()", mode: Mode::Dual, through_engine: false },
        ];
        if rate > 10_000 {
            variants.push(Variant {
                label: "publish(), high-volume mode",
                mode: Mode::HighVolume,
                through_engine: false,
            });
        }
        let mut hand_best: Option<Run<usize>> = None;
        let mut ours_best: Vec<Option<Run<Arc<Outcomes>>>> = variants.iter().map(|_| None).collect();
        // Every round's p99, per side, for the row's note.
        let mut hand_p99s = Vec::new();
        let mut ours_p99s: Vec<Vec<f64>> = variants.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            // Every run on a fresh topic, and the order of the sides turned
            // by one each round: tansu slows as a topic and the broker fill,
            // so a side that always ran last, on a topic holding the others'
            // events, would always run on the slowest broker.
            let sides = variants.len() + 1;
            for k in 0..sides {
                let side = (round + k) % sides;
                let topic = unique_topic("bench-lat");
                create_topic(brokers, &topic, partitions).await;
                if side == 0 {
                    let (lat, failed) = hand_written(brokers, redis_url, &topic, rate, n).await;
                    let run = Run { lat, counts: failed };
                    println!(
                        "  latency {rate}/s round {}: hand-written p50 {:.2} p99 {:.2} ms",
                        round + 1,
                        percentile(&run.lat, 0.5),
                        run.p99()
                    );
                    hand_p99s.push(run.p99());
                    keep_best(&mut hand_best, run);
                    continue;
                }
                let (i, v) = (side - 1, variants[side - 1]);
                let run = our_variant(brokers, redis_url, &topic, rate, n, v, &engine_config).await;
                println!(
                    "  latency {rate}/s round {}: {} p50 {:.2} p99 {:.2} ms ({})",
                    round + 1,
                    v.label,
                    percentile(&run.lat, 0.5),
                    run.p99(),
                    run.counts
                );
                ours_p99s[i].push(run.p99());
                keep_best(&mut ours_best[i], run);
            }
        }
        let Some(hand) = hand_best else { return };
        let fmt_p99s = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
        for ((v, ours), p99s) in variants.iter().zip(ours_best).zip(&ours_p99s) {
            let Some(ours) = ours else { continue };
            for (q_label, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
                let (o, b) = (percentile(&ours.lat, q), percentile(&hand.lat, q));
                rows.push(Row {
                    group: "latency",
                    name: format!("latency at {rate}/s, {}, {q_label}, ms", v.label),
                    ours: o,
                    baseline: b,
                    unit: "ms",
                    goal: match (q_label, rate) {
                        ("p99", 100_000) => "reported".into(),
                        ("p99", _) => "≤ hand-written + 1 ms".into(),
                        _ => "-".into(),
                    },
                    met: (q_label == "p99" && rate < 100_000).then_some(o <= b + 1.0),
                    cpu: None,
                    note: format!(
                        "{}-second runs, best (lowest p99) of {rounds} rounds, each run on a fresh topic, the sides in turn (the order turned each round), p99 of every round: ours {}, hand-written {}; send → notification at a PSUBSCRIBE subscriber on its own thread ({} of {n} measured; hand-written {} of {n}, {} failed); ours' notifications by outcome: {}; baseline = hand-written dual publisher per event: produce → ack → PUBLISH",
                        p.latency_secs,
                        fmt_p99s(p99s),
                        fmt_p99s(&hand_p99s),
                        ours.lat.len(),
                        hand.lat.len(),
                        hand.counts,
                        ours.counts,
                    ),
                });
            }
            println!(
                "  latency {rate}/s {}: ours p50 {:.2} p99 {:.2} ms ({}); hand-written p50 {:.2} p99 {:.2} ms (best of {rounds})",
                v.label,
                percentile(&ours.lat, 0.5),
                ours.p99(),
                ours.counts,
                percentile(&hand.lat, 0.5),
                hand.p99()
            );
        }
    }
}

/// One run of one of our variants on `topic`: its samples and its
/// notifications by outcome.
async fn our_variant(
    brokers: &str,
    redis_url: &str,
    topic: &str,
    rate: u64,
    n: usize,
    v: Variant,
    engine_config: &BatchConfig,
) -> Run<Arc<Outcomes>> {
    let sink = KafkaSink::new(sink_config(brokers, topic)).expect("sink");
    let sink: Arc<dyn DurableSink> = if split::on() { Arc::new(split::SplitSink(sink)) } else { Arc::new(sink) };
    let mut config = PublisherConfig { mode: v.mode, ..PublisherConfig::default() };
    if let Some(pipelines) = knob("HV_PIPELINES") {
        config.high_volume.pipelines = pipelines;
    }
    if let Some(max) = knob("HV_MAX_BATCH") {
        config.high_volume.max_batch = max;
    }
    let notifier: Arc<dyn RealtimeNotifier> = if split::on() {
        Arc::new(split::SplitNotifier(redis_notifier(redis_url)))
    } else {
        Arc::new(redis_notifier(redis_url))
    };
    let publisher =
        DualPublisher::builder().durable(sink).notifier(notifier).config(config).build().expect("publisher");
    publisher.publish(events(1, 10).remove(0)).await.expect("warm-up");
    let outcomes = Arc::new(Outcomes::default());
    let caller = if v.through_engine {
        Caller::Engine(BatchEngine::new(publisher, engine_config.clone()).expect("engine"))
    } else {
        Caller::Publisher(publisher)
    };
    let lat = to_subscriber(redis_url, rate, n, {
        let (caller, outcomes) = (caller.clone(), outcomes.clone());
        move |e: Event| {
            let (caller, outcomes) = (caller.clone(), outcomes.clone());
            async move { outcomes.add(caller.send(e).await.as_ref()) }
        }
    })
    .await;
    caller.shutdown().await;
    split::report(v.label);
    Run { lat, counts: outcomes }
}

/// How a variant publishes: through the engine (`submit`) or straight
/// through the publisher (`publish`).
#[derive(Clone)]
enum Caller {
    Engine(BatchEngine),
    Publisher(DualPublisher),
}

impl Caller {
    /// Publish one event: its receipt's notification outcome, or `None` for
    /// a publish that failed.
    async fn send(&self, e: Event) -> Option<NotificationOutcome> {
        match self {
            Caller::Engine(engine) => engine.submit(e).await.ok().map(|r| r.notification),
            Caller::Publisher(publisher) => publisher.publish(e).await.ok().map(|r| r.notification),
        }
    }

    async fn shutdown(&self) {
        match self {
            Caller::Engine(engine) => engine.shutdown().await,
            Caller::Publisher(publisher) => {
                let _ = publisher.shutdown(Duration::from_secs(10)).await;
            }
        }
    }
}

/// `DUALSTREAM_BENCH_LAT_SPLIT=1` (diagnostic, not for committed runs):
/// each event's way split in three, printed per variant: send → handed to
/// the Kafka sink, handed → acknowledged (as the awaiting task sees it),
/// acknowledged → at the subscriber. One lock per mark, so the figures are
/// a little higher than without it.
mod split {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};
    use std::time::{Duration, Instant};

    use dualstream::prelude::*;

    pub(super) const SENT: usize = 0;
    const HANDED: usize = 1;
    const ACKED: usize = 2;
    pub(super) const ARRIVED: usize = 3;
    /// The notifier was called with the event's notification, and answered.
    const TAKEN: usize = 4;
    const ANSWERED: usize = 5;

    type Marks = HashMap<dualstream::EventId, [Option<Instant>; 6]>;
    static MARKS: LazyLock<Mutex<Marks>> = LazyLock::new(Default::default);
    static ON: LazyLock<bool> = LazyLock::new(|| std::env::var_os("DUALSTREAM_BENCH_LAT_SPLIT").is_some());

    pub(super) fn on() -> bool {
        *ON
    }

    pub(super) fn mark(id: dualstream::EventId, stage: usize) {
        if on() {
            MARKS.lock().expect("lock").entry(id).or_default()[stage] = Some(Instant::now());
        }
    }

    /// Print the three parts' p50 and p99 over the events marked at every
    /// stage, and forget the marks.
    pub(super) fn report(label: &str) {
        if !on() {
            return;
        }
        let marks = std::mem::take(&mut *MARKS.lock().expect("lock"));
        let mut parts: [Vec<Duration>; 6] = Default::default();
        for m in marks.values() {
            if let [Some(sent), Some(handed), Some(acked), Some(arrived), taken, answered] = m {
                parts[0].push(*handed - *sent);
                parts[1].push(*acked - *handed);
                parts[2].push(*arrived - *acked);
                // The last part split at the notifier call (when the
                // notification reached one).
                if let (Some(taken), Some(answered)) = (taken, answered) {
                    parts[3].push(taken.saturating_duration_since(*acked));
                    parts[4].push(*arrived - *taken);
                    parts[5].push(*answered - *taken);
                }
            }
        }
        let names = [
            "send → handed",
            "handed → acked",
            "acked → arrived",
            "acked → in a notifier call",
            "notifier call → arrived",
            "notifier call → answered",
        ];
        for (name, mut d) in names.into_iter().zip(parts) {
            d.sort();
            println!(
                "    {label}, {name}: p50 {:.2} p99 {:.2} ms ({} events)",
                crate::percentile(&d, 0.5),
                crate::percentile(&d, 0.99),
                d.len()
            );
        }
    }

    /// The notifier, marking when a call with each notification starts and
    /// when it is answered.
    pub(super) struct SplitNotifier<N>(pub(super) N);

    #[async_trait::async_trait]
    impl<N: RealtimeNotifier> RealtimeNotifier for SplitNotifier<N> {
        async fn notify(&self, notification: &Notification) -> Result<(), dualstream::NotifyError> {
            mark(notification.id, TAKEN);
            let r = self.0.notify(notification).await;
            mark(notification.id, ANSWERED);
            r
        }

        async fn notify_batch(&self, notifications: &[Notification]) -> Result<(), dualstream::NotifyError> {
            notifications.iter().for_each(|n| mark(n.id, TAKEN));
            let r = self.0.notify_batch(notifications).await;
            notifications.iter().for_each(|n| mark(n.id, ANSWERED));
            r
        }

        async fn health_check(&self) -> Result<(), dualstream::NotifyError> {
            self.0.health_check().await
        }
    }

    /// The Kafka sink, marking when each batch is handed over and when the
    /// task awaiting its acknowledgements sees them.
    pub(super) struct SplitSink(pub(super) KafkaSink);

    #[async_trait::async_trait]
    impl DurableSink for SplitSink {
        async fn publish(&self, event: Event) -> Result<Position, dualstream::DeliveryError> {
            self.enqueue_batch(vec![event]).await.await.pop().expect("one result")
        }

        async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<Position, dualstream::DeliveryError>> {
            self.enqueue_batch(events).await.await
        }

        async fn enqueue_batch(&self, events: Vec<Event>) -> dualstream::core::PendingAcks {
            let ids: Vec<_> = events.iter().map(|e| e.id()).collect();
            ids.iter().for_each(|id| mark(*id, HANDED));
            let acks = self.0.enqueue_batch(events).await;
            Box::pin(async move {
                let results = acks.await;
                ids.iter().for_each(|id| mark(*id, ACKED));
                results
            })
        }

        async fn health_check(&self) -> Result<(), dualstream::SinkError> {
            self.0.health_check().await
        }

        async fn flush(&self, timeout: Duration) -> Result<(), dualstream::SinkError> {
            self.0.flush(timeout).await
        }
    }
}

/// The callers' receipts by notification outcome. A notification that was
/// skipped or timed out never reaches the subscriber, so it has no latency
/// sample: the row's note says how many, and how many publishes failed.
#[derive(Default)]
struct Outcomes([std::sync::atomic::AtomicUsize; 7]);

impl Outcomes {
    const NAMES: [&'static str; 7] =
        ["sent", "queued", "skipped", "failed", "timed out", "disabled", "not published (an error)"];

    /// A receipt's notification outcome, or `None` for a publish that failed.
    fn add(&self, outcome: Option<&NotificationOutcome>) {
        let i = match outcome {
            Some(NotificationOutcome::Sent) => 0,
            Some(NotificationOutcome::Queued) => 1,
            Some(NotificationOutcome::Skipped) => 2,
            Some(NotificationOutcome::Failed) => 3,
            Some(NotificationOutcome::TimedOut) => 4,
            Some(_) => 5,
            None => 6,
        };
        self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Display for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts = self.0.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
        let parts: Vec<String> =
            Self::NAMES.iter().zip(counts).filter(|(_, c)| *c > 0).map(|(n, c)| format!("{c} {n}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Start `f(event)` at a fixed rate (in ticks of 1 ms), await all; sorted
/// durations.
pub(super) async fn paced<F, Fut>(rate: u64, evs: Vec<Event>, f: F) -> Vec<Duration>
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
