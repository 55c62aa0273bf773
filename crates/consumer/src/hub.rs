//! Live Redis subscriptions with local fan-out (docs/design.md, "Many
//! subscribers per channel").
//!
//! One task per hub owns the connection and every subscriber slot. Its loop
//! never waits for Redis or for a subscriber:
//!
//! - a message is handed to each subscriber with `try_send` only;
//! - a subscription change updates the local slots at once and is queued for
//!   Redis ([`Changes`]): in order, one command in flight at a time,
//!   consecutive changes of one kind merged into one multi-argument command;
//!   `Hub::subscribe` is answered once Redis confirmed;
//! - the liveness ping runs beside the loop.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use deadpool_redis::redis::{
    self,
    aio::{PubSub, PubSubSink, PubSubStream},
    Msg,
};
use dualstream_channel::ChannelNamer;
use dualstream_core::{Limits, Notification, Source};
use dualstream_history::ConfigError;
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{HubConfig, Overflow};

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

/// Most channels or patterns in one SUBSCRIBE-like command.
const MAX_NAMES_PER_COMMAND: usize = 4_096;

/// Most messages the hub takes from the connection in one turn of its loop
/// (amortises the loop's cost during a burst).
const MAX_MESSAGES_PER_TURN: usize = 256;

/// What a subscriber's stream shares with its slot in the hub.
#[derive(Debug, Default)]
struct Lag {
    /// Notifications dropped for this subscriber and not yet reported; the
    /// hub reports them before its next item, the stream as soon as its
    /// buffer is empty, whichever comes first.
    missed: AtomicU64,
    /// Set when the hub removed the subscriber for lag.
    dropped: AtomicBool,
    /// The stream's task, registered before the stream reads `missed`: a
    /// drop counted after the stream found its buffer empty wakes it.
    waker: AtomicWaker,
}

impl Lag {
    fn add_missed(&self, n: u64) {
        self.missed.fetch_add(n, Ordering::AcqRel);
        self.waker.wake();
    }
}

pub(crate) struct Slot {
    tx: mpsc::Sender<LiveItem>,
    lag: Arc<Lag>,
    /// Told [`LiveItem::Disconnected`] and not yet [`LiveItem::Gap`]: gets
    /// no notification until the gap is announced.
    pub(crate) awaiting_gap: bool,
}

#[cfg(test)]
impl Slot {
    /// A subscriber slot sending to `tx`.
    pub(crate) fn for_test(tx: mpsc::Sender<LiveItem>) -> Self {
        Self { tx, lag: Arc::default(), awaiting_gap: false }
    }

    /// Hand the subscriber an item as the hub would, waiting for room.
    pub(crate) async fn send_for_test(&self, item: LiveItem) {
        self.tx.send(item).await.expect("the subscriber is there");
    }
}

#[cfg(test)]
impl LiveStream {
    /// A stream of channel "c" outside any hub, and the slot that feeds it.
    pub(crate) fn for_test(buffer: usize) -> (Slot, LiveStream) {
        let (tx, rx) = mpsc::channel(buffer);
        let (cmd, _cmd_rx) = mpsc::unbounded_channel();
        let lag = Arc::new(Lag::default());
        let slot = Slot { tx, lag: Arc::clone(&lag), awaiting_gap: false };
        let stream = LiveStream { rx, cmd, target: Target::Channel("c".into()), id: 0, lag, ended: false };
        (slot, stream)
    }
}

