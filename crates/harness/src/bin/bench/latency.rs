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

/// The baseline: the hand-written dual publisher, per event: produce →
/// ack → PUBLISH of the same notification bytes → the same subscriber.
async fn hand_written(brokers: &str, redis_url: &str, topic: &str, rate: u64, n: usize) -> Vec<Duration> {
    let raw = Arc::new(raw_producer(brokers, topic).await);
    let conn = redis::Client::open(redis_url).expect("url").get_multiplexed_async_connection().await.expect("redis");
    let hand = to_subscriber(redis_url, rate, n, {
        let (raw, topic, conn) = (raw.clone(), Arc::<str>::from(topic), conn);
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
    hand
}

pub(super) async fn latency(brokers: &str, redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    for rate in [2_000u64, 20_000] {
        let topic = unique_topic("bench-lat");
        create_topic(brokers, &topic, 3).await;
        let n = (rate * p.latency_secs) as usize;
        let hand = hand_written(brokers, redis_url, &topic, rate, n).await;
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
