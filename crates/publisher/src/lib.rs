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
    /// Counter, OpenTelemetry's `messaging.client.sent.messages`: messages
    /// sent, with labels `messaging_system` (`kafka`: events the durable sink
    /// stored or failed to store; `redis`: notifications the notifier
    /// answered for), `messaging_operation_name` (`send` for Kafka,
    /// `publish` for Redis), `messaging_destination_name` (the topic, for
    /// stored events) and `error_type` (failures only: the
    /// [`SinkError::kind`](dualstream_core::SinkError::kind), or `failed` /
    /// `timeout` for Redis).
    pub const SENT_MESSAGES: &str = "messaging_client_sent_messages_total";
    /// Histogram, seconds, OpenTelemetry's
    /// `messaging.client.operation.duration`, labels `messaging_system` =
    /// `kafka` and `messaging_operation_name` = `send`: from handing a write
    /// (or a batch) to the durable sink to its acknowledgement.
    pub const OPERATION_SECONDS: &str = "messaging_client_operation_duration_seconds";
    /// Counter with label `outcome` (`sent`, `queued`, `skipped`, `failed`,
    /// `timed_out`): notifications. `timed_out` ones were not confirmed in
    /// time and may have been delivered.
    pub const NOTIFICATIONS: &str = "dualstream_notifications_total";
    /// Histogram: events per `publish_batch`.
    pub const BATCH_SIZE: &str = "dualstream_batch_size";
    /// Gauge: notifications waiting in the high-volume queue.
    pub const NOTIFY_QUEUE_DEPTH: &str = "dualstream_notify_queue_depth";
}

pub use dualstream_core;