pub(crate) enum Cmd {
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
/// - Subscribing and unsubscribing never hold up delivery: the Redis
///   commands are sent beside the reader, in order.
/// - After Redis restarts the hub reconnects (with jittered backoff),
///   resubscribes everything and, once Redis confirmed every subscription,
///   tells every subscriber [`LiveItem::Gap`].
/// - A subscription is released in Redis when its last local subscriber
///   drops its stream.
/// - On a Redis Cluster ([`HubConfig::cluster_urls`]) it subscribes with
///   sharded Pub/Sub instead: one connection per master, `SSUBSCRIBE` on
///   each channel's master, the same items per channel after a master's
///   return or a slot's migration; patterns are refused.
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
        if config.cluster_urls.is_empty() {
            handle.spawn(Task::new(config.clone(), client, rx).run());
        } else {
            handle.spawn(crate::shard_hub::ShardTask::new(config.clone(), rx).run());
        }
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
    /// subscription and every subscription change made before it (at once
    /// when another local subscriber already has it and no change is
    /// pending); waiting does not hold up delivery to anyone else. If Redis
    /// is unreachable it returns at once too: the stream then starts with
    /// [`LiveItem::Disconnected`] and yields [`LiveItem::Gap`] once
    /// subscribed.
    ///
    /// With [`HubConfig::cluster_urls`] (sharded Pub/Sub) a
    /// [`Target::Pattern`] is refused with [`HubError::InvalidTarget`]
    /// (field `pattern`): sharded Pub/Sub has no patterns; subscribe to the
    /// aggregate channel of the source type (`events:user`, published with
    /// the notifier's `aggregate_channels`) instead.
    pub async fn subscribe(&self, target: Target) -> Result<LiveStream, HubError> {
        target.check()?;
        if matches!(target, Target::Pattern(_)) && !self.inner.config.cluster_urls.is_empty() {
            return Err(HubError::InvalidTarget {
                field: "pattern",
                reason: "a hub on a Redis Cluster (cluster_urls) uses sharded Pub/Sub, which has no patterns: \
                         subscribe to the aggregate channel of the source type instead"
                    .into(),
            });
        }
        let (tx, rx) = mpsc::channel(self.inner.config.subscriber_buffer);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let lag = Arc::new(Lag::default());
        let (reply, confirmed) = oneshot::channel();
        let slot = Slot { tx, lag: Arc::clone(&lag), awaiting_gap: false };
        self.inner
            .cmd
            .send(Cmd::Subscribe { target: target.clone(), id, slot, reply })
            .map_err(|_| HubError::Closed)?;
        let stream = LiveStream { rx, cmd: self.inner.cmd.clone(), target, id, lag, ended: false };
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
    lag: Arc<Lag>,
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
                let missed = self.lag.missed.swap(0, Ordering::AcqRel);
                Poll::Ready(self.lag.dropped.load(Ordering::Acquire).then_some(LiveItem::Dropped { missed }))
            }
            Poll::Pending => {
                // Everything buffered was taken; the drops came after it.
                // Register before reading: a drop the hub counts after the
                // read wakes this task.
                self.lag.waker.register(cx.waker());
                match self.lag.missed.swap(0, Ordering::AcqRel) {
                    0 => Poll::Pending,
                    missed if self.lag.dropped.load(Ordering::Acquire) => {
                        // Removed for lag: the count comes with `Dropped`
                        // once the channel closes, which wakes this task.
                        self.lag.missed.fetch_add(missed, Ordering::AcqRel);
                        Poll::Pending
                    }
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
    channels: Slots,
    patterns: Slots,
    stats: HubStats,
}

/// Local subscribers by channel or pattern, then by id.
type Slots = HashMap<String, HashMap<u64, Slot>>;

/// The slots of the target's kind, its name, and whether it is a pattern.
fn slots_of<'a>(channels: &'a mut Slots, patterns: &'a mut Slots, target: Target) -> (&'a mut Slots, String, bool) {
    match target {
        Target::Channel(c) => (channels, c, false),
        Target::Pattern(p) => (patterns, p, true),
    }
}

/// A subscription command failed or timed out; the connection is replaced.
#[derive(Debug)]
struct Broken;

/// How serving one connection ended.
enum Ended {
    /// The connection was lost; `was_live` if the gap had been announced.
    Lost { was_live: bool },
    /// The hub and every stream were dropped.
    Stopped,
}

/// Why a connection was given up.
#[derive(Debug)]
enum Lost {
    /// Redis closed it.
    Closed,
    /// A subscription command or ping failed.
    Failed,
    /// A command or ping went unanswered for `timeout_ms` while nothing else
    /// arrived either.
    Silent,
}

impl Task {
    fn new(config: HubConfig, client: redis::Client, rx: mpsc::UnboundedReceiver<Cmd>) -> Self {
        Self { config, client, rx, channels: HashMap::new(), patterns: HashMap::new(), stats: HubStats::default() }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    async fn run(mut self) {
        // Attempts since the connection was last live: sets the backoff.
        let mut attempt = 0u32;
        loop {
            // Commands wait while connecting (at most timeout_ms), so that a
            // subscriber arriving while the hub starts is not told
            // `Disconnected` for nothing; nothing is delivered meanwhile.
            let connect = tokio::time::timeout(self.timeout(), self.client.get_async_pubsub()).await;
            if let Ok(Ok(pubsub)) = connect {
                match self.serve(pubsub).await {
                    Ended::Stopped => return,
                    Ended::Lost { was_live: true } => attempt = 0,
                    Ended::Lost { was_live: false } => {}
                }
            }
            let wait = reconnect_delay(self.config.reconnect_min_ms, self.config.reconnect_max_ms, attempt);
            attempt = attempt.saturating_add(1);
            // Wait before the next attempt, still serving commands.
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.rx.recv() => match cmd {
                        None => return,
                        Some(c) => self.handle(c, None),
                    },
                }
            }
        }
    }

