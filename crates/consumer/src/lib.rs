//! The consuming side of dualstream: what WebSocket and SSE gateways, live
//! dashboards and event processors need behind Redis.
//!
//! This crate is the catch-up join, [`CatchUp`]; it re-exports the public
//! items of the two crates it composes, `dualstream-history` (the Kafka
//! side: [`Replay`] and the shared readers) and `dualstream-hub` (the Redis
//! side: [`Hub`]), so that one dependency gives all three. Depend on either
//! of those alone for one side without the other's broker client.
//!
//! - [`Replay`]: read events back from Kafka (docs/design.md,
//!   "Replay") from an offset, a timestamp or the last N events, for one
//!   source (only its partition is read) or for all, as a bounded-memory
//!   [`Stream`](futures::Stream). Records that are not valid events are typed
//!   errors ([`ReplayError::Decode`]) and the stream goes on.
//! - [`Hub`]: live Redis subscriptions with local fan-out (docs/design.md,
//!   "Many subscribers per channel"): one dedicated connection and one Redis
//!   subscription per distinct channel or pattern, however many local
//!   subscribers, each with a bounded buffer. It
//!   reconnects by itself and tells subscribers about the
//!   [`Gap`](LiveItem::Gap) a reconnection leaves.
//! - [`CatchUp`]: the mid-stream join (docs/design.md, "Joining
//!   mid-stream"): history from Kafka, then live notifications, merged by
//!   Kafka offset with no gap and no duplicate, catching up again after every
//!   gap.
//!
//! # Replay one source from a timestamp
//!
//! ```no_run
//! use dualstream_consumer::{Replay, ReplayConfig, ReplayRequest, Scope, StartAt};
//! use dualstream_core::Source;
//! use futures::StreamExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let replay = Replay::new(ReplayConfig { bootstrap_servers: "127.0.0.1:9092".into(), ..Default::default() })?;
//! let request = ReplayRequest::new(Scope::Source(Source::new("user", "octocat")?))
//!     .start(StartAt::Timestamp(1_764_000_000_000));
//! let mut events = replay.stream(request).await?;
//! while let Some(item) = events.next().await {
//!     match item {
//!         Ok(r) => println!("{} {} at {}", r.event.id(), r.event.event_type(), r.position),
//!         Err(e) => eprintln!("skipped: {e}"), // an undecodable record; the stream goes on
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # A gateway: many clients, one Redis subscription per channel
//!
//! ```no_run
//! use dualstream_consumer::{Hub, HubConfig, LiveItem};
//! use futures::StreamExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = Hub::new(HubConfig { url: "redis://127.0.0.1:6379".into(), ..Default::default() })?;
//! // Every WebSocket client of this dashboard gets its own stream.
//! let mut client = hub.subscribe_source_type("user").await?;
//! while let Some(item) = client.next().await {
//!     match item {
//!         LiveItem::Notification(n) => println!("{} {}", n.id, n.event_type),
//!         LiveItem::Gap | LiveItem::Lagged { .. } => println!("missed some: catch up from Kafka"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # A client that connects mid-stream
//!
//! ```no_run
//! use dualstream_consumer::{CatchUp, Delivery, Hub, HubConfig, JoinConfig, Replay, ReplayConfig, StartAt};
//! use dualstream_core::Source;
//! use futures::StreamExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let replay = Replay::new(ReplayConfig::default())?;
//! let hub = Hub::new(HubConfig::default())?;
//! let joiner = CatchUp::new(replay, hub, JoinConfig::default())?;
//! // The client last saw offset 41 of this source's partition.
//! let mut stream = joiner.join(Source::new("user", "octocat")?, StartAt::Offset(42)).await?;
//! while let Some(item) = stream.next().await {
//!     match item? {
//!         Delivery::History(r) => println!("missed while away: {}", r.event.id()),
//!         Delivery::Live(n) => println!("live: {}", n.id),
//!         Delivery::Truncated { requested, first_available } => {
//!             println!("offsets {requested}..{first_available} are no longer stored")
//!         }
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! `rdkafka` and `deadpool_redis` (for its `redis`) are not re-exported here;
//! `dualstream-kafka` and `dualstream-redis` do. The hub's configuration
//! errors are `dualstream_hub::ConfigError`; [`ConfigError`] here is the
//! replay's and the join's.

mod catchup;
mod config;
mod ready;

pub use catchup::{CatchUp, Delivery, JoinError, JoinLag, JoinStream, LiveChecks};
pub use config::JoinConfig;
pub use ready::ReadyBudget;
pub use dualstream_history::{
    partition_for_key, ConfigError, HistoryStats, Replay, ReplayConfig, ReplayError, ReplayRequest, ReplayStream,
    Replayed, Scope, StartAt, TopicRouting, Until,
};
pub use dualstream_hub::{
    key_of, Hub, HubConfig, HubError, HubStats, LiveItem, LiveStream, Overflow, Seen, SeenOffsets, Target,
    MAX_TARGET_LEN,
};

#[cfg(test)]
mod tests;
