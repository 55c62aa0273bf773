//! The queue-depth gauge: one per engine (its `engine` label), following
//! its queue both ways, up on submit and down on the durable
//! acknowledgement. Its own test binary, so that the global metrics
//! recorder it installs sees no other test's engine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use dualstream_batch::{BatchConfig, BatchEngine};
use dualstream_core::{DeliveryError, DurableSink, Event, Position, SinkError};
use dualstream_publisher::{DualPublisher, Mode};
use metrics::{Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tokio::sync::Semaphore;

const QUEUE_DEPTH: &str = "dualstream_batch_queue_depth";

/// A gauge's value, as `f64` bits.
#[derive(Default)]
struct Value(AtomicU64);

impl Value {
    fn update(&self, f: impl Fn(f64) -> f64) {
        let _ = self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |bits| Some(f(f64::from_bits(bits)).to_bits()));
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::SeqCst))
    }
}

impl GaugeFn for Value {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }
    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }
    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

/// Keeps `dualstream_batch_queue_depth` per value of its `engine` label
/// ("" without one).
#[derive(Default)]
struct Depths(Mutex<HashMap<String, Arc<Value>>>);

impl Depths {
    fn of(&self, engine: &str) -> Arc<Value> {
        self.0.lock().expect("lock").entry(engine.to_owned()).or_default().clone()
    }
}

struct Recording(&'static Depths);

impl Recorder for Recording {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        if key.name() != QUEUE_DEPTH {
            return Gauge::noop();
        }
        let engine = key.labels().find(|l| l.key() == "engine").map_or("", |l| l.value());
        Gauge::from_arc(self.0.of(engine))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// The recorder, installed once for the binary's tests.
fn depths() -> &'static Depths {
    static DEPTHS: OnceLock<&'static Depths> = OnceLock::new();
    DEPTHS.get_or_init(|| {
        let depths: &'static Depths = Box::leak(Box::default());
        metrics::set_global_recorder(Recording(depths)).expect("recorder");
        depths
    })
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

/// An engine named `name` in front of a sink that stores once `gate` has
/// permits.
fn engine(name: &str, gate: Arc<Semaphore>) -> BatchEngine {
    let publisher = DualPublisher::builder().durable(Arc::new(GatedSink(gate))).mode(Mode::DurableOnly).build().expect("p");
    BatchEngine::new(publisher, BatchConfig { name: name.to_owned(), lanes: 1, ..BatchConfig::default() }).expect("engine")
}

fn submit(engine: &BatchEngine, i: usize) -> tokio::task::JoinHandle<Result<dualstream_publisher::Receipt, dualstream_batch::BatchError>> {
    let engine = engine.clone();
    tokio::spawn(async move { engine.submit(Event::builder("t", "user", "a").payload(format!("{i}")).build().expect("valid")).await })
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_gauge_goes_back_down_when_events_are_acknowledged() {
    let depth = depths().of("up-down");
    let gate = Arc::new(Semaphore::new(0));
    let engine = engine("up-down", gate.clone());
    let calls: Vec<_> = (0..10).map(|i| submit(&engine, i)).collect();
    wait_until("the events are accepted", || engine.queued() == 10).await;
    assert_eq!(depth.get(), 10.0, "the gauge rose on submit");
    gate.add_permits(100);
    for c in calls {
        c.await.expect("task").expect("stored");
    }
    assert_eq!(depth.get(), 0.0, "the gauge is back to 0 once everything is acknowledged");
    engine.shutdown().await;
}

/// Two engines in one process: each has its own gauge, and the one that
/// acknowledges does not overwrite the other's depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_engine_has_its_own_queue_gauge() {
    let (held_depth, moving_depth) = (depths().of("held"), depths().of("moving"));
    let held_gate = Arc::new(Semaphore::new(0));
    let held = engine("held", held_gate.clone());
    let moving = engine("moving", Arc::new(Semaphore::new(1_000)));
    let waiting: Vec<_> = (0..10).map(|i| submit(&held, i)).collect();
    wait_until("the held engine's events are accepted", || held.queued() == 10).await;
    for i in 0..5 {
        submit(&moving, i).await.expect("task").expect("stored");
    }
    assert_eq!(moving.queued(), 0);
    assert_eq!(moving_depth.get(), 0.0, "the moving engine's queue is empty");
    assert_eq!(held_depth.get(), 10.0, "the held engine's depth is its own, not the last one set");
    held_gate.add_permits(100);
    for c in waiting {
        c.await.expect("task").expect("stored");
    }
    assert_eq!(held_depth.get(), 0.0);
    held.shutdown().await;
    moving.shutdown().await;
}
