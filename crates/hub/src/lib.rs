//! The Redis Pub/Sub side of dualstream's consumers: live notifications with
//! local fan-out (docs/design.md, "Many subscribers per channel").
//!
//! A [`Hub`] owns one dedicated Redis connection (one per master on a Redis
//! Cluster, with sharded Pub/Sub) and one Redis subscription per distinct
//! channel or pattern, however many local subscribers, each with a bounded
//! buffer. It never waits for a subscriber: what does not fit is counted and
//! reported to that subscriber alone ([`LiveItem::Lagged`]). It reconnects by
//! itself and tells subscribers about the [`Gap`](LiveItem::Gap) a
//! reconnection leaves, which a reader fills from Kafka (`dualstream-consumer`'s
//! `CatchUp` does).
//!
//! # A gateway: many clients, one Redis subscription per channel
//!
//! ```no_run
//! use dualstream_hub::{Hub, HubConfig, LiveItem};
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
//! `deadpool_redis` (for its `redis`) is not re-exported here;
//! `dualstream-redis` does.

mod backoff;
mod config;
mod error;
mod hub;
mod live;
mod seen;
mod shard_hub;

pub use config::{ConfigError, HubConfig, Overflow};
pub use error::HubError;
pub use hub::Hub;
pub use live::{HubStats, LiveItem, LiveStream, Target, MAX_TARGET_LEN};
pub use seen::{key_of, source_key, Seen, SeenOffsets, WINDOW as SEEN_WINDOW};

#[cfg(test)]
mod tests;
