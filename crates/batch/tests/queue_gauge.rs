//! The queue-depth gauge follows the queue both ways: up on submit, down on
//! the durable acknowledgement. Its own test binary, so that the global
//! metrics recorder it installs sees no other test's engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dualstream_batch::{BatchConfig, BatchEngine};
use dualstream_core::{DeliveryError, DurableSink, Event, Position, SinkError};
use dualstream_publisher::{DualPublisher, Mode};
use metrics::{Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tokio::sync::Semaphore;

/// Keeps the last value set on `dualstream_batch_queue_depth`.
#[derive(Default)]
struct Depth(AtomicU64);

impl GaugeFn for Depth {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::SeqCst);
    }
}

struct OneGauge(Arc<Depth>);

impl Recorder for OneGauge {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        if key.name() == "dualstream_batch_queue_depth" {
            Gauge::from_arc(self.0.clone())
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Stores nothing until the gate opens.
struct GatedSink(Arc<Semaphore>);

#[async_trait]
impl DurableSink for GatedSink {
    async fn publish(&self, _: Event) -> Result<Position, DeliveryError> {
        self.0.acquire().await.expect("gate").forget();
        Ok(Position::new("t", 0, 0))
    }
    async fn health_check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_gauge_goes_back_down_when_events_are_acknowledged() {
    let depth = Arc::new(Depth::default());
    metrics::set_global_recorder(OneGauge(depth.clone())).expect("recorder");
    let read = || f64::from_bits(depth.0.load(Ordering::SeqCst));
    let gate = Arc::new(Semaphore::new(0));
    let publisher =
        DualPublisher::builder().durable(Arc::new(GatedSink(gate.clone()))).mode(Mode::DurableOnly).build().expect("p");
    let engine = BatchEngine::new(publisher, BatchConfig { lanes: 1, ..BatchConfig::default() }).expect("engine");
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                engine.submit(Event::builder("t", "user", "a").payload(format!("{i}")).build().expect("valid")).await
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.queued() < 10 {
        assert!(tokio::time::Instant::now() < deadline, "events accepted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Let the last submit reach its own gauge update.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(read(), 10.0, "the gauge rose on submit");
    gate.add_permits(100);
    for c in calls {
        c.await.expect("task").expect("stored");
    }
    assert_eq!(read(), 0.0, "the gauge is back to 0 once everything is acknowledged");
    engine.shutdown().await;
}
