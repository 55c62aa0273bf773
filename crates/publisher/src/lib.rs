//! The dual publisher of dualstream (docs/design.md, "The contract" and "Choosing streams").
//!
//! [`DualPublisher`] composes any [`DurableSink`](dualstream_core::DurableSink) and any
//! [`RealtimeNotifier`](dualstream_core::RealtimeNotifier): the built-in Kafka and Redis ones, or yours. It
//! depends on `dualstream-core` only.
//!
//! - [`DualPublisher::publish`]: the durable write must succeed; only after
//!   its acknowledgement the notification, carrying the event's
//!   [`Position`](dualstream_core::Position), goes to the notifier, best
//!   effort and bounded by [`PublisherConfig::notify_timeout_ms`]. A notifier
//!   error never becomes a publish error.
//! - [`DualPublisher::publish_batch`]: one result per event; notifications
//!   only for the events that were stored, as one batch.
//! - [`Mode`]: dual (default), durable only, real-time only, and high volume
//!   (notifications queued to a background task that coalesces and pipelines
//!   them, so the real-time path never slows the durable path).
//!
//! Observability: `tracing` spans, and metrics through the `metrics` facade
//! (see [`metric_names`]).
//!
//! ```
//! use std::sync::Arc;
//! use dualstream_core::{DeliveryError, DurableSink, Event, Position, SinkError};
//! use dualstream_publisher::{DualPublisher, Mode, NotificationOutcome, PublisherConfig};
//!
//! #[derive(Debug)]
//! struct Log;
//! #[async_trait::async_trait]
//! impl DurableSink for Log {
//!     async fn publish(&self, _event: Event) -> Result<Position, DeliveryError> {
//!         Ok(Position::new("log", 0, 0))
//!     }
//!     async fn health_check(&self) -> Result<(), SinkError> { Ok(()) }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let publisher = DualPublisher::builder()
//!     .durable(Arc::new(Log))
//!     .config(PublisherConfig { mode: Mode::DurableOnly, ..PublisherConfig::default() })
//!     .build()?;
//! let event = Event::builder("user.created", "user", "octocat").build()?;
//! let receipt = publisher.publish(event).await?;
//! assert_eq!(receipt.notification, NotificationOutcome::Disabled);
//! # Ok::<_, Box<dyn std::error::Error>>(()) }).unwrap();
//! ```

mod config;
mod publisher;
#[cfg(test)]
mod tests;

pub use config::{BuildError, HighVolumeConfig, Mode, PublisherConfig};
#[doc(hidden)]
pub use publisher::{end_send_span, end_send_spans};
pub use publisher::{
    DualPublisher, DualPublisherBuilder, NotificationOutcome, PendingStore, PublishError, Receipt, StoredBatch,
};

/// The names of the metrics the publisher records through the `metrics`
/// facade. Install any recorder (Prometheus, StatsD…) to export them.
pub mod metric_names {
    /// Counter: events stored by the durable sink.
    pub const PUBLISHED: &str = "dualstream_published_total";
    /// Counter: events the durable sink failed to store.
    pub const FAILED: &str = "dualstream_publish_failed_total";
    /// Counter with label `outcome` (`sent`, `queued`, `skipped`, `failed`,
    /// `timed_out`): notifications. `timed_out` ones were not confirmed in
    /// time and may have been delivered.
    pub const NOTIFICATIONS: &str = "dualstream_notifications_total";
    /// Histogram, seconds: from `publish` to the durable acknowledgement.
    pub const PUBLISH_SECONDS: &str = "dualstream_publish_duration_seconds";
    /// Histogram: events per `publish_batch`.
    pub const BATCH_SIZE: &str = "dualstream_batch_size";
    /// Gauge: notifications waiting in the high-volume queue.
    pub const NOTIFY_QUEUE_DEPTH: &str = "dualstream_notify_queue_depth";
}

pub use dualstream_core;
