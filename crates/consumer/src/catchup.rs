//! The catch-up join: history from Kafka, then live notifications, merged by
//! Kafka position (docs/design.md, "Joining mid-stream").

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use dualstream_core::{EventId, Notification, Position, Source};
use dualstream_history::{
    partition_for_key, ConfigError, History, HistoryStats, Item, Marks, Rec, Replay, ReplayError, Replayed, StartAt,
    Tp, Window,
};
use dualstream_hub::{key_of, Hub, HubError, LiveItem, Seen, SeenOffsets};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::JoinConfig;
use crate::ready::{Charge, ReadyBudget};

/// One item of a join, in Kafka order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// An event read from Kafka: the history before the live part, one whose
    /// notification was missed (a gap filled), or, in a join made with
    /// [`CatchUp::join_events`], every event.
    History(Replayed),
    /// A live notification from Redis. Its `position` is always set. Shared
    /// with the hub's other subscribers of the channel (it is not copied for
    /// each join).
    Live(Arc<Notification>),
    /// The records from `requested` up to `first_available` are no longer
    /// stored (retention or delete-records removed them before the join read
    /// them): events of this source among them are lost to this client. The
    /// join goes on from `first_available`.
    Truncated {
        /// The first offset the join wanted.
        requested: i64,
        /// The first offset still stored.
        first_available: i64,
    },
}

impl Delivery {
    /// The event id (`None` for [`Delivery::Truncated`]).
    pub fn id(&self) -> Option<EventId> {
        match self {
            Delivery::History(r) => Some(r.event.id()),
            Delivery::Live(n) => Some(n.id),
            Delivery::Truncated { .. } => None,
        }
    }

    /// Where the event is stored in Kafka (`None` for
    /// [`Delivery::Truncated`]).
    pub fn position(&self) -> Option<&Position> {
        match self {
            Delivery::History(r) => Some(&r.position),
            Delivery::Live(n) => n.position.as_ref(),
            Delivery::Truncated { .. } => None,
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
    /// A live notification that cannot be placed in the Kafka order (a
    /// position in another topic or partition). The join goes on. (One
    /// without a position makes the join read Kafka instead.)
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
/// then takes Kafka's watermarks and reads the history up to the high one,
/// then hands over to the live notifications. It tracks the next Kafka offset
/// it has checked; a notification below it is a duplicate and is skipped.
/// Gaps are filled from Kafka:
///
/// - after [`LiveItem::Gap`] (Redis reconnected) or [`LiveItem::Lagged`]
///   (this subscriber fell behind), it reads up to the new high watermark;
/// - when a notification's offset jumps past the checked offset, the
///   offsets in between are of other sources if the hub has seen a
///   notification of another source for each of them
///   ([`Hub::follow_partitions`], [`JoinConfig::reorder_window_ms`]): the
///   notification is delivered at once. Otherwise (an offset not seen within
///   the window, or one of this source) it reads the records in between from
///   Kafka first, so even a notification the publisher never sent does not
///   leave a hole;
/// - when the polled high watermark moved and the join has had no live item
///   for `idle_check_ms`, it reads up to it, so a lost notification of the
///   last event is delivered late rather than never.
///
/// History the broker no longer stores is reported with
/// [`Delivery::Truncated`], never skipped silently.
///
/// Every join of one `CatchUp` (and its clones) shares the Kafka side: one
/// consumer for metadata and watermarks, one consumer per topic for the
/// records, and an in-memory cache of the latest `cache_records` records of
/// each partition read (see docs/consumer.md, "Shared history"). An idle join
/// makes no Kafka request of its own.
#[derive(Clone)]
pub struct CatchUp {
    replay: Replay,
    hub: Hub,
    config: JoinConfig,
    history: Arc<Mutex<Option<History>>>,
    /// The hub's record of the notifications it has seen (`None`: not
    /// followed; every jump reads Kafka).
    seen: Option<Arc<SeenOffsets>>,
    checks: Arc<Checks>,
    lags: Arc<Lags>,
}

/// How live notifications that jumped past a join's checked offset were
/// placed in the Kafka order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveChecks {
    /// Delivered without reading Kafka: the hub had seen a notification of
    /// another source for every offset in between.
    pub proven_by_notifications: u64,
    /// After reading Kafka up to the notification (an offset in between not
    /// seen within the reorder window, or of the join's own source, or no
    /// record of the notifications kept).
    pub read_from_kafka: u64,
}

/// How far the open joins are behind the ends of their partitions: the
/// consumer lag of [`CatchUp`]'s joins (docs/consumer.md, "Lag").
///
/// A join's lag is the number of records of its partition from the first
/// offset it has not yet delivered or checked to the high watermark as last
/// polled (every `idle_check_ms`): the work left before the join is proven
/// current. It grows while a join's consumer does not take its items (a
/// slow client) and while a join reads history from far back. A current
/// join of a quiet source in a busy partition also shows the other sources'
/// records since its last idle check, up to about `idle_check_ms` of them:
/// alert on the maximum staying high, not on one reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JoinLag {
    /// Joins open (their streams not dropped).
    pub joins: usize,
    /// The largest lag of one join, in records.
    pub max: i64,
    /// The lags of all joins added up, in records.
    pub sum: i64,
}

/// The open joins' positions, for [`CatchUp::lag`].
#[derive(Default)]
struct Lags {
    /// Each join's slot, and how many were open when the list was last
    /// pruned (dropped joins are removed once the list has doubled).
    slots: Mutex<(Vec<Weak<LagSlot>>, usize)>,
}

impl Lags {
    fn register(&self, tp: Tp, next: i64) -> Arc<LagSlot> {
        let slot = Arc::new(LagSlot { tp, next: AtomicI64::new(next) });
        let mut guard = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let (slots, open) = &mut *guard;
        if slots.len() >= 2 * *open + 64 {
            slots.retain(|w| w.strong_count() > 0);
            *open = slots.len();
        }
        slots.push(Arc::downgrade(&slot));
        slot
    }

