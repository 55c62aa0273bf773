use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::cluster::ClusterClientBuilder;
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::cluster_routing::Slot;
use deadpool_redis::redis::{self, Pipeline};
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use dualstream_channel::ChannelNamer;
use dualstream_core::{Notification, NotifyError, RealtimeNotifier};

use crate::breaker::{Admit, Breaker, BreakerState, Ticket};
use crate::config::{ConfigError, RedisNotifierConfig};

/// Counters of a [`RedisNotifier`], since it was created. Every
/// notification of an admitted call is counted once, when the call ends (or
/// when its caller gives up on it): as published, failed or timed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifierStats {
    /// Notifications Redis accepted.
    pub published: u64,
    /// Notifications skipped at once because the breaker was open.
    pub skipped: u64,
    /// Notifications not delivered, or not all of them: a connection
    /// error, an error answer, no connection within `connect_timeout_ms`,
    /// or a caller that gave up before the call had a connection (nothing
    /// was sent).
    pub failed: u64,
    /// Notifications sent whose answer did not come within the call's
    /// bound (`timeout_ms` plus the per-notification allowance, or the
    /// caller's own bound, whichever ended first): the outcome is unknown,
    /// Redis may well have delivered them (on a busy machine it usually
    /// has).
    pub timed_out: u64,
    /// The breaker's state now.
    pub breaker: BreakerState,
}

/// The Redis Pub/Sub notifier. Cheap to clone; clones share the connection,
/// the breaker and the counters.
#[derive(Clone)]
pub struct RedisNotifier {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisNotifierConfig,
    pool: Pool,
    /// One multiplexed connection shared by all calls, with its id;
    /// replaced after a connection error on it (or when a failure on it
    /// opens the breaker). The pool creates it (with its timeouts). In
    /// cluster mode, one cluster connection (a multiplexed connection per
    /// node, kept up by redis-rs), replaced only when the breaker opens.
    /// A call drops only the connection it used, never one made since.
    conn: Mutex<Option<(u64, Conn)>>,
    /// The id of the next connection made.
    next_conn: AtomicU64,
    /// The connection being made, if any: every caller waits for the same
    /// attempt, which runs in a task of its own.
    connecting: Mutex<Option<Connecting>>,
    namer: ChannelNamer,
    breaker: Mutex<Breaker>,
    published: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    /// Calls Redis answered: a call that timed out while this moved was
    /// waiting behind work Redis was doing, not on a hung Redis.
    answered: AtomicU64,
    warn: Mutex<WarnState>,
}

#[derive(Default)]
struct WarnState {
    last: Option<Instant>,
    skipped: u64,
    failed: u64,
    timed_out: u64,
}

impl std::fmt::Debug for RedisNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisNotifier")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The notifier's connection: to one Redis, or to a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

type Connecting = futures::future::Shared<futures::future::BoxFuture<'static, Result<(u64, Conn), String>>>;

/// A batch's commands in cluster mode: one pipeline per hash slot, in the
/// order the slots first appear. redis-rs refuses a cluster pipeline whose
/// commands cross slots; within a slot, commands keep the batch's order,
/// so every channel keeps its order.
struct SlotPipelines {
    pipes: Vec<Pipeline>,
    index: std::collections::HashMap<Slot, usize>,
}

impl SlotPipelines {
    fn new() -> Self {
        Self { pipes: Vec::new(), index: std::collections::HashMap::new() }
    }

    fn for_channel(&mut self, channel: &str) -> &mut Pipeline {
        let next = self.pipes.len();
        let i = *self.index.entry(Slot::for_key(channel)).or_insert(next);
        if i == next {
            self.pipes.push(Pipeline::new());
        }
        &mut self.pipes[i]
    }
}

