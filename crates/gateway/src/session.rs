//! One client connection's subscriptions, shared by SSE and WebSocket.
//!
//! Every channel subscription is a catch-up join (so it resumes from an
//! offset with no gap and no duplicate); patterns and aggregate channels are
//! live hub subscriptions. Each is a stream (`session/subs.rs`) that the
//! connection polls when its transport can take the next item: no task of
//! its own, no buffer of rendered items. A client that reads slowly falls
//! behind and catches up from Kafka, and never holds up the hub, the shared
//! Kafka reader or other clients; what its joins read ahead for it is
//! bounded by `limits.client_buffer` and `limits.client_buffer_bytes`. The
//! session keeps the resume token's positions as items reach the client.

mod subs;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use dualstream_consumer::{ReadyBudget, Target};
use dualstream_core::Source;
use futures::stream::{AbortHandle, Abortable, BoxStream, SelectAll};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;

use crate::auth::{now_secs, Verified};
use crate::error::ErrorCode;
use crate::limits::LimitError;
use crate::metric_names as metric;
use crate::resume::{hash, ResumeToken};
use crate::state::{AppState, ClientGuard};
use crate::wire::{to_json, ErrorItem, EventItem, Kind, ResetItem, SubscribedItem};

use subs::{ChannelSub, Counted};

/// What a client asks for: notifications (ids and positions) or whole
/// events (with payloads read from Kafka).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ids, types, source and Kafka position.
    #[default]
    Notify,
    /// The whole event as well: payload, headers, `occurred_at_ms`.
    Full,
}

impl Mode {
    /// The name, as in the query and the metrics' `mode` label.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Notify => "notify",
            Mode::Full => "full",
        }
    }
}

/// A refused subscription.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SubError {
    /// The token's read claims do not cover it: 403.
    #[error("{0}")]
    Forbidden(String),
    /// Not a channel name of this gateway's namer: 400.
    #[error("{0}")]
    InvalidChannel(String),
    /// Not a pattern this gateway takes, or a pattern in `full` mode: 400.
    #[error("{0}")]
    InvalidPattern(String),
    /// More subscriptions than `limits.max_subscriptions`: 400.
    #[error("subscriptions: {n} would exceed limits.max_subscriptions = {max}")]
    TooMany {
        /// How many there would be.
        n: usize,
        /// `limits.max_subscriptions`.
        max: usize,
    },
    /// Kafka or Redis could not start it: 503.
    #[error("{0}")]
    Unavailable(String),
    /// A limit of the token's share (`limits.far_resumes_per_min`): 429,
    /// with when to try again.
    #[error(transparent)]
    Limited(LimitError),
}

impl SubError {
    /// The stable code.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            SubError::Forbidden(_) => ErrorCode::Forbidden,
            SubError::InvalidChannel(_) => ErrorCode::InvalidChannel,
            SubError::InvalidPattern(_) => ErrorCode::InvalidPattern,
            SubError::TooMany { .. } => ErrorCode::TooMany,
            SubError::Unavailable(_) => ErrorCode::Unavailable,
            SubError::Limited(e) => e.limit.code(),
        }
    }

    /// The HTTP status for a stream that cannot open.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            SubError::Forbidden(_) => StatusCode::FORBIDDEN,
            SubError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            SubError::Limited(e) => e.limit.status(),
            SubError::InvalidChannel(_) | SubError::InvalidPattern(_) | SubError::TooMany { .. } => {
                StatusCode::BAD_REQUEST
            }
        }
    }

    /// The `{"kind": "error", ...}` reply to a WebSocket command.
    pub(crate) fn item(&self) -> ErrorItem<'static> {
        match self {
            SubError::Limited(e) => e.item(),
            _ => ErrorItem::new(self.code(), self.to_string()),
        }
    }
}

/// Why a stream was closed by the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// A WebSocket client whose socket took no item for
    /// `limits.send_timeout_ms`.
    SlowClient,
    /// The token (or the ticket's token) expired.
    TokenExpired,
    /// The gateway is shutting down.
    Shutdown,
}

impl CloseReason {
    /// A stable code.
    pub fn code(self) -> &'static str {
        match self {
            CloseReason::SlowClient => "slow_client",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// In words.
    pub fn message(self) -> &'static str {
        match self {
            CloseReason::SlowClient => {
                "the client did not read its items fast enough; reconnect with the last resume token"
            }
            CloseReason::TokenExpired => "the token expired; reconnect with a fresh token and the last resume token",
            CloseReason::Shutdown => {
                "the gateway is shutting down; reconnect (to another node) with the last resume token"
            }
        }
    }