    fn open(&self) -> Vec<Arc<LagSlot>> {
        let mut guard = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let (slots, open) = &mut *guard;
        slots.retain(|w| w.strong_count() > 0);
        *open = slots.len();
        slots.iter().filter_map(Weak::upgrade).collect()
    }
}

/// One join's partition and the first offset it has not delivered or
/// checked.
struct LagSlot {
    tp: Tp,
    next: AtomicI64,
}

#[derive(Debug, Default)]
struct Checks {
    proven: AtomicU64,
    read: AtomicU64,
}

impl std::fmt::Debug for CatchUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatchUp").field("replay", &self.replay).field("config", &self.config).finish_non_exhaustive()
    }
}

impl CatchUp {
    /// A joiner from a Kafka reader configuration and a hub. No Kafka client
    /// is made until the first join.
    pub fn new(replay: Replay, hub: Hub, config: JoinConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let seen = if config.reorder_window_ms > 0 { hub.follow_partitions() } else { None };
        Ok(Self {
            replay,
            hub,
            config,
            history: Arc::new(Mutex::new(None)),
            seen,
            checks: Arc::default(),
            lags: Arc::default(),
        })
    }

    /// How the live notifications that jumped past a join's checked offset
    /// were placed: proven by the notifications the hub saw, or read from
    /// Kafka.
    pub fn live_checks(&self) -> LiveChecks {
        LiveChecks {
            proven_by_notifications: self.checks.proven.load(Ordering::Relaxed),
            read_from_kafka: self.checks.read.load(Ordering::Relaxed),
        }
    }

    fn history(&self) -> Result<History, ReplayError> {
        let mut h = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = &*h {
            return Ok(h.clone());
        }
        let made = History::new(
            Arc::new(self.replay.config().clone()),
            Duration::from_millis(self.config.idle_check_ms),
            self.config.cache_records,
            self.config.backfill_readers,
        )?;
        made.set_backfill_rate(self.config.backfill_records_per_sec);
        *h = Some(made.clone());
        Ok(made)
    }

