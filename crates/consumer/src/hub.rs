//! Live Redis subscriptions with local fan-out (PATTERN §5, "many
//! subscribers per channel").

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use deadpool_redis::redis::{self, aio::PubSubSink, Msg};
use dualstream_channel::ChannelNamer;
use dualstream_core::{Notification, Source};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};

use crate::config::{ConfigError, HubConfig, Overflow};

/// Longest channel name or pattern accepted, in bytes.
pub const MAX_TARGET_LEN: usize = 4_096;

/// What to subscribe to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// One channel (`SUBSCRIBE`).
    Channel(String),
    /// A glob pattern (`PSUBSCRIBE`).
    Pattern(String),
}

impl Target {
    fn check(&self) -> Result<(), HubError> {
        let (field, text) = match self {
            Target::Channel(c) => ("channel", c),
            Target::Pattern(p) => ("pattern", p),
        };
        if text.is_empty() {
            return Err(HubError::InvalidTarget { field, reason: "must not be empty".into() });
        }
        if text.len() > MAX_TARGET_LEN {
            return Err(HubError::InvalidTarget {
                field,
                reason: format!("{} bytes is longer than the limit of {MAX_TARGET_LEN}", text.len()),
            });
        }
        Ok(())
    }
}

/// One item of a live subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LiveItem {
    /// A notification, decoded once and shared by every local subscriber.
    Notification(Arc<Notification>),
    /// A message on the channel that is not a valid notification.
    Malformed {
        /// The channel it came on.
        channel: Arc<str>,
        /// Why it could not be decoded.
        reason: Arc<str>,
    },
    /// The connection to Redis was lost (or could not be made when the
    /// subscription started). Notifications published from now until the
    /// next [`LiveItem::Gap`] are lost to this subscriber.
    Disconnected,
    /// The subscription is active again after [`LiveItem::Disconnected`].
    /// Anything published in between is missing: catch up from Kafka.
    Gap,
    /// This subscriber's buffer was full: `missed` notifications were
    /// dropped for it (not for the others). Catch up from Kafka.
    Lagged {
        /// How many were dropped.
        missed: u64,
    },
    /// The subscriber was removed for being too slow
    /// ([`Overflow::Disconnect`]); the stream ends after this item.
    Dropped {
        /// How many notifications it missed.
        missed: u64,
    },
}

/// Why a hub call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The channel or pattern cannot be subscribed to.
    #[error("invalid {field}: {reason}")]
    InvalidTarget {
        /// `channel` or `pattern`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The source's channel could not be named.
    #[error(transparent)]
    Channel(#[from] dualstream_channel::ChannelError),
    /// `Hub::new` was called outside a Tokio runtime.
    #[error("the hub needs a Tokio runtime: call Hub::new inside one")]
    NoRuntime,
    /// The hub's task has stopped.
    #[error("the hub has stopped")]
    Closed,
}

/// Counters and state of a [`Hub`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Whether the subscription connection is up.
    pub connected: bool,
    /// Channels subscribed in Redis (one per distinct channel, however many
    /// local subscribers).
    pub channels: usize,
    /// Patterns subscribed in Redis.
    pub patterns: usize,
    /// Local subscribers.
    pub subscribers: usize,
    /// Messages received from Redis.
    pub received: u64,
    /// Items handed to local subscribers.
    pub delivered: u64,
    /// Items dropped for full subscriber buffers.
    pub missed: u64,
    /// Times the connection was lost.
    pub disconnects: u64,
}

struct Slot {
    tx: mpsc::Sender<LiveItem>,
    /// Notifications dropped for this subscriber and not yet reported; the
    /// hub reports them before its next item, the stream as soon as its
    /// buffer is empty, whichever comes first.
    missed: Arc<AtomicU64>,
    /// Set when the hub removed the subscriber for lag.
    dropped: Arc<AtomicBool>,
}

enum Cmd {
    Subscribe { target: Target, id: u64, slot: Slot, reply: oneshot::Sender<()> },
    Unsubscribe { target: Target, id: u64 },
    Stats { reply: oneshot::Sender<HubStats> },
}