    /// The WebSocket close code.
    pub fn ws_code(self) -> u16 {
        match self {
            CloseReason::SlowClient => 4008,
            CloseReason::TokenExpired => 4001,
            CloseReason::Shutdown => 1001,
        }
    }
}

/// One item for the client.
#[derive(Debug)]
pub(crate) enum Out {
    /// A JSON object of kind `event`, `reset`, `error` or `subscribed`, and
    /// the resume token after it (for `event`, `reset` and `subscribed`).
    Item {
        /// `event`, `reset`, `error` or `subscribed`.
        kind: Kind,
        /// The JSON text.
        json: Arc<str>,
        /// The resume token after this item.
        resume_token: Option<String>,
    },
    /// The stream ends.
    Close(CloseReason),
}

/// An item a subscription hands to the connection, as JSON text.
#[derive(Debug)]
struct Msg {
    kind: Kind,
    /// Shared by every subscriber of the channel for an event
    /// (`renders.rs`).
    json: Arc<str>,
    /// Moves the channel's position in the resume token: (channel hash,
    /// partition, next offset).
    advance: Option<(u32, i32, i64)>,
}

impl Msg {
    fn event(item: &EventItem<'_>, advance: Option<(u32, i32, i64)>) -> Self {
        Self::shared_event(to_json(item).into(), advance)
    }

    /// An event item rendered already.
    fn shared_event(json: Arc<str>, advance: Option<(u32, i32, i64)>) -> Self {
        Self { kind: Kind::Event, json, advance }
    }

    fn reset(item: &ResetItem<'_>, advance: Option<(u32, i32, i64)>) -> Self {
        Self { kind: Kind::Reset, json: to_json(item).into(), advance }
    }

    fn error(item: &ErrorItem<'_>) -> Self {
        Self { kind: Kind::Error, json: to_json(item).into(), advance: None }
    }
}

/// A parsed subscription request.
#[derive(Clone, Debug)]
pub(crate) enum Want {
    /// One source's channel: resumable.
    Channel {
        /// The channel name.
        channel: String,
        /// Its source.
        source: Source,
    },
    /// A pattern (`events:user:*`) or an aggregate channel (`events:user`):
    /// live only.
    Live {
        /// What to subscribe to.
        target: Target,
        /// The name the client used.
        name: String,
    },
}

impl Want {
    /// The name the client used.
    pub(crate) fn name(&self) -> &str {
        match self {
            Want::Channel { channel, .. } => channel,
            Want::Live { name, .. } => name,
        }
    }
}

/// The subscriptions of a request, each name once, checked against the
/// token; more distinct names than `max_subscriptions` are refused before
/// any is checked.
pub(crate) fn wants(
    state: &AppState,
    auth: &Verified,
    channels: &[String],
    patterns: &[String],
) -> Result<Vec<Want>, SubError> {
    let mut seen = HashSet::new();
    let channels: Vec<&String> = channels.iter().filter(|c| seen.insert(c.as_str())).collect();
    let patterns: Vec<&String> = patterns.iter().filter(|p| seen.insert(p.as_str())).collect();
    let max = state.config.limits.max_subscriptions;
    if seen.len() > max {
        return Err(SubError::TooMany { n: seen.len(), max });
    }
    let mut out = Vec::with_capacity(seen.len());
    for c in channels {
        out.push(want_channel(state, auth, c)?);
    }
    for p in patterns {
        out.push(want_pattern(state, auth, p)?);
    }
    Ok(out)
}

/// Check a channel name against the namer and the token.
fn want_channel(state: &AppState, auth: &Verified, channel: &str) -> Result<Want, SubError> {
    if channel.len() > dualstream_consumer::MAX_TARGET_LEN {
        return Err(SubError::InvalidChannel(format!(
            "channel: {} bytes is longer than the limit of {}",
            channel.len(),
            dualstream_consumer::MAX_TARGET_LEN
        )));
    }
    let parsed = state.namer.parse(channel).map_err(|e| SubError::InvalidChannel(format!("channel: {e}")))?;
    if !auth.may_read_channel(channel) {
        return Err(SubError::Forbidden(format!("the token's read claims do not cover channel {channel:?}")));
    }
    match parsed.source_id {
        Some(id) => {
            let source = Source::with_limits(parsed.source_type, id, &dualstream_core::Limits::lenient())
                .map_err(|e| SubError::InvalidChannel(format!("channel: {e}")))?;
            Ok(Want::Channel { channel: channel.to_owned(), source })
        }
        None => Ok(Want::Live { target: Target::Channel(channel.to_owned()), name: channel.to_owned() }),
    }
}

