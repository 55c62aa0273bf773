//! Micro benchmarks: the event model, naming, and the batching engine's
//! overhead with no-op sinks. `cargo xtask bench` runs them (quick profile)
//! and copies the figures into docs/benchmarks.md.

use std::hint::black_box;
use std::sync::Arc;

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dualstream::core::record::{self, HeaderScratch};
use dualstream::prelude::*;
use dualstream::{DeliveryError, NotifyError, SinkError};

fn event(size: usize) -> Event {
    Event::builder("user.created", "user", "octocat")
        .payload(vec![b'x'; size])
        .header("trace-id", "abc")
        .build()
        .expect("valid")
}

fn model(c: &mut Criterion) {
    let mut g = c.benchmark_group("model");
    let e = event(150);
    let json = e.to_json();
    let n = Notification::for_event(&e, Some(Position::new("events", 1, 42)));
    let njson = n.to_json();
    g.throughput(Throughput::Elements(1));
    g.bench_function("event build+validate 150B", |b| {
        let body = bytes::Bytes::from(vec![b'x'; 150]);
        b.iter(|| Event::builder("user.created", "user", "octocat").payload(body.clone()).build().expect("valid"))
    });
    g.bench_function("event encode json 150B", |b| b.iter(|| black_box(&e).to_json()));
    g.bench_function("event decode json 150B", |b| b.iter(|| Event::from_json(black_box(&json)).expect("ok")));
    g.bench_function("notification encode", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            black_box(&n).write_json(&mut out);
        })
    });
    g.bench_function("notification decode", |b| b.iter(|| Notification::from_json(black_box(&njson)).expect("ok")));
    g.bench_function("record headers", |b| {
        b.iter(|| {
            let mut s = HeaderScratch::default();
            record::headers(black_box(&e), &mut s).count()
        })
    });
    let names = ChannelNamer::default();
    g.bench_function("channel name", |b| b.iter(|| names.channel_for(black_box(e.source()))));
    g.bench_function("channel name escaped id", |b| {
        b.iter(|| names.channel(black_box("repo"), black_box("own:er/re*po")).expect("ok"))
    });
    g.finish();
}

struct NoopSink;
#[async_trait]
impl DurableSink for NoopSink {
    async fn publish(&self, _e: Event) -> Result<Position, DeliveryError> {
        Ok(Position::new("t", 0, 0))
    }
    async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<Position, DeliveryError>> {
        events.iter().map(|_| Ok(Position::new("t", 0, 0))).collect()
    }
    async fn health_check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}
struct NoopNotifier;
#[async_trait]
impl RealtimeNotifier for NoopNotifier {
    async fn notify(&self, _n: &Notification) -> Result<(), NotifyError> {
        Ok(())
    }
    async fn notify_batch(&self, _n: &[Notification]) -> Result<(), NotifyError> {
        Ok(())
    }
    async fn health_check(&self) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// A runtime, an engine with no-op sinks, and 1,000 events of 64 sources.
fn noop_engine() -> (tokio::runtime::Runtime, BatchEngine, Vec<Event>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let engine = rt.block_on(async {
        let publisher = DualPublisher::builder()
            .durable(Arc::new(NoopSink))
            .notifier(Arc::new(NoopNotifier))
            .build()
            .expect("publisher");
        BatchEngine::new(publisher, BatchConfig { linger_ms: 0, ..BatchConfig::default() }).expect("engine")
    });
    let events: Vec<Event> = (0..1000)
        .map(|i| Event::builder("t", "user", format!("u{}", i % 64)).payload(vec![0u8; 150]).build().expect("valid"))
        .collect();
    (rt, engine, events)
}

fn engine(c: &mut Criterion) {
    let (rt, engine, events) = noop_engine();
    // Built with `otel` (`cargo bench -p dualstream --bench micro --features otel`), the same rows
    // under their own name: the spans compiled in, no trace under way.
    let mut g = c.benchmark_group(if cfg!(feature = "otel") { "engine, otel built in, untraced" } else { "engine" });
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("submit→receipt, 1000 events, no-op sinks", |b| {
        b.iter(|| {
            rt.block_on(async {
                let calls = events.iter().cloned().map(|e| engine.submit(e));
                for r in futures::future::join_all(calls).await {
                    r.expect("ok");
                }
            })
        })
    });
    // The floor under the row above: the same caller and events, each event
    // sent to one task over an unbounded channel and answered at once with a
    // oneshot, as the engine answers `submit`. No budget, batching or sinks:
    // what a reply per event costs by itself.
    let (floor_tx, mut floor_rx) = tokio::sync::mpsc::unbounded_channel::<(Event, tokio::sync::oneshot::Sender<_>)>();
    rt.spawn(async move {
        while let Some((event, reply)) = floor_rx.recv().await {
            let _ = reply.send(Ok::<_, DeliveryError>(event.id()));
        }
    });
    g.bench_function("floor: event→task→oneshot reply, 1000 events", |b| {
        b.iter(|| {
            rt.block_on(async {
                let calls = events.iter().cloned().map(|event| {
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    let sent = floor_tx.send((event, reply));
                    async move {
                        sent.expect("the floor task runs");
                        rx.await.expect("a reply")
                    }
                });
                for r in futures::future::join_all(calls).await {
                    black_box(r.expect("ok"));
                }
            })
        })
    });
    g.bench_function("submit_many→receipts, 1000 events, no-op sinks", |b| {
        b.iter(|| {
            rt.block_on(async {
                for r in engine.submit_many(events.clone()).await {
                    r.expect("ok");
                }
            })
        })
    });
    let mut receipts = Vec::with_capacity(events.len());
    g.bench_function("submit_many_into→one buffer, 1000 events, no-op sinks", |b| {
        b.iter(|| {
            rt.block_on(async {
                receipts.clear();
                engine.submit_many_into(events.clone(), &mut receipts).await;
                for r in receipts.drain(..) {
                    r.expect("ok");
                }
            })
        })
    });
    g.finish();
}

/// Built with `otel`: the engine rows with every event in a sampled trace,
/// through the tracing bridge into the SDK's batch processor and an exporter
/// that drops what it is given (the cost of the spans, not of a network).
#[cfg(feature = "otel")]
fn engine_traced(c: &mut Criterion) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Debug)]
    struct Dropped;
    impl opentelemetry_sdk::trace::SpanExporter for Dropped {
        async fn export(
            &self,
            batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            black_box(batch);
            Ok(())
        }
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_batch_exporter(Dropped).build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("bench"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).expect("the only subscriber");
    let (rt, engine, events) = noop_engine();
    let mut g = c.benchmark_group("engine, otel, every event traced");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("submit_many→receipts, 1000 events, no-op sinks", |b| {
        b.iter(|| {
            let root = tracing::info_span!("request");
            let _entered = root.enter();
            rt.block_on(async {
                for r in engine.submit_many(events.clone()).await {
                    r.expect("ok");
                }
            })
        })
    });
    g.finish();
    let _ = provider.shutdown();
}

#[cfg(not(feature = "otel"))]
criterion_group!(benches, model, engine);
#[cfg(feature = "otel")]
criterion_group!(benches, model, engine, engine_traced);
criterion_main!(benches);