    /// The high watermark of `position`'s partition (the offset its next
    /// record will get) as last polled, every `idle_check_ms`: no Kafka
    /// request. `None` when no join watches that partition, or before the
    /// first join.
    pub fn polled_end(&self, position: &Position) -> Option<i64> {
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner).clone()?;
        history.polled(&(Arc::clone(&position.topic), position.partition)).map(|m| m.high)
    }

    /// The consumer lag of the open joins ([`JoinLag`]), from the
    /// watermarks as last polled: no Kafka request.
    pub fn lag(&self) -> JoinLag {
        let Some(history) = self.history.lock().unwrap_or_else(PoisonError::into_inner).clone() else {
            return JoinLag::default();
        };
        let mut lag = JoinLag::default();
        for slot in self.lags.open() {
            let high = history.polled(&slot.tp).map_or(0, |m| m.high);
            let behind = (high - slot.next.load(Ordering::Relaxed)).max(0);
            lag.joins += 1;
            lag.max = lag.max.max(behind);
            lag.sum = lag.sum.saturating_add(behind);
        }
        lag
    }

    /// Counters of the shared Kafka readers (all zero before the first
    /// join).
    pub fn stats(&self) -> HistoryStats {
        self.history.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(History::stats).unwrap_or_default()
    }

    /// Join `source` from `start` (an offset, a timestamp, the last N events,
    /// the beginning or the end). The first item comes from Kafka unless
    /// nothing is stored after `start`. An offset below what is still stored
    /// gives [`Delivery::Truncated`] first.
    pub async fn join(&self, source: Source, start: StartAt) -> Result<JoinStream, JoinError> {
        self.join_with(source, start, false, None).await
    }

    /// Like [`join`](Self::join), but every item is a whole event: a live
    /// notification is not delivered itself; its event is read from Kafka
    /// (from the shared cache of recent records, in the common case) and
    /// delivered as [`Delivery::History`]. For clients that want payloads,
    /// not just ids and positions.
    pub async fn join_events(&self, source: Source, start: StartAt) -> Result<JoinStream, JoinError> {
        self.join_with(source, start, true, None).await
    }

    /// A join ([`join`](Self::join), or with `events`
    /// [`join_events`](Self::join_events)) whose events read from Kafka
    /// count against `budget` until the stream hands them out: the joins of
    /// one consumer given one budget hold at most that much ready for it
    /// together. Without a budget a join holds up to
    /// [`JoinConfig::buffer`] items, of any size.
    pub async fn join_within(
        &self,
        source: Source,
        start: StartAt,
        events: bool,
        budget: ReadyBudget,
    ) -> Result<JoinStream, JoinError> {
        self.join_with(source, start, events, Some(budget)).await
    }

    /// Where `source`'s events go and the offset the next one will get (the
    /// partition's high watermark now), from the shared reader. A client
    /// that records this before its first event and later joins from it
    /// misses nothing in between.
    pub async fn position_now(&self, source: &Source) -> Result<Position, JoinError> {
        let history = self.history()?;
        let topic = self.replay.config().topic.topic_for(source.source_type());
        let count = history.partition_count(&topic).await?;
        let tp: Tp = (topic.into(), partition_for_key(source.source_id().as_bytes(), count));
        let marks = history.fresh(&tp).await?;
        Ok(Position::new(Arc::clone(&tp.0), tp.1, marks.high))
    }

    async fn join_with(
        &self,
        source: Source,
        start: StartAt,
        full: bool,
        budget: Option<ReadyBudget>,
    ) -> Result<JoinStream, JoinError> {
        // Live first, so nothing published from now on can be missed.
        let live = self.hub.subscribe_source(&source).await?;
        let history = self.history()?;
        let topic = self.replay.config().topic.topic_for(source.source_type());
        let key: Arc<[u8]> = source.source_id().as_bytes().into();
        let count = history.partition_count(&topic).await?;
        let tp: Tp = (topic.into(), partition_for_key(&key, count));
        let watermarks = history.watch(&tp);
        // Taken after the subscription exists. The low mark may be older
        // (see `History::fresh`), except for a join from the beginning or
        // from the last n, which may start at it. A join from an offset at
        // or below the polled end (a resume) takes the polled marks and
        // waits for no round: what was stored between that end and the
        // subscription comes with the source's next notification's proof,
        // or at the join's idle check.
        let marks = match start {
            StartAt::Beginning | StartAt::LastN(_) => history.fresh_low(&tp).await?,
            StartAt::Offset(o) => match history.polled(&tp) {
                Some(m) if (0..=m.high).contains(&o) => m,
                _ => history.fresh(&tp).await?,
            },
            _ => history.fresh(&tp).await?,
        };
        let begin = match start {
            StartAt::Beginning => marks.low,
            StartAt::End => marks.high,
            StartAt::Offset(o) if o < 0 => {
                return Err(ReplayError::Request { field: "start", reason: format!("offset {o} is negative") }.into())
            }
            StartAt::Offset(o) => o.min(marks.high),
            StartAt::Timestamp(ts) if ts < 0 => {
                return Err(
                    ReplayError::Request { field: "start", reason: format!("timestamp {ts} is negative") }.into()
                )
            }
            StartAt::Timestamp(ts) => history.offset_for_time(&tp, ts).await?.unwrap_or(marks.high).min(marks.high),
            StartAt::LastN(n) => last_n_start(&history, &tp, &key, &source, n, marks).await?,
            // `StartAt` is `non_exhaustive`: a start added to the replay
            // is refused by joins until they know it.
            other => {
                let reason = format!("{other:?} is not supported by joins");
                return Err(ReplayError::Request { field: "start", reason }.into());
            }
        };
        let (tx, rx) = handoff(self.config.buffer);
        let seen = self.seen.clone().map(|seen| Proof {
            key: key_of(&source),
            seen,
            window: Duration::from_millis(self.config.reorder_window_ms),
        });
        let checks = Arc::clone(&self.checks);
        let lag = self.lags.register(tp.clone(), begin);
        let window = history.window(&tp);
        let joiner = Joiner {
            tx,
            history,
            window,
            tp,
            source,
            key,
            next: begin,
            low: marks.low,
            full,
            seen,
            checks,
            lag,
            budget,
        };
        let idle = Duration::from_millis(self.config.idle_check_ms);
        Ok(Box::pin(Joined::new(joiner.run(live, watermarks, marks.high, idle), rx)))
    }
}

