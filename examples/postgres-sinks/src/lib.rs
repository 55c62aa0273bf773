//! Custom dualstream sinks on PostgreSQL, as an example of writing your own
//! (see `docs/extending.md`):
//!
//! - [`OutboxSink`], a [`DurableSink`](dualstream_core::DurableSink): every
//!   event becomes a row of an outbox table, its position the source's
//!   sequence number.
//! - [`PgNotifier`], a [`RealtimeNotifier`](dualstream_core::RealtimeNotifier):
//!   every notification is a `NOTIFY` on the channel of its source.
//!
//! Both depend on `dualstream-core` (the contract), `tokio-postgres` and,
//! for the notifier's channel names, `dualstream-channel` only, and plug
//! into the same [`DualPublisher`] and [`BatchEngine`] as the Kafka sink and
//! the Redis notifier:
//!
//! ```no_run
//! use std::sync::Arc;
//! use dualstream_batch::{BatchConfig, BatchEngine};
//! use dualstream_core::Event;
//! use dualstream_example_postgres::{ConnectionConfig, OutboxConfig, OutboxSink, PgNotifier, PgNotifierConfig};
//! use dualstream_publisher::DualPublisher;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let url = "postgres://postgres@127.0.0.1:5432/postgres".to_owned();
//! let connection = ConnectionConfig { url, ..Default::default() };
//! let outbox = OutboxSink::connect(OutboxConfig { connection: connection.clone(), ..Default::default() }).await?;
//! let notifier = PgNotifier::new(PgNotifierConfig { connection, ..Default::default() })?;
//! let publisher = DualPublisher::builder().durable(Arc::new(outbox)).notifier(Arc::new(notifier)).build()?;
//!
//! // A row in dualstream_outbox, then NOTIFY "events:user:octocat", '{"id":…,"offset":1}'.
//! let receipt = publisher.publish(Event::builder("user.created", "user", "octocat").build()?).await?;
//! println!("{:?}", receipt.position); // Some(Position { topic: "public.dualstream_outbox", partition: 0, offset: 1 })
//!
//! let engine = BatchEngine::new(publisher, BatchConfig::default())?;
//! engine.submit(Event::builder("user.updated", "user", "octocat").build()?).await?;
//! engine.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! [`DualPublisher`]: dualstream_publisher::DualPublisher
//! [`BatchEngine`]: dualstream_batch::BatchEngine

mod conn;
mod notify;
mod outbox;

pub use conn::{quote_ident, ConfigError, ConnectionConfig, PgError, DEFAULT_URL};
pub use notify::{ChannelScope, PgNotifier, PgNotifierConfig, PgNotifyError, MAX_CHANNEL_BYTES, MAX_PAYLOAD_BYTES};
pub use outbox::{OutboxConfig, OutboxSink, SetupError};
