//! The catch-up join: history from Kafka, then live notifications, merged by
//! Kafka position (PATTERN §6, "Client connects mid-stream").

use std::pin::Pin;
use std::time::Duration;

use dualstream_core::{EventId, Notification, Position, Source};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::config::{ConfigError, JoinConfig};
use crate::hub::{Hub, HubError, LiveItem, LiveStream};
use crate::reader::{Fetched, Reader};
use crate::replay::{Replay, ReplayError, Replayed, Scope, StartAt};

/// One item of a join, in Kafka order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// An event read from Kafka: the history before the live part, or one
    /// whose notification was missed (a gap filled).
    History(Replayed),
    /// A live notification from Redis. Its `position` is always set.
    Live(Notification),
}

impl Delivery {
    /// The event id.
    pub fn id(&self) -> EventId {
        match self {
            Delivery::History(r) => r.event.id(),
            Delivery::Live(n) => n.id,
        }
    }

    /// Where the event is stored in Kafka.
    pub fn position(&self) -> Option<&Position> {
        match self {
            Delivery::History(r) => Some(&r.position),
            Delivery::Live(n) => n.position.as_ref(),
        }
    }
}

/// Why a join failed, or an item it could not deliver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// Reading Kafka failed. A `Decode` error is one item and the join goes
    /// on; any other ends the join (rejoin from the last delivered position).
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The hub failed or stopped; the join ends.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// A live notification that cannot be placed in the Kafka order (no
    /// position, or a position in another topic or partition). The join goes
    /// on.
    #[error("notification {id} cannot be merged: {reason}")]
    Unmergeable {
        /// The event id.
        id: EventId,
        /// Why.
        reason: String,
    },
    /// A message on the source's channel that is not a notification. The join
    /// goes on.
    #[error("malformed message on {channel}: {reason}")]
    Malformed {
        /// The channel.
        channel: String,
        /// Why it could not be decoded.
        reason: String,
    },
}

/// A join: one ordered stream, without gaps or duplicates, of one source's
/// events from the requested start on.
pub type JoinStream = Pin<Box<dyn Stream<Item = Result<Delivery, JoinError>> + Send>>;

/// Joins Kafka history with live Redis notifications.
///
/// The join subscribes to the source's channel first (through the hub, so
/// gateways with many clients of one source share one Redis subscription),
/// then takes Kafka's high watermark and reads the history up to it, then
/// hands over to the live notifications. It tracks the next Kafka offset it
/// has checked; a notification below it is a duplicate and is skipped.
/// Gaps are filled from Kafka:
///
/// - after [`LiveItem::Gap`] (Redis reconnected) or [`LiveItem::Lagged`]
///   (this subscriber fell behind), it reads up to the new high watermark;
/// - when a notification's offset jumps past the checked offset, it reads
///   the records in between first (`JoinConfig::verify_jumps`), so even a
///   notification the publisher never sent does not leave a hole;
/// - after `idle_check_ms` without live traffic, it compares with the high
///   watermark, so a lost notification of the last event is delivered late
///   rather than never.
#[derive(Clone, Debug)]
pub struct CatchUp {
    replay: Replay,
    hub: Hub,
    config: JoinConfig,
}

impl CatchUp {
    /// A joiner from a Kafka reader and a hub.
    pub fn new(replay: Replay, hub: Hub, config: JoinConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self { replay, hub, config })
    }

    /// Join `source` from `start` (an offset, a timestamp, the last N events,
    /// the beginning or the end). The first item comes from Kafka unless
    /// nothing is stored after `start`.
    pub async fn join(&self, source: Source, start: StartAt) -> Result<JoinStream, JoinError> {
        // Live first, so nothing published from now on can be missed.
        let live = self.hub.subscribe_source(&source).await?;
        let reader = self.replay.reader()?;
        let target = self.replay.resolve(&reader, &Scope::Source(source.clone())).await?;
        let starts = self.replay.start_offsets(&reader, &target, &start).await?;
        let (partition, offset) = starts[0];
        reader.assign(&target.topic, &[(partition, offset)])?;
        let (tx, rx) = mpsc::channel(self.config.buffer);
        let joiner = Joiner {
            tx,
            reader,
            topic: target.topic,
            partition,
            key: source.source_id().as_bytes().to_vec(),
            source,
            next: offset,
            read_pos: offset,
            verify_jumps: self.config.verify_jumps,
        };
        tokio::spawn(joiner.run(live, Duration::from_millis(self.config.idle_check_ms)));
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })))
    }
}

