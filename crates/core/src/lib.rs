//! The event model and the sink contract of dualstream.
//!
//! **Who should depend on this crate:** authors of custom sinks and anyone who
//! only needs the types. It is the stable boundary of dualstream: it has no
//! broker client in its dependency tree (no rdkafka, no redis) and does no I/O.
//! The orchestrator ([`dualstream-publisher`]) depends on it alone, and the
//! batching engine on the orchestrator, so a sink you write is exactly as
//! first-class as the Kafka and Redis ones.
//!
//! - [`Event`] and [`EventBuilder`]: the validated event.
//! - [`Notification`]: the lightweight real-time message with the Kafka
//!   [`Position`] (docs/design.md, "The notification").
//! - [`DurableSink`] and [`RealtimeNotifier`]: the object-safe async traits
//!   every sink implements.
//! - [`record`]: how an event maps onto a Kafka-style record (key, headers,
//!   value), shared by the Kafka sink and the replay consumer.
//! - [`trace`]: the W3C trace context an event carries ([`TraceContext`]), and
//!   with the `otel` feature the OpenTelemetry spans of both streams ([`Traced`]).
//! - [`FieldError`], [`check_range`] and [`Backoff`]: what every crate's
//!   configuration check and retry loop share.
//! - With the `mock` feature, [`MockDurableSink`] and [`MockRealtimeNotifier`]
//!   (mockall) for your own tests.
//!
//! # A custom durable sink
//!
//! ```
//! use std::sync::Mutex;
//! use async_trait::async_trait;
//! use dualstream_core::{DeliveryError, DurableSink, Event, Position, SinkError};
//!
//! /// Keeps events in memory; the "offset" is the index in the vector.
//! #[derive(Debug, Default)]
//! struct VecSink(Mutex<Vec<Event>>);
//!
//! #[async_trait]
//! impl DurableSink for VecSink {
//!     async fn publish(&self, event: Event) -> Result<Position, DeliveryError> {
//!         let mut log = self.0.lock().map_err(|_| {
//!             DeliveryError::new(SinkError::other("lock poisoned"), event.clone())
//!         })?;
//!         log.push(event);
//!         Ok(Position::new("memory", 0, log.len() as i64 - 1))
//!     }
//!
//!     async fn health_check(&self) -> Result<(), SinkError> {
//!         Ok(())
//!     }
//! }
//!
//! # tokio_test_block_on(async {
//! let sink = VecSink::default();
//! let event = Event::builder("user.created", "user", "octocat").payload("{}").build()?;
//! let position = sink.publish(event).await.map_err(|e| e.error)?;
//! assert_eq!(position.offset, 0);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```
//!
//! [`dualstream-publisher`]: https://docs.rs/dualstream-publisher

mod event;
mod notification;
pub mod record;
mod settings;
mod sink;
pub mod trace;
mod validate;

pub use event::{Event, EventBuilder, EventId, Source};
pub use notification::{Notification, NotificationDecodeError, Position};
pub use settings::{check_range, Backoff, FieldError};
pub use sink::{DeliveryError, DurableSink, NotifyError, PendingAcks, RealtimeNotifier, SinkError};
pub use trace::{TraceContext, Traced};
pub use validate::{Limits, ValidationError, MAX_OCCURRED_AT_MS};

#[cfg(feature = "mock")]
pub use sink::{MockDurableSink, MockRealtimeNotifier};

/// Errors from decoding an [`Event`] from JSON or from a record.
pub use event::DecodeError;
