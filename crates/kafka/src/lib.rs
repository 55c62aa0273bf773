//! The Kafka durable sink of dualstream (docs/design.md, "The contract" and
//! "Kafka down or slow").
//!
//! [`KafkaSink`] implements [`DurableSink`](dualstream_core::DurableSink) with
//! rdkafka's `ThreadedProducer` (one wake-up per batch of delivery reports):
//!
//! - `acks=all` and `enable.idempotence=true`, always: a publish resolves only
//!   after the broker acknowledged the write, and retries never duplicate.
//! - The record key is the source id, so one source stays ordered in one
//!   partition. dualstream's headers carry the event id, type and source
//!   ([`dualstream_core::record`]); the value is the payload, unchanged.
//! - A record larger than the producer's `message.max.bytes` (from
//!   `librdkafka_options`, else librdkafka's default 1,000,000), counting
//!   key, headers and framing ([`record_size`]), fails at once with
//!   [`SinkError::RecordTooLarge`](dualstream_core::SinkError::RecordTooLarge)
//!   and is never handed to librdkafka; the later events of its source in
//!   the same batch fail with `EarlierFailed`. The default
//!   [`Limits`](dualstream_core::Limits) keep every valid event under the
//!   default `message.max.bytes`.
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

pub use config::{
    partition_for_key, Compression, CreateTopics, KafkaSinkConfig, TopicRouting, LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES,
};
pub use error::ConfigError;
pub use sink::{record_size, AckContext, Acks, KafkaSink, SlotRef, SinkProducer, RECORD_FRAMING_BYTES};

pub use rdkafka;
