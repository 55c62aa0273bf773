//! Export dualstream's metrics for Prometheus.
//!
//! Installs `metrics-exporter-prometheus` as the global recorder, publishes
//! a few events through a `DualPublisher` (with in-process sinks, so no
//! services are needed), and prints the Prometheus text exposition. In a
//! service, serve `handle.render()` on your `/metrics` route, or enable the
//! exporter's `http-listener` feature.
//!
//! ```sh
//! cargo run -p dualstream --example prometheus
//! ```

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dualstream::prelude::*;
use dualstream::{DeliveryError, NotifyError, SinkError};
use metrics_exporter_prometheus::PrometheusBuilder;

/// A durable sink that keeps nothing and counts offsets.
struct Counting(AtomicI64);

#[async_trait]
impl DurableSink for Counting {
    async fn publish(&self, _event: Event) -> Result<Position, DeliveryError> {
        Ok(Position::new("events", 0, self.0.fetch_add(1, Ordering::Relaxed)))
    }
    async fn health_check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A notifier whose server is down: every notification fails.
struct Down;

#[async_trait]
impl RealtimeNotifier for Down {
    async fn notify(&self, _n: &Notification) -> Result<(), NotifyError> {
        Err(NotifyError::Connection("connection refused".into()))
    }
    async fn health_check(&self) -> Result<(), NotifyError> {
        Err(NotifyError::Connection("connection refused".into()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    let publisher = DualPublisher::builder()
        .durable(Arc::new(Counting(AtomicI64::new(0))))
        .notifier(Arc::new(Down))
        .build()?;
    for i in 0..10 {
        let event = Event::builder("user.created", "user", format!("user-{i}")).build()?;
        publisher.publish(event).await?;
    }
    let batch = (0..5).map(|i| Event::builder("user.updated", "user", format!("user-{i}")).build()).collect::<Result<Vec<_>, _>>()?;
    publisher.publish_batch(batch).await;
    println!("{}", handle.render());
    Ok(())
}