/// What a join's loop hands to its stream: a word or two, so the queue
/// between them ([`Handoff`]) stays small for a join that sits idle; the
/// stream unpacks each into a [`Delivery`] or a [`JoinError`].
#[derive(Debug)]
enum Sent {
    /// A record of the join's source read from Kafka, as the history
    /// reader holds it (shared with its cache and with the other joins of
    /// the source), with its room in the join's [`ReadyBudget`], if it has
    /// one, given back when the stream hands it out. Made into a [`Replayed`]
    /// only when the stream hands it out: what waits is a pointer, not a
    /// copy of the event (about 200 bytes less for each item a client's
    /// joins hold ready; a gateway's 2,000 clients behind by 128 items each
    /// held up to 50 MiB of copies).
    Record(Box<(Arc<Rec>, Option<Charge>)>),
    Live(Arc<Notification>),
    Truncated { requested: i64, first_available: i64 },
    Failed(Box<JoinError>),
}

impl Sent {
    fn unpack(self) -> Result<Delivery, JoinError> {
        match self {
            Sent::Record(r) => {
                let rec = &r.0;
                match &rec.event {
                    Ok(event) => Ok(Delivery::History(Replayed {
                        event: event.clone(),
                        position: rec.position.clone(),
                        timestamp_ms: rec.timestamp_ms,
                    })),
                    Err(raw) => Err(ReplayError::Decode { position: rec.position.clone(), error: raw.error() }.into()),
                }
            }
            Sent::Live(n) => Ok(Delivery::Live(n)),
            Sent::Truncated { requested, first_available } => Ok(Delivery::Truncated { requested, first_available }),
            Sent::Failed(e) => Err(*e),
        }
    }
}

/// A join's stream. It drives the join's loop itself, in the task that
/// polls it: a join costs no task of its own, and a join nobody polls does
/// no work (its hub subscription's buffer holds the live items meanwhile,
/// and an overflow there is read from Kafka like any gap).
struct Joined<F> {
    /// The join's loop, until it ends.
    run: Option<Pin<Box<F>>>,
    rx: Arc<Handoff>,
}

impl<F: std::future::Future<Output = ()>> Joined<F> {
    fn new(run: F, rx: Arc<Handoff>) -> Self {
        Self { run: Some(Box::pin(run)), rx }
    }
}

