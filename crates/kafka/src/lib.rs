//! The Kafka durable sink of dualstream (PATTERN §1, §4, §6).
//!
//! [`KafkaSink`] implements [`DurableSink`](dualstream_core::DurableSink) with
//! rdkafka's `FutureProducer`:
//!
//! - `acks=all` and `enable.idempotence=true`, always: a publish resolves only
//!   after the broker acknowledged the write, and retries never duplicate.
//! - The record key is the source id, so one source stays ordered in one
//!   partition. dualstream's headers carry the event id, type and source
//!   ([`dualstream_core::record`]); the value is the payload, unchanged.
//! - A full local queue is backpressure: a publish waits for room up to
//!   [`KafkaSinkConfig::enqueue_timeout_ms`], then fails with
//!   [`SinkError::QueueFull`](dualstream_core::SinkError::QueueFull) and hands
//!   the event back. Memory is bounded by the producer's queue limits.
//!
//! ```no_run
//! use dualstream_core::{DurableSink, Event};
//! use dualstream_kafka::{KafkaSink, KafkaSinkConfig, TopicRouting};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = KafkaSinkConfig {
//!     bootstrap_servers: "127.0.0.1:9092".into(),
//!     topic: TopicRouting::Single { topic: "events".into() },
//!     ..KafkaSinkConfig::default()
//! };
//! let sink = KafkaSink::new(config)?;
//! let event = Event::builder("user.created", "user", "octocat").payload("{}").build()?;
//! let position = sink.publish(event).await?;
//! println!("stored at {position}");
//! # Ok(()) }
//! ```
//!
//! `rdkafka` is re-exported so you can use the version this crate was built
//! with.

mod config;
mod error;
mod sink;
#[cfg(test)]
mod tests;
mod topics;

pub use config::{Compression, CreateTopics, KafkaSinkConfig, TopicRouting};
pub use error::ConfigError;
pub use sink::{AckContext, Acks, KafkaSink, SinkProducer};

pub use rdkafka;
