//! The engine's rules, with test sinks behind a real `DualPublisher`.

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
    let engine = engine(sink.clone(), BatchConfig { max_batch_events: 64, lanes: 1, linger_ms: 50, ..BatchConfig::default() });
    let calls = (0..1000).map(|i| engine.submit(event("a", &i.to_string())));
    assert!(futures::future::join_all(calls).await.iter().all(Result::is_ok));
    let batches = sink.batches.lock().expect("lock");
    assert!(batches.iter().all(|b| b.len() <= 64));
    assert!(batches.iter().any(|b| b.len() == 64), "full batches are sent without waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_source_are_written_in_submission_order() {
    let sink = Arc::new(TestSink::default());
    let engine = engine(sink.clone(), BatchConfig { max_batch_events: 7, lanes: 4, linger_ms: 1, ..BatchConfig::default() });
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
    while engine.queued() < 10 {
        tokio::task::yield_now().await;
    }
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
    let engine = engine(sink.clone(), BatchConfig { linger_ms: 1_000, max_batch_events: 10_000, ..BatchConfig::default() });
    let pending: Vec<_> = (0..500)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.submit(event(&format!("s{}", i % 5), "ok")).await })
        })
        .collect();
    while engine.queued() < 500 {
        tokio::task::yield_now().await;
    }
    engine.shutdown().await;
    for h in pending {
        h.await.expect("task").expect("every accepted event is published at shutdown");
    }
    assert_eq!(sink.batches.lock().expect("lock").iter().map(Vec::len).sum::<usize>(), 500);
    let late = event("a", "late");
    match engine.submit(late.clone()).await {
        Err(BatchError::Closed { event }) => assert_eq!(event, late),
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_resolves_its_callers_instead_of_leaving_them_hanging() {
    let sink = Arc::new(TestSink::default());
    let engine = engine(sink, BatchConfig { lanes: 1, linger_ms: 50, ..BatchConfig::default() });
    let calls = vec![engine.submit(event("a", "ok")), engine.submit(event("a", "panic")), engine.submit(event("a", "ok"))];
    let results = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(calls))
        .await
        .expect("callers are resolved, not left hanging");
    assert!(results.iter().all(|r| matches!(r, Err(BatchError::WorkerGone))), "{results:?}");
    let after = event("a", "ok");
    assert!(matches!(engine.submit(after).await, Err(BatchError::Closed { .. })), "the dead lane refuses new events");
}

#[tokio::test]
async fn config_is_validated() {
    let sink = Arc::new(TestSink::default());
    let publisher = DualPublisher::builder().durable(sink).mode(Mode::DurableOnly).build().expect("publisher");
    let err = BatchEngine::new(publisher, BatchConfig { lanes: 0, ..BatchConfig::default() }).unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { field: "lanes", .. }));
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
    let engine = BatchEngine::new(publisher, BatchConfig { lanes: 1, linger_ms: 1, ..BatchConfig::default() }).expect("engine");
    let first = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.submit(event("a", "1")).await })
    };
    // Let the first batch be stored before the second is submitted.
    while sink.inner.batches.lock().expect("lock").is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
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
