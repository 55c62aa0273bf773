//! The batching engine of dualstream (PATTERN §4, §6).
//!
//! Callers [`submit`](BatchEngine::submit) single events and await their own
//! result; lane workers group them by count, bytes and linger time and hand
//! each group to [`DualPublisher::publish_batch`](dualstream_publisher::DualPublisher::publish_batch).
//! The shape is tower's buffer: a handle, bounded queues, one oneshot per
//! request.
//!
//! - **Bounded memory**: the queue is bounded in events and bytes (accepted
//!   and not yet resolved). When full, `submit` waits up to
//!   [`BatchConfig::submit_timeout_ms`], then fails with
//!   [`BatchError::QueueFull`], handing the event back. Nothing is dropped
//!   silently.
//! - **Order**: each source maps to one lane and each lane has one batch in
//!   flight, so events of one source are written in submission order while
//!   up to [`BatchConfig::lanes`] batches are in flight.
//! - **Shutdown**: [`BatchEngine::shutdown`] stops accepting, flushes every
//!   accepted event and resolves every caller. A worker that dies resolves
//!   its pending callers with [`BatchError::WorkerGone`].
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

mod budget;
mod config;
mod engine;
#[cfg(test)]
mod tests;

pub use config::{BatchConfig, ConfigError};
pub use engine::{BatchEngine, BatchError};
