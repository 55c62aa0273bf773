//! The hub on a Redis Cluster ([`HubConfig::cluster_urls`]): sharded Pub/Sub.
//!
//! The same [`Hub`](crate::Hub) API and items as on one Redis, served by
//! another task: one connection per master (a plain RESP2 connection, in a
//! task of its own), `SSUBSCRIBE` sent to the master that serves each
//! channel's slot, one command per slot (Redis refuses one across slots).
//! The task owns resubscription:
//!
//! - a master's connection lost: its channels' subscribers are told
//!   `Disconnected`; once it is back every channel is subscribed again (per
//!   slot) and each subscriber is told `Gap` when its channel is confirmed;
//! - a channel refused (`MOVED`) or unsubscribed by the server (a
//!   `sunsubscribe` push: its slot migrated to another master): its
//!   subscribers are told `Disconnected`, the slot map is read again
//!   (`CLUSTER SLOTS`) and the channel subscribed on the slot's owner, then
//!   `Gap`.
//!
//! redis-rs parses the replies (`parse_redis_value_async`), packs the
//! commands (`redis::cmd`) and computes a channel's slot (`Slot::for_key`,
//! as the notifier's cluster connection routes). The connections, their
//! timeouts and reconnection are the hub's own: redis-rs's cluster
//! connection (`ssubscribe`, RESP3 only) resubscribes by itself, with one
//! `SSUBSCRIBE` across slots, which Redis refuses (docs/operations.md,
//! "Redis Cluster"), and its `aio::PubSub` has no `SSUBSCRIBE`.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use deadpool_redis::redis::{self, IntoConnectionInfo, RedisResult, Value};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backoff::reconnect_delay;
use crate::config::{HubConfig, Overflow};
use crate::live::{announce_to, decode, deliver, fan_out, Cmd, HubStats, LiveItem, Slot, Target};

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;

/// The hash slot of a key or channel, as Redis computes it (CRC16 of its
/// hash tag, the part between the first `{` and the next `}` if not empty,
/// or of the whole name, modulo 16,384): redis-rs's `Slot::for_key`, by
/// which the notifier's cluster connection routes each `SPUBLISH`, so the
/// hub subscribes where the notifier publishes. redis-rs keeps a slot's
/// number to itself, and the hub compares it with the ranges of `CLUSTER
/// SLOTS`: it is looked up in a table of every slot, made once.
pub(crate) fn slot_of(name: &[u8]) -> u16 {
    use redis::cluster_routing::Slot as KeySlot;
    static NUMBERS: OnceLock<HashMap<KeySlot, u16>> = OnceLock::new();
    let numbers = NUMBERS.get_or_init(|| (0..SLOTS).filter_map(|n| KeySlot::new(n).map(|slot| (slot, n))).collect());
    numbers.get(&KeySlot::for_key(name)).copied().expect("a key's slot is one of 0..16,384")
}

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// The values a connection's read half brings, parsed by redis-rs's RESP
/// parser (`parse_redis_value_async`, whose state keeps what was read past
/// a value); the stream ends after its first error (the connection closed
/// or broken).
type Values = BoxStream<'static, RedisResult<Value>>;