/// The fan-out hub: one dedicated Redis connection per process, one Redis
/// subscription per distinct channel or pattern, any number of local
/// subscribers, each with its own bounded buffer.
///
/// - The reader task never waits for a subscriber: an item that does not
///   fit is dropped for that subscriber alone and reported to it
///   ([`LiveItem::Lagged`]), or the subscriber is removed
///   ([`Overflow::Disconnect`]).
/// - After Redis restarts the hub reconnects (with backoff), resubscribes
///   everything and tells every subscriber [`LiveItem::Gap`].
/// - A subscription is released in Redis when its last local subscriber
///   drops its stream.
///
/// Cheap to clone. The task stops when the hub and every stream are
/// dropped.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Shared>,
}

struct Shared {
    cmd: mpsc::UnboundedSender<Cmd>,
    namer: ChannelNamer,
    config: HubConfig,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl Hub {
    /// Validate the configuration and start the hub's task (inside a Tokio
    /// runtime). It connects at once and keeps reconnecting while Redis is
    /// unreachable.
    pub fn new(config: HubConfig) -> Result<Self, HubError> {
        config.validate()?;
        let namer = ChannelNamer::with_prefix(config.channel_prefix.clone())?;
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| ConfigError::Invalid { field: "url", reason: e.to_string() })?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| HubError::NoRuntime)?;
        let (cmd, rx) = mpsc::unbounded_channel();
        handle.spawn(Task::new(config.clone(), client, rx).run());
        Ok(Self { inner: Arc::new(Shared { cmd, namer, config, next_id: AtomicU64::new(0) }) })
    }

    /// The channel namer (from `channel_prefix`).
    pub fn namer(&self) -> &ChannelNamer {
        &self.inner.namer
    }

    /// The configuration.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// Subscribe a new local subscriber. Returns once Redis confirmed the
    /// subscription (at once when another local subscriber already has it).
    /// If Redis is unreachable it returns at once too: the stream then
    /// starts with [`LiveItem::Disconnected`] and yields [`LiveItem::Gap`]
    /// once subscribed.
    pub async fn subscribe(&self, target: Target) -> Result<LiveStream, HubError> {
        target.check()?;
        let (tx, rx) = mpsc::channel(self.inner.config.subscriber_buffer);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicBool::new(false));
        let missed = Arc::new(AtomicU64::new(0));
        let (reply, confirmed) = oneshot::channel();
        let slot = Slot { tx, missed: Arc::clone(&missed), dropped: Arc::clone(&dropped) };
        self.inner
            .cmd
            .send(Cmd::Subscribe { target: target.clone(), id, slot, reply })
            .map_err(|_| HubError::Closed)?;
        let stream = LiveStream { rx, cmd: self.inner.cmd.clone(), target, id, missed, dropped, ended: false };
        confirmed.await.map_err(|_| HubError::Closed)?;
        Ok(stream)
    }

    /// Subscribe to the channel of one source.
    pub async fn subscribe_source(&self, source: &Source) -> Result<LiveStream, HubError> {
        self.subscribe(Target::Channel(self.inner.namer.channel_for(source))).await
    }

    /// Subscribe to every source of one type (`events:user:*`).
    pub async fn subscribe_source_type(&self, source_type: &str) -> Result<LiveStream, HubError> {
        self.subscribe(Target::Pattern(self.inner.namer.pattern_for_type(source_type)?)).await
    }

    /// Counters and state.
    pub async fn stats(&self) -> Result<HubStats, HubError> {
        let (reply, rx) = oneshot::channel();
        self.inner.cmd.send(Cmd::Stats { reply }).map_err(|_| HubError::Closed)?;
        rx.await.map_err(|_| HubError::Closed)
    }
}

/// One local subscriber's stream. Dropping it unsubscribes; the Redis
/// subscription goes when the last local subscriber of it goes.
pub struct LiveStream {
    rx: mpsc::Receiver<LiveItem>,
    cmd: mpsc::UnboundedSender<Cmd>,
    target: Target,
    id: u64,
    missed: Arc<AtomicU64>,
    dropped: Arc<AtomicBool>,
    ended: bool,
}