/// The caller dropped the stream, or a fatal error was sent: stop.
struct Stop;

/// Skipping more already-delivered records than this costs more than
/// re-positioning the reader.
const REASSIGN_DISTANCE: i64 = 10_000;

struct Joiner {
    tx: mpsc::Sender<Result<Delivery, JoinError>>,
    reader: Reader,
    topic: String,
    partition: i32,
    source: Source,
    key: Vec<u8>,
    /// Every offset below this has been delivered or checked.
    next: i64,
    /// The offset the reader returns next.
    read_pos: i64,
    verify_jumps: bool,
}

impl Joiner {
    async fn run(mut self, mut live: LiveStream, idle: Duration) {
        if self.catch_up().await.is_err() {
            return;
        }
        loop {
            let item = tokio::select! {
                _ = self.tx.closed() => return,
                item = tokio::time::timeout(idle, live.next()) => item,
            };
            let step = match item {
                Err(_idle) => self.catch_up().await,
                Ok(Some(LiveItem::Notification(n))) => self.on_live(std::sync::Arc::unwrap_or_clone(n)).await,
                Ok(Some(LiveItem::Gap | LiveItem::Lagged { .. })) => self.catch_up().await,
                Ok(Some(LiveItem::Disconnected)) => Ok(()),
                Ok(Some(LiveItem::Malformed { channel, reason })) => {
                    self.send(Err(JoinError::Malformed { channel: channel.to_string(), reason: reason.to_string() }))
                        .await
                }
                Ok(Some(LiveItem::Dropped { .. }) | None) => {
                    let _ = self.catch_up().await;
                    let _ = self.send(Err(JoinError::Hub(HubError::Closed))).await;
                    return;
                }
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn send(&self, item: Result<Delivery, JoinError>) -> Result<(), Stop> {
        self.tx.send(item).await.map_err(|_| Stop)
    }

    async fn fatal(&self, e: ReplayError) -> Stop {
        let _ = self.send(Err(e.into())).await;
        Stop
    }

    /// Read from Kafka up to the high watermark taken now.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        match self.reader.watermarks(&self.topic, self.partition).await {
            Ok((_, high)) => self.scan_to(high).await,
            Err(e) => Err(self.fatal(e).await),
        }
    }

    /// Deliver this source's records in `[next, target)` from Kafka.
    async fn scan_to(&mut self, target: i64) -> Result<(), Stop> {
        if self.next >= target {
            return Ok(());
        }
        if self.next - self.read_pos > REASSIGN_DISTANCE {
            if let Err(e) = self.reader.assign(&self.topic, &[(self.partition, self.next)]) {
                return Err(self.fatal(e).await);
            }
            self.read_pos = self.next;
        }
        while self.next < target {
            let fetched = match self.reader.recv(Some(&self.key)).await {
                Ok(f) => f,
                Err(e) => return Err(self.fatal(e).await),
            };
            let offset = fetched.position().offset;
            self.read_pos = offset + 1;
            if offset < self.next {
                continue;
            }
            self.next = offset + 1;
            if let Fetched::Record { position, timestamp_ms, event } = fetched {
                match event {
                    Ok(event) if event.source() == &self.source => {
                        self.send(Ok(Delivery::History(Replayed { event, position, timestamp_ms }))).await?
                    }
                    Ok(_) => {}
                    Err(error) => self.send(Err(ReplayError::Decode { position, error }.into())).await?,
                }
            }
        }
        Ok(())
    }

    async fn on_live(&mut self, n: Notification) -> Result<(), Stop> {
        let offset = match &n.position {
            Some(p) if *p.topic == *self.topic && p.partition == self.partition => p.offset,
            Some(p) => {
                let reason = format!("position {p} is not in {}/{}", self.topic, self.partition);
                return self.send(Err(JoinError::Unmergeable { id: n.id, reason })).await;
            }
            None => {
                let reason = "it has no Kafka position (published in real-time-only mode)".to_owned();
                return self.send(Err(JoinError::Unmergeable { id: n.id, reason })).await;
            }
        };
        if offset > self.next && self.verify_jumps {
            self.scan_to(offset).await?;
        }
        if offset < self.next {
            // Delivered already (from history, or a duplicate).
            return Ok(());
        }
        self.next = offset + 1;
        self.send(Ok(Delivery::Live(n))).await
    }
}
