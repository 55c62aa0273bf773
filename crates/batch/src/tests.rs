//! The engine's rules, with test sinks behind a real `DualPublisher`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dualstream_core::{DeliveryError, DurableSink, Event, Position, SinkError};
use dualstream_publisher::{DualPublisher, Mode};
use tokio::sync::Semaphore;

use crate::{BatchConfig, BatchEngine, BatchError, ConfigError};

/// Stores events in memory, batch by batch; fails events whose payload is
/// "fail"; waits for a permit per batch when gated; panics on "panic".
#[derive(Default)]
struct TestSink {
    batches: Mutex<Vec<Vec<Event>>>,
    next: AtomicI64,
    gate: Option<Arc<Semaphore>>,
}

#[async_trait]
impl DurableSink for TestSink {
    async fn publish(&self, event: Event) -> Result<Position, DeliveryError> {
        self.publish_batch(vec![event]).await.pop().expect("one result")
    }
    async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<Position, DeliveryError>> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate").forget();
        }
        if events.iter().any(|e| e.payload().as_ref() == b"panic") {
            panic!("sink bug");
        }
        self.batches.lock().expect("lock").push(events.clone());
        events
            .into_iter()
            .map(|e| {
                if e.payload().as_ref() == b"fail" {
                    Err(DeliveryError::new(SinkError::Rejected { reason: "fail".into() }, e))
                } else {
                    Ok(Position::new("t", 0, self.next.fetch_add(1, Ordering::SeqCst)))
                }
            })
            .collect()
    }
    async fn health_check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

fn event(source: &str, payload: &str) -> Event {
    Event::builder("t", "user", source).payload(payload.to_owned()).build().expect("valid")
}