/// Check a pattern: only `<prefix>:*` and `<prefix>:<source type>:*` are
/// accepted, and a prefix claim must cover it.
fn want_pattern(state: &AppState, auth: &Verified, pattern: &str) -> Result<Want, SubError> {
    let bad = || {
        SubError::InvalidPattern(format!(
            "pattern {:?}: only {} and {}:<source type>:* are accepted",
            pattern.chars().take(200).collect::<String>(),
            state.namer.pattern_all(),
            state.namer.prefix()
        ))
    };
    let literal = pattern.strip_suffix('*').ok_or_else(bad)?;
    let all = state.namer.pattern_all();
    let ok = pattern == all || {
        let ty = literal.strip_prefix(&format!("{}:", state.namer.prefix())).and_then(|r| r.strip_suffix(':'));
        ty.and_then(|t| state.namer.pattern_for_type(t).ok()).as_deref() == Some(pattern)
    };
    if !ok {
        return Err(bad());
    }
    if !state.hub_patterns {
        return Err(SubError::InvalidPattern(
            "this gateway reads a Redis Cluster (sharded Pub/Sub has no patterns): subscribe to channels".into(),
        ));
    }
    if !auth.may_read_pattern(literal) {
        return Err(SubError::Forbidden(format!("the token's read claims do not cover pattern {pattern:?}")));
    }
    Ok(Want::Live { target: Target::Pattern(pattern.to_owned()), name: pattern.to_owned() })
}

/// A subscription's stream, ended when this is dropped (and then dropped,
/// with its join and hub subscription, the next time the connection polls
/// its subscriptions).
#[derive(Debug)]
struct Sub(AbortHandle);

impl Drop for Sub {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A channel to start: where its partition ends now, and whether it
/// resumes further back than the tail cache holds (`far`).
struct PlannedChannel {
    channel: String,
    source: Source,
    now: dualstream_core::Position,
    far: bool,
}

/// A subscription about to start: a channel with its partition's end now.
enum Planned {
    Channel(PlannedChannel),
    Live {
        target: Target,
        name: String,
    },
}

/// One connection's subscriptions and resume state. Every subscription's
/// stream is dropped when its subscription ends or the session is dropped.
pub(crate) struct Session {
    state: Arc<AppState>,
    /// Every subscription's items, polled as they are woken.
    streams: SelectAll<Abortable<BoxStream<'static, Msg>>>,
    /// Items of the session's own (a `reset` at subscribe) that go first.
    queued: VecDeque<Msg>,
    /// What this connection's joins may hold ready for it.
    budget: ReadyBudget,
    shutdown: watch::Receiver<bool>,
    subs: HashMap<String, Sub>,
    /// Channel hash → (partition, next offset), for the resume token.
    positions: BTreeMap<u32, (i32, i64)>,
    /// Channel hash → channel, for the subscriptions that have one.
    channels: HashMap<u32, String>,
    /// Channel hash → the mode it was subscribed in, for the delivery
    /// counters.
    modes: HashMap<u32, Mode>,
    /// `dualstream_gateway_deliveries_total` of this transport: notify, full.
    delivered: [metrics::Counter; 2],
    /// When the token (or the ticket's token) expires: one timer for the
    /// session, not one per item.
    expiry: std::pin::Pin<Box<tokio::time::Sleep>>,
    closed: bool,
    guard: ClientGuard,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("subs", &self.subs.len()).field("positions", &self.positions).finish()
    }
}

impl Session {
    /// A session for a client holding `auth`.
    pub(crate) fn new(state: Arc<AppState>, auth: &Verified, guard: ClientGuard) -> Self {
        let limits = &state.config.limits;
        let budget =
            ReadyBudget::new(limits.client_buffer, limits.client_buffer_bytes, Arc::clone(&state.buffered_bytes));
        let shutdown = state.shutdown.subscribe();
        let transport = guard.transport();
        let delivered = [Mode::Notify, Mode::Full]
            .map(|m| metrics::counter!(metric::DELIVERIES, "transport" => transport, "mode" => m.name()));
        Self {
            modes: HashMap::new(),
            delivered,
            streams: SelectAll::new(),
            queued: VecDeque::new(),
            budget,
            shutdown,
            subs: HashMap::new(),
            positions: BTreeMap::new(),
            channels: HashMap::new(),
            expiry: {
                let secs = auth.stream_expiry().saturating_sub(now_secs());
                Box::pin(tokio::time::sleep(Duration::from_secs(secs)))
            },
            closed: false,
            state,
            guard,
        }
    }

