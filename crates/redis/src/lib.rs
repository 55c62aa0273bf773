//! The Redis Pub/Sub notifier of dualstream (docs/design.md, "Redis down or slow").
//!
//! [`RedisNotifier`] implements
//! [`RealtimeNotifier`](dualstream_core::RealtimeNotifier): it `PUBLISH`es the
//! notification JSON to the source's channel (`events:{source_type}:{source_id}`,
//! from `dualstream-channel`), and a batch as one pipeline.
//!
//! - Best effort and bounded: every call ends within
//!   [`RedisNotifierConfig::timeout_ms`], so a hung Redis never stalls a
//!   caller. A publish that reaches 0 subscribers is a success.
//! - A circuit breaker: after [`BreakerConfig::failure_threshold`]
//!   consecutive failures it opens; while open, notifications are skipped at
//!   once and counted; it probes with exponential backoff and closes when
//!   Redis answers again. Warnings are rate-limited, with counts.
//! - Redis Cluster ([`RedisNotifierConfig::cluster_urls`]): sharded Pub/Sub,
//!   `SPUBLISH` to the master serving each channel's slot; a batch goes as
//!   one pipeline per slot (redis-rs refuses a cluster pipeline across
//!   slots), so each channel keeps its order.
//! - Counters ([`RedisNotifier::stats`]): published, skipped, failed, timed
//!   out (sent, no answer in time: outcome unknown), and the breaker state.
//!
//! ```no_run
//! use dualstream_core::{Event, Notification, Position, RealtimeNotifier};
//! use dualstream_redis::{RedisNotifier, RedisNotifierConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let notifier = RedisNotifier::new(RedisNotifierConfig {
//!     url: "redis://127.0.0.1:6379".into(),
//!     ..RedisNotifierConfig::default()
//! })?;
//! let event = Event::builder("user.created", "user", "octocat").build()?;
//! let n = Notification::for_event(&event, Some(Position::new("events", 0, 42)));
//! notifier.notify(&n).await?; // PUBLISH events:user:octocat {...}
//! # Ok(()) }
//! ```
//!
//! `deadpool_redis` (and through it `redis`) is re-exported.

mod breaker;
mod config;
#[cfg(test)]
mod live_tests;
mod notifier;
#[cfg(test)]
mod tests;

pub use breaker::{Admit, Breaker, BreakerState, Ticket};
pub use config::{check_cluster_urls, BreakerConfig, ConfigError, RedisNotifierConfig};
pub use notifier::{NotifierStats, RedisNotifier};

pub use deadpool_redis;
