//! One client connection's subscriptions, shared by SSE and WebSocket.
//!
//! Every channel subscription is a catch-up join (so it resumes from an
//! offset with no gap and no duplicate); patterns and aggregate channels are
//! live hub subscriptions. Each runs in a task of its own that hands items to
//! the connection with `try_send`: a client whose buffer is full is closed
//! with the reason `slow_client`, and never holds up the hub, the shared
//! Kafka reader or other clients.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dualstream_consumer::{Delivery, HubError, JoinError, LiveItem, ReplayError, StartAt, Target};
use dualstream_core::{Event, Notification, Position, Source};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::auth::{now_secs, Verified};
use crate::state::AppState;
use crate::token::{hash, ResumeToken};

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

/// A refused subscription.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct SubError {
    /// `forbidden`, `invalid_channel`, `invalid_pattern`, `too_many` or
    /// `unavailable`.
    pub(crate) code: &'static str,
    /// What and why.
    pub(crate) message: String,
}

impl SubError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// `n` subscriptions are more than `max`.
    pub(crate) fn too_many(n: usize, max: usize) -> Self {
        Self::new("too_many", format!("subscriptions: {n} would exceed limits.max_subscriptions = {max}"))
    }

    /// The HTTP status for a stream that cannot open.
    pub(crate) fn status(&self) -> axum::http::StatusCode {
        match self.code {
            "forbidden" => axum::http::StatusCode::FORBIDDEN,
            "unavailable" => axum::http::StatusCode::SERVICE_UNAVAILABLE,
            _ => axum::http::StatusCode::BAD_REQUEST,
        }
    }
}

/// Why a stream was closed by the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client did not keep up with its items.
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
            CloseReason::SlowClient => "the client did not read its items fast enough; reconnect with the last resume token",
            CloseReason::TokenExpired => "the token expired; reconnect with a fresh token and the last resume token",
            CloseReason::Shutdown => "the gateway is shutting down; reconnect (to another node) with the last resume token",
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
        kind: &'static str,
        /// The JSON text.
        json: String,
        /// The resume token after this item.
        token: Option<String>,
    },
    /// The stream ends.
    Close(CloseReason),
}

/// What subscription tasks hand to the connection.
enum Msg {
    /// `advance` moves the channel's position in the resume token.
    Item { kind: &'static str, body: Value, advance: Option<(u32, i32, i64)> },
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

/// Check a channel name against the namer and the token.
pub(crate) fn want_channel(state: &AppState, auth: &Verified, channel: &str) -> Result<Want, SubError> {
    if channel.len() > dualstream_consumer::MAX_TARGET_LEN {
        return Err(SubError::new(
            "invalid_channel",
            format!("channel: {} bytes is longer than the limit of {}", channel.len(), dualstream_consumer::MAX_TARGET_LEN),
        ));
    }
    let parsed =
        state.namer.parse(channel).map_err(|e| SubError::new("invalid_channel", format!("channel: {e}")))?;
    if !auth.may_read_channel(channel) {
        return Err(SubError::new("forbidden", format!("the token's read claims do not cover channel {channel:?}")));
    }
    match parsed.source_id {
        Some(id) => {
            let source = Source::with_limits(parsed.source_type, id, &dualstream_core::Limits::lenient())
                .map_err(|e| SubError::new("invalid_channel", format!("channel: {e}")))?;
            Ok(Want::Channel { channel: channel.to_owned(), source })
        }
        None => Ok(Want::Live { target: Target::Channel(channel.to_owned()), name: channel.to_owned() }),
    }
}

/// Check a pattern: only `<prefix>:*` and `<prefix>:<source type>:*` are
/// accepted, and a prefix claim must cover it.
pub(crate) fn want_pattern(state: &AppState, auth: &Verified, pattern: &str) -> Result<Want, SubError> {
    let bad = || {
        SubError::new(
            "invalid_pattern",
            format!(
                "pattern {:?}: only {} and {}:<source type>:* are accepted",
                pattern.chars().take(200).collect::<String>(),
                state.namer.pattern_all(),
                state.namer.prefix()
            ),
        )
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
        return Err(SubError::new(
            "invalid_pattern",
            "this gateway reads a Redis Cluster (sharded Pub/Sub has no patterns): subscribe to channels",
        ));
    }
    if !auth.may_read_pattern(literal) {
        return Err(SubError::new("forbidden", format!("the token's read claims do not cover pattern {pattern:?}")));
    }
    Ok(Want::Live { target: Target::Pattern(pattern.to_owned()), name: pattern.to_owned() })
}

/// A subscription's task, aborted when this is dropped (dropping a tokio
/// `JoinHandle` would only detach it, leaving its join and hub subscriber
/// running).
#[derive(Debug)]
struct Task(AbortHandle);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> Task {
    Task(tokio::spawn(task).abort_handle())
}

/// One connection's subscriptions and resume state. Every task it starts is
/// aborted when its subscription ends or the session is dropped.
pub(crate) struct Session {
    state: Arc<AppState>,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    close_tx: Arc<watch::Sender<Option<CloseReason>>>,
    close_rx: watch::Receiver<Option<CloseReason>>,
    shutdown: watch::Receiver<bool>,
    subs: HashMap<String, Task>,
    /// Channel hash → (partition, next offset), for the resume token.
    positions: BTreeMap<u32, (i32, i64)>,
    /// Channel hash → channel, for the subscriptions that have one.
    channels: HashMap<u32, String>,
    expires: u64,
    closed: bool,
    _guard: crate::state::ClientGuard,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("subs", &self.subs.len()).field("positions", &self.positions).finish()
    }
}

impl Session {
    /// A session for a client holding `auth`.
    pub(crate) fn new(state: Arc<AppState>, auth: &Verified, guard: crate::state::ClientGuard) -> Self {
        let (tx, rx) = mpsc::channel(state.config.limits.client_buffer);
        let (close_tx, close_rx) = watch::channel(None);
        let shutdown = state.shutdown.subscribe();
        Self {
            tx,
            rx,
            close_tx: Arc::new(close_tx),
            close_rx,
            shutdown,
            subs: HashMap::new(),
            positions: BTreeMap::new(),
            channels: HashMap::new(),
            expires: auth.stream_expiry(),
            closed: false,
            state,
            _guard: guard,
        }
    }