/// Connections the pool may hold for [`RedisNotifier::pool`] users. The
/// notifier itself uses one multiplexed connection, taken out of the pool.
const POOL_MAX_SIZE: usize = 4;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RedisNotifier {
    /// Validate the configuration and create the pool. No connection is made
    /// until the first call.
    pub fn new(config: RedisNotifierConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let timeout = config.timeout();
        let connect = Duration::from_millis(config.connect_timeout_ms);
        let pool_url = config.cluster_urls.first().unwrap_or(&config.url);
        let mut pool_config = deadpool_redis::Config::from_url(pool_url.clone());
        pool_config.pool = Some(PoolConfig {
            max_size: POOL_MAX_SIZE,
            timeouts: Timeouts { wait: Some(connect), create: Some(connect), recycle: Some(connect) },
            ..PoolConfig::default()
        });
        let pool = pool_config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| ConfigError::Invalid { field: "url", reason: e.to_string() })?;
        let namer = ChannelNamer::with_prefix(config.channel_prefix.clone())
            .map_err(|e| ConfigError::Invalid { field: "channel_prefix", reason: e.to_string() })?;
        let breaker = Breaker::new(config.breaker.clone(), timeout * 2);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                pool,
                conn: Mutex::new(None),
                next_conn: AtomicU64::new(0),
                connecting: Mutex::new(None),
                namer,
                breaker: Mutex::new(breaker),
                published: AtomicU64::new(0),
                skipped: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                timed_out: AtomicU64::new(0),
                answered: AtomicU64::new(0),
                warn: Mutex::new(WarnState::default()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisNotifierConfig {
        &self.inner.config
    }

    /// The channel namer in use.
    pub fn namer(&self) -> &ChannelNamer {
        &self.inner.namer
    }

    /// The pool, for other commands on the same server. It holds at most
    /// four connections; the notifier's own connection is taken out of it
    /// and does not count. Build your own pool from
    /// [`RedisNotifierConfig::url`] for more. In cluster mode its
    /// connections are plain connections to the first node of
    /// [`RedisNotifierConfig::cluster_urls`], not cluster-aware (a key
    /// served by another node answers `MOVED`).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The counters and the breaker state.
    pub fn stats(&self) -> NotifierStats {
        NotifierStats {
            published: self.inner.published.load(Ordering::Relaxed),
            skipped: self.inner.skipped.load(Ordering::Relaxed),
            failed: self.inner.failed.load(Ordering::Relaxed),
            timed_out: self.inner.timed_out.load(Ordering::Relaxed),
            breaker: lock(&self.inner.breaker).state(),
        }
    }

    /// Drop the connection `id` if it is still the current one; one made
    /// since (by another call) stays.
    fn drop_connection(&self, id: u64) {
        let mut current = lock(&self.inner.conn);
        if current.as_ref().is_some_and(|(c, _)| *c == id) {
            *current = None;
        }
    }

    /// The current connection and its id, or the one being made.
    async fn connection(&self) -> Result<(u64, Conn), NotifyError> {
        use futures::FutureExt;
        if let Some(c) = lock(&self.inner.conn).as_ref() {
            return Ok(c.clone());
        }
        let attempt = {
            let mut slot = lock(&self.inner.connecting);
            match slot.as_ref() {
                Some(a) => a.clone(),
                None => {
                    // In a task of its own, bounded by connect_timeout_ms:
                    // a caller's shorter timeout must not cancel it, or a
                    // far-away Redis could never be reconnected.
                    let inner = self.inner.clone();
                    let task = tokio::spawn(async move {
                        let made = if inner.config.is_cluster() {
                            connect_cluster(&inner.config).await.map(Conn::Cluster)
                        } else {
                            match inner.pool.get().await {
                                Ok(pooled) => Ok(Conn::Single(deadpool_redis::Connection::take(pooled))),
                                Err(e) => Err(e.to_string()),
                            }
                        };
                        let made = made.map(|conn| (inner.next_conn.fetch_add(1, Ordering::Relaxed), conn));
                        if let Ok(conn) = &made {
                            *lock(&inner.conn) = Some(conn.clone());
                        }
                        *lock(&inner.connecting) = None;
                        made
                    });
                    let attempt = async move { task.await.unwrap_or_else(|e| Err(e.to_string())) }.boxed().shared();
                    *slot = Some(attempt.clone());
                    attempt
                }
            }
        };
        attempt.await.map_err(NotifyError::Connection)
    }

    /// Call `add(channel, json)` for every message of the batch, in order:
    /// each notification on its source's channel, then (with
    /// `aggregate_channels`) on its type's.
    fn for_each_message(&self, notifications: &[Notification], mut add: impl FnMut(&str, &[u8])) {
        let mut channel = String::with_capacity(64);
        for n in notifications {
            let json = n.to_json();
            channel.clear();
            self.inner.namer.write_channel(&n.source_type, &n.source_id, &mut channel);
            add(&channel, json.as_slice());
            if self.inner.config.aggregate_channels {
                channel.clear();
                channel.push_str(self.inner.namer.prefix());
                channel.push(':');
                channel.push_str(&n.source_type);
                add(&channel, json.as_slice());
            }
        }
    }

    fn pipeline(&self, notifications: &[Notification]) -> Pipeline {
        let per = if self.inner.config.aggregate_channels { 2 } else { 1 };
        let mut pipe = redis::Pipeline::with_capacity(notifications.len() * per);
        self.for_each_message(notifications, |channel, json| {
            pipe.cmd("PUBLISH").arg(channel).arg(json).ignore();
        });
        pipe
    }

    /// The batch as `SPUBLISH`es, one pipeline per slot.
    fn slot_pipelines(&self, notifications: &[Notification]) -> Vec<Pipeline> {
        let mut pipes = SlotPipelines::new();
        self.for_each_message(notifications, |channel, json| {
            pipes.for_channel(channel).cmd("SPUBLISH").arg(channel).arg(json).ignore();
        });
        pipes.pipes
    }

    /// Send the batch on `conn`, under the call's bound: the round trip and
    /// Redis's work, not the time spent building the pipelines. In cluster
    /// mode the slots' pipelines go out together (redis-rs sends each to
    /// its slot's master); the call fails if any of them fails, as a
    /// single pipeline fails as a whole (the others may have been
    /// delivered). An answer that does not come in time, by this bound or
    /// redis-rs's own response timeout, is [`NotifyError::Timeout`].
    async fn send(&self, conn: Conn, notifications: &[Notification]) -> Result<(), NotifyError> {
        let timeout = self.inner.config.timeout()
            + Duration::from_micros(self.inner.config.timeout_per_notification_us.saturating_mul(notifications.len() as u64));
        let call = async {
            match conn {
                Conn::Single(mut conn) => {
                    // This call's own handle: redis-rs would otherwise cut
                    // the answer at its default 500 ms, as an error, however
                    // long the call's bound is.
                    conn.set_response_timeout(timeout);
                    self.pipeline(notifications).query_async::<()>(&mut conn).await
                }
                Conn::Cluster(conn) => {
                    let pipes = self.slot_pipelines(notifications);
                    let calls = pipes.iter().map(|pipe| {
                        let mut conn = conn.clone();
                        async move { pipe.query_async::<()>(&mut conn).await }
                    });
                    futures::future::join_all(calls).await.into_iter().collect::<Result<(), _>>()
                }
            }
            .map_err(|e| if e.is_timeout() { NotifyError::Timeout { after: timeout } } else { NotifyError::Connection(e.to_string()) })
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(NotifyError::Timeout { after: timeout }),
        }
    }

    /// Count notifications skipped, failed or timed out for the next
    /// warning, and warn at most once per `warn_interval_ms`.
    fn warn_rate_limited(&self, add: [u64; 3], cause: &dyn std::fmt::Display) {
        let mut w = lock(&self.inner.warn);
        let [skipped, failed, timed_out] = add;
        w.skipped += skipped;
        w.failed += failed;
        w.timed_out += timed_out;
        let interval = Duration::from_millis(self.inner.config.warn_interval_ms);
        let now = Instant::now();
        if w.last.is_none_or(|t| now.duration_since(t) >= interval) {
            tracing::warn!(
                skipped = w.skipped,
                failed = w.failed,
                timed_out = w.timed_out,
                cause = %cause,
                "redis notifications not delivered or not confirmed (real-time path degraded; durable path unaffected)"
            );
            *w = WarnState { last: Some(now), ..WarnState::default() };
        }
    }
}

/// How an admitted call ended, as the counters and the breaker see it.
enum End<'e> {
    /// Redis accepted every notification.
    Delivered,
    /// Not delivered, or not all: an error (`broken`: the connection
    /// failed), or no connection in time. Counts toward the breaker.
    Failed { cause: &'e dyn std::fmt::Display, broken: bool },
    /// Sent, with no answer within the call's bound or before the caller
    /// gave up: Redis may have delivered them. Counts toward the breaker
    /// unless Redis answered other calls meanwhile (see [`Call::end`]).
    Unknown { cause: &'e dyn std::fmt::Display },
}

/// One call the breaker admitted. Its outcome is reported exactly once, to
/// the breaker (with the admission's ticket) and to the counters: when the
/// call ends, or when it is dropped unfinished because its caller stopped
/// waiting (the publisher's `notify_timeout_ms` is shorter than a
/// connection attempt's `connect_timeout_ms`). A call given up on is a
/// failure when nothing was sent yet, and a timeout once its commands went
/// to Redis.
struct Call<'a> {
    notifier: &'a RedisNotifier,
    ticket: Ticket,
    probe: bool,
    count: u64,
    /// The connection the call uses, once it has one: the only one it may
    /// drop.
    conn: Option<u64>,
    /// `answered` when the commands were handed to the connection; `None`
    /// before.
    sent: Option<u64>,
    done: bool,
}

impl<'a> Call<'a> {
    fn new(notifier: &'a RedisNotifier, ticket: Ticket, probe: bool, count: u64) -> Self {
        Self { notifier, ticket, probe, count, conn: None, sent: None, done: false }
    }

    /// The call's commands are about to go out on connection `id`.
    fn sending(&mut self, id: u64) {
        self.conn = Some(id);
        self.sent = Some(self.notifier.inner.answered.load(Ordering::Relaxed));
    }

    fn finish(mut self, outcome: &Result<(), NotifyError>) {
        match outcome {
            Ok(()) => self.end(End::Delivered),
            Err(e @ NotifyError::Timeout { .. }) => self.end(End::Unknown { cause: e }),
            Err(e) => self.end(End::Failed { cause: e, broken: true }),
        }
    }

    /// Report the outcome. A timeout counts toward the breaker: a hung
    /// Redis (stopped, or behind a dead network path) shows as nothing
    /// else, and the breaker is what spares every later caller the full
    /// bound. Except when Redis answered other calls while this one waited
    /// (one Redis, not a probe): then Redis is up and the call waited
    /// behind work, its own large pipeline or a busy machine, and counting
    /// it would open the breaker on a healthy Redis. On a cluster a timeout
    /// always counts: answers from the other masters say nothing about the
    /// one that did not answer.
    fn end(&mut self, end: End<'_>) {
        self.done = true;
        let inner = &self.notifier.inner;
        let count = self.count;
        let (cause, broken) = match end {
            End::Delivered => {
                inner.published.fetch_add(count, Ordering::Relaxed);
                inner.answered.fetch_add(1, Ordering::Relaxed);
                if lock(&inner.breaker).on_success(self.ticket) {
                    tracing::info!("redis answers again: circuit breaker closed, notifications resume");
                }
                return;
            }
            End::Failed { cause, broken } => {
                inner.failed.fetch_add(count, Ordering::Relaxed);
                self.notifier.warn_rate_limited([0, count, 0], cause);
                (cause, broken)
            }
            End::Unknown { cause } => {
                inner.timed_out.fetch_add(count, Ordering::Relaxed);
                self.notifier.warn_rate_limited([0, 0, count], cause);
                let answered_meanwhile = self.sent.is_some_and(|at| inner.answered.load(Ordering::Relaxed) != at);
                if answered_meanwhile && !self.probe && !inner.config.is_cluster() {
                    return;
                }
                (cause, false)
            }
        };
        let opened = lock(&inner.breaker).on_failure(self.ticket, Instant::now());
        // A connection error drops the connection the call used, and so
        // does the breaker opening (the probe then reconnects); a slow
        // answer alone keeps it, since the other calls on it may be fine. A
        // cluster connection is kept up to the breaker opening: redis-rs
        // reconnects a failed node and follows slots that moved, and the
        // other nodes are fine.
        if opened || (broken && !inner.config.is_cluster()) {
            if let Some(id) = self.conn {
                self.notifier.drop_connection(id);
            }
        }
        if opened {
            tracing::warn!(error = %cause, "redis failing: circuit breaker open, skipping notifications");
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.sent.is_some() {
            self.end(End::Unknown { cause: &"the caller stopped waiting for the answer" });
        } else {
            self.end(End::Failed { cause: &"the caller stopped waiting for a connection", broken: false });
        }
    }
}

#[async_trait]
impl RealtimeNotifier for RedisNotifier {
    async fn notify(&self, notification: &Notification) -> Result<(), NotifyError> {
        self.notify_batch(std::slice::from_ref(notification)).await
    }

    async fn notify_batch(&self, notifications: &[Notification]) -> Result<(), NotifyError> {
        if notifications.is_empty() {
            return Ok(());
        }
        let count = notifications.len() as u64;
        let admit = lock(&self.inner.breaker).admit(Instant::now());
        let mut call = match admit {
            Admit::Yes(ticket) => Call::new(self, ticket, false, count),
            Admit::Probe(ticket) => Call::new(self, ticket, true, count),
            Admit::No => {
                self.inner.skipped.fetch_add(count, Ordering::Relaxed);
                self.warn_rate_limited([count, 0, 0], &"circuit breaker open");
                return Err(NotifyError::CircuitOpen);
            }
        };
        // Waiting for a connection being made is bounded by
        // connect_timeout_ms, apart from the call's own bound: a far-away
        // Redis takes several round trips to connect. A caller that stops
        // waiting earlier drops `call`, which reports it.
        let outcome = match self.connection().await {
            Ok((id, conn)) => {
                call.sending(id);
                self.send(conn, notifications).await
            }
            Err(e) => Err(e),
        };
        call.finish(&outcome);
        outcome
    }

    async fn health_check(&self) -> Result<(), NotifyError> {
        let timeout = self.inner.config.timeout();
        // In cluster mode redis-rs sends PING to every master.
        let ping = async {
            let (id, conn) = self.connection().await.map_err(|e| (None, e))?;
            let pinged = match conn {
                Conn::Single(mut conn) => redis::cmd("PING").query_async::<String>(&mut conn).await,
                Conn::Cluster(mut conn) => redis::cmd("PING").query_async::<String>(&mut conn).await,
            };
            pinged.map_err(|e| (Some(id), NotifyError::Connection(e.to_string())))
        };
        match tokio::time::timeout(timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((id, e))) => {
                if let Some(id) = id {
                    self.drop_connection(id);
                }
                Err(e)
            }
            Err(_) => Err(NotifyError::Timeout { after: timeout }),
        }
    }
}

/// Connect to the cluster of `config.cluster_urls`: every master, and the
/// slot map, bounded by `connect_timeout_ms` (each node's connection too);
/// each command's answer is bounded by `timeout_ms` on top of the call's
/// own bound.
async fn connect_cluster(config: &RedisNotifierConfig) -> Result<ClusterConnection, String> {
    let connect = Duration::from_millis(config.connect_timeout_ms);
    let client = ClusterClientBuilder::new(config.cluster_urls.iter().map(String::as_str))
        .connection_timeout(connect)
        .response_timeout(config.timeout())
        .build()
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(connect, client.get_async_connection()).await {
        Ok(made) => made.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no cluster connection within {connect:?}")),
    }
}