impl std::fmt::Debug for LiveStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStream").field("target", &self.target).finish_non_exhaustive()
    }
}

impl LiveStream {
    /// What this stream is subscribed to.
    pub fn target(&self) -> &Target {
        &self.target
    }
}

impl Stream for LiveStream {
    type Item = LiveItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LiveItem>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) => {
                self.ended = true;
                let missed = self.missed.swap(0, Ordering::AcqRel);
                Poll::Ready(self.dropped.load(Ordering::Acquire).then_some(LiveItem::Dropped { missed }))
            }
            Poll::Pending => {
                // Everything buffered was taken; the drops came after it.
                match self.missed.swap(0, Ordering::AcqRel) {
                    0 => Poll::Pending,
                    missed => Poll::Ready(Some(LiveItem::Lagged { missed })),
                }
            }
            ready => ready,
        }
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Unsubscribe { target: self.target.clone(), id: self.id });
    }
}

/// The hub's task: owns the connection and every subscriber slot.
struct Task {
    config: HubConfig,
    client: redis::Client,
    rx: mpsc::UnboundedReceiver<Cmd>,
    channels: HashMap<String, HashMap<u64, Slot>>,
    patterns: HashMap<String, HashMap<u64, Slot>>,
    stats: HubStats,
}

/// The connection broke; reconnect.
struct Broken;

