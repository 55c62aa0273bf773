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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use deadpool_redis::redis::{
    self,
    aio::{PubSub, PubSubSink, PubSubStream},
    Msg,
};
use dualstream_channel::ChannelNamer;
use dualstream_core::Source;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backoff::reconnect_delay;
use crate::config::{ConfigError, HubConfig, Overflow};
use crate::error::HubError;
use crate::live::{
    announce_to, decode, deliver, fan_out, subscriber, Cmd, HubStats, LiveItem, LiveStream, Slot, Target,
};
use crate::seen::SeenOffsets;

/// Most channels or patterns in one SUBSCRIBE-like command.
const MAX_NAMES_PER_COMMAND: usize = 4_096;

/// Most messages the hub takes from the connection in one turn of its loop
/// (amortises the loop's cost during a burst).
const MAX_MESSAGES_PER_TURN: usize = 256;
/// Commands (subscribe, unsubscribe, stats) the hub's task handles in one
/// turn of its loop, at most: each is a few map operations.
const MAX_COMMANDS_PER_TURN: usize = 4_096;

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
    seen: Arc<SeenOffsets>,
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
        let seen = Arc::new(SeenOffsets::default());
        if config.cluster_urls.is_empty() {
            handle.spawn(Task::new(config.clone(), client, rx, Arc::clone(&seen)).run());
        } else {
            handle.spawn(crate::shard_hub::ShardTask::new(config.clone(), rx).run());
        }
        Ok(Self { inner: Arc::new(Shared { cmd, namer, config, next_id: AtomicU64::new(0), seen }) })
    }

    /// Follow every source channel under the prefix (one pattern
    /// subscription, `events:*:*`, kept across reconnections) and record the
    /// position of each notification, so that a catch-up join can tell,
    /// without reading Kafka, that no event of its source lies between two
    /// of its notifications (see [`SeenOffsets`]). Idempotent. The hub then
    /// receives every notification under the prefix.
    ///
    /// `None` on a Redis Cluster ([`HubConfig::cluster_urls`]): sharded
    /// Pub/Sub has no patterns, and joins read Kafka at each jump instead.
    pub fn follow_partitions(&self) -> Option<Arc<SeenOffsets>> {
        if !self.inner.config.cluster_urls.is_empty() {
            return None;
        }
        let pattern = self.inner.namer.pattern_all_sources();
        self.inner.cmd.send(Cmd::Follow { pattern }).ok()?;
        Some(Arc::clone(&self.inner.seen))
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
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (slot, stream) =
            subscriber(self.inner.config.subscriber_buffer, self.inner.cmd.clone(), target.clone(), id);
        let (reply, confirmed) = oneshot::channel();
        self.inner.cmd.send(Cmd::Subscribe { target, id, slot, reply }).map_err(|_| HubError::Closed)?;
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

/// The hub's task: owns the connection and every subscriber slot.
struct Task {
    config: HubConfig,
    client: redis::Client,
    rx: mpsc::UnboundedReceiver<Cmd>,
    channels: Slots,
    patterns: Slots,
    stats: HubStats,
    /// The pattern followed for [`SeenOffsets`], once asked for.
    follow: Option<String>,
    seen: Arc<SeenOffsets>,
    /// Channels subscribed in Redis on their own, on this connection. A
    /// channel the followed pattern covers is not: its messages come with
    /// the pattern's (one Redis subscription and one copy of each message
    /// for all of them, and subscribing one is local). Each message of a
    /// channel is taken from exactly one of the two: from its own
    /// subscription if it is in this set, else from the pattern.
    individually: HashSet<String>,
}

/// Local subscribers by channel or pattern, then by id.
type Slots = HashMap<String, HashMap<u64, Slot>>;

/// Whether `follow`, the followed pattern, covers `channel`, as Redis
/// matches it. Only `*` is understood: a pattern with `?`, `[` or `\\`
/// covers nothing here (its channels are then subscribed on their own).
fn covers(follow: Option<&str>, channel: &str) -> bool {
    let Some(pattern) = follow else { return false };
    if pattern.contains(['?', '[', '\\']) {
        return false;
    }
    // Classic wildcard matching: on a mismatch, let the last `*` take one
    // more byte.
    let (p, c) = (pattern.as_bytes(), channel.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < c.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == c[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&b| b == b'*')
}

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
    fn new(config: HubConfig, client: redis::Client, rx: mpsc::UnboundedReceiver<Cmd>, seen: Arc<SeenOffsets>) -> Self {
        Self {
            config,
            client,
            rx,
            channels: HashMap::new(),
            patterns: HashMap::new(),
            stats: HubStats::default(),
            follow: None,
            seen,
            individually: HashSet::new(),
        }
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
        self.individually.clear();
        for name in self.channels.keys() {
            if !covers(self.follow.as_deref(), name) {
                changes.push(Verb::Subscribe, name.clone());
                self.individually.insert(name.clone());
            }
        }
        for name in self.patterns.keys() {
            changes.push(Verb::PSubscribe, name.clone());
        }
        if let Some(follow) = self.follow.as_ref().filter(|f| !self.patterns.contains_key(*f)) {
            changes.push(Verb::PSubscribe, follow.clone());
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
                    Some(c) => {
                        self.handle(c, Some(&mut changes));
                        // Whatever else waits, up to a turn's worth: one
                        // command a turn, against a turn of up to
                        // `MAX_MESSAGES_PER_TURN` messages fanned out,
                        // kept the subscribes and unsubscribes of a
                        // reconnect storm waiting for tens of seconds.
                        for _ in 1..MAX_COMMANDS_PER_TURN {
                            match self.rx.try_recv() {
                                Ok(c) => self.handle(c, Some(&mut changes)),
                                Err(_) => break,
                            }
                        }
                    }
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
                        let own = pattern || !covers(self.follow.as_deref(), &name);
                        if !map.contains_key(&name) && own {
                            changes.push(Verb::subscribe(pattern), name.clone());
                            if !pattern {
                                self.individually.insert(name.clone());
                            }
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
                    if pattern && self.follow.as_ref() == Some(&name) {
                        // Still followed.
                        return;
                    }
                    if !pattern && !self.individually.remove(&name) {
                        // Its messages came with the followed pattern's.
                        return;
                    }
                    if let Some(changes) = changes {
                        changes.push(Verb::unsubscribe(pattern), name);
                    }
                }
            }
            Cmd::Follow { pattern } => {
                if self.follow.is_some() {
                    return;
                }
                if let Some(changes) = changes.filter(|_| !self.patterns.contains_key(&pattern)) {
                    changes.push(Verb::PSubscribe, pattern.clone());
                }
                self.follow = Some(pattern);
            }
            Cmd::Stats { reply } => {
                let mut s = self.stats;
                s.channels = self.channels.len();
                s.patterns = self.patterns.len();
                s.subscribers = self.channels.values().chain(self.patterns.values()).map(HashMap::len).sum();
                s.queued = crate::live::queued(self.channels.values().chain(self.patterns.values()).flat_map(HashMap::values));
                let _ = reply.send(s);
            }
        }
    }

    fn dispatch(&mut self, msg: &Msg) {
        self.stats.received += 1;
        let channel = msg.get_channel_name();
        if !msg.from_pattern() {
            // A channel the pattern covers takes its messages from the
            // pattern, unless it is (still) subscribed on its own.
            if !self.individually.contains(channel) {
                return;
            }
            let Some(slots) = self.channels.get_mut(channel) else { return };
            let decoded = || decode(channel, msg.get_payload_bytes());
            fan_out(slots, self.config.overflow, &mut self.stats, decoded);
            return;
        }
        let Ok(pattern) = msg.get_pattern::<String>() else { return };
        if self.follow.as_ref() != Some(&pattern) {
            let Some(slots) = self.patterns.get_mut(&pattern) else { return };
            let decoded = || decode(channel, msg.get_payload_bytes());
            fan_out(slots, self.config.overflow, &mut self.stats, decoded);
            return;
        }
        // The followed pattern: decoded once, for the record of what was
        // seen, the pattern's own subscribers and the channel's.
        let item = decode(channel, msg.get_payload_bytes());
        if let LiveItem::Notification(n) = &item {
            self.seen.record(n);
        }
        if let Some(slots) = self.patterns.get_mut(&pattern) {
            fan_out(slots, self.config.overflow, &mut self.stats, || item.clone());
        }
        if !self.individually.contains(channel) {
            if let Some(slots) = self.channels.get_mut(channel) {
                fan_out(slots, self.config.overflow, &mut self.stats, || item.clone());
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

#[cfg(test)]
mod covers_tests {
    use super::covers;

    #[test]
    fn the_followed_pattern_covers_what_redis_would_match() {
        let f = Some("events:*:*");
        assert!(covers(f, "events:user:42"));
        assert!(covers(f, "events:user:a:b"));
        assert!(covers(f, "events::"));
        assert!(!covers(f, "events:user"), "an aggregate channel has no second colon");
        assert!(!covers(f, "other:user:42"));
        assert!(!covers(None, "events:user:42"));
        assert!(covers(Some("events:*"), "events:user"));
        assert!(covers(Some("a*b*c"), "axxbyyc"));
        assert!(!covers(Some("a*b*c"), "axxbyy"));
        assert!(!covers(Some("events:?:*"), "events:u:1"), "other glob characters cover nothing");
        assert!(!covers(Some("events:[ab]:*"), "events:a:1"));
    }
}