    /// Serve one connection: resubscribe everything, announce the gap once
    /// Redis confirmed all of it, and deliver until the connection is lost.
    /// Nothing in the loop waits for Redis: subscription commands and pings
    /// are in flight beside it, and a watchdog gives the connection up when
    /// one of them has been unanswered for `timeout_ms` and nothing else
    /// arrived meanwhile either (during a burst, replies queue behind the
    /// messages; the messages show the connection is alive).
    async fn serve(&mut self, pubsub: PubSub) -> Ended {
        let (sink, mut stream) = pubsub.split();
        let t = self.timeout();
        let mut changes = Changes::new();
        for name in self.channels.keys() {
            changes.push(Verb::Subscribe, name.clone());
        }
        for name in self.patterns.keys() {
            changes.push(Verb::PSubscribe, name.clone());
        }
        // Every subscriber told `Disconnected` is subscribed by the commands
        // queued so far: the gap is announced once they are confirmed.
        let resubscribed = changes.queued;
        let mut live = false;
        let mut ping_timer = tokio::time::interval(Duration::from_millis(self.config.ping_interval_ms));
        ping_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping_timer.reset();
        let mut ping: Option<(Instant, BoxFuture<'static, bool>)> = None;
        // When the connection last showed it is alive.
        let mut heard = Instant::now();
        let watchdog = tokio::time::sleep(t);
        tokio::pin!(watchdog);
        let lost = loop {
            if !live && changes.confirmed >= resubscribed {
                live = true;
                self.stats.connected = true;
                tracing::debug!(channels = self.channels.len(), patterns = self.patterns.len(), "hub subscribed");
                self.announce(LiveItem::Gap, false);
            }
            tokio::select! {
                msg = stream.next() => {
                    heard = Instant::now();
                    match msg {
                        Some(m) => if !self.drain(&m, &mut stream) { break Lost::Closed },
                        None => break Lost::Closed,
                    }
                }
                cmd = self.rx.recv() => match cmd {
                    Some(c) => self.handle(c, Some(&mut changes)),
                    None => return Ended::Stopped,
                },
                confirmed = std::future::poll_fn(|cx| changes.poll_confirm(&sink, cx)) => {
                    if confirmed.is_err() {
                        break Lost::Failed;
                    }
                    heard = Instant::now();
                }
                _ = ping_timer.tick(), if ping.is_none() => ping = Some((Instant::now(), ping_once(sink.clone()))),
                ok = in_flight(&mut ping) => {
                    ping = None;
                    if !ok {
                        break Lost::Failed;
                    }
                    heard = Instant::now();
                }
                () = &mut watchdog => {
                    let waiting = [ping.as_ref().map(|(at, _)| *at), changes.sent_at()].into_iter().flatten().min();
                    match waiting.map(|since| since.max(heard) + t) {
                        Some(deadline) if deadline <= Instant::now() => break Lost::Silent,
                        Some(deadline) => watchdog.as_mut().reset(deadline),
                        None => watchdog.as_mut().reset(Instant::now() + t),
                    }
                }
            }
        };
        self.stats.connected = false;
        if live {
            self.stats.disconnects += 1;
            tracing::warn!(?lost, "hub lost its Redis connection; reconnecting");
        } else {
            tracing::debug!(?lost, "hub lost its Redis connection while resubscribing");
        }
        self.announce(LiveItem::Disconnected, true);
        // Callers still waiting for a confirmation are answered after their
        // subscriber was told `Disconnected`.
        changes.release();
        Ended::Lost { was_live: live }
    }

    /// Dispatch `first` and whatever else the connection has ready, up to
    /// [`MAX_MESSAGES_PER_TURN`]. Returns whether the stream is still open.
    fn drain(&mut self, first: &Msg, stream: &mut PubSubStream) -> bool {
        self.dispatch(first);
        for _ in 1..MAX_MESSAGES_PER_TURN {
            match stream.next().now_or_never() {
                Some(Some(m)) => self.dispatch(&m),
                Some(None) => return false,
                None => break,
            }
        }
        true
    }

    /// Handle one command; `changes` is `None` while disconnected.
    fn handle(&mut self, cmd: Cmd, changes: Option<&mut Changes>) {
        match cmd {
            Cmd::Subscribe { target, id, mut slot, reply } => {
                let (map, name, pattern) = slots_of(&mut self.channels, &mut self.patterns, target);
                match changes {
                    Some(changes) => {
                        if !map.contains_key(&name) {
                            changes.push(Verb::subscribe(pattern), name.clone());
                        }
                        // Answered once Redis confirmed this change and every
                        // one before it (another subscriber's pending
                        // subscription of the same name, say).
                        changes.answer_when_confirmed(reply);
                    }
                    None => {
                        // Subscribed in Redis with the others on reconnection.
                        deliver(&slot, LiveItem::Disconnected, Overflow::Signal, &mut self.stats);
                        slot.awaiting_gap = true;
                        let _ = reply.send(());
                    }
                }
                map.entry(name).or_default().insert(id, slot);
            }
            Cmd::Unsubscribe { target, id } => {
                let (map, name, pattern) = slots_of(&mut self.channels, &mut self.patterns, target);
                let Some(slots) = map.get_mut(&name) else { return };
                slots.remove(&id);
                if slots.is_empty() {
                    map.remove(&name);
                    if let Some(changes) = changes {
                        changes.push(Verb::unsubscribe(pattern), name);
                    }
                }
            }
            Cmd::Stats { reply } => {
                let mut s = self.stats;
                s.channels = self.channels.len();
                s.patterns = self.patterns.len();
                s.subscribers = self.channels.values().chain(self.patterns.values()).map(HashMap::len).sum();
                let _ = reply.send(s);
            }
        }
    }


    fn dispatch(&mut self, msg: &Msg) {
        self.stats.received += 1;
        let slots = if msg.from_pattern() {
            let Ok(pattern) = msg.get_pattern::<String>() else { return };
            self.patterns.get_mut(&pattern)
        } else {
            self.channels.get_mut(msg.get_channel_name())
        };
        let Some(slots) = slots else { return };
        let decoded = || decode(msg.get_channel_name(), msg.get_payload_bytes());
        fan_out(slots, self.config.overflow, &mut self.stats, decoded);
    }

    /// Tell `item` to every subscriber whose `awaiting_gap` is not
    /// `awaiting` yet, and set it: `Disconnected` to those not told yet,
    /// `Gap` to those waiting for it.
    fn announce(&mut self, item: LiveItem, awaiting: bool) {
        for slots in self.channels.values_mut().chain(self.patterns.values_mut()) {
            announce_to(slots, &item, awaiting, &mut self.stats);
        }
    }
}

/// Hand one message to the subscribers in `slots`, without waiting.
/// `decode` runs once, and only when some subscriber has room for the item,
/// so a burst to subscribers that do not read costs little.
pub(crate) fn fan_out(
    slots: &mut HashMap<u64, Slot>,
    overflow: Overflow,
    stats: &mut HubStats,
    decode: impl Fn() -> LiveItem,
) {
    let mut item = None;
    slots.retain(|_, slot| {
        if slot.awaiting_gap {
            // Told `Disconnected`; `Gap` covers this message.
            return true;
        }
        if slot.tx.is_closed() {
            return false;
        }
        if slot.tx.capacity() == 0 {
            return missed_one(slot, overflow, stats);
        }
        deliver(slot, item.get_or_insert_with(&decode).clone(), overflow, stats)
    });
}

/// [`Task::announce`] for the subscribers of one channel or pattern.
pub(crate) fn announce_to(slots: &mut HashMap<u64, Slot>, item: &LiveItem, awaiting: bool, stats: &mut HubStats) {
    slots.retain(|_, slot| {
        if slot.awaiting_gap == awaiting {
            return true;
        }
        slot.awaiting_gap = awaiting;
        deliver(slot, item.clone(), Overflow::Signal, stats)
    });
}

/// The notification in a message's payload, decoded with the lenient limits
/// of the consuming side (docs/consumer.md, "One set of limits").
pub(crate) fn decode(channel: &str, payload: &[u8]) -> LiveItem {
    match Notification::from_json_with_limits(payload, &Limits::lenient()) {
        Ok(n) => LiveItem::Notification(Arc::new(n)),
        Err(e) => LiveItem::Malformed { channel: channel.into(), reason: e.to_string().into() },
    }
}

/// A SUBSCRIBE-like command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Subscribe,
    Unsubscribe,
    PSubscribe,
    PUnsubscribe,
}