fn values(read: impl AsyncRead + Unpin + Send + 'static) -> Values {
    futures::stream::unfold(Some((read, Default::default())), |state| async move {
        let (mut read, mut parser) = state?;
        match redis::parse_redis_value_async(&mut parser, &mut read).await {
            Ok(value) => Some((Ok(value), Some((read, parser)))),
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

/// The next value of a connection, or why there is none.
async fn next_value(values: &mut Values) -> std::io::Result<Value> {
    match values.next().await {
        Some(Ok(value)) => Ok(value),
        Some(Err(e)) => Err(bad(e.to_string())),
        None => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
}

/// A server's error as it sent it (`MOVED 3999 127.0.0.1:6381`): redis-rs
/// splits it into a code and the rest.
fn error_text(e: &redis::ServerError) -> String {
    match e.details() {
        Some(details) => format!("{} {details}", e.code()),
        None => e.code().to_owned(),
    }
}

/// A bulk or simple string's bytes.
fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Credentials from the first cluster URL, sent with `AUTH` on every
/// connection.
#[derive(Clone, Debug, Default)]
struct Auth {
    username: Option<String>,
    password: Option<String>,
}

/// A connection to `node` (`host:port`), authenticated, within `timeout`.
async fn connect(node: &str, auth: &Auth, timeout: Duration) -> std::io::Result<(Values, OwnedWriteHalf)> {
    let made = async {
        let (read, mut write) = TcpStream::connect(node).await?.into_split();
        let mut read = values(read);
        if let Some(password) = &auth.password {
            let mut command = redis::cmd("AUTH");
            if let Some(username) = &auth.username {
                command.arg(username);
            }
            command.arg(password);
            write.write_all(&command.get_packed_command()).await?;
            if let Value::ServerError(e) = next_value(&mut read).await? {
                return Err(bad(format!("AUTH: {}", error_text(&e))));
            }
        }
        Ok((read, write))
    };
    tokio::time::timeout(timeout, made).await.map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// Slot ranges and the `host:port` of the master serving each.
type SlotMap = Vec<(u16, u16, String)>;

/// `CLUSTER SLOTS` from `node`.
async fn fetch_slots(node: &str, auth: &Auth, timeout: Duration) -> Result<SlotMap, String> {
    let ask = async {
        let (mut read, mut write) = connect(node, auth, timeout).await.map_err(|e| e.to_string())?;
        write.write_all(&redis::cmd("CLUSTER").arg("SLOTS").get_packed_command()).await.map_err(|e| e.to_string())?;
        next_value(&mut read).await.map_err(|e| e.to_string())
    };
    let reply =
        tokio::time::timeout(timeout, ask).await.map_err(|_| format!("{node}: no answer within {timeout:?}"))??;
    let Value::Array(ranges) = reply else { return Err(format!("{node}: CLUSTER SLOTS answered {reply:?}")) };
    let mut map = Vec::new();
    for range in ranges {
        let Value::Array(fields) = range else { continue };
        if let [Value::Int(lo), Value::Int(hi), Value::Array(master), ..] = fields.as_slice() {
            if let [host, Value::Int(port), ..] = master.as_slice() {
                let host = String::from_utf8_lossy(bytes(host).unwrap_or_default()).into_owned();
                // An empty host means "the address you reached me at".
                let host = match node.rsplit_once(':') {
                    Some((reached, _)) if host.is_empty() => reached.to_owned(),
                    _ => host,
                };
                if let (Ok(lo), Ok(hi)) = (u16::try_from(*lo), u16::try_from(*hi)) {
                    map.push((lo, hi, format!("{host}:{port}")));
                }
            }
        }
    }
    if map.is_empty() {
        return Err(format!("{node}: CLUSTER SLOTS lists no slot"));
    }
    Ok(map)
}

/// What the shard task asks of a master's connection.
#[derive(Debug)]
enum NodeCmd {
    /// `SSUBSCRIBE`; the channels share one slot.
    Subscribe(Vec<String>),
    /// `SUNSUBSCRIBE`; the channels share one slot.
    Unsubscribe(Vec<String>),
}

/// What a master's connection tells the shard task. `conn` numbers the
/// node's connections, so that news of an older one is recognised.
#[derive(Debug)]
enum NodeEvent {
    Up {
        node: String,
        conn: u64,
    },
    /// The connection was lost, or (`conn` 0) could not be made.
    Down {
        node: String,
        conn: u64,
    },
    Confirmed {
        node: String,
        conn: u64,
        channel: String,
    },
    Refused {
        node: String,
        conn: u64,
        channels: Vec<String>,
        error: String,
    },
    /// A `sunsubscribe` the hub did not ask for: the slot moved.
    Dropped {
        node: String,
        conn: u64,
        channel: String,
    },
    Message {
        channel: String,
        payload: Vec<u8>,
    },
    Slots(Result<SlotMap, String>),
}

/// Timing of a master's connection.
#[derive(Clone, Copy, Debug)]
struct Timing {
    timeout: Duration,
    ping_interval: Duration,
    reconnect_min_ms: u64,
    reconnect_max_ms: u64,
}

/// A command awaiting its answers on a master's connection.
#[derive(Debug)]
enum Waiting {
    Subscribe(Vec<String>, Instant),
    Unsubscribe(Vec<String>, Instant),
    Ping(Instant),
}

impl Waiting {
    fn sent(&self) -> Instant {
        match self {
            Waiting::Subscribe(_, at) | Waiting::Unsubscribe(_, at) | Waiting::Ping(at) => *at,
        }
    }
}

/// One master's connection: connects (and reconnects, with the hub's
/// backoff), sends the shard task's commands in order and reports answers,
/// messages and losses. Ends when the shard task drops its sender.
async fn node_task(
    node: String,
    auth: Auth,
    timing: Timing,
    mut cmds: mpsc::UnboundedReceiver<NodeCmd>,
    events: mpsc::Sender<NodeEvent>,
) {
    let mut attempt = 0u32;
    let mut conn = 0u64;
    loop {
        match connect(&node, &auth, timing.timeout).await {
            Ok((read, write)) => {
                // Commands queued while down are dropped: the shard task
                // subscribes everything again on `Up`.
                while cmds.try_recv().is_ok() {}
                conn += 1;
                if events.send(NodeEvent::Up { node: node.clone(), conn }).await.is_err() {
                    return;
                }
                let stopped = serve_node(&node, conn, read, write, timing, &mut cmds, &events).await;
                if stopped || events.send(NodeEvent::Down { node: node.clone(), conn }).await.is_err() {
                    return;
                }
                attempt = 0;
            }
            Err(e) => {
                tracing::debug!(%node, error = %e, "hub: cluster node unreachable");
                if events.send(NodeEvent::Down { node: node.clone(), conn: 0 }).await.is_err() {
                    return;
                }
            }
        }
        let sleep = tokio::time::sleep(reconnect_delay(timing.reconnect_min_ms, timing.reconnect_max_ms, attempt));
        attempt = attempt.saturating_add(1);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                cmd = cmds.recv() => if cmd.is_none() { return },
            }
        }
    }
}

/// Serve one connection until it is lost (`false`) or the shard task is
/// gone (`true`). Values are read in a task of their own, which hands at
/// most 1,024 on (past that the socket is not read); a command or ping
/// unanswered for `timeout` while nothing else arrived either gives the
/// connection up.
async fn serve_node(
    node: &str,
    conn: u64,
    mut read: Values,
    mut write: OwnedWriteHalf,
    timing: Timing,
    cmds: &mut mpsc::UnboundedReceiver<NodeCmd>,
    events: &mpsc::Sender<NodeEvent>,
) -> bool {
    let (values_tx, mut values) = mpsc::channel::<Value>(1_024);
    let reader = tokio::spawn(async move {
        while let Some(Ok(v)) = read.next().await {
            if values_tx.send(v).await.is_err() {
                return;
            }
        }
    });
    let _abort = AbortOnDrop(reader);
    let mut waiting: std::collections::VecDeque<Waiting> = std::collections::VecDeque::new();
    let mut heard = Instant::now();
    let mut last_ping = Instant::now();
    let mut tick = tokio::time::interval(timing.timeout.min(timing.ping_interval) / 4);
    let node_s = node.to_owned();
    let mut out = Vec::new();
    loop {
        tokio::select! {
            v = values.recv() => {
                let Some(v) = v else { return false };
                heard = Instant::now();
                let fine = on_value(&node_s, conn, v, &mut waiting, &mut out);
                // Waits while the shard task is behind: the backlog stays
                // in this connection's socket and in Redis's output buffer,
                // not in the process (see `EVENTS_BUFFER`).
                for e in out.drain(..) {
                    if events.send(e).await.is_err() {
                        return true;
                    }
                }
                if !fine {
                    return false;
                }
            }
            cmd = cmds.recv() => {
                let now = Instant::now();
                let (bytes, w) = match cmd {
                    None => return true,
                    Some(NodeCmd::Subscribe(c)) => (sub_command("SSUBSCRIBE", &c), Waiting::Subscribe(c, now)),
                    Some(NodeCmd::Unsubscribe(c)) => (sub_command("SUNSUBSCRIBE", &c), Waiting::Unsubscribe(c, now)),
                };
                if !write_bounded(&mut write, &bytes, timing.timeout).await {
                    return false;
                }
                waiting.push_back(w);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if waiting.front().is_some_and(|w| w.sent().max(heard) + timing.timeout <= now) {
                    tracing::debug!(node = %node_s, "hub: cluster node silent; reconnecting");
                    return false;
                }
                let pinging = waiting.iter().any(|w| matches!(w, Waiting::Ping(_)));
                if !pinging && last_ping + timing.ping_interval <= now {
                    if !write_bounded(&mut write, &redis::cmd("PING").get_packed_command(), timing.timeout).await {
                        return false;
                    }
                    last_ping = now;
                    waiting.push_back(Waiting::Ping(now));
                }
            }
        }
    }
}

/// Write `bytes` within `timeout`; whether it worked.
async fn write_bounded(write: &mut OwnedWriteHalf, bytes: &[u8], timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, write.write_all(bytes)).await, Ok(Ok(())))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `SSUBSCRIBE` or `SUNSUBSCRIBE` of `channels`, packed by redis-rs.
fn sub_command(verb: &'static str, channels: &[String]) -> Vec<u8> {
    redis::cmd(verb).arg(channels).get_packed_command()
}

/// Handle one value from a master: the events for the shard task go to
/// `out`. Returns whether the connection is fine.
fn on_value(
    node: &str,
    conn: u64,
    v: Value,
    waiting: &mut std::collections::VecDeque<Waiting>,
    out: &mut Vec<NodeEvent>,
) -> bool {
    let mut send = |e: NodeEvent| {
        out.push(e);
        true
    };
    let name_of = node;
    let node = || name_of.to_owned();
    match v {
        Value::Array(items) => {
            let kind = items.first().and_then(bytes).map(<[u8]>::to_ascii_lowercase).unwrap_or_default();
            let name = items.get(1).and_then(bytes).map(|b| String::from_utf8_lossy(b).into_owned());
            match (kind.as_slice(), name) {
                (b"smessage", Some(channel)) => {
                    let payload = match items.get(2) {
                        Some(Value::BulkString(p)) => p.clone(),
                        _ => Vec::new(),
                    };
                    send(NodeEvent::Message { channel, payload })
                }
                (b"ssubscribe", Some(channel)) => {
                    if let Some(Waiting::Subscribe(chs, _)) = waiting.front_mut() {
                        chs.retain(|c| *c != channel);
                        if chs.is_empty() {
                            waiting.pop_front();
                        }
                    }
                    send(NodeEvent::Confirmed { node: node(), conn, channel })
                }
                (b"sunsubscribe", Some(channel)) => {
                    if let Some(Waiting::Unsubscribe(chs, _)) = waiting.front_mut() {
                        if chs.contains(&channel) {
                            chs.retain(|c| *c != channel);
                            if chs.is_empty() {
                                waiting.pop_front();
                            }
                            return true;
                        }
                    }
                    send(NodeEvent::Dropped { node: node(), conn, channel })
                }
                (b"pong", _) => {
                    if matches!(waiting.front(), Some(Waiting::Ping(_))) {
                        waiting.pop_front();
                    }
                    true
                }
                _ => true,
            }
        }
        Value::SimpleString(_) | Value::Okay => {
            // PONG on a connection with no subscription.
            if matches!(waiting.front(), Some(Waiting::Ping(_))) {
                waiting.pop_front();
            }
            true
        }
        Value::ServerError(e) => match (waiting.pop_front(), error_text(&e)) {
            (Some(Waiting::Subscribe(channels, _)), error) => {
                send(NodeEvent::Refused { node: node(), conn, channels, error })
            }
            (Some(Waiting::Unsubscribe(..)), _) => true,
            (Some(Waiting::Ping(_)) | None, error) => {
                tracing::debug!(node = %name_of, %error, "hub: cluster node answered an error");
                false
            }
        },
        _ => true,
    }
}

/// Events (messages above all) the masters' connections may have waiting for
/// the shard task. When it is behind, a connection waits to hand over its
/// next message and stops reading its socket, so the backlog waits in Redis
/// (up to `client-output-buffer-limit pubsub`, past which Redis closes the
/// connection and the subscribers get `Disconnected`, then `Gap`), as with
/// the single-node hub; a subscriber that does not read gets `Lagged` from
/// the fan-out. (This channel used to be unbounded.)
pub(crate) const EVENTS_BUFFER: usize = 1_024;

/// One channel of the shard task.
struct Channel {
    slot: u16,
    /// The master it is subscribed on (or being subscribed on), if placed.
    node: Option<String>,
    confirmed: bool,
    /// Callers of `Hub::subscribe` waiting for the confirmation.
    replies: Vec<oneshot::Sender<()>>,
    subscribers: HashMap<u64, Slot>,
}

impl Channel {
    fn answer(&mut self) {
        for r in self.replies.drain(..) {
            let _ = r.send(());
        }
    }
}

/// One master's connection, as the shard task sees it.
struct Node {
    tx: mpsc::UnboundedSender<NodeCmd>,
    /// The live connection's number, if up.
    conn: Option<u64>,
    /// Whether its first connection attempt has ended (up or not).
    tried: bool,
}

/// The hub's task on a Redis Cluster.
pub(crate) struct ShardTask {
    config: HubConfig,
    auth: Auth,
    timing: Timing,
    rx: mpsc::UnboundedReceiver<Cmd>,
    events_tx: mpsc::Sender<NodeEvent>,
    events: mpsc::Receiver<NodeEvent>,
    channels: HashMap<String, Channel>,
    nodes: HashMap<String, Node>,
    /// The slot map, once read.
    slots: Option<SlotMap>,
    /// `SSUBSCRIBE`s sent on a master's live connection and not answered
    /// yet, by master and channel: a channel counts as subscribed when the
    /// last is confirmed (not when an earlier one, sent before an
    /// unsubscription of it, is).
    outstanding: HashMap<(String, String), u32>,
    /// A slot map read is under way; `again`: read once more after it.
    reading: bool,
    again: bool,
    /// Failed slot map reads in a row: sets the backoff.
    read_failures: u32,
    stats: HubStats,
}

impl ShardTask {
    pub(crate) fn new(config: HubConfig, rx: mpsc::UnboundedReceiver<Cmd>) -> Self {
        let auth = config
            .cluster_urls
            .first()
            .and_then(|u| u.as_str().into_connection_info().ok())
            .map(|i| Auth {
                username: i.redis_settings().username().map(str::to_owned),
                password: i.redis_settings().password().map(str::to_owned),
            })
            .unwrap_or_default();
        let timing = Timing {
            timeout: Duration::from_millis(config.timeout_ms),
            ping_interval: Duration::from_millis(config.ping_interval_ms),
            reconnect_min_ms: config.reconnect_min_ms,
            reconnect_max_ms: config.reconnect_max_ms,
        };
        let (events_tx, events) = mpsc::channel(EVENTS_BUFFER);
        Self {
            config,
            auth,
            timing,
            rx,
            events_tx,
            events,
            channels: HashMap::new(),
            nodes: HashMap::new(),
            outstanding: HashMap::new(),
            slots: None,
            reading: false,
            again: false,
            read_failures: 0,
            stats: HubStats::default(),
        }
    }

    pub(crate) async fn run(mut self) {
        self.read_slots(Duration::ZERO);
        loop {
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(c) => self.handle(c),
                    None => return,
                },
                Some(ev) = self.events.recv() => self.on_event(ev),
            }
        }
    }

    /// Read the slot map after `delay`, from the masters known (live ones
    /// first) and then the configured URLs.
    fn read_slots(&mut self, delay: Duration) {
        if self.reading {
            self.again = true;
            return;
        }
        self.reading = true;
        let mut seeds: Vec<(bool, String)> = self.nodes.iter().map(|(a, n)| (n.conn.is_none(), a.clone())).collect();
        seeds.sort();
        let mut seeds: Vec<String> = seeds.into_iter().map(|(_, a)| a).collect();
        seeds.extend(self.config.cluster_urls.iter().filter_map(
            |u| match u.as_str().into_connection_info().ok()?.addr() {
                deadpool_redis::redis::ConnectionAddr::Tcp(host, port) => Some(format!("{host}:{port}")),
                _ => None,
            },
        ));
        let (auth, timeout, events) = (self.auth.clone(), self.timing.timeout, self.events_tx.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut last = Err("no node to ask".to_owned());
            for seed in seeds {
                last = fetch_slots(&seed, &auth, timeout).await;
                if last.is_ok() {
                    break;
                }
            }
            let _ = events.send(NodeEvent::Slots(last)).await;
        });
    }

    fn owner(&self, slot: u16) -> Option<String> {
        let map = self.slots.as_ref()?;
        map.iter().find(|(lo, hi, _)| (*lo..=*hi).contains(&slot)).map(|(_, _, n)| n.clone())
    }

    /// The connection to `node`, started if new.
    fn node(&mut self, node: &str) -> &mut Node {
        if !self.nodes.contains_key(node) {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(node_task(node.to_owned(), self.auth.clone(), self.timing, rx, self.events_tx.clone()));
            self.nodes.insert(node.to_owned(), Node { tx, conn: None, tried: false });
        }
        self.nodes.get_mut(node).expect("inserted above")
    }

    /// Subscribe `names` on their owner (they share a slot), if its
    /// connection is up; returns whether it is, or is still being made for
    /// the first time (its `Up` subscribes them).
    fn subscribe_on(&mut self, node: &str, names: Vec<String>) -> bool {
        let n = self.node(node);
        if !n.tried {
            return true;
        }
        if n.conn.is_none() || n.tx.send(NodeCmd::Subscribe(names.clone())).is_err() {
            return false;
        }
        for name in names {
            *self.outstanding.entry((node.to_owned(), name)).or_default() += 1;
        }
        true
    }

    /// One `SSUBSCRIBE` of `channel` on `node` answered; returns how many
    /// are still unanswered.
    fn answered(&mut self, node: &str, channel: &str) -> u32 {
        let key = (node.to_owned(), channel.to_owned());
        let Some(left) = self.outstanding.get_mut(&key) else { return 0 };
        *left = left.saturating_sub(1);
        let left = *left;
        if left == 0 {
            self.outstanding.remove(&key);
        }
        left
    }

    /// Whether a subscriber of `c` waits for its confirmation: the slot map
    /// is being read for the first time, or its master is up or being
    /// connected to for the first time.
    fn pending(&self, c: &Channel) -> bool {
        (self.slots.is_none() && self.reading)
            || c.node.as_ref().and_then(|n| self.nodes.get(n)).is_some_and(|n| n.conn.is_some() || !n.tried)
    }

    /// Tell `item` to a channel's subscribers (see `announce_to`).
    fn tell(&mut self, name: &str, item: &LiveItem, awaiting: bool) {
        if let Some(c) = self.channels.get_mut(name) {
            announce_to(&mut c.subscribers, item, awaiting, &mut self.stats);
        }
    }

    /// The channel is not subscribed anywhere now: its subscribers are told
    /// `Disconnected`, waiting callers answered.
    fn lose(&mut self, name: &str) {
        self.tell(name, &LiveItem::Disconnected, true);
        if let Some(c) = self.channels.get_mut(name) {
            c.confirmed = false;
            c.answer();
        }
    }

    /// Place a channel on its slot's owner and subscribe it there, or, with
    /// the owner unknown or down, tell its subscribers `Disconnected`.
    fn place(&mut self, name: &str) {
        let Some(slot) = self.channels.get(name).map(|c| c.slot) else { return };
        let owner = self.owner(slot);
        if let Some(c) = self.channels.get_mut(name) {
            c.node.clone_from(&owner);
            c.confirmed = false;
        }
        match owner {
            Some(node) if self.subscribe_on(&node, vec![name.to_owned()]) => {}
            // Before the first slot map the subscriber waits, as the
            // single-node hub's callers wait while it connects.
            None if self.slots.is_none() && self.reading => {}
            _ => self.lose(name),
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Subscribe { target, id, slot, reply } => {
                // Patterns are refused by `Hub::subscribe`.
                let Target::Channel(name) = target else { return };
                let new = !self.channels.contains_key(&name);
                let c = self.channels.entry(name.clone()).or_insert_with(|| Channel {
                    slot: slot_of(name.as_bytes()),
                    node: None,
                    confirmed: false,
                    replies: Vec::new(),
                    subscribers: HashMap::new(),
                });
                c.subscribers.insert(id, slot);
                c.replies.push(reply);
                if new {
                    self.place(&name);
                    return;
                }
                let pending = self.pending(&self.channels[&name]);
                let c = self.channels.get_mut(&name).expect("present");
                if c.confirmed {
                    c.answer();
                } else if !pending {
                    // Its master is down: this subscriber hears `Gap` with
                    // the others.
                    if let Some(s) = c.subscribers.get_mut(&id) {
                        deliver(s, LiveItem::Disconnected, Overflow::Signal, &mut self.stats);
                        s.awaiting_gap = true;
                    }
                    c.answer();
                }
            }
            Cmd::Unsubscribe { target, id } => {
                let Target::Channel(name) = target else { return };
                let Some(c) = self.channels.get_mut(&name) else { return };
                c.subscribers.remove(&id);
                if !c.subscribers.is_empty() {
                    return;
                }
                let c = self.channels.remove(&name).expect("present");
                if let Some(node) = c.node.and_then(|n| self.nodes.get(&n)) {
                    if node.conn.is_some() {
                        let _ = node.tx.send(NodeCmd::Unsubscribe(vec![name]));
                    }
                }
            }
            Cmd::Stats { reply } => {
                let mut s = self.stats;
                let up =
                    |c: &Channel| c.node.as_ref().and_then(|n| self.nodes.get(n)).is_some_and(|n| n.conn.is_some());
                s.connected = self.slots.is_some() && self.channels.values().all(up);
                s.channels = self.channels.len();
                s.patterns = 0;
                s.subscribers = self.channels.values().map(|c| c.subscribers.len()).sum();
                s.queued = crate::live::queued(self.channels.values().flat_map(|c| c.subscribers.values()));
                let _ = reply.send(s);
            }
            // `Hub::follow_partitions` does not send it on a cluster.
            Cmd::Follow { .. } => {}
        }
    }

    /// Whether news of `node`'s connection `conn` is about its live one.
    fn current(&self, node: &str, conn: u64) -> bool {
        self.nodes.get(node).is_some_and(|n| n.conn == Some(conn))
    }

    fn on_event(&mut self, ev: NodeEvent) {
        match ev {
            NodeEvent::Up { node, conn } => {
                let n = self.node(&node);
                n.conn = Some(conn);
                n.tried = true;
                self.outstanding.retain(|(n, _), _| *n != node);
                // Every channel of this master again, one command per slot.
                let mut by_slot: HashMap<u16, Vec<String>> = HashMap::new();
                for (name, c) in &mut self.channels {
                    if c.node.as_deref() == Some(node.as_str()) {
                        c.confirmed = false;
                        by_slot.entry(c.slot).or_default().push(name.clone());
                    }
                }
                for names in by_slot.into_values() {
                    self.subscribe_on(&node, names);
                }
            }
            NodeEvent::Down { node, conn } => {
                let Some(n) = self.nodes.get_mut(&node) else { return };
                n.tried = true;
                if conn != 0 && n.conn != Some(conn) {
                    return;
                }
                self.outstanding.retain(|(n, _), _| *n != node);
                if n.conn.take().is_some() {
                    self.stats.disconnects += 1;
                    tracing::warn!(%node, "hub lost a Redis Cluster node; reconnecting");
                }
                let on_node =
                    |(name, c): (&String, &Channel)| (c.node.as_deref() == Some(node.as_str())).then(|| name.clone());
                let names: Vec<String> = self.channels.iter().filter_map(on_node).collect();
                for name in &names {
                    self.lose(name);
                }
                // A replica may have taken its slots over.
                let delay = Duration::from_millis(self.config.reconnect_min_ms);
                self.read_slots(delay);
            }
            NodeEvent::Confirmed { node, conn, channel } => {
                if !self.current(&node, conn) || self.answered(&node, &channel) > 0 {
                    return;
                }
                if let Some(c) = self.channels.get_mut(&channel) {
                    if c.node.as_deref() == Some(node.as_str()) && !c.confirmed {
                        c.confirmed = true;
                        c.answer();
                        self.tell(&channel, &LiveItem::Gap, false);
                    }
                }
            }
            NodeEvent::Refused { node, conn, channels, error } => {
                if !self.current(&node, conn) {
                    return;
                }
                tracing::debug!(%node, %error, "hub: SSUBSCRIBE refused; reading the slot map again");
                for name in &channels {
                    self.answered(&node, name);
                    if self.channels.get(name).is_some_and(|c| c.node.as_deref() == Some(node.as_str())) {
                        self.lose(name);
                        if let Some(c) = self.channels.get_mut(name) {
                            c.node = None;
                        }
                    }
                }
                self.read_slots(Duration::from_millis(self.config.reconnect_min_ms));
            }
            NodeEvent::Dropped { node, conn, channel } => {
                if !self.current(&node, conn) {
                    return;
                }
                if self.channels.get(&channel).is_some_and(|c| c.node.as_deref() == Some(node.as_str())) {
                    tracing::debug!(%node, %channel, "hub: channel unsubscribed by the server (slot moved)");
                    self.lose(&channel);
                    if let Some(c) = self.channels.get_mut(&channel) {
                        c.node = None;
                    }
                    self.read_slots(Duration::ZERO);
                }
            }
            NodeEvent::Message { channel, payload } => {
                self.stats.received += 1;
                if let Some(c) = self.channels.get_mut(&channel) {
                    fan_out(&mut c.subscribers, self.config.overflow, &mut self.stats, || decode(&channel, &payload));
                }
            }
            NodeEvent::Slots(read) => self.on_slots(read),
        }
    }

    /// Masters that own no slot in the slot map and serve no channel left
    /// the cluster (or became replicas): their connections are closed
    /// (dropping the sender ends the node's task).
    fn forget_departed(&mut self) {
        let Some(map) = &self.slots else { return };
        let departed: Vec<String> = self
            .nodes
            .keys()
            .filter(|a| !map.iter().any(|(_, _, owner)| owner == *a))
            .filter(|a| !self.channels.values().any(|c| c.node.as_deref() == Some(a.as_str())))
            .cloned()
            .collect();
        for node in departed {
            tracing::debug!(%node, "hub: Redis Cluster node no longer a master; closing its connection");
            self.nodes.remove(&node);
            self.outstanding.retain(|(n, _), _| *n != node);
        }
    }

    fn on_slots(&mut self, read: Result<SlotMap, String>) {
        self.reading = false;
        match read {
            Ok(map) => {
                self.read_failures = 0;
                self.slots = Some(map);
                // Channels not placed, or whose slot's owner changed.
                let moved: Vec<String> = self
                    .channels
                    .iter()
                    .filter(|(_, c)| c.node.is_none() || c.node != self.owner(c.slot))
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in moved {
                    if self.channels.get(&name).is_some_and(|c| c.confirmed) {
                        // Subscribed on a master that no longer serves it.
                        self.lose(&name);
                    }
                    self.place(&name);
                }
                self.forget_departed();
                if std::mem::take(&mut self.again) {
                    self.read_slots(Duration::ZERO);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "hub: cannot read the Redis Cluster slot map; trying again");
                let unplaced: Vec<String> =
                    self.channels.iter().filter(|(_, c)| c.node.is_none()).map(|(n, _)| n.clone()).collect();
                for name in unplaced {
                    self.lose(&name);
                }
                let (min, max) = (self.config.reconnect_min_ms, self.config.reconnect_max_ms);
                let wait = reconnect_delay(min, max, self.read_failures);
                self.read_failures = self.read_failures.saturating_add(1);
                self.again = false;
                self.read_slots(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::LiveStream;

    #[test]
    fn slots_are_computed_as_redis_does() {
        // CRC16/XMODEM check value, and CLUSTER KEYSLOT answers.
        assert_eq!(slot_of(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot_of(b"foo"), 12_182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"), "an empty tag hashes the whole name");
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
    }

    /// A channel unsubscribed and subscribed again before Redis answered:
    /// the first SSUBSCRIBE's confirmation (sent before the SUNSUBSCRIBE)
    /// does not answer the new subscriber, the second one does.
    #[test]
    fn a_channel_counts_as_subscribed_at_its_last_ssubscribe_confirmed() {
        let (_cmds, rx) = mpsc::unbounded_channel();
        let config = HubConfig { cluster_urls: vec!["redis://n:1".into()], ..HubConfig::default() };
        let mut task = ShardTask::new(config, rx);
        let (node_tx, mut node_rx) = mpsc::unbounded_channel();
        task.nodes.insert("n:1".into(), Node { tx: node_tx, conn: Some(1), tried: true });
        task.slots = Some(vec![(0, SLOTS - 1, "n:1".into())]);
        let target = Target::Channel("c".into());
        let subscribe = |task: &mut ShardTask, id| {
            let (slot, rx) = LiveStream::for_test(8);
            let (reply, answered) = oneshot::channel();
            task.handle(Cmd::Subscribe { target: target.clone(), id, slot, reply });
            (answered, rx)
        };
        let _first = subscribe(&mut task, 0);
        task.handle(Cmd::Unsubscribe { target: Target::Channel("c".into()), id: 0 });
        let (mut second, _items) = subscribe(&mut task, 1);
        let sent: Vec<String> = std::iter::from_fn(|| node_rx.try_recv().ok()).map(|c| format!("{c:?}")).collect();
        assert_eq!(sent, [r#"Subscribe(["c"])"#, r#"Unsubscribe(["c"])"#, r#"Subscribe(["c"])"#]);
        let confirmed = || NodeEvent::Confirmed { node: "n:1".into(), conn: 1, channel: "c".into() };
        task.on_event(confirmed());
        assert!(second.try_recv().is_err(), "not answered by the first SSUBSCRIBE's confirmation");
        task.on_event(confirmed());
        assert!(second.try_recv().is_ok(), "answered by its own");
    }

    /// A master that left the slot map has its connection's task ended and
    /// is forgotten, once no channel is on it; the others stay (they used
    /// to be kept for ever, one task and connection attempt each).
    #[test]
    fn a_master_that_left_the_slot_map_is_forgotten() {
        let (_cmds, rx) = mpsc::unbounded_channel();
        let config = HubConfig { cluster_urls: vec!["redis://n:1".into()], ..HubConfig::default() };
        let mut task = ShardTask::new(config, rx);
        let mut node_rx = Vec::new();
        for node in ["n:1", "n:2"] {
            let (tx, rx) = mpsc::unbounded_channel();
            task.nodes.insert(node.into(), Node { tx, conn: Some(1), tried: true });
            node_rx.push(rx);
        }
        task.slots = Some(vec![(0, 8_000, "n:1".into()), (8_001, SLOTS - 1, "n:2".into())]);
        // "c" (slot 7,365) is on n:1.
        let (slot, _items) = LiveStream::for_test(8);
        let (reply, _answered) = oneshot::channel();
        let target = Target::Channel("c".into());
        task.handle(Cmd::Subscribe { target, id: 0, slot, reply });
        task.reading = true;
        task.on_slots(Ok(vec![(0, SLOTS - 1, "n:1".into())]));
        assert!(task.nodes.contains_key("n:1"));
        assert!(!task.nodes.contains_key("n:2"), "n:2 left the slot map");
        let n2 = &mut node_rx[1];
        assert!(matches!(n2.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)), "n:2's task is told to end");
        assert!(!node_rx[0].is_closed());
    }

    /// The masters' events reach the shard task through a bounded channel:
    /// past `EVENTS_BUFFER` waiting, a connection waits (and stops reading
    /// its socket) instead of queueing more in memory.
    #[test]
    fn the_masters_events_are_bounded() {
        let (_cmds, rx) = mpsc::unbounded_channel();
        let task = ShardTask::new(HubConfig { cluster_urls: vec!["redis://n:1".into()], ..HubConfig::default() }, rx);
        let message = || NodeEvent::Message { channel: "c".into(), payload: Vec::new() };
        for _ in 0..EVENTS_BUFFER {
            task.events_tx.try_send(message()).expect("room");
        }
        assert!(matches!(task.events_tx.try_send(message()), Err(mpsc::error::TrySendError::Full(_))));
    }

    /// What the hub reads with redis-rs's parser, in the forms `on_value` and
    /// `fetch_slots` match on, and the commands it writes with redis-rs.
    #[tokio::test]
    async fn resp_values_are_read_and_written() {
        let input: &'static [u8] =
            b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n-MOVED 1 h:1\r\n:7\r\n+PONG\r\n+OK\r\n$-1\r\n";
        let mut r = values(input);
        let message = ["smessage", "ch", "hello"].map(|s| Value::BulkString(s.as_bytes().to_vec()));
        assert_eq!(next_value(&mut r).await.expect("array"), Value::Array(message.to_vec()));
        let Value::ServerError(e) = next_value(&mut r).await.expect("error") else { panic!("a server error") };
        assert_eq!(error_text(&e), "MOVED 1 h:1", "as the server sent it");
        assert_eq!(next_value(&mut r).await.expect("int"), Value::Int(7));
        assert_eq!(next_value(&mut r).await.expect("simple"), Value::SimpleString("PONG".into()));
        assert_eq!(next_value(&mut r).await.expect("ok"), Value::Okay);
        assert_eq!(next_value(&mut r).await.expect("nil"), Value::Nil);
        assert!(next_value(&mut r).await.is_err(), "end of input");
        assert!(r.next().await.is_none(), "nothing after the first error");
        assert_eq!(sub_command("SSUBSCRIBE", &["a".into()]), b"*2\r\n$10\r\nSSUBSCRIBE\r\n$1\r\na\r\n");
        let two = sub_command("SUNSUBSCRIBE", &["a".into(), "bc".into()]);
        assert_eq!(two, b"*3\r\n$12\r\nSUNSUBSCRIBE\r\n$1\r\na\r\n$2\r\nbc\r\n");
    }
}