impl<F: std::future::Future<Output = ()>> Stream for Joined<F> {
    type Item = Result<Delivery, JoinError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        // The loop first: it fills the queue until the queue is full or
        // it waits for Redis, Kafka or a timer (each of which wakes this
        // task). A loop that waits for room is polled again by the next
        // call, after this one took an item.
        if let Some(run) = self.run.as_mut() {
            if run.as_mut().poll(cx).is_ready() {
                self.run = None;
            }
        }
        // Once the loop has ended, what is queued comes out, then the end.
        match self.rx.pop() {
            Some(sent) => std::task::Poll::Ready(Some(sent.unpack())),
            None if self.run.is_none() => std::task::Poll::Ready(None),
            None => std::task::Poll::Pending,
        }
    }
}

/// The items a join's loop has ready for its stream, at most `cap`. Both
/// are polled by one task (the stream polls the loop), so a queue under a
/// plain lock does what a channel did, without waking that task for every
/// item it hands over to itself; a loop that finds the queue full waits
/// for the stream's next poll, which takes an item first.
#[derive(Debug)]
struct Handoff {
    items: Mutex<VecDeque<Sent>>,
    cap: usize,
}

/// What an empty [`Handoff`] keeps room for.
const IDLE_HANDOFF: usize = 32;

fn handoff(cap: usize) -> (Arc<Handoff>, Arc<Handoff>) {
    let h = Arc::new(Handoff { items: Mutex::new(VecDeque::new()), cap: cap.max(1) });
    (Arc::clone(&h), h)
}