impl Verb {
    fn subscribe(pattern: bool) -> Self {
        if pattern {
            Self::PSubscribe
        } else {
            Self::Subscribe
        }
    }

    fn unsubscribe(pattern: bool) -> Self {
        if pattern {
            Self::PUnsubscribe
        } else {
            Self::Unsubscribe
        }
    }
}

/// Subscription changes on their way to Redis, in the order they were made.
/// One command is in flight at a time; changes made meanwhile wait, and
/// consecutive ones of one verb go as one multi-argument command (redis-rs
/// waits for all of its confirmations). Changes are numbered from 1.
struct Changes {
    /// Commands not sent yet, oldest first, with the number of their last
    /// change.
    queue: VecDeque<(Verb, Vec<String>, u64)>,
    /// The command awaiting Redis: the number of its last change, when it
    /// was sent, and its outcome.
    sent: Option<(u64, Instant, BoxFuture<'static, bool>)>,
    /// The last change queued.
    queued: u64,
    /// The last change Redis confirmed.
    confirmed: u64,
    /// Callers of `Hub::subscribe`, each answered once the changes up to its
    /// number are confirmed.
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Changes {
    fn new() -> Self {
        Self { queue: VecDeque::new(), sent: None, queued: 0, confirmed: 0, waiting: VecDeque::new() }
    }

    /// When the command awaiting Redis was sent.
    fn sent_at(&self) -> Option<Instant> {
        self.sent.as_ref().map(|(_, at, _)| *at)
    }

    fn push(&mut self, verb: Verb, name: String) {
        self.queued += 1;
        match self.queue.back_mut() {
            Some((v, names, last)) if *v == verb && names.len() < MAX_NAMES_PER_COMMAND => {
                names.push(name);
                *last = self.queued;
            }
            _ => self.queue.push_back((verb, vec![name], self.queued)),
        }
    }

    /// Answer `reply` once every change queued so far is confirmed.
    fn answer_when_confirmed(&mut self, reply: oneshot::Sender<()>) {
        if self.confirmed == self.queued {
            let _ = reply.send(());
        } else {
            self.waiting.push_back((self.queued, reply));
        }
    }

    /// Send the next command if none is in flight, and drive it: `Ready(Ok)`
    /// when Redis confirmed one, `Ready(Err)` when it failed, `Pending`
    /// otherwise (with nothing queued, until a change is pushed). How long a
    /// command may wait is the serving loop's watchdog's business.
    fn poll_confirm(&mut self, sink: &PubSubSink, cx: &mut Context<'_>) -> Poll<Result<(), Broken>> {
        if self.sent.is_none() {
            let Some((verb, names, last)) = self.queue.pop_front() else { return Poll::Pending };
            self.sent = Some((last, Instant::now(), send(sink.clone(), verb, names)));
        }
        let (last, _, command) = self.sent.as_mut().expect("set above");
        let ok = ready!(command.as_mut().poll(cx));
        let last = *last;
        self.sent = None;
        if !ok {
            return Poll::Ready(Err(Broken));
        }
        self.confirmed = last;
        while self.waiting.front().is_some_and(|(n, _)| *n <= last) {
            if let Some((_, reply)) = self.waiting.pop_front() {
                let _ = reply.send(());
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The connection is gone: answer every waiting caller.
    fn release(self) {
        for (_, reply) in self.waiting {
            let _ = reply.send(());
        }
    }
}

/// One command: whether Redis confirmed it (redis-rs waits for one
/// confirmation per name). `names` is not empty (an UNSUBSCRIBE without
/// arguments would drop every subscription).
fn send(mut sink: PubSubSink, verb: Verb, names: Vec<String>) -> BoxFuture<'static, bool> {
    Box::pin(async move {
        let confirmed = match verb {
            Verb::Subscribe => sink.subscribe(&names).await,
            Verb::Unsubscribe => sink.unsubscribe(&names).await,
            Verb::PSubscribe => sink.psubscribe(&names).await,
            Verb::PUnsubscribe => sink.punsubscribe(&names).await,
        };
        confirmed.is_ok()
    })
}

/// One ping: whether Redis answered it.
fn ping_once(mut sink: PubSubSink) -> BoxFuture<'static, bool> {
    Box::pin(async move { sink.ping::<redis::Value>().await.is_ok() })
}

/// Await the future if there is one; without one, never complete.
async fn in_flight<T>(fut: &mut Option<(Instant, BoxFuture<'static, T>)>) -> T {
    match fut {
        Some((_, f)) => f.await,
        None => std::future::pending().await,
    }
}

/// The backoff after `attempt` attempts since the connection was last live
/// (0 for the first wait): `min_ms` doubled per attempt, at most `max_ms`.
fn backoff_ms(min_ms: u64, max_ms: u64, attempt: u32) -> u64 {
    min_ms.saturating_mul(1u64.checked_shl(attempt).unwrap_or(u64::MAX)).min(max_ms)
}

/// The wait before the next connection attempt: drawn uniformly from
/// `[backoff / 2, backoff]`, so that a fleet of gateways that lost Redis at
/// the same moment does not reconnect in step.
pub(crate) fn reconnect_delay(min_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let backoff = backoff_ms(min_ms, max_ms, attempt);
    Duration::from_millis(rand::random_range(backoff / 2..=backoff))
}

/// What [`offer`] did with an item.
#[derive(Debug, PartialEq, Eq)]
enum Offer {
    Taken,
    Full,
    Closed,
}

/// Step one of [`deliver`]: report the subscriber's pending lag before the
/// item, then try to hand the item over.
fn offer(slot: &Slot, item: LiveItem) -> Offer {
    use mpsc::error::TrySendError;
    let pending = slot.lag.missed.swap(0, Ordering::AcqRel);
    if pending > 0 {
        match slot.tx.try_send(LiveItem::Lagged { missed: pending }) {
            Ok(()) => {}
            Err(TrySendError::Closed(_)) => return Offer::Closed,
            Err(TrySendError::Full(_)) => {
                // Put back, with a wake-up: the subscriber may have emptied
                // its buffer since the swap.
                slot.lag.add_missed(pending);
                return Offer::Full;
            }
        }
    }
    match slot.tx.try_send(item) {
        Ok(()) => Offer::Taken,
        Err(TrySendError::Closed(_)) => Offer::Closed,
        Err(TrySendError::Full(_)) => Offer::Full,
    }
}

/// Step two of [`deliver`], for an item that did not fit: count it and wake
/// the subscriber, which may have emptied its buffer and gone to sleep since
/// the failed `try_send`. Returns whether to keep the subscriber.
fn missed_one(slot: &Slot, overflow: Overflow, stats: &mut HubStats) -> bool {
    stats.missed += 1;
    let keep = match overflow {
        Overflow::Signal => true,
        Overflow::Disconnect => {
            // Before the count, so a stream that sees the count sees this.
            slot.lag.dropped.store(true, Ordering::Release);
            false
        }
    };
    slot.lag.add_missed(1);
    keep
}

/// Hand `item` to one subscriber without waiting. Returns whether to keep
/// the subscriber.
pub(crate) fn deliver(slot: &Slot, item: LiveItem, overflow: Overflow, stats: &mut HubStats) -> bool {
    match offer(slot, item) {
        Offer::Taken => {
            stats.delivered += 1;
            true
        }
        Offer::Closed => false,
        Offer::Full => missed_one(slot, overflow, stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualstream_core::{Event, Notification};

    fn pair(buffer: usize) -> (Slot, LiveStream) {
        LiveStream::for_test(buffer)
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
        let (slot, mut stream) = pair(2);
        for i in 0..5 {
            assert!(deliver(&slot, note(i), Overflow::Signal, &mut stats));
        }
        assert_eq!((stats.delivered, stats.missed), (2, 3));
        // The two that fit, then the count of the three that did not.
        assert_eq!(ready(&mut stream), ["n:u0", "n:u1", "lagged:3"]);
        // Reported once; later items flow again.
        assert!(deliver(&slot, note(5), Overflow::Signal, &mut stats));
        assert_eq!(ready(&mut stream), ["n:u5"]);
    }

    #[test]
    fn the_hub_reports_the_lag_before_its_next_item_when_it_gets_there_first() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(2);
        for i in 0..3 {
            deliver(&slot, note(i), Overflow::Signal, &mut stats);
        }
        // The subscriber takes one item only, so its buffer is not empty.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Some(first)) = Pin::new(&mut stream).poll_next(&mut cx) else { panic!("an item") };
        assert_eq!(show(&first), "n:u0");
        deliver(&slot, note(3), Overflow::Signal, &mut stats);
        deliver(&slot, note(4), Overflow::Signal, &mut stats);
        // Item 2 was dropped: the hub reports it before item 3, which no longer
        // fits; items 3 and 4 are reported by the stream once it is empty.
        assert_eq!(ready(&mut stream), ["n:u1", "lagged:1", "lagged:2"]);
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicU64);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(s: &mut LiveStream, cx: &mut Context<'_>) -> Poll<Option<String>> {
        Pin::new(s).poll_next(cx).map(|item| item.as_ref().map(show))
    }

    /// The race of issue 11: the hub's `try_send` fails, the subscriber then
    /// empties its buffer, polls (nothing buffered, nothing missed yet) and
    /// sleeps, and only then does the hub count the drop. Without a wake-up
    /// from the count, the subscriber sleeps until the next item, which may
    /// never come.
    #[test]
    fn a_drop_counted_after_the_subscriber_went_to_sleep_wakes_it() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(1);
        assert!(deliver(&slot, note(0), Overflow::Signal, &mut stats));
        // The hub: the buffer holds item 0, item 1 does not fit.
        assert_eq!(offer(&slot, note(1)), Offer::Full);
        // The subscriber: takes item 0, finds nothing more and sleeps.
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("n:u0".into())));
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        // The hub counts the drop: the sleeping subscriber is woken ...
        assert!(missed_one(&slot, Overflow::Signal, &mut stats));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the count wakes the subscriber");
        // ... and hears of it at once.
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("lagged:1".into())));
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending);
    }

    /// The same race on the hub's other path: it takes the pending count to
    /// report it before an item, the report does not fit, and the subscriber
    /// empties its buffer and sleeps before the count is put back.
    #[test]
    fn a_lag_report_put_back_after_the_subscriber_went_to_sleep_wakes_it() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(1);
        assert!(deliver(&slot, note(0), Overflow::Signal, &mut stats));
        assert!(deliver(&slot, note(1), Overflow::Signal, &mut stats), "missed: the buffer is full");
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        // The subscriber takes item 0; its next poll would report the lag.
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("n:u0".into())));
        // The hub, first, takes the count (1) to report it before item 2 ...
        let pending = slot.lag.missed.swap(0, Ordering::AcqRel);
        assert_eq!(pending, 1);
        // ... the subscriber polls meanwhile: nothing buffered, nothing
        // counted, so it sleeps ...
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending);
        // ... and the hub, finding no room (a test stand-in for the item
        // that took it), puts the count back.
        slot.lag.add_missed(pending);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "putting the count back wakes the subscriber");
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("lagged:1".into())));
    }

    #[test]
    fn a_subscriber_removed_for_lag_gets_the_whole_count_with_dropped() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(1);
        assert!(deliver(&slot, note(0), Overflow::Disconnect, &mut stats));
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        assert_eq!(offer(&slot, note(1)), Offer::Full);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("n:u0".into())));
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending);
        // Counted and marked for removal; the subscriber, woken, polls
        // before the hub drops its slot.
        assert!(!missed_one(&slot, Overflow::Disconnect, &mut stats));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending, "no Lagged: the count comes with Dropped");
        drop(slot);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("dropped:1".into())));
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(None));
    }

    #[test]
    fn the_backoff_doubles_from_min_up_to_max() {
        let got: Vec<u64> = (0..8).map(|a| backoff_ms(100, 2_000, a)).collect();
        assert_eq!(got, [100, 200, 400, 800, 1_600, 2_000, 2_000, 2_000]);
        assert_eq!(backoff_ms(1, 3_600_000, 200), 3_600_000, "no overflow");
        assert_eq!(backoff_ms(3_600_000, 3_600_000, 63), 3_600_000);
    }

    #[test]
    fn each_wait_is_drawn_between_half_the_backoff_and_the_backoff() {
        for attempt in 0..8 {
            let backoff = backoff_ms(100, 2_000, attempt);
            let draws: Vec<u64> =
                (0..1_000).map(|_| reconnect_delay(100, 2_000, attempt).as_millis() as u64).collect();
            assert!(draws.iter().all(|d| (backoff / 2..=backoff).contains(d)), "attempt {attempt}: {draws:?}");
            let distinct: std::collections::HashSet<u64> = draws.iter().copied().collect();
            assert!(distinct.len() > 10, "attempt {attempt}: jittered, {} distinct waits", distinct.len());
        }
        // The smallest backoff still varies.
        let draws: std::collections::HashSet<Duration> = (0..100).map(|_| reconnect_delay(1, 1, 0)).collect();
        assert_eq!(draws.len(), 2, "0 or 1 ms");
    }

    #[test]
    fn changes_keep_their_order_and_merge_runs_of_one_verb() {
        let mut c = Changes::new();
        c.push(Verb::Subscribe, "a".into());
        c.push(Verb::Subscribe, "b".into());
        c.push(Verb::PSubscribe, "p".into());
        c.push(Verb::Unsubscribe, "a".into());
        c.push(Verb::Subscribe, "a".into());
        c.push(Verb::Subscribe, "c".into());
        let queue: Vec<(Verb, Vec<&str>, u64)> =
            c.queue.iter().map(|(v, names, last)| (*v, names.iter().map(String::as_str).collect(), *last)).collect();
        assert_eq!(
            queue,
            [
                (Verb::Subscribe, vec!["a", "b"], 2),
                (Verb::PSubscribe, vec!["p"], 3),
                (Verb::Unsubscribe, vec!["a"], 4),
                (Verb::Subscribe, vec!["a", "c"], 6),
            ]
        );
        // A caller is answered once everything queued before it is confirmed.
        let (reply, mut answered) = oneshot::channel();
        c.answer_when_confirmed(reply);
        assert_eq!(c.waiting.front().map(|(n, _)| *n), Some(6));
        assert!(answered.try_recv().is_err());
        // With nothing pending, at once.
        let mut idle = Changes::new();
        let (reply, mut answered) = oneshot::channel();
        idle.answer_when_confirmed(reply);
        assert!(answered.try_recv().is_ok());
    }

    #[test]
    fn a_command_carries_at_most_so_many_names() {
        let mut c = Changes::new();
        for i in 0..MAX_NAMES_PER_COMMAND + 1 {
            c.push(Verb::Subscribe, format!("c{i}"));
        }
        let sizes: Vec<usize> = c.queue.iter().map(|(_, names, _)| names.len()).collect();
        assert_eq!(sizes, [MAX_NAMES_PER_COMMAND, 1]);
    }

    #[test]
    fn disconnect_policy_removes_the_subscriber_and_says_so() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(1);
        assert!(deliver(&slot, note(0), Overflow::Disconnect, &mut stats));
        assert!(!deliver(&slot, note(1), Overflow::Disconnect, &mut stats), "removed");
        drop(slot);
        assert_eq!(ready(&mut stream), ["n:u0", "dropped:1"]);
        assert!(ready(&mut stream).is_empty(), "ended");
    }
}