    /// The resume token now.
    pub(crate) fn token(&self) -> String {
        ResumeToken { log: self.state.log_hash, positions: self.positions.clone() }.encode()
    }

    /// Start subscriptions. Channels present in `resume` continue from
    /// their position there; others start at the end of the log now. A
    /// resume token of another log resumes nothing: its channels get a
    /// `reset`. Already-active names are left as they are, and a name given
    /// twice counts once. All or nothing: when one fails, those started by
    /// this call are stopped again.
    pub(crate) async fn subscribe(&mut self, wants: Vec<Want>, mode: Mode, resume: Option<&ResumeToken>) -> Result<(), SubError> {
        let mut seen = HashSet::new();
        let new: Vec<Want> =
            wants.into_iter().filter(|w| !self.subs.contains_key(w.name()) && seen.insert(w.name().to_owned())).collect();
        if let (Mode::Full, Some(live)) = (mode, new.iter().find(|w| matches!(w, Want::Live { .. }))) {
            return Err(SubError::new(
                "invalid_pattern",
                format!("{}: patterns and aggregate channels deliver notifications only (mode=notify)", live.name()),
            ));
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
        if self.subs.len() + new.len() > self.state.config.limits.max_subscriptions {
            return Err(SubError::too_many(self.subs.len() + new.len(), self.state.config.limits.max_subscriptions));
        }
        let foreign = resume.filter(|r| r.log != self.state.log_hash);
        let resume = resume.filter(|r| r.log == self.state.log_hash);
        for want in new {
            let name = want.name().to_owned();
            let task = match want {
                Want::Channel { channel, source } => {
                    let h = hash(&channel);
                    let from = resume.and_then(|r| r.positions.get(&h)).copied();
                    let now = self
                        .state
                        .catchup
                        .position_now(&source)
                        .await
                        .map_err(|e| SubError::new("unavailable", format!("Kafka: {e}")))?;
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
                    if let Some(reason) = reset {
                        let body = json!({"kind": "reset", "channels": [&channel], "reason": reason});
                        self.push(Msg::Item { kind: "reset", body, advance: None });
                    }
                    let fwd = ChannelTask {
                        state: Arc::clone(&self.state),
                        channel: channel.into(),
                        hash: h,
                        source,
                        partition: now.partition,
                        next: start,
                        mode,
                        tx: self.tx.clone(),
                        close: Arc::clone(&self.close_tx),
                    };
                    spawn(fwd.run())
                }
                Want::Live { target, name } => {
                    if resume.is_some() || foreign.is_some() {
                        let body = json!({"kind": "reset", "channels": [&name],
                            "reason": "patterns and aggregate channels are live only: what was published while disconnected is not replayed"});
                        self.push(Msg::Item { kind: "reset", body, advance: None });
                    }
                    let live = self
                        .state
                        .hub
                        .subscribe(target)
                        .await
                        .map_err(|e| SubError::new("unavailable", format!("Redis: {e}")))?;
                    let fwd = LiveTask {
                        state: Arc::clone(&self.state),
                        name: name.clone().into(),
                        tx: self.tx.clone(),
                        close: Arc::clone(&self.close_tx),
                    };
                    spawn(fwd.run(live))
                }
            };
            added.push(name.clone());
            self.subs.insert(name, task);
        }
        Ok(())
    }

    /// Stop subscriptions by name; unknown names are ignored.
    pub(crate) fn unsubscribe(&mut self, names: &[String]) {
        for n in names {
            if self.subs.remove(n).is_some() {
                let h = hash(n);
                self.positions.remove(&h);
                self.channels.remove(&h);
            }
        }
    }

    fn push(&self, msg: Msg) {
        if self.tx.try_send(msg).is_err() {
            let _ = self.close_tx.send(Some(CloseReason::SlowClient));
        }
    }

    /// The next item for the client; after [`Out::Close`] always `None`.
    pub(crate) async fn next(&mut self) -> Option<Out> {
        if self.closed {
            return None;
        }
        let expires_in = Duration::from_secs(self.expires.saturating_sub(now_secs()));
        let (close_rx, shutdown, rx) = (&mut self.close_rx, &mut self.shutdown, &mut self.rx);
        let step = tokio::select! {
            biased;
            r = close_rx.wait_for(|r| r.is_some()) => Err(r.ok().and_then(|r| *r).unwrap_or(CloseReason::SlowClient)),
            _ = shutdown.wait_for(|s| *s) => Err(CloseReason::Shutdown),
            _ = tokio::time::sleep(expires_in) => Err(CloseReason::TokenExpired),
            msg = rx.recv() => Ok(msg),
        };
        let reason = match step {
            Ok(Some(Msg::Item { kind, body, advance })) => {
                if let Some((h, p, next)) = advance {
                    if let Some(pos) = self.positions.get_mut(&h) {
                        *pos = (p, next.max(pos.1));
                    }
                }
                let token = (kind != "error").then(|| self.token());
                return Some(Out::Item { kind, json: body.to_string(), token });
            }
            Ok(None) => return None,
            Err(reason) => reason,
        };
        self.closed = true;
        Some(Out::Close(reason))
    }

    /// The `subscribed` item: the active names and the token now.
    pub(crate) fn subscribed(&self) -> Out {
        let mut names: Vec<&String> = self.subs.keys().collect();
        names.sort();
        Out::Item {
            kind: "subscribed",
            json: json!({"kind": "subscribed", "subscriptions": names}).to_string(),
            token: Some(self.token()),
        }
    }
}

/// Hand one item to the connection, waiting up to `wait` for room; `false`
/// when the client stayed too slow for that long (the connection is then
/// closed with `slow_client`) or is gone. Only this subscription's task
/// waits: the hub and the shared Kafka reader never wait for a client.
async fn hand(tx: &mpsc::Sender<Msg>, close: &watch::Sender<Option<CloseReason>>, msg: Msg, wait: Duration) -> bool {
    let msg = match tx.try_send(msg) {
        Ok(()) => return true,
        Err(mpsc::error::TrySendError::Closed(_)) => return false,
        Err(mpsc::error::TrySendError::Full(msg)) => msg,
    };
    match tx.send_timeout(msg, wait).await {
        Ok(()) => true,
        Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            tracing::debug!(?wait, "a client's buffer stayed full: closing it as too slow");
            close.send_if_modified(|r| {
                let set = r.is_none();
                if set {
                    *r = Some(CloseReason::SlowClient);
                }
                set
            });
            false
        }
    }
}

fn position_json(p: &Position) -> Value {
    json!({"topic": &*p.topic, "partition": p.partition, "offset": p.offset})
}

fn notification_json(channel: &str, n: &Notification) -> Value {
    json!({
        "kind": "event",
        "channel": channel,
        "id": n.id.to_string(),
        "type": &*n.event_type,
        "source_type": &*n.source_type,
        "source_id": &*n.source_id,
        "position": n.position.as_ref().map(position_json),
    })
}

fn event_json(channel: &str, e: &Event, position: &Position, full: bool) -> Value {
    let mut v = json!({
        "kind": "event",
        "channel": channel,
        "id": e.id().to_string(),
        "type": e.event_type(),
        "source_type": e.source().source_type(),
        "source_id": e.source().source_id(),
        "position": position_json(position),
    });
    if full {
        v["occurred_at_ms"] = json!(e.occurred_at_ms());
        match serde_json::from_slice::<Value>(e.payload()) {
            Ok(p) if !e.payload().is_empty() => v["payload"] = p,
            _ => {
                use base64::Engine as _;
                v["payload_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(e.payload()));
            }
        }
        if !e.headers().is_empty() {
            v["headers"] = json!(e.headers());
        }
    }
    v
}

struct ChannelTask {
    state: Arc<AppState>,
    channel: Arc<str>,
    hash: u32,
    source: Source,
    partition: i32,
    next: i64,
    mode: Mode,
    tx: mpsc::Sender<Msg>,
    close: Arc<watch::Sender<Option<CloseReason>>>,
}

impl ChannelTask {
    /// Join from `next`; when the join fails, join again from where it got
    /// to, after a backoff, so a Kafka outage delays items but loses none.
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let start = StartAt::Offset(self.next);
            let joined = match self.mode {
                Mode::Full => self.state.catchup.join_events(self.source.clone(), start).await,
                Mode::Notify => self.state.catchup.join(self.source.clone(), start).await,
            };
            match joined {
                Ok(mut stream) => {
                    while let Some(item) = stream.next().await {
                        backoff = Duration::from_millis(100);
                        let msg = match item {
                            Ok(Delivery::History(r)) => {
                                self.next = r.position.offset + 1;
                                let body = event_json(&self.channel, &r.event, &r.position, self.mode == Mode::Full);
                                Msg::Item { kind: "event", body, advance: Some((self.hash, r.position.partition, self.next)) }
                            }
                            Ok(Delivery::Live(n)) => {
                                let Some(p) = n.position.as_ref() else { continue };
                                self.next = p.offset + 1;
                                let advance = Some((self.hash, p.partition, self.next));
                                Msg::Item { kind: "event", body: notification_json(&self.channel, &n), advance }
                            }
                            Ok(Delivery::Truncated { requested, first_available }) => {
                                self.next = first_available;
                                let body = json!({"kind": "reset", "channels": [&*self.channel],
                                    "reason": "history is gone (retention or deletion): the events in between are lost to this client",
                                    "requested": requested, "first_available": first_available});
                                Msg::Item { kind: "reset", body, advance: Some((self.hash, self.partition, first_available)) }
                            }
                            Ok(_) => continue,
                            Err(e @ (JoinError::Replay(ReplayError::Decode { .. })
                            | JoinError::Unmergeable { .. }
                            | JoinError::Malformed { .. })) => {
                                let body = json!({"kind": "error", "channel": &*self.channel, "code": "undeliverable",
                                    "message": e.to_string()});
                                Msg::Item { kind: "error", body, advance: None }
                            }
                            Err(e) => {
                                tracing::warn!(channel = %short(&self.channel), error = %e, "join ended; joining again");
                                break;
                            }
                        };
                        if !hand(&self.tx, &self.close, msg, self.state.send_timeout()).await {
                            return;
                        }
                    }
                }
                Err(e) if permanent(&e) => {
                    let body = json!({"kind": "error", "channel": &*self.channel, "code": "subscription_failed",
                        "message": e.to_string()});
                    hand(&self.tx, &self.close, Msg::Item { kind: "error", body, advance: None }, self.state.send_timeout())
                        .await;
                    return;
                }
                Err(e) => tracing::warn!(channel = %short(&self.channel), error = %e, "join failed; retrying"),
            }
            if self.tx.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// A join error that joining again cannot cure.
fn permanent(e: &JoinError) -> bool {
    matches!(e, JoinError::Replay(ReplayError::Request { .. } | ReplayError::Config(_)) | JoinError::Hub(HubError::InvalidTarget { .. } | HubError::Channel(_) | HubError::Config(_)))
}

/// At most 200 characters of a name, for logs.
fn short(name: &str) -> String {
    name.chars().take(200).collect()
}

struct LiveTask {
    state: Arc<AppState>,
    name: Arc<str>,
    tx: mpsc::Sender<Msg>,
    close: Arc<watch::Sender<Option<CloseReason>>>,
}

impl LiveTask {
    async fn run(self, mut live: dualstream_consumer::LiveStream) {
        while let Some(item) = live.next().await {
            let msg = match item {
                LiveItem::Notification(n) => {
                    let mut channel = String::new();
                    self.state.namer.write_channel(&n.source_type, &n.source_id, &mut channel);
                    let mut body = notification_json(&channel, &n);
                    body["subscription"] = json!(&*self.name);
                    Msg::Item { kind: "event", body, advance: None }
                }
                LiveItem::Gap | LiveItem::Lagged { .. } | LiveItem::Dropped { .. } => {
                    let reason = match item {
                        LiveItem::Gap => "Redis reconnected: notifications published meanwhile were missed",
                        _ => "this connection fell behind the live notifications: some were missed",
                    };
                    let body = json!({"kind": "reset", "channels": [&*self.name], "reason": reason});
                    Msg::Item { kind: "reset", body, advance: None }
                }
                LiveItem::Malformed { channel, reason } => {
                    let body = json!({"kind": "error", "channel": &*channel, "code": "undeliverable", "message": &*reason});
                    Msg::Item { kind: "error", body, advance: None }
                }
                _ => continue,
            };
            if !hand(&self.tx, &self.close, msg, self.state.send_timeout()).await {
                return;
            }
        }
    }
}