fn engine(sink: Arc<TestSink>, config: BatchConfig) -> BatchEngine {
    let publisher = DualPublisher::builder().durable(sink).mode(Mode::DurableOnly).build().expect("publisher");
    BatchEngine::new(publisher, config).expect("engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_gets_its_own_result() {
    let sink = Arc::new(TestSink::default());
    let engine = engine(sink.clone(), BatchConfig { linger_ms: 20, ..BatchConfig::default() });
    let calls = (0..100).map(|i| {
        let engine = engine.clone();
        let e = event(&format!("s{}", i % 3), if i % 10 == 0 { "fail" } else { "ok" });
        let id = e.id();
        async move { (id, engine.submit(e).await) }
    });
    for (id, result) in futures::future::join_all(calls).await {
        match result {
            Ok(receipt) => assert_eq!(receipt.event_id, id),
            Err(err) => {
                let e = err.into_event().expect("failed event handed back");
                assert_eq!(e.id(), id);
                assert_eq!(e.payload().as_ref(), b"fail");
            }
        }
    }
    let batches = sink.batches.lock().expect("lock");
    assert!(batches.len() < 100, "events were grouped: {} batches", batches.len());
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_respect_the_count_bound() {
    let sink = Arc::new(TestSink::default());
    let engine =
        engine(sink.clone(), BatchConfig { max_batch_events: 64, lanes: 1, linger_ms: 50, ..BatchConfig::default() });
    let calls = (0..1000).map(|i| engine.submit(event("a", &i.to_string())));
    assert!(futures::future::join_all(calls).await.iter().all(Result::is_ok));
    let batches = sink.batches.lock().expect("lock");
    assert!(batches.iter().all(|b| b.len() <= 64));
    assert!(batches.iter().any(|b| b.len() == 64), "full batches are sent without waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_source_are_written_in_submission_order() {
    let sink = Arc::new(TestSink::default());
    let engine =
        engine(sink.clone(), BatchConfig { max_batch_events: 7, lanes: 4, linger_ms: 1, ..BatchConfig::default() });
    // join_all polls the submits in order, so each source's events enter
    // the engine in order without awaiting one another.
    let mut expected: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut calls = Vec::new();
    for i in 0..800 {
        let source = format!("s{}", i % 9);
        expected.entry(source.clone()).or_default().push(i.to_string());
        calls.push(engine.submit(event(&source, &i.to_string())));
    }
    assert!(futures::future::join_all(calls).await.iter().all(Result::is_ok));
    let mut written: std::collections::HashMap<String, Vec<String>> = Default::default();
    for e in sink.batches.lock().expect("lock").iter().flatten() {
        written
            .entry(e.source().source_id().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(e.payload()).into_owned());
    }
    assert_eq!(written, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_waits_then_fails_with_the_event_and_memory_stays_bounded() {
    let gate = Arc::new(Semaphore::new(0));
    let sink = Arc::new(TestSink { gate: Some(gate.clone()), ..TestSink::default() });
    let engine = engine(
        sink.clone(),
        BatchConfig { max_queued_events: 10, submit_timeout_ms: 100, lanes: 1, ..BatchConfig::default() },
    );
    let accepted: Vec<_> = (0..10)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.submit(event("a", &i.to_string())).await })
        })
        .collect();
    wait_until("the ten submits are queued", || engine.queued() >= 10).await;
    let extra = event("a", "extra");
    let err = engine.submit(extra.clone()).await.expect_err("queue is full");
    assert!(matches!(&err, BatchError::QueueFull { waited, .. } if *waited == Duration::from_millis(100)), "{err}");
    assert!(err.is_retriable());
    assert_eq!(err.into_event(), Some(extra), "the refused event is handed back");
    assert_eq!(engine.queued(), 10, "never more than the bound");
    gate.add_permits(1_000);
    for h in accepted {
        h.await.expect("task").expect("accepted events are published once the sink moves");
    }
    assert_eq!(engine.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_the_byte_bound_is_refused_at_once() {
    let sink = Arc::new(TestSink::default());
    let engine = engine(sink, BatchConfig { max_queued_bytes: 4096, ..BatchConfig::default() });
    let big = Event::builder("t", "user", "a").payload(vec![0u8; 8192]).build().expect("valid");
    let err = engine.submit(big).await.expect_err("too large");
    assert!(matches!(err, BatchError::TooLarge { max: 4096, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_everything_accepted_and_refuses_the_rest() {
    let sink = Arc::new(TestSink::default());
    let engine =
        engine(sink.clone(), BatchConfig { linger_ms: 1_000, max_batch_events: 10_000, ..BatchConfig::default() });
    let pending: Vec<_> = (0..500)
        .map(|i| {
            let engine = engine.clone();
            let e = event(&format!("s{}", i % 5), "ok");
            tokio::spawn(async move { (e.clone(), engine.submit(e).await) })
        })
        .collect();
    wait_until("the 500 submits have their queue share", || engine.queued() >= 500).await;
    engine.shutdown().await;
    // A submit holds its share a moment before its event reaches the lane
    // (no await between them): one that gets there after the lane stopped
    // is refused, its event handed back. At most one per worker thread can
    // be in that moment. Everything that reached a lane is published.
    let mut accepted = 0;
    for h in pending {
        match h.await.expect("task") {
            (_, Ok(_)) => accepted += 1,
            (e, Err(BatchError::Closed { event })) => assert_eq!(*event, e, "a refused event is handed back"),
            (_, Err(other)) => panic!("an accepted event was not published at shutdown: {other}"),
        }
    }
    assert!(accepted >= 500 - 2, "only submits on their way to a lane are refused: {accepted} accepted");
    assert_eq!(sink.batches.lock().expect("lock").iter().map(Vec::len).sum::<usize>(), accepted);
    let late = event("a", "late");
    match engine.submit(late.clone()).await {
        Err(BatchError::Closed { event }) => assert_eq!(*event, late),
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_resolves_its_callers_instead_of_leaving_them_hanging() {
    let sink = Arc::new(TestSink::default());
    let engine = engine(sink, BatchConfig { lanes: 1, linger_ms: 50, ..BatchConfig::default() });
    let calls =
        vec![engine.submit(event("a", "ok")), engine.submit(event("a", "panic")), engine.submit(event("a", "ok"))];
    let results = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(calls))
        .await
        .expect("callers are resolved, not left hanging");
    assert!(results.iter().all(|r| matches!(r, Err(BatchError::WorkerGone))), "{results:?}");
    // The engine reports the dead lane instead of passing for open, and
    // refuses its sources with an error that says so and hands the event
    // back.
    assert_eq!(engine.dead_lanes(), vec![0]);
    let after = event("a", "ok");
    match engine.submit(after.clone()).await {
        Err(BatchError::LaneDead { event, lane: 0 }) => assert_eq!(*event, after),
        other => panic!("expected LaneDead, got {other:?}"),
    }
    let many = engine.submit_many(vec![event("a", "x"), event("b", "y")]).await;
    assert!(many.iter().all(|r| matches!(r, Err(BatchError::LaneDead { .. }))), "{many:?}");
}

/// The engine hands one `Result<Receipt, BatchError>` back per event, and
/// moves it twice on the way: with the event held by value in the error it
/// was 160 bytes (memmove was 6 % of a profile); boxed, it is 64.
#[test]
fn a_per_event_result_stays_small() {
    let size = std::mem::size_of::<Result<dualstream_publisher::Receipt, BatchError>>();
    assert!(size <= 64, "Result<Receipt, BatchError> is {size} bytes");
}

/// The other way to keep the event out of the result: hand it back by its
/// index in the caller's batch. The error would then hold a `u32` where it
/// holds a `Box<Event>`, and the result would be no smaller: the receipt
/// sets its size, not the error. So the success path moves the same bytes
/// either way, and the box costs an allocation only on a failure (measured
/// with this stand-in of BatchError's largest variant; docs/benchmark-analysis.md).
#[test]
fn an_index_in_place_of_the_boxed_event_would_not_shrink_the_result() {
    #[allow(dead_code)]
    enum ByIndex {
        TooLarge { index: u32, size: usize, max: usize },
        LaneDead { index: u32, lane: usize },
    }
    type Receipt = dualstream_publisher::Receipt;
    let boxed = std::mem::size_of::<Result<Receipt, BatchError>>();
    let by_index = std::mem::size_of::<Result<Receipt, ByIndex>>();
    let receipt = std::mem::size_of::<Receipt>();
    assert!(boxed <= receipt + 8, "the boxed error sets the size: {boxed} bytes, a receipt {receipt}");
    assert_eq!(boxed, by_index, "Result<Receipt, _>: boxed event {boxed} bytes, index {by_index}");
}

#[tokio::test]
async fn config_is_validated() {
    let sink = Arc::new(TestSink::default());
    let publisher = DualPublisher::builder().durable(sink).mode(Mode::DurableOnly).build().expect("publisher");
    let err = BatchEngine::new(publisher, BatchConfig { lanes: 0, ..BatchConfig::default() }).expect_err("lanes");
    assert!(matches!(err, ConfigError::Invalid { field: "lanes", .. }));
    for name in ["", "a b", "ingest\n", &"x".repeat(65)] {
        let err = BatchConfig { name: name.to_owned(), ..BatchConfig::default() }.validate().expect_err(name);
        assert!(matches!(err, ConfigError::Invalid { field: "name", .. }), "{err}");
    }
    BatchConfig { name: "ingest-1.eu_west".to_owned(), ..BatchConfig::default() }.validate().expect("a good name");
}

/// A notifier whose first batch waits until the durable sink has received a
/// second batch, and records the order of what it was sent.
struct WaitingNotifier {
    second_batch_stored: Arc<tokio::sync::Notify>,
    seen: Mutex<Vec<i64>>,
}

#[async_trait]
impl dualstream_core::RealtimeNotifier for WaitingNotifier {
    async fn notify(&self, n: &dualstream_core::Notification) -> Result<(), dualstream_core::NotifyError> {
        self.notify_batch(std::slice::from_ref(n)).await
    }
    async fn notify_batch(&self, ns: &[dualstream_core::Notification]) -> Result<(), dualstream_core::NotifyError> {
        let first = self.seen.lock().expect("lock").is_empty();
        if first {
            self.second_batch_stored.notified().await;
        }
        self.seen.lock().expect("lock").extend(ns.iter().filter_map(|n| n.position.as_ref().map(|p| p.offset)));
        Ok(())
    }
    async fn health_check(&self) -> Result<(), dualstream_core::NotifyError> {
        Ok(())
    }
}

/// Signals once it has stored two batches.
struct SignallingSink {
    inner: TestSink,
    second_batch_stored: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl DurableSink for SignallingSink {
    async fn publish(&self, event: Event) -> Result<Position, DeliveryError> {
        self.publish_batch(vec![event]).await.pop().expect("one result")
    }
    async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<Position, DeliveryError>> {
        let out = self.inner.publish_batch(events).await;
        if self.inner.batches.lock().expect("lock").len() == 2 {
            self.second_batch_stored.notify_one();
        }
        out
    }
    async fn health_check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_path_does_not_wait_for_notifications_and_their_order_holds() {
    let signal = Arc::new(tokio::sync::Notify::new());
    let sink = Arc::new(SignallingSink { inner: TestSink::default(), second_batch_stored: signal.clone() });
    let notifier = Arc::new(WaitingNotifier { second_batch_stored: signal, seen: Mutex::new(Vec::new()) });
    // A notify bound long enough that the first batch's notifications only
    // go out once the second batch is stored: possible only if the lane
    // stores batch 2 while batch 1's notifications are pending.
    let publisher = DualPublisher::builder()
        .durable(sink.clone())
        .notifier(notifier.clone())
        .config(dualstream_publisher::PublisherConfig { notify_timeout_ms: 30_000, ..Default::default() })
        .build()
        .expect("publisher");
    let engine =
        BatchEngine::new(publisher, BatchConfig { lanes: 1, linger_ms: 1, ..BatchConfig::default() }).expect("engine");
    let first = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.submit(event("a", "1")).await })
    };
    // Let the first batch be stored before the second is submitted.
    wait_until("the first batch is stored", || !sink.inner.batches.lock().expect("lock").is_empty()).await;
    let second = tokio::time::timeout(Duration::from_secs(10), engine.submit(event("a", "2")))
        .await
        .expect("the second batch is stored and notified while the first one's notifications wait")
        .expect("receipt");
    let first = first.await.expect("task").expect("receipt");
    assert_eq!(first.notification, dualstream_publisher::NotificationOutcome::Sent);
    assert_eq!(second.notification, dualstream_publisher::NotificationOutcome::Sent);
    assert_eq!(*notifier.seen.lock().expect("lock"), vec![0, 1], "notifications in lane order");
    engine.shutdown().await;
}

/// A notifier that records what it was sent, in the order calls started,
/// and holds every call until released (or not at all when `hold` is None).
#[derive(Default)]
struct HeldNotifier {
    hold: Option<Arc<Semaphore>>,
    /// Per call: the offsets it carried, recorded when the call starts.
    calls: Mutex<Vec<Vec<i64>>>,
    /// Every notification as (source id, offset), in the same order.
    seen: Mutex<Vec<(String, i64)>>,
    delay: Duration,
}

impl HeldNotifier {
    fn seen(&self) -> Vec<(String, i64)> {
        self.seen.lock().expect("lock").clone()
    }
}

#[async_trait]
impl dualstream_core::RealtimeNotifier for HeldNotifier {
    async fn notify(&self, n: &dualstream_core::Notification) -> Result<(), dualstream_core::NotifyError> {
        self.notify_batch(std::slice::from_ref(n)).await
    }
    async fn notify_batch(&self, ns: &[dualstream_core::Notification]) -> Result<(), dualstream_core::NotifyError> {
        self.calls
            .lock()
            .expect("lock")
            .push(ns.iter().filter_map(|n| n.position.as_ref().map(|p| p.offset)).collect());
        let offset = |n: &dualstream_core::Notification| n.position.as_ref().map_or(-1, |p| p.offset);
        self.seen.lock().expect("lock").extend(ns.iter().map(|n| (n.source_id.to_string(), offset(n))));
        if let Some(hold) = &self.hold {
            hold.acquire().await.expect("hold").forget();
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(())
    }
    async fn health_check(&self) -> Result<(), dualstream_core::NotifyError> {
        Ok(())
    }
}

fn dual_engine(sink: Arc<dyn DurableSink>, notifier: Arc<HeldNotifier>, config: BatchConfig) -> BatchEngine {
    let publisher = DualPublisher::builder()
        .durable(sink)
        .notifier(notifier)
        .config(dualstream_publisher::PublisherConfig { notify_timeout_ms: 30_000, ..Default::default() })
        .build()
        .expect("publisher");
    BatchEngine::new(publisher, config).expect("engine")
}

/// A dual engine whose notifier holds every call until `hold` gets permits.
fn held_dual_engine(sink: Arc<TestSink>, config: BatchConfig) -> (BatchEngine, Arc<HeldNotifier>, Arc<Semaphore>) {
    let hold = Arc::new(Semaphore::new(0));
    let notifier = Arc::new(HeldNotifier { hold: Some(hold.clone()), ..HeldNotifier::default() });
    (dual_engine(sink, notifier.clone(), config), notifier, hold)
}

type Submitted = tokio::task::JoinHandle<Result<dualstream_publisher::Receipt, BatchError>>;

/// Submit one event of source "a" and wait until its notification call has
/// started (and is held by the notifier).
async fn first_notification_held(engine: &BatchEngine, notifier: &HeldNotifier, payload: &str) -> Submitted {
    let first = tokio::spawn({
        let (engine, e) = (engine.clone(), event("a", payload));
        async move { engine.submit(e).await }
    });
    wait_until("the first pipeline started", || notifier.calls.lock().expect("lock").len() == 1).await;
    first
}

/// Submit events of source "a" numbered by `range`, waiting after every
/// `per_batch` until they are stored, so they form batches of that size.
async fn submit_in_stored_batches(
    engine: &BatchEngine,
    sink: &TestSink,
    range: std::ops::RangeInclusive<usize>,
    per_batch: usize,
) -> Vec<Submitted> {
    let mut out = Vec::new();
    for i in range {
        let engine = engine.clone();
        out.push(tokio::spawn(async move { engine.submit(event("a", &i.to_string())).await }));
        if i % per_batch == 0 {
            wait_until("the batch is stored", || sink.batches.lock().expect("lock").iter().flatten().count() > i).await;
        }
    }
    out
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_many_returns_results_in_input_order_and_keeps_each_sources_order() {
    let sink = Arc::new(TestSink::default());
    // Small chunks, so one call spans several chunks and lanes.
    let engine = engine(sink.clone(), BatchConfig { max_batch_events: 16, lanes: 3, ..BatchConfig::default() });
    let events: Vec<Event> =
        (0..500).map(|i| event(&format!("s{}", i % 7), if i % 50 == 0 { "fail" } else { "ok" })).collect();
    let results = engine.submit_many(events.clone()).await;
    assert_eq!(results.len(), events.len());
    for (e, r) in events.iter().zip(&results) {
        match r {
            Ok(receipt) => assert_eq!(receipt.event_id, e.id()),
            Err(BatchError::Publish(p)) => assert_eq!(e.payload().as_ref(), b"fail", "{p}"),
            Err(other) => panic!("unexpected {other}"),
        }
    }
    let mut written: std::collections::HashMap<String, Vec<dualstream_core::EventId>> = Default::default();
    for e in sink.batches.lock().expect("lock").iter().flatten() {
        written.entry(e.source().source_id().to_owned()).or_default().push(e.id());
    }
    for s in 0..7 {
        let source = format!("s{s}");
        let expected: Vec<_> = events.iter().filter(|e| e.source().source_id() == source).map(Event::id).collect();
        assert_eq!(written[&source], expected, "order of {source}");
    }
}

/// Paused time: the gate opens 400 ms after the call in the engine's own
/// clock, so the 100 ms submit timeout has always expired by then (on real
/// time a busy machine could start the call so late that everything fit).
#[tokio::test(start_paused = true)]
async fn submit_many_hands_back_what_does_not_fit_and_nothing_overtakes() {
    let gate = Arc::new(Semaphore::new(0));
    let sink = Arc::new(TestSink { gate: Some(gate.clone()), ..TestSink::default() });
    let engine = engine(
        sink.clone(),
        BatchConfig { max_queued_events: 40, submit_timeout_ms: 100, lanes: 1, ..BatchConfig::default() },
    );
    // The sink holds every batch: the first chunks fill the queue, the rest
    // must come back as QueueFull, every event handed back, in order.
    let events: Vec<Event> = (0..100).map(|i| event("a", &i.to_string())).collect();
    let call = tokio::spawn({
        let engine = engine.clone();
        let events = events.clone();
        async move { engine.submit_many(events).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    gate.add_permits(1000);
    let results = call.await.expect("task");
    let first_full = results.iter().position(|r| matches!(r, Err(BatchError::QueueFull { .. }))).expect("some full");
    assert!(results[..first_full].iter().all(Result::is_ok));
    for (e, r) in events.iter().zip(&results).skip(first_full) {
        match r {
            Err(BatchError::QueueFull { event, .. }) => assert_eq!(**event, *e, "handed back"),
            other => panic!("an event after the refused chunk was not refused: {other:?}"),
        }
    }
    let stored = sink.batches.lock().expect("lock").iter().flatten().count();
    assert_eq!(stored, first_full, "only accepted events were stored");
    // A too-large event fails alone, with the later events of its source.
    let engine = engine_with_bytes(sink.clone(), 2048);
    let big = event("b", &"x".repeat(4096));
    let results = engine.submit_many(vec![event("b", "1"), big, event("c", "1"), event("b", "2")]).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(matches!(results[1], Err(BatchError::TooLarge { .. })));
    assert!(
        matches!(&results[3], Err(BatchError::Publish(dualstream_publisher::PublishError::Durable(d))) if matches!(d.error, SinkError::EarlierFailed { .. })),
        "{:?}",
        results[3]
    );
}

fn engine_with_bytes(sink: Arc<TestSink>, max_queued_bytes: usize) -> BatchEngine {
    engine(sink, BatchConfig { max_queued_bytes, ..BatchConfig::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_notifier_gets_merged_pipelines_and_holds_no_durable_capacity() {
    let sink = Arc::new(TestSink::default());
    let (engine, notifier, hold) = held_dual_engine(
        sink.clone(),
        BatchConfig { lanes: 1, notify_pipelines: 1, max_batch_events: 10, ..BatchConfig::default() },
    );
    // First batch: its notifications are held.
    let first = first_notification_held(&engine, &notifier, "0").await;
    // Twenty more batches of ten while Redis is "slow": all stored, queue share
    // given back at the durable ack, callers waiting for notifications.
    let rest = submit_in_stored_batches(&engine, &sink, 1..=200, 10).await;
    wait_until("every batch is stored", || sink.batches.lock().expect("lock").iter().flatten().count() == 201).await;
    wait_until("durable capacity is given back", || engine.queued() == 0).await;
    assert_eq!(notifier.calls.lock().expect("lock").len(), 1, "one pipeline in flight");
    hold.add_permits(1000);
    first.await.expect("task").expect("receipt");
    for r in rest {
        let receipt = r.await.expect("task").expect("receipt");
        assert_eq!(receipt.notification, dualstream_publisher::NotificationOutcome::Sent);
    }
    let calls = notifier.calls.lock().expect("lock").clone();
    assert_eq!(calls.len(), 2, "everything that waited went into one pipeline: {calls:?}");
    let sent: Vec<i64> = calls.into_iter().flatten().collect();
    assert_eq!(sent, (0..201).collect::<Vec<i64>>(), "every notification, in batch order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_pipelines_in_flight_start_and_resolve_in_batch_order() {
    let sink = Arc::new(TestSink::default());
    let notifier = Arc::new(HeldNotifier { delay: Duration::from_millis(30), ..HeldNotifier::default() });
    let engine = dual_engine(
        sink.clone(),
        notifier.clone(),
        BatchConfig { lanes: 1, notify_pipelines: 3, max_batch_events: 5, ..BatchConfig::default() },
    );
    let mut tasks = Vec::new();
    for i in 0..60 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move { engine.submit(event("a", &i.to_string())).await }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut offsets = Vec::new();
    for t in tasks {
        offsets.push(t.await.expect("task").expect("receipt").position.expect("position").offset);
    }
    let calls = notifier.calls.lock().expect("lock").clone();
    assert!(calls.len() > 1, "more than one pipeline: {calls:?}");
    let sent: Vec<i64> = calls.into_iter().flatten().collect();
    assert_eq!(sent, (0..60).collect::<Vec<i64>>(), "pipelines started in batch order");
    // Each event stored once. (The tasks are spawned 2 ms apart, but a busy
    // machine may let a later task submit first: their order is not the
    // engine's to keep.)
    offsets.sort_unstable();
    assert_eq!(offsets, (0..60).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_nothing_to_notify_does_not_resolve_ahead_of_earlier_batches() {
    let sink = Arc::new(TestSink::default());
    let (engine, notifier, hold) = held_dual_engine(sink.clone(), BatchConfig { lanes: 1, ..BatchConfig::default() });
    let first = first_notification_held(&engine, &notifier, "ok").await;
    // Every event of this batch fails: it has nothing to notify.
    let second = tokio::spawn({
        let engine = engine.clone();
        async move { engine.submit(event("a", "fail")).await }
    });
    wait_until("the second batch is stored", || sink.batches.lock().expect("lock").len() == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished(), "the failed batch resolved ahead of the first batch");
    hold.add_permits(10);
    first.await.expect("task").expect("receipt");
    assert!(second.await.expect("task").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_backlog_over_its_bound_is_skipped_not_held() {
    let sink = Arc::new(TestSink::default());
    // The backlog bound is max_queued_events (20 here).
    let (engine, notifier, hold) = held_dual_engine(
        sink.clone(),
        BatchConfig { lanes: 1, notify_pipelines: 1, max_queued_events: 20, ..BatchConfig::default() },
    );
    let first = first_notification_held(&engine, &notifier, "0").await;
    let rest = submit_in_stored_batches(&engine, &sink, 1..=50, 5).await;
    hold.add_permits(100);
    first.await.expect("task").expect("receipt");
    let outcomes: Vec<_> = {
        let mut v = Vec::new();
        for r in rest {
            v.push(r.await.expect("task").expect("stored durably all the same").notification);
        }
        v
    };
    use dualstream_publisher::NotificationOutcome::{Sent, Skipped};
    let skipped = outcomes.iter().filter(|o| **o == Skipped).count();
    assert!(skipped >= 30, "at most 20 waited: {outcomes:?}");
    let first_sent = outcomes.iter().position(|o| *o == Sent).expect("the newest were sent");
    assert!(outcomes[first_sent..].iter().all(|o| *o == Sent), "the oldest are skipped first: {outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_shutdown_waits_for_the_flush() {
    let gate = Arc::new(Semaphore::new(0));
    let sink = Arc::new(TestSink { gate: Some(gate.clone()), ..TestSink::default() });
    let engine = engine(sink.clone(), BatchConfig { lanes: 1, ..BatchConfig::default() });
    let pending = tokio::spawn({
        let engine = engine.clone();
        async move { engine.submit(event("a", "1")).await }
    });
    wait_until("the event is accepted", || engine.queued() == 1).await;
    let first = tokio::spawn({
        let engine = engine.clone();
        async move { engine.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = tokio::spawn({
        let engine = engine.clone();
        async move { engine.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished(), "the second shutdown returned before the flush");
    gate.add_permits(10);
    second.await.expect("task");
    assert_eq!(sink.batches.lock().expect("lock").iter().flatten().count(), 1, "flushed when the second returns");
    first.await.expect("task");
    pending.await.expect("task").expect("receipt");
}

/// A caller waits at most the publisher's notify bound for its
/// notification's outcome, even while earlier pipelines hold the slots: it
/// is then resolved as `Queued` (the notifications are still sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_caller_waits_longer_than_the_notify_bound() {
    let sink = Arc::new(TestSink::default());
    let hold = Arc::new(Semaphore::new(0));
    let notifier = Arc::new(HeldNotifier { hold: Some(hold.clone()), ..HeldNotifier::default() });
    let publisher = DualPublisher::builder()
        .durable(sink.clone())
        .notifier(notifier.clone())
        .config(dualstream_publisher::PublisherConfig { notify_timeout_ms: 300, ..Default::default() })
        .build()
        .expect("publisher");
    let engine = BatchEngine::new(publisher, BatchConfig { lanes: 1, notify_pipelines: 1, ..BatchConfig::default() })
        .expect("engine");
    let first = first_notification_held(&engine, &notifier, "0").await;
    // The only pipeline slot is taken; this batch's notifications wait.
    let second = engine.submit(event("a", "1")).await.expect("stored");
    assert_eq!(second.notification, dualstream_publisher::NotificationOutcome::Queued, "resolved at its deadline");
    assert_eq!(
        first.await.expect("task").expect("stored").notification,
        dualstream_publisher::NotificationOutcome::Queued,
        "the caller of the held pipeline stopped waiting at the bound too"
    );
    hold.add_permits(10);
    wait_until("the second batch's notification went out", || notifier.calls.lock().expect("lock").len() == 2).await;
    engine.shutdown().await;
}

/// Hands each batch over at once and acknowledges it only when the test
/// says so.
struct TwoPhaseSink {
    handed: Mutex<Vec<usize>>,
    acks: Arc<Semaphore>,
}

impl Default for TwoPhaseSink {
    fn default() -> Self {
        Self { handed: Mutex::new(Vec::new()), acks: Arc::new(Semaphore::new(0)) }
    }
}

#[async_trait]
impl DurableSink for TwoPhaseSink {
    async fn publish(&self, event: Event) -> Result<Position, DeliveryError> {
        self.enqueue_batch(vec![event]).await.await.pop().expect("one result")
    }
    async fn enqueue_batch(&self, events: Vec<Event>) -> dualstream_core::PendingAcks {
        self.handed.lock().expect("lock").push(events.len());
        let acks = self.acks.clone();
        Box::pin(async move {
            acks.acquire().await.expect("acks").forget();
            events.iter().map(|_| Ok(Position::new("t", 0, 0))).collect()
        })
    }
    async fn health_check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A lane hands its next batch to the sink while the previous one is not
/// acknowledged yet, up to `max_in_flight_batches`; past that it collects,
/// so the batch that follows holds everything that came meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_overlaps_its_batches_up_to_the_in_flight_bound() {
    let sink = Arc::new(TwoPhaseSink::default());
    let publisher = DualPublisher::builder().durable(sink.clone()).mode(Mode::DurableOnly).build().expect("publisher");
    let engine =
        BatchEngine::new(publisher, BatchConfig { lanes: 1, max_in_flight_batches: 2, ..BatchConfig::default() })
            .expect("engine");
    let mut calls = Vec::new();
    for i in 0..2 {
        let engine = engine.clone();
        calls.push(tokio::spawn(async move { engine.submit(event("a", &i.to_string())).await }));
        wait_until("the batch is handed over", || sink.handed.lock().expect("lock").len() == i + 1).await;
    }
    // Two batches out, none acknowledged: the next events wait in the lane.
    for i in 2..10 {
        let engine = engine.clone();
        calls.push(tokio::spawn(async move { engine.submit(event("a", &i.to_string())).await }));
    }
    wait_until("the events are accepted", || engine.queued() == 10).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(*sink.handed.lock().expect("lock"), vec![1, 1], "no third batch while two are out");
    sink.acks.add_permits(1);
    wait_until("the third batch is handed over", || sink.handed.lock().expect("lock").len() == 3).await;
    assert_eq!(*sink.handed.lock().expect("lock"), vec![1, 1, 8], "the third batch holds what came meanwhile");
    sink.acks.add_permits(10);
    for c in calls {
        c.await.expect("task").expect("stored");
    }
    engine.shutdown().await;
}

/// `max_batch_events` is a hard bound: a `submit_many` part that would take
/// the batch a lane is collecting past it starts the next batch instead.
/// Here the lane lingers (60 s) with five events when a part of ten comes;
/// the five go at once, the ten next, without waiting for the linger (the
/// 30 s bound only ends the test if they do wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_many_part_never_takes_a_lingering_batch_past_max_batch_events() {
    let sink = Arc::new(TwoPhaseSink::default());
    sink.acks.add_permits(1_000);
    let publisher = DualPublisher::builder().durable(sink.clone()).mode(Mode::DurableOnly).build().expect("publisher");
    let config = BatchConfig { lanes: 1, max_batch_events: 10, linger_ms: 60_000, ..BatchConfig::default() };
    let engine = BatchEngine::new(publisher, config).expect("engine");
    let five = tokio::spawn({
        let engine = engine.clone();
        async move { engine.submit_many((0..5).map(|i| event("a", &i.to_string())).collect()).await }
    });
    wait_until("the five are accepted", || engine.queued() == 5).await;
    let ten = engine.submit_many((5..15).map(|i| event("a", &i.to_string())).collect());
    let ten = tokio::time::timeout(Duration::from_secs(30), ten).await.expect("the full batch went without the linger");
    let five = five.await.expect("task");
    assert!(five.iter().chain(&ten).all(Result::is_ok));
    // (Sorted: a part holds its queue share a moment before it reaches the
    // lane, so the two could arrive the other way round.)
    let mut handed = sink.handed.lock().expect("lock").clone();
    handed.sort_unstable();
    assert_eq!(handed, vec![5, 10]);
    engine.shutdown().await;
}

/// The same while the lane collects behind its in-flight batches: parts of
/// five and ten come while the one slot is taken; they make two batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_collecting_behind_its_in_flight_batch_keeps_max_batch_events() {
    let sink = Arc::new(TwoPhaseSink::default());
    let publisher = DualPublisher::builder().durable(sink.clone()).mode(Mode::DurableOnly).build().expect("publisher");
    let config = BatchConfig { lanes: 1, max_batch_events: 10, max_in_flight_batches: 1, ..BatchConfig::default() };
    let engine = BatchEngine::new(publisher, config).expect("engine");
    let submit = |range: std::ops::Range<usize>| {
        let engine = engine.clone();
        tokio::spawn(async move { engine.submit_many(range.map(|i| event("a", &i.to_string())).collect()).await })
    };
    let mut calls = vec![submit(0..1)];
    wait_until("the first batch is handed over", || sink.handed.lock().expect("lock").len() == 1).await;
    calls.push(submit(1..6));
    calls.push(submit(6..16));
    wait_until("the parts are accepted", || engine.queued() == 16).await;
    sink.acks.add_permits(1_000);
    for c in calls {
        assert!(c.await.expect("task").iter().all(Result::is_ok));
    }
    // (The two parts may reach the lane in either order.)
    let mut handed = sink.handed.lock().expect("lock").clone();
    handed[1..].sort_unstable();
    assert_eq!(handed, vec![1, 5, 10]);
    engine.shutdown().await;
}

/// A durable sink of partitions, one per source (numbered in the order of
/// first use), that acknowledges each batch as a whole, as the Kafka sink
/// does, and only when the test lets it: a batch waits for its own gate
/// (open from the start unless `manual`) and for the gate of every held
/// source it has an event of, like a batch with events for a slow
/// partition. Offsets count per partition in hand-over order; an event
/// whose payload starts with "fail" is not stored.
#[derive(Default)]
struct PartitionSink {
    manual: bool,
    state: Mutex<Partitions>,
}

/// An event as the sink got it: source id, payload, position (`None`: not
/// stored).
type Handed = (String, String, Option<Position>);

#[derive(Default)]
struct Partitions {
    partitions: HashMap<String, i32>,
    next_offset: HashMap<i32, i64>,
    /// Each batch handed over, in order, with its gate.
    batches: Vec<(Vec<Handed>, Arc<Semaphore>)>,
    /// The gates of held sources.
    held: HashMap<String, Arc<Semaphore>>,
}

impl PartitionSink {
    fn state(&self) -> std::sync::MutexGuard<'_, Partitions> {
        self.state.lock().expect("lock")
    }
    /// Batches with an event of `source` wait until `release(source)`.
    fn hold(&self, source: &str) {
        self.state().held.insert(source.to_owned(), Arc::new(Semaphore::new(0)));
    }
    fn release(&self, source: &str) {
        // Each waiter takes the permit and gives it back: open for good.
        self.state().held[source].add_permits(1);
    }
    /// Open the gate of batch `index` (`manual`).
    fn ack(&self, index: usize) {
        self.state().batches[index].1.add_permits(1);
    }
    fn handed(&self) -> usize {
        self.state().batches.len()
    }
}

#[async_trait]
impl DurableSink for PartitionSink {
    async fn publish(&self, event: Event) -> Result<Position, DeliveryError> {
        self.enqueue_batch(vec![event]).await.await.pop().expect("one result")
    }
    async fn enqueue_batch(&self, events: Vec<Event>) -> dualstream_core::PendingAcks {
        let mut st = self.state();
        let gate = Arc::new(Semaphore::new(usize::from(!self.manual)));
        let mut gates = vec![gate.clone()];
        let mut handed = Vec::with_capacity(events.len());
        let mut results = Vec::with_capacity(events.len());
        for e in events {
            let source = e.source().source_id().to_owned();
            if let Some(g) = st.held.get(&source) {
                if !gates.iter().any(|x| Arc::ptr_eq(x, g)) {
                    gates.push(g.clone());
                }
            }
            let payload = String::from_utf8_lossy(e.payload()).into_owned();
            let position = if payload.starts_with("fail") {
                None
            } else {
                let fresh = st.partitions.len() as i32;
                let partition = *st.partitions.entry(source.clone()).or_insert(fresh);
                let offset = st.next_offset.entry(partition).or_default();
                *offset += 1;
                Some(Position::new("t", partition, *offset - 1))
            };
            results.push(match &position {
                Some(p) => Ok(p.clone()),
                None => Err(DeliveryError::new(SinkError::Rejected { reason: "fail".into() }, e)),
            });
            handed.push((source, payload, position));
        }
        st.batches.push((handed, gate));
        Box::pin(async move {
            for g in gates {
                drop(g.acquire().await.expect("gate"));
            }
            results
        })
    }
    async fn health_check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A one-lane dual engine on a [`PartitionSink`] whose batches with an
/// event of `held` wait until `sink.release(held)`.
fn one_lane_holding(held: &str) -> (Arc<PartitionSink>, Arc<HeldNotifier>, BatchEngine) {
    let sink = Arc::new(PartitionSink::default());
    sink.hold(held);
    let notifier = Arc::new(HeldNotifier::default());
    let engine = dual_engine(sink.clone(), notifier.clone(), BatchConfig { lanes: 1, ..BatchConfig::default() });
    (sink, notifier, engine)
}

fn spawn_submit(engine: &BatchEngine, event: Event) -> Submitted {
    let engine = engine.clone();
    tokio::spawn(async move { engine.submit(event).await })
}

/// Submit and expect the receipt within 10 s: a point on the paused clock,
/// reached at once if the engine waits for a held source.
async fn answered(engine: &BatchEngine, event: Event, what: &str) -> dualstream_publisher::Receipt {
    match tokio::time::timeout(Duration::from_secs(10), engine.submit(event)).await {
        Ok(result) => result.expect("stored"),
        Err(_) => panic!("timed out: {what}"),
    }
}

fn seen(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
    pairs.iter().map(|(s, o)| ((*s).to_owned(), *o)).collect()
}

/// Issue #23, item 2: the acknowledgements of source "a" (a slow
/// partition) are held back; an event of "b", handed over after it on the
/// same lane, gets its receipt and notification meanwhile (paused time:
/// see `answered`).
#[tokio::test(start_paused = true)]
async fn a_held_source_does_not_hold_back_the_receipts_and_notifications_of_another() {
    let (sink, notifier, engine) = one_lane_holding("a");
    let a = spawn_submit(&engine, event("a", "1"));
    wait_until("a's batch is handed over", || sink.handed() == 1).await;
    let b = answered(&engine, event("b", "1"), "b's receipt comes while a's acknowledgement is held").await;
    assert_eq!(b.notification, dualstream_publisher::NotificationOutcome::Sent);
    assert_eq!(b.position.map(|p| (p.partition, p.offset)), Some((1, 0)));
    assert_eq!(notifier.seen(), seen(&[("b", 0)]), "b notified, a not yet");
    assert!(!a.is_finished(), "a is answered only at its acknowledgement");
    assert_eq!(engine.queued(), 1, "b's queue share is back, a's is not");
    sink.release("a");
    let a = a.await.expect("task").expect("stored");
    assert_eq!(a.notification, dualstream_publisher::NotificationOutcome::Sent);
    assert_eq!(notifier.seen(), seen(&[("b", 0), ("a", 0)]));
    assert_eq!(engine.queued(), 0);
    engine.shutdown().await;
}

/// An acknowledged batch with events of a source that an earlier,
/// unacknowledged batch holds too ("a", behind the slow "x"): its other
/// source's event ("b") is notified at once, and a later event of "b" is
/// answered; the `submit_many` reply holding both comes with "a"'s.
#[tokio::test(start_paused = true)]
async fn an_acknowledged_batch_releases_the_sources_no_earlier_batch_holds() {
    let (sink, notifier, engine) = one_lane_holding("x");
    let many = |events: Vec<Event>| {
        let engine = engine.clone();
        tokio::spawn(async move { engine.submit_many(events).await })
    };
    let first = many(vec![event("a", "1"), event("x", "1")]);
    wait_until("the first batch is handed over", || sink.handed() == 1).await;
    let second = many(vec![event("a", "2"), event("b", "1")]);
    wait_until("the second batch is handed over", || sink.handed() == 2).await;
    let b2 = answered(&engine, event("b", "2"), "b's second event is answered while x's acknowledgement is held").await;
    assert_eq!(b2.notification, dualstream_publisher::NotificationOutcome::Sent);
    assert_eq!(notifier.seen(), seen(&[("b", 0), ("b", 1)]), "b's events notified in order, a's wait for a's first");
    assert!(!first.is_finished() && !second.is_finished());
    sink.release("x");
    for call in [first, second] {
        for r in call.await.expect("task") {
            assert_eq!(r.expect("stored").notification, dualstream_publisher::NotificationOutcome::Sent);
        }
    }
    assert_eq!(notifier.seen(), seen(&[("b", 0), ("b", 1), ("a", 0), ("x", 0), ("a", 1)]));
    engine.shutdown().await;
}

/// Shutdown flushes: it waits for a held source's acknowledgement while
/// the other source's caller is answered, and returns once every caller is.
#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_a_held_source_and_answers_the_others_meanwhile() {
    let (sink, notifier, engine) = one_lane_holding("a");
    let a = spawn_submit(&engine, event("a", "1"));
    wait_until("a's batch is handed over", || sink.handed() == 1).await;
    let b = spawn_submit(&engine, event("b", "1"));
    wait_until("b's batch is handed over", || sink.handed() == 2).await;
    let shutdown = tokio::spawn({
        let engine = engine.clone();
        async move { engine.shutdown().await }
    });
    tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .expect("b is answered during the shutdown")
        .expect("task")
        .expect("stored");
    assert!(!shutdown.is_finished() && !a.is_finished(), "the shutdown waits for a's acknowledgement");
    sink.release("a");
    tokio::time::timeout(Duration::from_secs(10), shutdown).await.expect("the shutdown returns").expect("task");
    assert!(a.is_finished(), "a is answered before the shutdown returns");
    a.await.expect("task").expect("stored");
    assert_eq!(notifier.seen(), seen(&[("b", 0), ("a", 0)]));
    assert_eq!(engine.queued(), 0);
    match engine.submit(event("a", "2")).await {
        Err(BatchError::Closed { .. }) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
}

/// The release rule as a model, under random submissions and random orders
/// of acknowledgement (proptest): at every moment the engine is idle,
///
/// - exactly the stored events that are released have been notified, each
///   once, each source's in offset order; an event is released once its
///   batch and every earlier batch with an event of its source are
///   acknowledged;
/// - exactly the callers whose events are all released have their answer;
/// - the queue holds exactly the events not acknowledged yet (each share
///   given back once, at its batch's acknowledgement);
///
/// and a shutdown started with batches unacknowledged returns once they are
/// acknowledged, every caller answered. Paused time on one thread: `settle`
/// lets every task run until it waits.
mod release_model {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    #[derive(Clone, Debug)]
    enum Step {
        /// Submit an event of source `s{n}`, failing if true.
        One(usize, bool),
        /// `submit_many` events of these sources.
        Many(Vec<(usize, bool)>),
        /// Let every task run until it waits, then check.
        Settle,
        /// Settle, then acknowledge one of the batches not acknowledged.
        Ack(Index),
    }

    fn step() -> impl Strategy<Value = Step> {
        let event = || (0..4usize, prop::bool::weighted(0.1));
        prop_oneof![
            3 => event().prop_map(|(s, fail)| Step::One(s, fail)),
            1 => prop::collection::vec(event(), 1..6).prop_map(Step::Many),
            2 => Just(Step::Settle),
            3 => any::<Index>().prop_map(Step::Ack),
        ]
    }

    type Call = (Vec<String>, tokio::task::JoinHandle<Vec<Result<dualstream_publisher::Receipt, BatchError>>>);

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    struct Run {
        sink: Arc<PartitionSink>,
        notifier: Arc<HeldNotifier>,
        engine: BatchEngine,
        calls: Vec<Call>,
        acked: HashSet<usize>,
        submitted: usize,
    }

    impl Run {
        fn event(&mut self, (source, fail): (usize, bool)) -> Event {
            self.submitted += 1;
            let payload = format!("{}{}", if fail { "fail" } else { "ok" }, self.submitted);
            event(&format!("s{source}"), &payload)
        }

        fn unacked(&self) -> Vec<usize> {
            (0..self.sink.handed()).filter(|b| !self.acked.contains(b)).collect()
        }

        fn ack(&mut self, pick: &Index) {
            let open = self.unacked();
            if !open.is_empty() {
                let b = open[pick.index(open.len())];
                self.sink.ack(b);
                self.acked.insert(b);
            }
        }

        /// The model against the engine, which must be idle.
        fn check(&self) -> Result<(), TestCaseError> {
            let st = self.sink.state();
            let mut released: HashSet<&str> = HashSet::new();
            let mut notes: HashSet<(String, i64)> = HashSet::new();
            let mut acked_events = 0;
            for (b, (events, _)) in st.batches.iter().enumerate() {
                if self.acked.contains(&b) {
                    acked_events += events.len();
                }
                for (source, payload, position) in events {
                    let earlier_acked = st.batches[..b]
                        .iter()
                        .enumerate()
                        .all(|(j, (evs, _))| self.acked.contains(&j) || !evs.iter().any(|(s, ..)| s == source));
                    if self.acked.contains(&b) && earlier_acked {
                        released.insert(payload);
                        if let Some(p) = position {
                            notes.insert((source.clone(), p.offset));
                        }
                    }
                }
            }
            let seen = self.notifier.seen();
            prop_assert_eq!(seen.len(), notes.len(), "one notification per released stored event: {:?}", seen);
            prop_assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), notes);
            let mut last: HashMap<&str, i64> = HashMap::new();
            for (source, offset) in &seen {
                let before = last.insert(source, *offset).unwrap_or(-1);
                prop_assert!(before < *offset, "{}'s notifications out of order: {:?}", source, seen);
            }
            for (payloads, call) in &self.calls {
                let all = payloads.iter().all(|p| released.contains(p.as_str()));
                prop_assert_eq!(call.is_finished(), all, "the caller of {:?}", payloads);
            }
            prop_assert_eq!(self.engine.queued(), self.submitted - acked_events, "queue shares");
            Ok(())
        }

        async fn answers(self) -> Result<(), TestCaseError> {
            let positions: HashMap<String, Option<Position>> = {
                let st = self.sink.state();
                st.batches.iter().flat_map(|(evs, _)| evs).map(|(_, p, pos)| (p.clone(), pos.clone())).collect()
            };
            for (payloads, call) in self.calls {
                let results = call.await.expect("task");
                prop_assert_eq!(results.len(), payloads.len());
                for (p, r) in payloads.iter().zip(results) {
                    match r {
                        Ok(receipt) => {
                            prop_assert_eq!(&receipt.position, &positions[p]);
                            prop_assert_eq!(receipt.notification, dualstream_publisher::NotificationOutcome::Sent);
                        }
                        Err(e) => {
                            prop_assert!(p.starts_with("fail"), "{}: {}", p, e);
                            prop_assert_eq!(e.into_event().map(|e| e.payload().clone()), Some(p.clone().into()));
                        }
                    }
                }
            }
            Ok(())
        }
    }

    async fn run(steps: Vec<Step>, config: BatchConfig, picks: Vec<Index>) -> Result<(), TestCaseError> {
        let sink = Arc::new(PartitionSink { manual: true, ..PartitionSink::default() });
        let notifier = Arc::new(HeldNotifier::default());
        let engine = dual_engine(sink.clone(), notifier.clone(), config);
        let mut run = Run { sink, notifier, engine, calls: Vec::new(), acked: HashSet::new(), submitted: 0 };
        for step in steps {
            match step {
                Step::One(s, fail) => {
                    let e = run.event((s, fail));
                    let payload = String::from_utf8_lossy(e.payload()).into_owned();
                    let engine = run.engine.clone();
                    run.calls.push((vec![payload], tokio::spawn(async move { vec![engine.submit(e).await] })));
                }
                Step::Many(list) => {
                    let events: Vec<Event> = list.into_iter().map(|x| run.event(x)).collect();
                    let payloads = events.iter().map(|e| String::from_utf8_lossy(e.payload()).into_owned()).collect();
                    let engine = run.engine.clone();
                    run.calls.push((payloads, tokio::spawn(async move { engine.submit_many(events).await })));
                }
                Step::Settle => {
                    settle().await;
                    run.check()?;
                }
                Step::Ack(pick) => {
                    settle().await;
                    run.ack(&pick);
                }
            }
        }
        settle().await;
        run.check()?;
        let shutdown = tokio::spawn({
            let engine = run.engine.clone();
            async move { engine.shutdown().await }
        });
        for pick in picks.iter().cycle() {
            settle().await;
            run.check()?;
            if run.unacked().is_empty() {
                break;
            }
            run.ack(pick);
        }
        prop_assert!(shutdown.is_finished(), "the shutdown returns once every batch is acknowledged");
        prop_assert_eq!(run.engine.queued(), 0);
        run.answers().await
    }

    proptest! {
        #[test]
        fn each_event_is_released_once_it_and_the_earlier_events_of_its_source_are_acknowledged(
            steps in prop::collection::vec(step(), 1..40),
            lanes in 1..3usize,
            max_batch_events in 1..5usize,
            max_in_flight_batches in 1..4usize,
            notify_pipelines in 1..3usize,
            picks in prop::collection::vec(any::<Index>(), 1..8),
        ) {
            let config = BatchConfig { lanes, max_batch_events, max_in_flight_batches, notify_pipelines, ..BatchConfig::default() };
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
            rt.block_on(run(steps, config, picks))?;
        }
    }
}

/// A caller that spawns a task per event (the README's first example)
/// moves each `submit` future whole into its task: with the slow paths'
/// state inline it was 1,008 bytes, and copying it was the largest cost of
/// the per-event path in a profile (docs/benchmarks.md); as an `async fn`
/// with the slow paths boxed, 416 (the event twice). It holds the event and
/// little else.
#[tokio::test]
async fn a_submit_future_is_small() {
    let engine = engine(Arc::new(TestSink::default()), BatchConfig::default());
    let submit = engine.submit(event("s", "x"));
    let size = std::mem::size_of_val(&submit);
    let event = std::mem::size_of::<Event>();
    assert!(size <= event + 64, "{size} bytes (an event is {event})");
    assert!(submit.await.is_ok());
}

/// `submit_many_into` appends one result per event, in input order, after
/// what the buffer holds, and a cleared buffer is reused as it is.
#[tokio::test]
async fn submit_many_into_appends_in_order_and_reuses_the_buffer() {
    let sink = Arc::new(TestSink::default());
    let engine = engine(sink.clone(), BatchConfig::default());
    let batch = |n: usize| -> Vec<Event> {
        (0..n).map(|i| event(&format!("s{}", i % 3), if i == 2 { "fail" } else { "ok" })).collect()
    };
    let first = batch(5);
    let ids: Vec<_> = first.iter().map(Event::id).collect();
    let mut out = Vec::with_capacity(16);
    out.push(Err(BatchError::WorkerGone));
    engine.submit_many_into(first, &mut out).await;
    assert_eq!(out.len(), 6);
    assert!(matches!(out[0], Err(BatchError::WorkerGone)), "what the buffer held stays");
    for (i, (result, id)) in out[1..].iter().zip(&ids).enumerate() {
        match result {
            Ok(receipt) => assert_eq!((i != 2, receipt.event_id), (true, *id)),
            Err(e) => assert!(i == 2 && e.to_string().contains("fail"), "event {i}: {e}"),
        }
    }
    let buffer = out.as_ptr();
    out.clear();
    engine.submit_many_into(batch(10), &mut out).await;
    assert_eq!((out.len(), out.as_ptr()), (10, buffer), "the same buffer, not a new one");
    assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 9);
    assert_eq!(sink.batches.lock().expect("lock").iter().map(Vec::len).sum::<usize>(), 15);
}
