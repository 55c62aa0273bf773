//! The Kafka reading side of dualstream: events read back from where the
//! Kafka sink wrote them.
//!
//! - [`Replay`]: read events back from Kafka (docs/design.md, "Replay") from
//!   an offset, a timestamp or the last N events, for one source (only its
//!   partition is read) or for all, as a bounded-memory
//!   [`Stream`](futures::Stream). Records that are not valid events are typed
//!   errors ([`ReplayError::Decode`]) and the stream goes on.
//! - [`History`]: the shared readers behind `dualstream-consumer`'s catch-up
//!   joins (docs/consumer.md, "Shared history"): one watermark poller, one
//!   record consumer per topic with a cache of each partition's latest
//!   records, and backfill readers for reads from far back, whatever the
//!   number of joins.
//!
//! Every reader assigns partitions itself: no consumer group, no commits.
//! It reads where the Kafka sink wrote: the sink's [`TopicRouting`], and a
//! source's partition as the sink placed it ([`partition_for_key`]), both
//! re-exported from `dualstream-kafka`.
//!
//! # Replay one source from a timestamp
//!
//! ```no_run
//! use dualstream_core::Source;
//! use dualstream_history::{Replay, ReplayConfig, ReplayRequest, Scope, StartAt};
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
//! `rdkafka` is not re-exported here; `dualstream-kafka` does.

mod config;
mod decode;
mod error;
mod history;
mod reader;
mod replay;

pub use config::{ConfigError, ReplayConfig};
pub use dualstream_kafka::{partition_for_key, TopicRouting};
pub use error::ReplayError;
pub use history::{History, HistoryStats, Item, Range, Raw, Rec, Ticket, Tp, Window};
pub use reader::Marks;
pub use replay::{Replay, ReplayRequest, ReplayStream, Replayed, Scope, StartAt, Until};

#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod testkit;
#[cfg(test)]
mod tests;