    /// The resume token now.
    pub(crate) fn resume_token(&self) -> String {
        crate::resume::encode(self.state.log_hash, &self.positions)
    }

    /// Start subscriptions. Channels present in `resume` continue from
    /// their position there; others start at the end of the log now. A
    /// resume token of another log resumes nothing: its channels get a
    /// `reset`. Already-active names are left as they are, and a name given
    /// twice counts once. All or nothing: when one fails, those started by
    /// this call are stopped again.
    pub(crate) async fn subscribe(
        &mut self,
        wants: Vec<Want>,
        mode: Mode,
        resume: Option<&ResumeToken>,
    ) -> Result<(), SubError> {
        let mut seen = HashSet::new();
        let new: Vec<Want> = wants
            .into_iter()
            .filter(|w| !self.subs.contains_key(w.name()) && seen.insert(w.name().to_owned()))
            .collect();
        if let (Mode::Full, Some(live)) = (mode, new.iter().find(|w| matches!(w, Want::Live { .. }))) {
            return Err(SubError::InvalidPattern(format!(
                "{}: patterns and aggregate channels deliver notifications only (mode=notify)",
                live.name()
            )));
        }
        let mut added = Vec::with_capacity(new.len());
        let result = self.start(new, mode, resume, &mut added).await;
        if result.is_err() {
            self.unsubscribe(&added);
        }
        result
    }

    async fn start(
        &mut self,
        new: Vec<Want>,
        mode: Mode,
        resume: Option<&ResumeToken>,
        added: &mut Vec<String>,
    ) -> Result<(), SubError> {
        let max = self.state.config.limits.max_subscriptions;
        if self.subs.len() + new.len() > max {
            return Err(SubError::TooMany { n: self.subs.len() + new.len(), max });
        }
        let foreign = resume.filter(|r| r.log != self.state.log_hash);
        let resume = resume.filter(|r| r.log == self.state.log_hash);
        // Where each channel's partition ends now, and how many of them
        // resume from further back than the tail cache keeps: those are
        // taken from the subject's share at once, before any starts.
        let mut planned = Vec::with_capacity(new.len());
        let mut far = 0;
        let cached = i64::try_from(self.state.config.join.cache_records).unwrap_or(i64::MAX);
        let asked = std::time::Instant::now();
        // All at once: they share the watermark poller's next round.
        let catchup = &self.state.catchup;
        let positions = futures::future::join_all(new.iter().map(|want| async move {
            match want {
                Want::Channel { source, .. } => Some(catchup.position_now(source).await),
                Want::Live { .. } => None,
            }
        }))
        .await;
        if asked.elapsed() > std::time::Duration::from_secs(2) {
            tracing::warn!(
                channels = new.len(),
                waited_ms = asked.elapsed().as_millis() as u64,
                "a subscribe waited long for its channels' watermarks"
            );
        }
        for (want, position) in new.into_iter().zip(positions) {
            planned.push(match want {
                Want::Channel { channel, source } => {
                    let now = position
                        .expect("looked up for every channel")
                        .map_err(|e| SubError::Unavailable(format!("Kafka: {e}")))?;
                    let from = resume.and_then(|r| r.positions.get(&hash(&channel)));
                    let is_far = from.is_some_and(|&(p, next)| p == now.partition && now.offset - next > cached);
                    far += usize::from(is_far);
                    Planned::Channel(PlannedChannel { channel, source, now, far: is_far })
                }
                Want::Live { target, name } => Planned::Live { target, name },
            });
        }
        let per_min = self.state.config.limits.far_resumes_per_min;
        self.state
            .far_resumes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(self.guard.subject(), far, per_min, std::time::Instant::now())
            .map_err(SubError::Limited)?;
        for p in planned {
            let (name, stream) = match p {
                Planned::Channel(planned) => {
                    (planned.channel.clone(), self.start_channel(planned, mode, resume, foreign))
                }
                Planned::Live { target, name } => {
                    let stream = self.start_live(target, name.clone(), resume.is_some() || foreign.is_some()).await?;
                    (name, stream)
                }
            };
            let (stream, handle) = futures::stream::abortable(stream);
            self.streams.push(stream);
            added.push(name.clone());
            self.subs.insert(name, Sub(handle));
        }
        Ok(())
    }