impl Handoff {
    /// Queue `sent` once there is room.
    async fn send(&self, sent: Sent) {
        let mut sent = Some(sent);
        std::future::poll_fn(|_| {
            let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
            if items.len() < self.cap {
                items.extend(sent.take());
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }

    /// The next item; a queue emptied gives back what a burst made it
    /// grow by, so an idle join holds little.
    fn pop(&self) -> Option<Sent> {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = items.pop_front();
        if items.is_empty() && items.capacity() > IDLE_HANDOFF {
            items.shrink_to(IDLE_HANDOFF);
        }
        sent
    }
}

/// A join of `source` from `next` in `tp`, fed by `live`, without the
/// initial watermark look-up, and with its idle check every `idle`: the test
/// drives it.
#[cfg(test)]
#[allow(clippy::too_many_arguments)] // a test's knobs, each named at the call
pub(crate) fn join_for_test(
    history: History,
    tp: Tp,
    source: Source,
    live: impl Stream<Item = LiveItem> + Unpin + Send + 'static,
    next: i64,
    seen: Option<(Arc<SeenOffsets>, Duration)>,
    idle: Duration,
    budget: Option<ReadyBudget>,
) -> JoinStream {
    let (tx, rx) = handoff(256);
    let key: Arc<[u8]> = source.source_id().as_bytes().into();
    let watermarks = history.watch(&tp);
    let seen = seen.map(|(seen, window)| Proof { key: key_of(&source), seen, window });
    let lag = Arc::new(LagSlot { tp: tp.clone(), next: AtomicI64::new(next) });
    let (checks, low, full) = (Arc::default(), 0, false);
    let window = history.window(&tp);
    let joiner = Joiner { tx, history, window, tp, source, key, next, low, full, seen, checks, lag, budget };
    Box::pin(Joined::new(joiner.run(live, watermarks, next, idle), rx))
}

/// The offset of the `n`-th last event of `source`, found by reading windows
/// backwards from the high watermark, each four times the last. Keeps at
/// most `n` offsets in memory.
async fn last_n_start(
    history: &History,
    tp: &Tp,
    key: &Arc<[u8]>,
    source: &Source,
    n: usize,
    marks: Marks,
) -> Result<i64, ReplayError> {
    if n == 0 {
        return Ok(marks.high);
    }
    let mut found_after = 0usize; // matches in [window_end, high)
    let mut window_end = marks.high;
    let mut step = (n as i64).saturating_mul(8).max(512);
    while window_end > marks.low {
        let from = window_end.saturating_sub(step).max(marks.low);
        let need = n - found_after;
        let mut last: VecDeque<i64> = VecDeque::with_capacity(need.min(4096));
        let mut next = from;
        while next < window_end {
            let mut range = history.read(tp, next, window_end, Arc::clone(key))?;
            while let Some(item) = range.rx.recv().await {
                if let Item::Record(rec) = item {
                    if matches!(&rec.event, Ok(e) if e.source() == source) {
                        if last.len() == need {
                            last.pop_front();
                        }
                        last.push_back(rec.position.offset);
                    }
                    next = next.max(rec.position.offset + 1);
                }
            }
            if let Some(e) = range.ticket.take_error() {
                return Err(e);
            }
            let checked = range.ticket.checked();
            if checked <= next && next < window_end && checked == from {
                return Err(ReplayError::Task("the history reader gave up a range without an error".into()));
            }
            next = next.max(checked);
        }
        if last.len() == need {
            return Ok(last[0]);
        }
        found_after += last.len();
        window_end = from;
        step = step.saturating_mul(4);
    }
    // Fewer than n stored: all of them.
    Ok(marks.low)
}

/// The caller dropped the stream, or a fatal error was sent: stop.
struct Stop;

struct Joiner {
    tx: Arc<Handoff>,
    history: History,
    /// The tail reader's cache of `tp`, read here without a request.
    window: Arc<Window>,
    tp: Tp,
    source: Source,
    key: Arc<[u8]>,
    /// Every offset below this has been delivered or checked.
    next: i64,
    /// The low watermark last seen.
    low: i64,
    /// Deliver live events read from Kafka, not their notifications.
    full: bool,
    seen: Option<Proof>,
    checks: Arc<Checks>,
    /// `next`, for [`CatchUp::lag`].
    lag: Arc<LagSlot>,
    /// What events read from Kafka may hold while ready.
    budget: Option<ReadyBudget>,
}

/// What a join proves the offsets before a live notification with.
struct Proof {
    /// Its source's key in `seen`.
    key: u64,
    seen: Arc<SeenOffsets>,
    /// How long to wait for a notification not seen yet.
    window: Duration,
}

/// How far a join's idle check backs off while the polled watermarks stay
/// unchanged: up to this many times `idle_check_ms` between checks.
const IDLE_BACKOFF: u32 = 4;

impl Joiner {
    /// The join's loop, on the items of `live`: a hub subscription (a test's
    /// own stream in `join_for_test`).
    async fn run(
        mut self,
        mut live: impl Stream<Item = LiveItem> + Unpin,
        mut marks: watch::Receiver<Marks>,
        high: i64,
        idle: Duration,
    ) {
        if self.scan_to(high).await.is_err() {
            return;
        }
        self.show_next();
        let mut last_live = Instant::now();
        // The idle check reads the polled watermarks when its own timer
        // fires, instead of waking on their change: a watch wakes every
        // receiver at once, and with ten thousand joins of a busy topic
        // that was ten thousand tasks woken in the same instant once a
        // poll (`idle_check_ms`), holding the runtime's threads for tens of
        // milliseconds: the p99 of every live item (docs/benchmark-analysis.md).
        // Each join's timer runs from its own start, so the checks spread
        // out; a check that finds the watermarks unchanged waits twice as
        // long next time, up to `IDLE_BACKOFF` times `idle`.
        let mut wait = idle;
        let check = tokio::time::sleep(idle);
        tokio::pin!(check);
        loop {
            let step = tokio::select! {
                item = live.next() => {
                    last_live = Instant::now();
                    // A check put off by quiet watermarks comes back to
                    // `idle` after a live item (one reset, not one per item).
                    if wait > idle {
                        wait = idle;
                        check.as_mut().reset(last_live + idle);
                    }
                    match item {
                        Some(LiveItem::Notification(n)) => self.on_live(n).await,
                        Some(LiveItem::Gap | LiveItem::Lagged { .. }) => self.catch_up().await,
                        Some(LiveItem::Disconnected) => Ok(()),
                        Some(LiveItem::Malformed { channel, reason }) => {
                            let e = JoinError::Malformed { channel: channel.to_string(), reason: reason.to_string() };
                            self.fail(e).await
                        }
                        Some(LiveItem::Dropped { .. }) | None => {
                            let _ = self.catch_up().await;
                            let _ = self.fail(JoinError::Hub(HubError::Closed)).await;
                            return;
                        }
                        // `LiveItem` is `non_exhaustive`: an item added to the
                        // hub is taken as a possible gap until joins know it
                        // (reading Kafka is never wrong). No such item exists.
                        Some(_) => self.catch_up().await,
                    }
                }
                () = &mut check => {
                    let Ok(changed) = marks.has_changed() else { return };
                    let m = *marks.borrow_and_update();
                    self.low = self.low.max(m.low);
                    let idle_since = last_live + idle;
                    let step = if Instant::now() >= idle_since && m.high > self.next {
                        self.scan_to(m.high).await
                    } else {
                        Ok(())
                    };
                    let now = Instant::now();
                    let at = if now < idle_since {
                        wait = idle;
                        idle_since
                    } else {
                        wait = if changed { idle } else { (wait * 2).min(idle * IDLE_BACKOFF) };
                        now + wait
                    };
                    check.as_mut().reset(at);
                    step
                }
            };
            if step.is_err() {
                return;
            }
            self.show_next();
        }
    }

    /// Publish `next` for [`CatchUp::lag`].
    fn show_next(&self) {
        self.lag.next.store(self.next, Ordering::Relaxed);
    }

    /// Hand an error to the stream.
    async fn fail(&self, e: JoinError) -> Result<(), Stop> {
        self.show_next();
        self.tx.send(Sent::Failed(Box::new(e))).await;
        Ok(())
    }

    /// Hand [`Delivery::Truncated`] to the stream.
    async fn truncated(&self, requested: i64, first_available: i64) -> Result<(), Stop> {
        self.show_next();
        self.tx.send(Sent::Truncated { requested, first_available }).await;
        Ok(())
    }

    async fn fatal(&self, e: ReplayError) -> Stop {
        let _ = self.fail(e.into()).await;
        Stop
    }

    /// Read from Kafka up to the high watermark taken now. Boxed, like
    /// [`scan_to`](Self::scan_to): the join's loop waits mostly for live
    /// items, and holds the large state of a Kafka read only while it reads.
    fn catch_up(&mut self) -> BoxFuture<'_, Result<(), Stop>> {
        Box::pin(self.catch_up_now())
    }

    async fn catch_up_now(&mut self) -> Result<(), Stop> {
        match self.history.fresh(&self.tp).await {
            Ok(m) => {
                self.low = self.low.max(m.low);
                self.scan_to(m.high).await
            }
            Err(e) => Err(self.fatal(e).await),
        }
    }

    /// Deliver this source's records in `[next, target)` from Kafka (boxed:
    /// see [`catch_up`](Self::catch_up)).
    fn scan_to(&mut self, target: i64) -> BoxFuture<'_, Result<(), Stop>> {
        Box::pin(self.scan_now(target))
    }

    async fn scan_now(&mut self, target: i64) -> Result<(), Stop> {
        while self.next < target {
            if self.next < self.low {
                let (requested, first_available) = (self.next, self.low.min(target));
                self.next = first_available;
                self.truncated(requested, first_available).await?;
                continue;
            }
            let from = self.next;
            // Near the tail, the shared cache has the whole range: taken
            // here, with no request to the reader's task.
            let mut cached = Vec::new();
            if self.history.cached(&self.window, from, target, &self.key, &mut cached) {
                for rec in cached {
                    self.deliver(rec).await?;
                }
                self.next = self.next.max(target);
                continue;
            }
            let mut range = match self.history.read(&self.tp, from, target, Arc::clone(&self.key)) {
                Ok(r) => r,
                Err(e) => return Err(self.fatal(e).await),
            };
            while let Some(item) = range.rx.recv().await {
                match item {
                    Item::Record(rec) => self.deliver(rec).await?,
                    Item::Hole { from, to } => {
                        if to <= self.next {
                            continue;
                        }
                        // Deleted records, or offsets that never held one
                        // (compaction, control records)? The low mark read
                        // now tells.
                        let m = match self.history.fresh_low(&self.tp).await {
                            Ok(m) => m,
                            Err(e) => return Err(self.fatal(e).await),
                        };
                        self.low = self.low.max(m.low);
                        let requested = self.next.max(from);
                        self.next = to;
                        if m.low > requested {
                            self.truncated(requested, to).await?;
                        }
                    }
                }
            }
            if let Some(e) = range.ticket.take_error() {
                return Err(self.fatal(e).await);
            }
            let checked = range.ticket.checked();
            if self.next == from && checked <= from {
                let e = ReplayError::Task("the history reader gave up a range without an error".into());
                return Err(self.fatal(e).await);
            }
            self.next = self.next.max(checked);
        }
        Ok(())
    }

    /// Deliver a record of the key read from Kafka (one of another source
    /// under the same key is skipped), moving `next` past it.
    async fn deliver(&mut self, rec: Arc<Rec>) -> Result<(), Stop> {
        let offset = rec.position.offset;
        if offset < self.next {
            return Ok(());
        }
        self.next = offset + 1;
        // With `otel`, a traced event read here gets a `receive` span, open
        // until the join's consumer took it.
        let mut _span = None;
        let size = match &rec.event {
            Ok(e) if e.source() == &self.source => {
                if dualstream_core::trace::ENABLED {
                    _span = dualstream_core::Traced::receive(e, &rec.position);
                }
                e.size_hint()
            }
            Ok(_) => return Ok(()),
            Err(raw) => {
                let e = ReplayError::Decode { position: rec.position.clone(), error: raw.error() };
                return self.fail(e.into()).await;
            }
        };
        self.show_next();
        let charge = match &self.budget {
            Some(budget) => budget.take(size).await,
            None => None,
        };
        self.tx.send(Sent::Record(Box::new((rec, charge)))).await;
        Ok(())
    }

    /// Whether the hub saw a notification of another source for every
    /// offset in `[next, offset)`, waiting up to the reorder window for
    /// those not seen yet.
    async fn proven(&self, offset: i64) -> bool {
        let Some(proof) = &self.seen else { return false };
        let deadline = Instant::now() + proof.window;
        loop {
            // Made before the check: a record made after it wakes it.
            let changed = proof.seen.changed();
            match proof.seen.check(&self.tp.0, self.tp.1, self.next, offset, proof.key) {
                Seen::Clear => return true,
                Seen::Mine { .. } => return false,
                Seen::Missing { .. } => {}
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    async fn on_live(&mut self, n: Arc<Notification>) -> Result<(), Stop> {
        let offset = match &n.position {
            // No position (a write whose outcome the publisher did not
            // learn, or real-time-only mode): the event, if stored, is in
            // Kafka below the high watermark taken now. Catch up.
            None => return self.catch_up().await,
            Some(p) if !p.is_known() => return self.catch_up().await,
            Some(p) if *p.topic == *self.tp.0 && p.partition == self.tp.1 => p.offset,
            Some(p) => {
                let reason = format!("position {p} is not in {}/{}", self.tp.0, self.tp.1);
                return self.fail(JoinError::Unmergeable { id: n.id, reason }).await;
            }
        };
        if self.full {
            // Through the notification's own record: its event comes from
            // Kafka like the history before it.
            return self.scan_to(offset + 1).await;
        }
        if offset > self.next {
            if self.proven(offset).await {
                self.checks.proven.fetch_add(1, Ordering::Relaxed);
            } else {
                // Events of this source in between whose notifications were
                // lost come from Kafka first (usually from the shared cache).
                self.checks.read.fetch_add(1, Ordering::Relaxed);
                self.scan_to(offset).await?;
            }
        }
        if offset < self.next {
            // Delivered already (from history, or a duplicate).
            return Ok(());
        }
        self.next = offset + 1;
        self.show_next();
        // Shared with the hub's other subscribers.
        self.tx.send(Sent::Live(n)).await;
        Ok(())
    }
}

#[cfg(test)]
mod size {
    use super::*;

    #[test]
    fn a_buffered_join_item_is_a_few_words() {
        // tokio's bounded channel allocates 32 slots at once: with the
        // delivery itself in the slot (about 180 bytes) an idle join held
        // about 6 KiB of buffer.
        assert!(std::mem::size_of::<Sent>() <= 24, "{} bytes", std::mem::size_of::<Sent>());
        assert!(std::mem::size_of::<Result<Delivery, JoinError>>() > 64, "the unpacked item is the large one");
    }

    /// A record a join holds ready points at the reader's record, with its
    /// room in the budget: its box is the size of a few words, where a copy
    /// of the event was about 220 bytes a waiting item.
    #[test]
    fn a_record_held_ready_is_a_pointer_and_its_room() {
        let boxed = std::mem::size_of::<(Arc<Rec>, Option<Charge>)>();
        assert!(boxed <= 48, "{boxed} bytes");
        assert!(std::mem::size_of::<(Replayed, Option<Charge>)>() > 4 * boxed, "the copy was the large one");
    }
}