impl Task {
    fn new(config: HubConfig, client: redis::Client, rx: mpsc::UnboundedReceiver<Cmd>) -> Self {
        Self { config, client, rx, channels: HashMap::new(), patterns: HashMap::new(), stats: HubStats::default() }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    async fn run(mut self) {
        let min = Duration::from_millis(self.config.reconnect_min_ms);
        let max = Duration::from_millis(self.config.reconnect_max_ms);
        let mut backoff = min;
        loop {
            if let Ok(Ok(pubsub)) = tokio::time::timeout(self.timeout(), self.client.get_async_pubsub()).await {
                let (mut sink, mut stream) = pubsub.split();
                if self.resubscribe(&mut sink).await.is_ok() {
                    self.stats.connected = true;
                    backoff = min;
                    tracing::debug!(channels = self.channels.len(), patterns = self.patterns.len(), "hub subscribed");
                    self.broadcast(LiveItem::Gap);
                    let mut ping = tokio::time::interval(Duration::from_millis(self.config.ping_interval_ms));
                    ping.reset();
                    // Serve until the connection is lost: the stream ends,
                    // a command fails or a ping goes unanswered.
                    loop {
                        tokio::select! {
                            msg = stream.next() => match msg {
                                Some(m) => self.dispatch(&m),
                                None => break,
                            },
                            cmd = self.rx.recv() => match cmd {
                                None => return,
                                Some(c) => if self.handle(c, Some(&mut sink)).await.is_err() { break },
                            },
                            _ = ping.tick() => {
                                let ok = matches!(
                                    tokio::time::timeout(self.timeout(), sink.ping::<redis::Value>()).await,
                                    Ok(Ok(_))
                                );
                                if !ok { break }
                            }
                        }
                    }
                    self.stats.connected = false;
                    self.stats.disconnects += 1;
                    tracing::warn!("hub lost its Redis connection; reconnecting");
                    self.broadcast(LiveItem::Disconnected);
                }
            }
            // Wait before the next attempt, still serving commands.
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.rx.recv() => match cmd {
                        None => return,
                        Some(c) => { let _ = self.handle(c, None).await; }
                    },
                }
            }
            backoff = (backoff * 2).min(max);
        }
    }

    async fn resubscribe(&mut self, sink: &mut PubSubSink) -> Result<(), Broken> {
        let t = self.timeout();
        let channels: Vec<&String> = self.channels.keys().collect();
        if !channels.is_empty() && !matches!(tokio::time::timeout(t, sink.subscribe(&channels)).await, Ok(Ok(()))) {
            return Err(Broken);
        }
        let patterns: Vec<&String> = self.patterns.keys().collect();
        if !patterns.is_empty() && !matches!(tokio::time::timeout(t, sink.psubscribe(&patterns)).await, Ok(Ok(()))) {
            return Err(Broken);
        }
        Ok(())
    }

    /// Handle one command; `sink` is `None` while disconnected.
    async fn handle(&mut self, cmd: Cmd, sink: Option<&mut PubSubSink>) -> Result<(), Broken> {
        let t = self.timeout();
        match cmd {
            Cmd::Subscribe { target, id, mut slot, reply } => {
                let (map, name, is_pattern) = match &target {
                    Target::Channel(c) => (&mut self.channels, c, false),
                    Target::Pattern(p) => (&mut self.patterns, p, true),
                };
                let first = !map.contains_key(name);
                let mut result = Ok(());
                match sink {
                    Some(sink) if first => {
                        let call = async {
                            if is_pattern {
                                sink.psubscribe(name.as_str()).await
                            } else {
                                sink.subscribe(name.as_str()).await
                            }
                        };
                        if !matches!(tokio::time::timeout(t, call).await, Ok(Ok(()))) {
                            // The broken connection is replaced and every
                            // subscriber, this one included, told.
                            result = Err(Broken);
                        }
                    }
                    Some(_) => {}
                    None => {
                        deliver(&mut slot, LiveItem::Disconnected, Overflow::Signal, &mut self.stats);
                    }
                }
                map.entry(name.clone()).or_default().insert(id, slot);
                let _ = reply.send(());
                result
            }
            Cmd::Unsubscribe { target, id } => {
                let (map, name, is_pattern) = match &target {
                    Target::Channel(c) => (&mut self.channels, c, false),
                    Target::Pattern(p) => (&mut self.patterns, p, true),
                };
                let Some(slots) = map.get_mut(name) else { return Ok(()) };
                slots.remove(&id);
                if !slots.is_empty() {
                    return Ok(());
                }
                map.remove(name);
                let Some(sink) = sink else { return Ok(()) };
                let call = async {
                    if is_pattern {
                        sink.punsubscribe(name.as_str()).await
                    } else {
                        sink.unsubscribe(name.as_str()).await
                    }
                };
                match tokio::time::timeout(t, call).await {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(Broken),
                }
            }
            Cmd::Stats { reply } => {
                let mut s = self.stats;
                s.channels = self.channels.len();
                s.patterns = self.patterns.len();
                s.subscribers = self.channels.values().chain(self.patterns.values()).map(HashMap::len).sum();
                let _ = reply.send(s);
                Ok(())
            }
        }
    }

    fn dispatch(&mut self, msg: &Msg) {
        self.stats.received += 1;
        let channel = msg.get_channel_name();
        let item = match Notification::from_json(msg.get_payload_bytes()) {
            Ok(n) => LiveItem::Notification(Arc::new(n)),
            Err(e) => LiveItem::Malformed { channel: channel.into(), reason: e.to_string().into() },
        };
        let overflow = self.config.overflow;
        let slots = if msg.from_pattern() {
            let Ok(pattern) = msg.get_pattern::<String>() else { return };
            self.patterns.get_mut(&pattern)
        } else {
            self.channels.get_mut(channel)
        };
        if let Some(slots) = slots {
            let stats = &mut self.stats;
            slots.retain(|_, slot| deliver(slot, item.clone(), overflow, stats));
        }
    }

    fn broadcast(&mut self, item: LiveItem) {
        let stats = &mut self.stats;
        for slots in self.channels.values_mut().chain(self.patterns.values_mut()) {
            slots.retain(|_, slot| deliver(slot, item.clone(), Overflow::Signal, stats));
        }
    }
}

