//! The batching engine of dualstream (docs/design.md, "Batch publishing").
//!
//! Callers [`submit`](BatchEngine::submit) single events, or
//! [`submit_many`](BatchEngine::submit_many) a batch at hand, and await
//! their own results; lane workers group what waits by count and bytes and
//! hand each group to the durable sink
//! ([`DualPublisher::enqueue_batch`](dualstream_publisher::DualPublisher::enqueue_batch)),
//! without waiting for the previous group's acknowledgements (up to
//! [`BatchConfig::max_in_flight_batches`] per lane). One notification stage
//! merges the stored groups' notifications into pipelines.
//!
//! - **Bounded memory**: the queue is bounded in events and bytes (accepted
//!   and not yet acknowledged by the durable sink). When full, `submit`
//!   waits (behind those that came first) up to
//!   [`BatchConfig::submit_timeout_ms`], then fails with
//!   [`BatchError::QueueFull`], handing the event back. Notifications
//!   waiting to be sent are bounded too. Nothing is dropped silently.
//! - **Order**: each source maps to one lane; a lane hands its batches to
//!   the sink in order (which keeps the order of a partition). An event's
//!   caller is resolved and its notification sent once it and every earlier
//!   event of its source are acknowledged, in each source's order, whatever
//!   other sources (a slow partition) wait for.
//! - **Bounded waits**: a caller waits at most the publisher's
//!   `notify_timeout_ms` for its notification's outcome once its event is
//!   stored; a slow Redis costs latency, not Kafka throughput.
//! - **Shutdown**: [`BatchEngine::shutdown`] stops accepting, flushes every
//!   accepted event and resolves every caller. A worker that dies resolves
//!   its pending callers with [`BatchError::WorkerGone`]; its sources are
//!   then refused with [`BatchError::LaneDead`].
//!
//! ```
//! # use std::sync::Arc;
//! # use dualstream_core::{DeliveryError, DurableSink, Event, Position, SinkError};
//! # #[derive(Debug)] struct Log;
//! # #[async_trait::async_trait]
//! # impl DurableSink for Log {
//! #     async fn publish(&self, _e: Event) -> Result<Position, DeliveryError> { Ok(Position::new("log", 0, 0)) }
//! #     async fn health_check(&self) -> Result<(), SinkError> { Ok(()) }
//! # }
//! use dualstream_batch::{BatchConfig, BatchEngine};
//! use dualstream_publisher::{DualPublisher, Mode};
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! let publisher = DualPublisher::builder().durable(Arc::new(Log)).mode(Mode::DurableOnly).build()?;
//! let engine = BatchEngine::new(publisher, BatchConfig::default())?;
//! let receipt = engine.submit(Event::builder("user.created", "user", "octocat").build()?).await?;
//! assert!(receipt.position.is_some());
//! engine.shutdown().await;
//! # Ok::<_, Box<dyn std::error::Error>>(()) }).unwrap();
//! ```

mod ack;
mod budget;
mod config;
mod engine;
mod lane;
mod notify;
#[cfg(test)]
mod tests;

pub use config::{BatchConfig, ConfigError};
pub use engine::{BatchEngine, BatchError};