    /// A channel's join, from its position in `resume`, or from `now`, the
    /// end of its partition (with a `reset` when the position cannot be
    /// used).
    fn start_channel(
        &mut self,
        planned: PlannedChannel,
        mode: Mode,
        resume: Option<&ResumeToken>,
        foreign: Option<&ResumeToken>,
    ) -> BoxStream<'static, Msg> {
        let PlannedChannel { channel, source, now, far } = planned;
        let h = hash(&channel);
        let from = resume.and_then(|r| r.positions.get(&h)).copied();
        let mut reset = None;
        let start = match from {
            Some((p, next)) if p == now.partition => next,
            Some((p, _)) => {
                reset = Some(format!(
                    "the channel moved from partition {p} to {} (the topic's partition count changed)",
                    now.partition
                ));
                now.offset
            }
            None if foreign.is_some_and(|f| f.positions.contains_key(&h)) => {
                reset = Some("the resume token is for another event log (stream_id or topic)".into());
                now.offset
            }
            None => now.offset,
        };
        self.positions.insert(h, (now.partition, start));
        self.channels.insert(h, channel.clone());
        self.modes.insert(h, mode);
        if let Some(reason) = reset {
            self.push(Msg::reset(&ResetItem::new(&channel, &reason), None));
        }
        ChannelSub {
            state: Arc::clone(&self.state),
            channel: channel.into(),
            hash: h,
            source,
            partition: now.partition,
            next: start,
            mode,
            budget: self.budget.clone(),
            // A far resume's history up to where the partition ends now is
            // paced, per token subject; nothing after it.
            pace_until: far.then_some(now.offset),
            subject: Arc::from(self.guard.subject()),
            end: None,
            _counted: Counted::new(self.guard.transport(), mode.name()),
        }
        .stream()
    }

    /// A pattern's or an aggregate channel's hub subscription, with a
    /// `reset` first when the client asked to resume (live names do not).
    async fn start_live(
        &mut self,
        target: Target,
        name: String,
        resuming: bool,
    ) -> Result<BoxStream<'static, Msg>, SubError> {
        if resuming {
            let reason =
                "patterns and aggregate channels are live only: what was published while disconnected is not replayed";
            self.push(Msg::reset(&ResetItem::new(&name, reason), None));
        }
        let live = self.state.hub.subscribe(target).await.map_err(|e| SubError::Unavailable(format!("Redis: {e}")))?;
        let counted = Counted::new(self.guard.transport(), "live");
        Ok(subs::live(Arc::clone(&self.state), name.into(), live, counted))
    }

    /// Stop subscriptions by name; unknown names are ignored.
    pub(crate) fn unsubscribe(&mut self, names: &[String]) {
        for n in names {
            if self.subs.remove(n).is_some() {
                let h = hash(n);
                self.positions.remove(&h);
                self.channels.remove(&h);
                self.modes.remove(&h);
            }
        }
    }

    fn push(&mut self, msg: Msg) {
        self.queued.push_back(msg);
    }

    /// The next item for the client; after [`Out::Close`] always `None`.
    pub(crate) async fn next(&mut self) -> Option<Out> {
        if self.closed {
            return None;
        }
        let (shutdown, streams, expiry) = (&mut self.shutdown, &mut self.streams, self.expiry.as_mut());
        let step = match self.queued.pop_front() {
            Some(msg) => Ok(msg),
            None => tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => Err(CloseReason::Shutdown),
                () = expiry => Err(CloseReason::TokenExpired),
                // With no subscription left (or none yet) there is nothing
                // to wait for but the others.
                Some(msg) = streams.next(), if !streams.is_empty() => Ok(msg),
            },
        };
        let reason = match step {
            Ok(Msg { kind, json, advance }) => {
                if kind == Kind::Event {
                    let full = advance.is_some_and(|(h, ..)| self.modes.get(&h) == Some(&Mode::Full));
                    self.delivered[usize::from(full)].increment(1);
                }
                if let Some((h, p, next)) = advance {
                    if let Some(pos) = self.positions.get_mut(&h) {
                        *pos = (p, next.max(pos.1));
                    }
                }
                let resume_token = (kind != Kind::Error).then(|| self.resume_token());
                return Some(Out::Item { kind, json, resume_token });
            }
            Err(reason) => reason,
        };
        metrics::counter!(metric::CLOSED, "transport" => self.guard.transport(), "reason" => reason.code())
            .increment(1);
        self.closed = true;
        // Free what the session holds now: the close item may wait for a
        // client that never reads until the connection's write timeout.
        self.subs.clear();
        self.streams.clear();
        self.queued.clear();
        Some(Out::Close(reason))
    }

    /// The `subscribed` item: the active names and the resume token now.
    pub(crate) fn subscribed(&self) -> Out {
        let json = to_json(&SubscribedItem::new(self.subs.keys().map(String::as_str))).into();
        Out::Item { kind: Kind::Subscribed, json, resume_token: Some(self.resume_token()) }
    }
}