/// Hand `item` to one subscriber without waiting. Returns whether to keep
/// the subscriber.
fn deliver(slot: &mut Slot, item: LiveItem, overflow: Overflow, stats: &mut HubStats) -> bool {
    use mpsc::error::TrySendError;
    let pending = slot.missed.swap(0, Ordering::AcqRel);
    let mut fits = true;
    if pending > 0 {
        match slot.tx.try_send(LiveItem::Lagged { missed: pending }) {
            Ok(()) => {}
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(_)) => {
                slot.missed.fetch_add(pending, Ordering::AcqRel);
                fits = false;
            }
        }
    }
    if fits {
        match slot.tx.try_send(item) {
            Ok(()) => {
                stats.delivered += 1;
                return true;
            }
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(_)) => {}
        }
    }
    slot.missed.fetch_add(1, Ordering::AcqRel);
    stats.missed += 1;
    match overflow {
        Overflow::Signal => true,
        Overflow::Disconnect => {
            slot.dropped.store(true, Ordering::Release);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualstream_core::{Event, Notification};

    fn pair(buffer: usize) -> (Slot, LiveStream) {
        let (tx, rx) = mpsc::channel(buffer);
        let (cmd, _cmd_rx) = mpsc::unbounded_channel();
        let missed = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicBool::new(false));
        let slot = Slot { tx, missed: Arc::clone(&missed), dropped: Arc::clone(&dropped) };
        let stream =
            LiveStream { rx, cmd, target: Target::Channel("c".into()), id: 0, missed, dropped, ended: false };
        (slot, stream)
    }

    fn note(i: u32) -> LiveItem {
        let e = Event::builder("t", "user", format!("u{i}")).build().expect("valid");
        LiveItem::Notification(Arc::new(Notification::for_event(&e, None)))
    }

    fn show(item: &LiveItem) -> String {
        match item {
            LiveItem::Notification(n) => format!("n:{}", n.source_id),
            LiveItem::Lagged { missed } => format!("lagged:{missed}"),
            LiveItem::Dropped { missed } => format!("dropped:{missed}"),
            other => format!("{other:?}"),
        }
    }

    /// What the stream has ready now, without waiting.
    fn ready(s: &mut LiveStream) -> Vec<String> {
        let mut out = Vec::new();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(Some(item)) = Pin::new(&mut *s).poll_next(&mut cx) {
            out.push(show(&item));
        }
        out
    }

    #[test]
    fn a_full_buffer_drops_for_that_subscriber_and_reports_the_count_in_order() {
        let mut stats = HubStats::default();
        let (mut slot, mut stream) = pair(2);
        for i in 0..5 {
            assert!(deliver(&mut slot, note(i), Overflow::Signal, &mut stats));
        }
        assert_eq!((stats.delivered, stats.missed), (2, 3));
        // The two that fit, then the count of the three that did not.
        assert_eq!(ready(&mut stream), ["n:u0", "n:u1", "lagged:3"]);
        // Reported once; later items flow again.
        assert!(deliver(&mut slot, note(5), Overflow::Signal, &mut stats));
        assert_eq!(ready(&mut stream), ["n:u5"]);
    }

    #[test]
    fn the_hub_reports_the_lag_before_its_next_item_when_it_gets_there_first() {
        let mut stats = HubStats::default();
        let (mut slot, mut stream) = pair(2);
        for i in 0..3 {
            deliver(&mut slot, note(i), Overflow::Signal, &mut stats);
        }
        // The subscriber takes one item only, so its buffer is not empty.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Some(first)) = Pin::new(&mut stream).poll_next(&mut cx) else { panic!("an item") };
        assert_eq!(show(&first), "n:u0");
        deliver(&mut slot, note(3), Overflow::Signal, &mut stats);
        deliver(&mut slot, note(4), Overflow::Signal, &mut stats);
        // Item 2 was dropped: the hub reports it before item 3, which no longer
        // fits; items 3 and 4 are reported by the stream once it is empty.
        assert_eq!(ready(&mut stream), ["n:u1", "lagged:1", "lagged:2"]);
    }

    #[test]
    fn disconnect_policy_removes_the_subscriber_and_says_so() {
        let mut stats = HubStats::default();
        let (mut slot, mut stream) = pair(1);
        assert!(deliver(&mut slot, note(0), Overflow::Disconnect, &mut stats));
        assert!(!deliver(&mut slot, note(1), Overflow::Disconnect, &mut stats), "removed");
        drop(slot);
        assert_eq!(ready(&mut stream), ["n:u0", "dropped:1"]);
        assert!(ready(&mut stream).is_empty(), "ended");
    }
}
