//! **dualstream**: every event goes to Kafka, the durable path that must
//! succeed, and a lightweight notification goes to Redis Pub/Sub, the
//! real-time path that is best effort.
//!
//! This facade composes the workspace's crates; depend on the individual
//! crates instead if you want less.
//!
//! | feature | default | what it brings |
//! |---|---|---|
//! | `kafka` | yes | [`kafka`]: the Kafka durable sink (rdkafka) |
//! | `redis` | yes | [`redis`]: the Redis Pub/Sub notifier (deadpool-redis) |
//! | `batch` | yes | [`batch`]: the batching engine |
//! | `history` | yes (with `consumer`) | [`history`]: replay from Kafka and the shared Kafka readers (rdkafka, no Redis client) |
//! | `hub` | yes (with `consumer`) | [`hub`]: live Redis subscriptions with local fan-out (deadpool-redis, no Kafka client) |
//! | `consumer` | yes | [`consumer`]: gap-free catch-up joins; turns on `history` and `hub`, whose items it re-exports |
//! | `mock` | no | mockall mocks of the sink traits: [`MockDurableSink`], [`MockRealtimeNotifier`] |
//!
//! Always present: the event model and sink contract ([`core`]), channel
//! naming ([`channel`]) and the [`DualPublisher`] ([`publisher`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use dualstream::prelude::*;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let kafka = KafkaSink::new(KafkaSinkConfig {
//!     bootstrap_servers: "127.0.0.1:9092".into(),
//!     ..KafkaSinkConfig::default()
//! })?;
//! let redis = RedisNotifier::new(RedisNotifierConfig {
//!     url: "redis://127.0.0.1:6379".into(),
//!     ..RedisNotifierConfig::default()
//! })?;
//! let publisher = DualPublisher::builder().durable(Arc::new(kafka)).notifier(Arc::new(redis)).build()?;
//!
//! let event = Event::builder("user.created", "user", "octocat").payload(r#"{"name":"Mona"}"#).build()?;
//! let receipt = publisher.publish(event).await?; // Ok only once Kafka acknowledged
//! println!("stored at {:?}, notification {:?}", receipt.position, receipt.notification);
//!
//! // Or through the batching engine, for throughput:
//! let engine = BatchEngine::new(publisher, BatchConfig::default())?;
//! let receipt = engine.submit(Event::builder("user.updated", "user", "octocat").build()?).await?;
//! # let _ = receipt;
//! engine.shutdown().await;
//! # Ok(()) }
//! ```

#[doc(inline)]
pub use dualstream_core::{
    DeliveryError, DurableSink, Event, EventBuilder, EventId, Limits, Notification, NotifyError, PendingAcks,
    Position, RealtimeNotifier, SinkError, Source, ValidationError,
};
#[cfg(feature = "mock")]
#[doc(inline)]
pub use dualstream_core::{MockDurableSink, MockRealtimeNotifier};
#[doc(inline)]
pub use dualstream_publisher::{DualPublisher, Mode, NotificationOutcome, PublishError, PublisherConfig, Receipt};

/// The event model and the sink contract (`dualstream-core`).
pub use dualstream_core as core;
/// Channel naming (`dualstream-channel`).
pub use dualstream_channel as channel;
/// The dual publisher (`dualstream-publisher`).
pub use dualstream_publisher as publisher;
/// The batching engine (`dualstream-batch`).
#[cfg(feature = "batch")]
pub use dualstream_batch as batch;
/// Replay from Kafka and the shared Kafka readers (`dualstream-history`).
#[cfg(feature = "history")]
pub use dualstream_history as history;
/// Live Redis subscriptions with local fan-out (`dualstream-hub`).
#[cfg(feature = "hub")]
pub use dualstream_hub as hub;
/// The consuming side (`dualstream-consumer`): catch-up joins, and the
/// replay and the hub re-exported.
#[cfg(feature = "consumer")]
pub use dualstream_consumer as consumer;
/// The Kafka durable sink (`dualstream-kafka`).
#[cfg(feature = "kafka")]
pub use dualstream_kafka as kafka;
/// The Redis notifier (`dualstream-redis`).
#[cfg(feature = "redis")]
pub use dualstream_redis as redis;

/// The types most programs need.
pub mod prelude {
    pub use dualstream_channel::ChannelNamer;
    pub use dualstream_core::{DurableSink, Event, Notification, Position, RealtimeNotifier};
    pub use dualstream_publisher::{DualPublisher, Mode, NotificationOutcome, PublisherConfig, Receipt};

    #[cfg(feature = "batch")]
    pub use dualstream_batch::{BatchConfig, BatchEngine, BatchError};
    #[cfg(feature = "consumer")]
    pub use dualstream_consumer::{CatchUp, Delivery, JoinConfig};
    #[cfg(feature = "history")]
    pub use dualstream_history::{Replay, ReplayConfig, ReplayRequest, Scope, StartAt, Until};
    #[cfg(feature = "hub")]
    pub use dualstream_hub::{Hub, HubConfig, LiveItem, Target};
    #[cfg(feature = "kafka")]
    pub use dualstream_kafka::{KafkaSink, KafkaSinkConfig, TopicRouting};
    #[cfg(feature = "redis")]
    pub use dualstream_redis::{RedisNotifier, RedisNotifierConfig};
}

/// The README's code examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
