//! Shared history: every join of one catch-up joiner (`dualstream-consumer`'s
//! `CatchUp`) reads Kafka through one consumer per topic, and learns the
//! watermarks from one poller ([`History`]).
//!
//! - **Watermarks.** One task polls the low and high watermarks of every
//!   partition some join watches, once per `idle_check_ms`, and on demand
//!   ([`History::fresh`]); demands that arrive while a round is under way are
//!   served together by the next round. Joins wait on a `watch` channel: an
//!   idle join makes no request of its own.
//! - **Ranges.** One task per topic owns one consumer. A join asks for the
//!   records of its key in `[from, to)` of a partition ([`History::read`]).
//!   While any join reads a partition the task follows it forward and keeps
//!   the last `cache_records` records in memory, so a range near the tail
//!   (the records between two notifications of a source, the records since
//!   the last watermark poll) is served from memory. The tail reader also
//!   shows each partition's cache to the joins as it stood after its last
//!   record ([`Window`]): a range the window covers whole is taken there,
//!   in the join's own task ([`History::cached`]), without a request to the
//!   reader's task and a channel for its answer. The task never waits
//!   for a join: a join whose buffer is full is parked at the record it did
//!   not take, and served from the cache once it takes its items (the cache
//!   keeps up to `PARKED_EXTRA` more records while a parked join needs
//!   them); past that it is dropped from the sweep with the offset it got
//!   to ([`Ticket::checked`]), and asks again from there.
//! - **Reads from far back.** A range older than the tail reader's cache
//!   (a resume from minutes ago, from offset 0) never moves the tail
//!   reader's position back, which would hold every join at the tail behind
//!   it. The tail reader hands it to a small pool of backfill readers per
//!   topic (`backfill_readers`, one consumer each, started as needed; each
//!   far read goes to the one that serves it soonest, and under a budget
//!   the reads of one partition share one sweep, [`choose_backfill`]).
//!   A backfill reader works like the tail reader, except
//!   that a range older than its cache waits for the reads in progress to
//!   end, then moves its position back once for all that waited, and it
//!   pauses a partition a second after its last read, keeping its cache
//!   and position for the next, and stops following it 30 s after. A join's next range, near the tail, goes
//!   to the tail reader again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use dualstream_core::{record, Backoff, DecodeError, Event, Position};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::config::ReplayConfig;
use crate::decode::{decode_limits, event_of};
use crate::error::ReplayError;
use crate::reader::Marks;

/// A topic and partition.
pub type Tp = (Arc<str>, i32);

/// One record of a partition, decoded once and shared by every join that
/// reads it.
#[derive(Debug)]
pub struct Rec {
    /// Where it is stored.
    pub position: Position,
    pub(crate) key: Option<Box<[u8]>>,
    /// Its Kafka timestamp, in milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
    /// The event, or the raw record when it does not decode (rare: each
    /// join decodes it again for its own error item).
    pub event: Result<Event, Raw>,
    /// The record's size as stored (key, payload and headers), for the
    /// cache's byte bound.
    pub(crate) size: usize,
}

/// A record that is not a valid event, kept to report the error.
#[derive(Debug)]
pub struct Raw {
    headers: Vec<(String, Option<Vec<u8>>)>,
    payload: Option<Vec<u8>>,
}

impl Raw {
    /// Why the record is not a valid event.
    pub fn error(&self) -> DecodeError {
        let headers = self.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()));
        match record::decode(headers, self.payload.as_deref(), &decode_limits()) {
            Err(e) => e,
            Ok(_) => DecodeError::BadHeader { name: String::new(), reason: "decoded on a second attempt".into() },
        }
    }
}

/// An item of a range read.
#[derive(Debug)]
pub enum Item {
    /// A record of the requested key.
    Record(Arc<Rec>),
    /// Offsets `[from, to)` of the partition were not returned by the broker
    /// (deleted by retention or delete-records, compacted, or control
    /// records): the reader checks the low watermark.
    Hole {
        /// The first offset not returned.
        from: i64,
        /// The offset of the next record returned (or the end of the range).
        to: i64,
    },
}

/// How far a range read got; final once its channel is closed.
#[derive(Debug)]
pub struct Ticket {
    checked: AtomicI64,
    failed: Mutex<Option<ReplayError>>,
}

impl Ticket {
    /// Every offset below this was delivered or is not of the key.
    pub fn checked(&self) -> i64 {
        self.checked.load(Ordering::SeqCst)
    }

    /// The error that ended the read, if one did.
    pub fn take_error(&self) -> Option<ReplayError> {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn fail(&self, e: ReplayError) {
        *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
    }
}

/// A range read in progress: items until the channel closes, then the
/// ticket says how far it got.
#[derive(Debug)]
pub struct Range {
    /// The records of the key, in offset order, and the holes.
    pub rx: mpsc::Receiver<Item>,
    /// How far the read got, and the error that ended it, if any.
    pub ticket: Arc<Ticket>,
}

/// Items a range read may have waiting before the join takes them.
const RANGE_BUFFER: usize = 64;
/// A partition nobody asked the tail reader for this long is no longer
/// followed.
const FOLLOW_LINGER: Duration = Duration::from_secs(30);
/// The same for a backfill reader. It pauses a partition nobody reads after
/// `BACKFILL_PAUSE` (it takes no records, and no budget, while paused) and
/// keeps its cache and position this long: a client that comes back (its
/// connections last seconds, and a broker kill ends them all) finds its
/// records there and its sweep where it was. Dropped after 5 s, the sweep
/// started over from the client's token, and a new sweep waits seconds for
/// its first record (docs/reliability.md, "The runs of the late evening of
/// 2026-12-06").
const BACKFILL_LINGER: Duration = Duration::from_secs(30);
/// How long a backfill reader follows a partition nobody reads before it
/// pauses it: a join's next range, which starts where the last one ended,
/// comes well within it.
const BACKFILL_PAUSE: Duration = Duration::from_secs(1);
/// A paused partition fetches again from this many records below its
/// position, and the probe reads from earlier if the broker's first record
/// is past the position (see [`Probe`]).
const RESUME_BACK: i64 = 64;
/// Records the cache may hold past `cache_records` while a parked read
/// still needs its oldest ones (see [`Part::trim`]).
const PARKED_EXTRA: usize = 8_192;
/// A backfill reader's cache holds at least this many records per
/// partition: a client that reconnects a few seconds after its last item
/// finds its records there and rides on with the sweep, instead of sending
/// the reader back (at tansu's 5,000 records a second, about 6 s).
const BACKFILL_CACHE_RECORDS: usize = 32_768;
/// Bytes (keys, payloads, headers) a partition's cache holds at most,
/// whatever its record count: large payloads cannot make it huge.
const CACHE_MAX_BYTES: usize = 32 << 20;
/// A far read goes to a backfill reader that follows its partition from
/// below when it is at most this many records ahead of the reader's
/// position (the reader gets there in a second or two); further ahead, to
/// a reader free to start there.
const BACKFILL_AHEAD: i64 = 8_192;
/// Under a backfill budget, a far read below a backfill reader's cache
/// joins that reader's sweep of the partition (which moves back for it)
/// when it is at most this many records below the cache; further below, it
/// gets a sweep of its own ([`choose_backfill`]).
const SHARE_BACK: i64 = BACKFILL_CACHE_RECORDS as i64;
/// How long a read older than a backfill reader's cache waits for the reads
/// in progress to end before the reader moves back anyway (they go on from
/// the lower position; nothing is lost, they read some records again).
const BEHIND_MAX: Duration = Duration::from_secs(5);
/// How often a reader with parked reads looks whether their joins took
/// items.
const PARKED_POLL: Duration = Duration::from_millis(2);
/// How long a partition nobody watches any more stays polled, its marks
/// kept for [`History::polled`]: longer than a reconnect storm's gap
/// between a client's old joins ending and its new ones starting.
const KEEP_UNWATCHED: Duration = Duration::from_secs(30);
/// A watermark round that takes longer is said at warn level.
const SLOW_ROUND: Duration = Duration::from_secs(2);
/// How often the reader checks for stalled reads and idle partitions.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// How long a cached partition count is trusted.
const COUNT_TTL: Duration = Duration::from_secs(60);
/// The back-off after a topic's first failed partition-count look-up; it
/// doubles after each failed retry, up to `COUNT_MAX_BACKOFF` (the idea of
/// dualstream-kafka's `TopicCache`).
const COUNT_MIN_BACKOFF: Duration = Duration::from_millis(100);
const COUNT_MAX_BACKOFF: Duration = Duration::from_secs(30);
const COUNT_BACKOFF: Backoff = Backoff::new(COUNT_MIN_BACKOFF, COUNT_MAX_BACKOFF);

/// A topic's partition count, or its last failed look-up.
enum Count {
    Ready { count: i32, at: tokio::time::Instant },
    Failed { error: ReplayError, until: tokio::time::Instant, backoff: Duration },
}

/// Partition counts per topic. A cached count is read without waiting for
/// anything. One caller at a time looks a topic up; callers that arrive
/// meanwhile take the count as last read if there is one (past its TTL),
/// and otherwise wait for that one look-up and take its answer, all woken
/// at once. A failure is kept for a back-off (100 ms, doubling up to 30 s)
/// and returned at once meanwhile, so an outage costs one look-up per topic
/// and back-off, not one per waiting join in turn.
///
/// (A lock held across the look-up made every reader queue behind it, and
/// then pass the lock on one task at a time: under load, a turn each.)
#[derive(Default)]
pub(crate) struct CountCache {
    topics: Mutex<HashMap<String, Arc<CountSlot>>>,
}

/// One topic's count, and who is looking it up.
#[derive(Default)]
struct CountSlot {
    state: Mutex<(Option<Count>, bool)>,
    /// Told when a look-up ends (answered, or dropped unanswered).
    done: tokio::sync::Notify,
}

/// Marks a topic's look-up as under way; when dropped (answered or
/// cancelled), as over, waking whoever waits for it.
struct LookingUp<'a>(&'a CountSlot);

impl Drop for LookingUp<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner).1 = false;
        self.0.done.notify_waiters();
    }
}

impl CountCache {
    /// The partition count of `topic`: cached, or the cached failure, or
    /// what `look_up` answers now (or what another caller's look-up
    /// answers).
    pub(crate) async fn get<F>(&self, topic: &str, look_up: F) -> Result<i32, ReplayError>
    where
        F: std::future::Future<Output = Result<i32, ReplayError>>,
    {
        let slot = {
            let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(topics.entry(topic.to_owned()).or_default())
        };
        let backoff = loop {
            // Made before the state is read: a look-up that ends after that
            // wakes it.
            let ended = slot.done.notified();
            {
                let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
                let now = tokio::time::Instant::now();
                let (count, looking) = &mut *state;
                let backoff = match &*count {
                    Some(Count::Ready { count, at }) if now.duration_since(*at) < COUNT_TTL => return Ok(*count),
                    // Being looked up again: the count as last read.
                    Some(Count::Ready { count, .. }) if *looking => return Ok(*count),
                    Some(Count::Failed { error, until, .. }) if now < *until => return Err(error.replica()),
                    _ if *looking => None,
                    Some(Count::Failed { backoff, .. }) => Some(COUNT_BACKOFF.after(*backoff)),
                    _ => Some(COUNT_BACKOFF.first()),
                };
                if let Some(backoff) = backoff {
                    *looking = true;
                    break backoff;
                }
            }
            ended.await;
        };
        let _looking = LookingUp(&slot);
        let result = look_up.await;
        let now = tokio::time::Instant::now();
        slot.state.lock().unwrap_or_else(PoisonError::into_inner).0 = Some(match &result {
            Ok(count) => Count::Ready { count: *count, at: now },
            Err(e) => Count::Failed { error: e.replica(), until: now + backoff, backoff },
        });
        result
    }
}

/// Counters of the shared readers (for benchmarks and dashboards).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Kafka consumers open: one for metadata and watermarks, one per topic
    /// read.
    pub consumers: u64,
    /// Watermark look-ups sent to the broker (two list-offsets requests
    /// each).
    pub watermark_lookups: u64,
    /// Metadata look-ups sent to the broker.
    pub metadata_lookups: u64,
    /// Range reads asked for by joins.
    pub range_reads: u64,
    /// Range reads served entirely from the in-memory cache.
    pub range_reads_cached: u64,
    /// Times a backfill reader moved a partition's read position back for
    /// an older range (the tail reader never does; it hands such ranges to
    /// a backfill reader).
    pub seeks: u64,
    /// Range reads older than the tail reader's cache, handed to a backfill
    /// reader.
    pub backfill_reads: u64,
    /// Records read from Kafka by the shared readers.
    pub records_read: u64,
    /// Times a read waited, parked, because its join's buffer was full;
    /// the reader serves it from its cache once the join takes items.
    pub parked: u64,
    /// Parked reads dropped because the records they still needed left the
    /// cache (their joins ask again, from far back).
    pub parked_dropped: u64,
    /// Records held now in the readers' caches (the tail reader's and the
    /// backfill readers'), and their sizes as stored (key, payload,
    /// headers) summed: a gauge, not a count since the start.
    pub cached_records: u64,
    /// See `cached_records`.
    pub cached_bytes: u64,
}

#[derive(Default)]
struct Counters {
    consumers: AtomicU64,
    watermark_lookups: AtomicU64,
    metadata_lookups: AtomicU64,
    range_reads: AtomicU64,
    range_reads_cached: AtomicU64,
    seeks: AtomicU64,
    backfill_reads: AtomicU64,
    records_read: AtomicU64,
    parked: AtomicU64,
    parked_dropped: AtomicU64,
    cached: Arc<CacheGauge>,
}

/// What the readers' caches hold now, in records and stored bytes.
#[derive(Debug, Default)]
struct CacheGauge {
    records: AtomicI64,
    bytes: AtomicI64,
}

impl CacheGauge {
    fn change(&self, records: i64, bytes: i64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistoryStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HistoryStats {
            consumers: get(&self.consumers),
            watermark_lookups: get(&self.watermark_lookups),
            metadata_lookups: get(&self.metadata_lookups),
            range_reads: get(&self.range_reads),
            range_reads_cached: get(&self.range_reads_cached),
            seeks: get(&self.seeks),
            backfill_reads: get(&self.backfill_reads),
            records_read: get(&self.records_read),
            parked: get(&self.parked),
            parked_dropped: get(&self.parked_dropped),
            cached_records: self.cached.records.load(Ordering::Relaxed).max(0) as u64,
            cached_bytes: self.cached.bytes.load(Ordering::Relaxed).max(0) as u64,
        }
    }
}

/// A token bucket: `rate` tokens a second, at most one second's worth kept.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Self {
        Self { rate: f64::from(rate), tokens: f64::from(rate), at: now }
    }

    /// Refill for the time since the last call; `None` when a token is
    /// there, else how long until one is.
    fn wait(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.at = now;
        (self.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

/// The answer to a caller of [`History::fresh`].
type FreshReply = oneshot::Sender<(Result<Marks, ReplayError>, RoundTimes)>;

/// When the watermark round that answered a caller began and answered it:
/// with the caller's own clock, the three stages of its wait (waiting for
/// a round to begin, the round's look-up, waiting for its own next turn).
#[derive(Clone, Copy)]
struct RoundTimes {
    began: Instant,
    answered: Instant,
}
/// Range reads to a topic's reader task: the partition and the read.
type RangeSender = mpsc::UnboundedSender<(i32, Req)>;

struct Watched {
    tx: watch::Sender<Marks>,
    /// A round has answered for the partition: `tx` holds marks read from
    /// the broker, not the default.
    answered: bool,
    /// When the partition last had a watcher or a waiter (as the poller
    /// last saw it): it stays polled for `KEEP_UNWATCHED` after, so that
    /// joins that end and start again (a reconnect) find its marks.
    watched_at: Instant,
    /// Whether a caller waiting for the next round wants the low mark read
    /// in it ([`History::fresh_low`]); otherwise it is not read.
    low_wanted: bool,
    /// Callers of `fresh` waiting for the next poll round.
    waiting: Vec<FreshReply>,
}

impl Watched {
    fn new() -> Self {
        Self {
            tx: watch::channel(Marks::default()).0,
            answered: false,
            watched_at: Instant::now(),
            low_wanted: false,
            waiting: Vec::new(),
        }
    }
}

struct Inner {
    config: Arc<ReplayConfig>,
    poll_every: Duration,
    cache_records: usize,
    meta: Arc<BaseConsumer>,
    counts: CountCache,
    watched: Mutex<HashMap<Tp, Watched>>,
    wake: Notify,
    readers: Mutex<HashMap<Arc<str>, RangeSender>>,
    /// The backfill readers, per topic (at most `backfill_readers`): each
    /// far read goes to the one that serves it soonest ([`choose_backfill`]).
    backfill: Mutex<HashMap<Arc<str>, Vec<ReaderHandle>>>,
    backfill_readers: usize,
    /// Records a second the backfill readers may read together (none:
    /// unbounded), so that reads from far back cannot take the broker's
    /// whole read capacity from the tail reader ([`History::set_backfill_rate`]).
    budget: Mutex<Option<Bucket>>,
    /// Per partition, one past the highest offset the topic readers have
    /// received. A broker never returns a record at or above its high
    /// watermark, so this is at most the watermark on Apache Kafka; on a
    /// broker that under-reports its watermark (tansu 0.6 reports the last
    /// batch's base offset + 1), the poller raises the watermark to it, so
    /// the rest of that batch is not left unseen until the next write.
    seen: Arc<Mutex<HashMap<Tp, Arc<AtomicI64>>>>,
    /// Per partition, the tail reader's cache as joins may read it
    /// ([`Window`]). An entry stays once made (one per partition ever
    /// read); the reader empties it when it stops following the partition.
    windows: Mutex<HashMap<Tp, Arc<Window>>>,
    counters: Counters,
    poller_started: std::sync::Once,
}

/// The shared readers of one catch-up joiner (and its clones): one consumer
/// for metadata and watermarks, one record consumer per topic (and its
/// backfill readers), the watermark poller (see the module's description).
/// Cheap to clone.
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl History {
    /// Shared readers for `config`: watermarks polled every `poll_every`,
    /// the latest `cache_records` records of each partition read kept in
    /// memory, reads older than the cache served by `backfill_readers`
    /// consumers per topic. Makes the metadata consumer; the others start
    /// with the first read of their topic.
    pub fn new(
        config: Arc<ReplayConfig>,
        poll_every: Duration,
        cache_records: usize,
        backfill_readers: usize,
    ) -> Result<Self, ReplayError> {
        let meta: BaseConsumer = config.client_config()?.create()?;
        let inner = Inner {
            config,
            poll_every,
            cache_records,
            meta: Arc::new(meta),
            counts: CountCache::default(),
            watched: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            readers: Mutex::new(HashMap::new()),
            backfill: Mutex::new(HashMap::new()),
            backfill_readers: backfill_readers.max(1),
            budget: Mutex::new(None),
            seen: Arc::new(Mutex::new(HashMap::new())),
            windows: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            poller_started: std::sync::Once::new(),
        };
        Counters::add(&inner.counters.consumers, 1);
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Bound the records a second that the backfill readers read together
    /// (0: unbounded). A broker's read capacity is shared: tansu 0.6 on
    /// PostgreSQL reads about 10,000 records a second in all, and backfill
    /// readers going at full speed held the tail reader's fetches past its
    /// timeout. Once the budget is spent, the backfill readers stop taking
    /// records until it refills (librdkafka stops fetching once its
    /// prefetch queue is full); the tail reader is never held.
    pub fn set_backfill_rate(&self, records_per_sec: u32) {
        *self.inner.budget.lock().unwrap_or_else(PoisonError::into_inner) =
            (records_per_sec > 0).then(|| Bucket::new(records_per_sec, Instant::now()));
    }

    /// Counters of the shared readers.
    pub fn stats(&self) -> HistoryStats {
        self.inner.counters.snapshot()
    }

    fn timeout(&self) -> Duration {
        self.inner.config.timeout()
    }

    /// Run a blocking call on the metadata consumer off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BaseConsumer, Duration) -> Result<T, ReplayError> + Send + 'static,
    ) -> Result<T, ReplayError> {
        let meta = Arc::clone(&self.inner.meta);
        let timeout = self.timeout();
        tokio::task::spawn_blocking(move || f(&meta, timeout)).await.map_err(|e| ReplayError::Task(e.to_string()))?
    }

    /// The partition count of `topic`, cached for a minute; a failure is
    /// kept for a back-off ([`CountCache`]).
    pub async fn partition_count(&self, topic: &str) -> Result<i32, ReplayError> {
        let t = topic.to_owned();
        let look_up = async {
            Counters::add(&self.inner.counters.metadata_lookups, 1);
            self.blocking(move |c, timeout| crate::reader::partition_count(c, &t, timeout)).await
        };
        self.inner.counts.get(topic, look_up).await
    }

    /// The first offset whose timestamp is at or after `ts_ms` (the high
    /// watermark when there is none).
    pub async fn offset_for_time(&self, tp: &Tp, ts_ms: i64) -> Result<Option<i64>, ReplayError> {
        Counters::add(&self.inner.counters.metadata_lookups, 1);
        let (t, p) = (tp.0.to_string(), tp.1);
        self.blocking(move |c, timeout| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&t, p, Offset::Offset(ts_ms))?;
            let out = c.offsets_for_times(tpl, timeout)?;
            Ok(match out.find_partition(&t, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            })
        })
        .await
    }

    /// The partition's watermarks as polled: changes whenever a poll round
    /// sees them move. Keeping the receiver keeps the partition polled.
    pub fn watch(&self, tp: &Tp) -> watch::Receiver<Marks> {
        self.start_poller();
        let mut watched = self.inner.watched.lock().unwrap_or_else(PoisonError::into_inner);
        watched
            .entry(tp.clone())
            .or_insert_with(Watched::new)
            .tx
            .subscribe()
    }

    /// The partition's watermarks as last polled, without asking the broker
    /// (`None` if nobody has watched it in the last `KEEP_UNWATCHED`, or no
    /// round has answered for it yet). At most a poll (`poll_every`) and a
    /// round old while the poller keeps up; under load, older.
    pub fn polled(&self, tp: &Tp) -> Option<Marks> {
        let watched = self.inner.watched.lock().unwrap_or_else(PoisonError::into_inner);
        watched.get(tp).filter(|w| w.answered).map(|w| *w.tx.borrow())
    }

    /// Watermarks read from the broker after this call: waits for the next
    /// poll round, which serves every caller waiting for it. The high mark
    /// is read in that round; the low mark is the last one read (by
    /// [`fresh_low`](Self::fresh_low); 0 before): it only rises, as records
    /// are deleted, so a read below the true one is told of the missing
    /// records by its reader, and `fresh_low` tells whether they were
    /// deleted. (tansu 0.6 on PostgreSQL sorts a whole partition to answer
    /// the low mark: see `reader::watermarks_of`.)
    pub async fn fresh(&self, tp: &Tp) -> Result<Marks, ReplayError> {
        self.fresh_with(tp, false).await
    }

    /// Like [`fresh`](Self::fresh), with the low mark read in that round
    /// too: for telling deleted records from offsets that never held one.
    pub async fn fresh_low(&self, tp: &Tp) -> Result<Marks, ReplayError> {
        self.fresh_with(tp, true).await
    }

    async fn fresh_with(&self, tp: &Tp, low: bool) -> Result<Marks, ReplayError> {
        self.start_poller();
        let (reply, rx) = oneshot::channel();
        {
            let mut watched = self.inner.watched.lock().unwrap_or_else(PoisonError::into_inner);
            let w = watched.entry(tp.clone()).or_insert_with(Watched::new);
            w.waiting.push(reply);
            w.low_wanted |= low;
        }
        let asked = Instant::now();
        self.inner.wake.notify_one();
        let (marks, round) = rx.await.map_err(|_| ReplayError::Task("the watermark poller stopped".into()))?;
        let woken = Instant::now();
        if woken.duration_since(asked) > SLOW_ROUND {
            tracing::warn!(
                topic = %tp.0,
                partition = tp.1,
                before_round_ms = round.began.saturating_duration_since(asked).as_millis() as u64,
                round_ms = round.answered.saturating_duration_since(round.began).as_millis() as u64,
                after_answer_ms = woken.saturating_duration_since(round.answered).as_millis() as u64,
                "a wait for fresh watermarks was slow"
            );
        }
        marks
    }

    fn start_poller(&self) {
        let weak = Arc::downgrade(&self.inner);
        self.inner.poller_started.call_once(|| {
            tokio::spawn(poll_watermarks(weak));
        });
    }

    /// The tail reader's window on a partition's cache (empty until the
    /// reader follows the partition). A join looks it up once and keeps it.
    pub fn window(&self, tp: &Tp) -> Arc<Window> {
        let mut windows = self.inner.windows.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(windows.entry(tp.clone()).or_default())
    }

    /// The records of `key` in `[from, to)` of `window`'s partition, into
    /// `out`, when the tail reader's cache covered all of that range after
    /// its last record; `false` (and `out` untouched) when it did not, and
    /// the range is for [`read`](Self::read). Counted as a range read served
    /// from the cache.
    pub fn cached(&self, window: &Window, from: i64, to: i64, key: &[u8], out: &mut Vec<Arc<Rec>>) -> bool {
        let hit = window.take(from, to, key, out);
        if hit {
            Counters::add(&self.inner.counters.range_reads, 1);
            Counters::add(&self.inner.counters.range_reads_cached, 1);
        }
        hit
    }

    /// Read the records of `key` in `[from, to)` of a partition.
    pub fn read(&self, tp: &Tp, from: i64, to: i64, key: Arc<[u8]>) -> Result<Range, ReplayError> {
        Counters::add(&self.inner.counters.range_reads, 1);
        let (tx, rx) = mpsc::channel(RANGE_BUFFER);
        let ticket = Arc::new(Ticket { checked: AtomicI64::new(from), failed: Mutex::new(None) });
        let req = Req { next: from, to, key, tx, ticket: Arc::clone(&ticket) };
        let sender = {
            let mut readers = self.inner.readers.lock().unwrap_or_else(PoisonError::into_inner);
            match readers.get(&tp.0) {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.inner.spawn_reader(&tp.0, Role::Tail)?.sender;
                    readers.insert(Arc::clone(&tp.0), s.clone());
                    s
                }
            }
        };
        sender.send((tp.1, req)).map_err(|_| ReplayError::Task("the history reader stopped".into()))?;
        Ok(Range { rx, ticket })
    }
}

impl Inner {
    /// A topic reader task of `role` with a consumer of its own, and what it
    /// follows.
    fn spawn_reader(self: &Arc<Self>, topic: &Arc<str>, role: Role) -> Result<ReaderHandle, ReplayError> {
        let consumer: StreamConsumer = self.config.client_config()?.create()?;
        Counters::add(&self.counters.consumers, 1);
        let (s, r) = mpsc::unbounded_channel();
        let spans = Spans::default();
        let reader = TopicReader {
            topic: Arc::clone(topic),
            role,
            parts: HashMap::new(),
            spans: Arc::clone(&spans),
            cache_records: match role {
                Role::Tail => self.cache_records,
                Role::Backfill => self.cache_records.max(BACKFILL_CACHE_RECORDS),
            },
            seen: Arc::clone(&self.seen),
            timeout: self.config.timeout(),
            inner: Arc::downgrade(self),
            active: Instant::now(),
            gauge: Arc::clone(&self.counters.cached),
        };
        tokio::spawn(reader.run(consumer, r));
        Ok(ReaderHandle { sender: s, spans })
    }

    /// Hand a read from far back to one of the topic's backfill readers
    /// ([`choose_backfill`]); a read that cannot be handed over fails (its
    /// join ends with the error, nothing is skipped).
    fn backfill(self: &Arc<Self>, topic: &Arc<str>, p: i32, req: Req) {
        Counters::add(&self.counters.backfill_reads, 1);
        let sender = {
            let mut pool = self.backfill.lock().unwrap_or_else(PoisonError::into_inner);
            let readers = pool.entry(Arc::clone(topic)).or_default();
            readers.retain(|b| !b.sender.is_closed());
            let views: Vec<View> = readers.iter().map(|b| b.view(p)).collect();
            let high = self.known_high(&(Arc::clone(topic), p));
            let budgeted = self.budget.lock().unwrap_or_else(PoisonError::into_inner).is_some();
            let share = budgeted.then_some(SHARE_BACK);
            let chosen = choose_backfill(&views, req.next, high, self.backfill_readers, BACKFILL_AHEAD, share);
            tracing::debug!(%topic, partition = p, from = req.next, high, ?views, ?chosen, "far read routed");
            match chosen {
                Some(i) => Ok(readers[i].sender.clone()),
                None => self.spawn_reader(topic, Role::Backfill).map(|b| {
                    let s = b.sender.clone();
                    readers.push(b);
                    s
                }),
            }
        };
        match sender {
            Ok(s) => {
                if let Err(mpsc::error::SendError((_, req))) = s.send((p, req)) {
                    req.ticket.fail(ReplayError::Task("the backfill reader stopped".into()));
                }
            }
            Err(e) => req.ticket.fail(e),
        }
    }

    /// The highest offset known to exist in a partition, from the polled
    /// watermarks and what the readers received (0 when unknown).
    fn known_high(&self, tp: &Tp) -> i64 {
        let polled =
            self.watched.lock().unwrap_or_else(PoisonError::into_inner).get(tp).map_or(0, |w| w.tx.borrow().high);
        let seen =
            self.seen.lock().unwrap_or_else(PoisonError::into_inner).get(tp).map_or(0, |s| s.load(Ordering::Relaxed));
        polled.max(seen)
    }
}

/// The watermark poller: one round per `poll_every` for every watched
/// partition, and one as soon as someone waits for fresh watermarks.
async fn poll_watermarks(weak: Weak<Inner>) {
    let mut next_full = Instant::now();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let wait = next_full.saturating_duration_since(Instant::now());
        let full = tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = inner.wake.notified() => false,
        };
        let began = Instant::now();
        // Whom this round serves: waiters registered from now on need a
        // later round.
        let mut round: Vec<(Tp, Vec<FreshReply>)> = Vec::new();
        let mut low = Vec::new();
        {
            let mut watched = inner.watched.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            watched.retain(|_, w| {
                if w.tx.receiver_count() > 0 || !w.waiting.is_empty() {
                    w.watched_at = now;
                }
                now.duration_since(w.watched_at) < KEEP_UNWATCHED
            });
            for (tp, w) in watched.iter_mut() {
                if full || !w.waiting.is_empty() {
                    round.push((tp.clone(), std::mem::take(&mut w.waiting)));
                    low.push(std::mem::take(&mut w.low_wanted));
                }
            }
        }
        if full {
            next_full = Instant::now() + inner.poll_every;
        }
        if round.is_empty() {
            continue;
        }
        let meta = Arc::clone(&inner.meta);
        let timeout = inner.config.timeout();
        let tps: Vec<Tp> = round.iter().map(|(tp, _)| tp.clone()).collect();
        Counters::add(&inner.counters.watermark_lookups, tps.len() as u64);
        let n = round.len();
        let started = Instant::now();
        let looked_up =
            tokio::task::spawn_blocking(move || crate::reader::watermarks_of(&*meta, &tps, &low, timeout)).await;
        let results: Vec<Result<(Option<i64>, i64), rdkafka::error::KafkaError>> = match looked_up {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "watermark look-up task failed");
                vec![Err(rdkafka::error::KafkaError::Canceled); n]
            }
        };
        let took = started.elapsed();
        if took > SLOW_ROUND {
            // Everyone who asked for fresh watermarks meanwhile waits for
            // this round and the next: a gateway's subscribe among them.
            tracing::warn!(partitions = n, full, took_ms = took.as_millis() as u64, "watermark round slow");
        }
        let seen: HashMap<Tp, i64> = inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(tp, high)| (tp.clone(), high.load(Ordering::Relaxed)))
            .collect();
        let mut watched = inner.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let times = RoundTimes { began, answered: Instant::now() };
        for ((tp, waiting), result) in round.into_iter().zip(results) {
            match result {
                Ok((low, high)) => {
                    // A low mark not asked for this round is the last one
                    // known (0 at first): it only rises (records deleted),
                    // and a read below the true one is told of the hole by
                    // its reader.
                    let known = watched.get(&tp).map(|w| w.tx.borrow().low);
                    let marks = Marks::sane(low.or(known).unwrap_or(0), high);
                    let marks = match seen.get(&tp) {
                        Some(&high) if high > marks.high => Marks::sane(marks.low, high),
                        _ => marks,
                    };
                    if let Some(w) = watched.get_mut(&tp) {
                        w.tx.send_if_modified(|m| std::mem::replace(m, marks) != marks);
                        w.answered = true;
                    }
                    for reply in waiting {
                        let _ = reply.send((Ok(marks), times));
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "watermark look-up failed");
                    for reply in waiting {
                        let _ = reply.send((Err(ReplayError::Kafka(e.clone())), times));
                    }
                }
            }
        }
    }
}

/// The tail reader's cache of one partition as it stood after the reader's
/// last record, for joins to read in their own tasks ([`History::cached`]).
///
/// The reader brings it up to date at each `Part::publish`, under its lock,
/// so a join sees the cache's records and the span they cover
/// (`[covered_from, pos)`: every record the broker returned there) from one
/// moment, never a trimmed cache with the span before the trim. It holds
/// the cache's records (shared, one more count each), nothing of its own.
#[derive(Debug, Default)]
pub struct Window {
    state: Mutex<WindowState>,
    /// Ranges taken here so far: the reader's housekeeping counts the
    /// partition as used while this moves (no clock read per range).
    taken: AtomicU64,
}

#[derive(Debug, Default)]
struct WindowState {
    records: VecDeque<Arc<Rec>>,
    covered_from: i64,
    pos: i64,
}

impl Window {
    /// The records of `key` in `[from, to)` into `out`, when the window
    /// covers all of it (as `Part::serve_cached` would serve a read that is
    /// done at once); otherwise `false`.
    fn take(&self, from: i64, to: i64, key: &[u8], out: &mut Vec<Arc<Rec>>) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if from < state.covered_from || to > state.pos || from >= to {
            return false;
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
        let start = state.records.partition_point(|c| c.position.offset < from);
        out.extend(
            state
                .records
                .range(start..)
                .take_while(|r| r.position.offset < to)
                .filter(|r| r.key.as_deref() == Some(key))
                .cloned(),
        );
        true
    }

    /// Follow `cache`, which covers `[covered_from, pos)`: what left the
    /// cache leaves, what came in is added. A window that does not end on
    /// the same record as the cache at that offset (the reader moved back
    /// and read again) is built again from the whole cache.
    fn follow(&self, cache: &VecDeque<Arc<Rec>>, covered_from: i64, pos: i64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &mut *state;
        while s.records.front().is_some_and(|r| r.position.offset < covered_from) {
            s.records.pop_front();
        }
        while s.records.back().is_some_and(|r| r.position.offset >= pos) {
            s.records.pop_back();
        }
        let start = match s.records.back() {
            None => 0,
            Some(last) => {
                let at = cache.partition_point(|c| c.position.offset < last.position.offset);
                match cache.get(at) {
                    Some(same) if Arc::ptr_eq(same, last) => at + 1,
                    _ => {
                        s.records.clear();
                        0
                    }
                }
            }
        };
        s.records.extend(cache.range(start..).cloned());
        (s.covered_from, s.pos) = (covered_from, pos);
    }

    /// Ranges taken here so far.
    fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Nothing covered, nothing held (the reader stopped following the
    /// partition).
    fn clear(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *state = WindowState::default();
    }
}

/// One join's range read, inside the topic reader.
struct Req {
    /// The next offset to deliver (records below were delivered or skipped).
    next: i64,
    to: i64,
    key: Arc<[u8]>,
    tx: mpsc::Sender<Item>,
    ticket: Arc<Ticket>,
}

/// What a read does after a record was offered to it.
enum Step {
    /// It goes on.
    Go(Req),
    /// Its join's buffer is full: it waits, parked, at its `next` offset.
    Full(Req),
    /// It is done (or its join is gone).
    Done,
}

impl Req {
    /// Finish: every offset below `checked` was delivered or not of the key.
    fn finish(&self, checked: i64) {
        self.ticket.checked.store(checked, Ordering::SeqCst);
    }

    /// Offer a record.
    fn offer(mut self, rec: &Arc<Rec>) -> Step {
        let offset = rec.position.offset;
        if offset < self.next {
            return Step::Go(self);
        }
        if offset >= self.to {
            self.finish(self.to);
            return Step::Done;
        }
        if rec.key.as_deref() == Some(&*self.key) {
            use mpsc::error::TrySendError;
            match self.tx.try_send(Item::Record(Arc::clone(rec))) {
                Ok(()) => {}
                // The join is busy: the read is parked at this record.
                Err(TrySendError::Full(_)) => return Step::Full(self),
                Err(TrySendError::Closed(_)) => return Step::Done,
            }
        }
        self.next = offset + 1;
        if self.next >= self.to {
            self.finish(self.to);
            return Step::Done;
        }
        Step::Go(self)
    }

    /// Tell the reader about offsets the broker did not return.
    fn hole(mut self, from: i64, to: i64) -> Option<Self> {
        if to <= self.next || from >= self.to {
            return Some(self);
        }
        match self.tx.try_send(Item::Hole { from: from.max(self.next), to: to.min(self.to) }) {
            Ok(()) => {
                self.next = to.min(self.to);
                if self.next >= self.to {
                    self.finish(self.to);
                    return None;
                }
                Some(self)
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.finish(self.next);
                None
            }
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        }
    }
}

/// Checks that reading starts at or before the offsets wanted. Some
/// Kafka-compatible brokers (tansu 0.6) answer a fetch from an offset inside
/// a record batch with the *next* batch. After every assignment or seek to
/// an offset above 0, the first record decides: when it is past the lowest
/// offset a waiting read needs (`requested`, or the `next` of a read added
/// since), the reader seeks further back; otherwise reading starts at that
/// record, and the cache covers the partition from it, not from the seek's
/// target (the broker may have skipped records in between).
struct Probe {
    requested: i64,
    back: i64,
}

/// What a topic reader asks of its Kafka consumer (a test gives it a
/// broker of its own).
pub(crate) trait Fetcher {
    /// Start reading partition `p` at `offset`.
    fn assign(&self, topic: &str, p: i32, offset: i64) -> rdkafka::error::KafkaResult<()>;
    /// Move the read position of partition `p` to `offset`.
    fn seek(&self, topic: &str, p: i32, offset: i64, timeout: Duration) -> rdkafka::error::KafkaResult<()>;
    /// Stop reading partitions `ps`.
    fn unassign(&self, topic: &str, ps: &[i32]) -> rdkafka::error::KafkaResult<()>;
    /// Stop fetching partition `p` for now; it stays assigned.
    fn pause(&self, topic: &str, p: i32) -> rdkafka::error::KafkaResult<()>;
    /// Fetch partition `p` again (the reader seeks it then).
    fn resume(&self, topic: &str, p: i32) -> rdkafka::error::KafkaResult<()>;
}

impl Fetcher for StreamConsumer {
    fn assign(&self, topic: &str, p: i32, offset: i64) -> rdkafka::error::KafkaResult<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
        self.incremental_assign(&tpl)
    }

    fn seek(&self, topic: &str, p: i32, offset: i64, timeout: Duration) -> rdkafka::error::KafkaResult<()> {
        Consumer::seek(self, topic, p, Offset::Offset(offset), timeout)
    }

    fn unassign(&self, topic: &str, ps: &[i32]) -> rdkafka::error::KafkaResult<()> {
        let mut tpl = TopicPartitionList::new();
        for p in ps {
            tpl.add_partition(topic, *p);
        }
        self.incremental_unassign(&tpl)
    }

    fn pause(&self, topic: &str, p: i32) -> rdkafka::error::KafkaResult<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, p);
        Consumer::pause(self, &tpl)
    }

    fn resume(&self, topic: &str, p: i32) -> rdkafka::error::KafkaResult<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, p);
        Consumer::resume(self, &tpl)
    }
}

/// The reader's state of one partition.
struct Part {
    /// The next offset the consumer returns; records below are stale.
    pos: i64,
    /// Every record in `[covered_from, pos)` that the broker returned is in
    /// `cache`.
    covered_from: i64,
    cache: VecDeque<Arc<Rec>>,
    reqs: Vec<Req>,
    /// Reads whose join's buffer was full, waiting at their `next` offset
    /// (at or above `covered_from`); served from the cache.
    parked: Vec<Req>,
    /// Requests older than the cache, waiting for the position to move back.
    behind: Vec<Req>,
    /// Since when `behind` has not been empty.
    behind_since: Option<Instant>,
    /// The sizes of the records in `cache`, summed.
    cache_bytes: usize,
    probe: Option<Probe>,
    /// When a record last arrived or a read last started.
    progress: Instant,
    /// When a join last asked for this partition.
    used: Instant,
    /// Records received below the position since the last one at or above
    /// it.
    skipped: u64,
    /// One past the highest offset received, shared with the watermark
    /// poller (`Inner::seen`).
    seen: Arc<AtomicI64>,
    /// `covered_from` and `pos`, for the router of far reads.
    span: Arc<Span>,
    /// Whether the consumer's fetching of the partition is paused (a
    /// backfill reader's partition nobody reads, see `BACKFILL_PAUSE`).
    paused: bool,
    /// The joins' view of the cache (the tail reader's partitions only).
    window: Option<Arc<Window>>,
    /// The window's count of ranges taken at the last housekeeping.
    window_taken: u64,
    /// The readers' caches' gauge, which this cache is part of.
    gauge: Arc<CacheGauge>,
}

/// A partition no longer followed holds nothing: its records leave the
/// gauge, and its window is emptied.
impl Drop for Part {
    fn drop(&mut self) {
        self.gauge.change(-(self.cache.len() as i64), -(self.cache_bytes as i64));
        if let Some(w) = &self.window {
            w.clear();
        }
    }
}

impl Part {
    /// Tell the router where the cache and the position are, and bring the
    /// joins' window up to date.
    fn publish(&self) {
        self.span.covered_from.store(self.covered_from, Ordering::Relaxed);
        self.span.pos.store(self.pos, Ordering::Relaxed);
        if let Some(w) = &self.window {
            w.follow(&self.cache, self.covered_from, self.pos);
        }
    }

    /// The consumer was moved to `to`: nothing is covered below it any more,
    /// the cache is emptied, and `probe` judges the first record.
    fn restart_at(&mut self, to: i64, probe: Option<Probe>) {
        self.pos = to;
        self.covered_from = to;
        self.gauge.change(-(self.cache.len() as i64), -(self.cache_bytes as i64));
        self.cache.clear();
        self.cache_bytes = 0;
        self.probe = probe;
        self.publish();
    }

    /// Where a probe reads from next: the lowest offset a read waiting here
    /// needs (reads added since the seek may want less than it was made
    /// for), less 64 offsets, four times further each time; and the probe
    /// that goes with it.
    fn step_back(&self, probe: &Probe) -> (i64, Probe) {
        let need = self.reqs.iter().map(|r| r.next).fold(probe.requested, i64::min);
        let back = (probe.back * 4).max(64);
        ((need - back).max(0), Probe { requested: need, back })
    }

    /// Fetch a paused partition again: from a little below the position,
    /// with a probe, so that a broker that answers with the next batch
    /// (tansu) cannot make the records from the position on look missing;
    /// records below the position are skipped, the cache is kept.
    fn wake(&mut self, consumer: &impl Fetcher, topic: &str, p: i32, timeout: Duration) -> rdkafka::error::KafkaResult<()> {
        // The probe first: should the seek fail, a record past the position
        // still sends the reader back rather than open a hole.
        self.probe = (self.pos > 0).then_some(Probe { requested: self.pos, back: RESUME_BACK });
        self.paused = false;
        self.progress = Instant::now();
        consumer.resume(topic, p)?;
        consumer.seek(topic, p, (self.pos - RESUME_BACK).max(0), timeout)
    }

    /// Offer a read the cached records from its `next` on. `Step::Go` means
    /// it has them all and waits at the position for the next record.
    fn serve_cached(&self, r: Req) -> Step {
        let start = self.cache.partition_point(|c| c.position.offset < r.next);
        let mut step = Step::Go(r);
        for rec in self.cache.range(start..) {
            let Step::Go(r) = step else { break };
            step = r.offer(rec);
        }
        match step {
            Step::Go(mut r) => {
                r.next = r.next.max(self.pos);
                if r.next >= r.to {
                    r.finish(r.to);
                    return Step::Done;
                }
                Step::Go(r)
            }
            other => other,
        }
    }

    /// Serve the parked reads whose joins took items since, from the cache:
    /// up to the position, then they follow the partition again (or are
    /// parked once more). A read whose records left the cache is dropped
    /// with the offset it got to, and its join asks again. Returns the
    /// reads dropped.
    fn serve_parked(&mut self) -> u64 {
        let mut dropped = 0;
        for r in std::mem::take(&mut self.parked) {
            if r.tx.is_closed() {
                continue;
            }
            if r.next < self.covered_from {
                r.finish(r.next);
                dropped += 1;
                continue;
            }
            if r.tx.capacity() == 0 {
                self.parked.push(r);
                continue;
            }
            match self.serve_cached(r) {
                Step::Go(r) => self.reqs.push(r),
                Step::Full(r) => self.parked.push(r),
                Step::Done => {}
            }
        }
        dropped
    }

    /// Keep the cache at `cache_records` records. While a parked read still
    /// needs the oldest ones it may hold up to `PARKED_EXTRA` more: a
    /// reader hands its joins a whole fetch answer (thousands of records)
    /// in one go, faster than a join takes them, and a join that was dropped
    /// there asked again from older than the cache, so a backfill reader
    /// went back for it, again and again (the gateway's catch-up fell behind
    /// the tail for good in 20-minute chaos runs). Past that, the parked
    /// reads that need the oldest record are dropped with the offset they
    /// got to. Returns the reads dropped.
    fn trim(&mut self, cache_records: usize) -> u64 {
        let mut dropped = 0;
        while self.cache.len() > cache_records || self.cache_bytes > CACHE_MAX_BYTES {
            let Some(front) = self.cache.front().map(|r| r.position.offset) else { break };
            let needs = |r: &Req| r.next <= front && r.next >= self.covered_from;
            if self.parked.iter().any(needs) {
                if self.cache.len() <= cache_records + PARKED_EXTRA && self.cache_bytes <= CACHE_MAX_BYTES {
                    break;
                }
                let covered_from = self.covered_from;
                self.parked.retain(|r| {
                    let keep = !(r.next <= front && r.next >= covered_from);
                    if !keep {
                        r.finish(r.next);
                        dropped += 1;
                    }
                    keep
                });
            }
            if let Some(gone) = self.cache.pop_front() {
                self.cache_bytes -= gone.size;
                self.gauge.change(-1, -(gone.size as i64));
            }
            // What is left covers the partition from its first record, or,
            // once nothing is left (`cache_records` 0), from the position.
            self.covered_from = self.cache.front().map_or(self.pos, |front| front.position.offset);
        }
        dropped
    }
}

/// What a reader follows of one partition, for the router: its cache
/// covers `[covered_from, pos)`. Written by the reader as it reads.
#[derive(Debug, Default)]
struct Span {
    covered_from: AtomicI64,
    pos: AtomicI64,
}

/// A reader's spans per partition followed.
type Spans = Arc<Mutex<HashMap<i32, Arc<Span>>>>;

/// A reader task as the router of far reads sees it: where its reads go,
/// and what it follows.
struct ReaderHandle {
    sender: RangeSender,
    spans: Spans,
}

impl ReaderHandle {
    fn view(&self, p: i32) -> View {
        let spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        View {
            parts: spans.len(),
            span: spans.get(&p).map(|s| (s.covered_from.load(Ordering::Relaxed), s.pos.load(Ordering::Relaxed))),
        }
    }
}

/// One backfill reader, seen from a far read of partition `p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct View {
    /// Partitions it follows.
    parts: usize,
    /// Its `(covered_from, pos)` of `p`, when it follows `p`.
    span: Option<(i64, i64)>,
}

/// Which backfill reader takes a far read of a partition from `next`: an
/// index into `views`, or `None` to start a new reader. A reader has one
/// position per partition, so two reads far apart on one reader make it
/// move back and forth, and with clients resuming every few seconds from
/// scattered offsets a reader that moved back for each got almost nowhere.
/// In order of preference:
///
/// 1. a reader whose cache covers `next`, or that follows the partition from
///    below and reaches `next` within `ahead` records or before the read
///    would reach the partition's end (`high`) on a reader of its own:
///    scattered positions share one sweep instead of each scanning the
///    partition (on a broker that serves few records a second, separate
///    sweeps of one partition divide its reads between them and each gets
///    nowhere);
/// 2. with `share` (the readers have a budget): a reader that follows the
///    partition at all, from below however far, or from above when it
///    moves back at most `share` records below its cache; the nearest.
///    Under a budget the readers together take a fixed number of records
///    a second, so a second sweep of one partition halves the first's
///    rate, and two sweeps that each read less than the partition's write
///    rate both fall behind for good (docs/reliability.md, "The runs of
///    2026-12-06"). A read further below gets a sweep of its own, so that
///    a client resuming from offset 0 over and over cannot keep sending
///    the sweep of every other client back;
/// 3. a reader that follows nothing;
/// 4. a new reader, while there are fewer than `max`;
/// 5. the reader following the fewest partitions, among those that do not
///    follow this one: it starts reading it at `next`;
/// 6. a reader that follows the partition from below: it gets there;
/// 7. the reader that moves back least.
fn choose_backfill(views: &[View], next: i64, high: i64, max: usize, ahead: i64, share: Option<i64>) -> Option<usize> {
    let pick = |f: &dyn Fn(&View) -> Option<i64>| {
        views.iter().enumerate().filter_map(|(i, v)| f(v).map(|k| (k, i))).min().map(|(_, i)| i)
    };
    let reach = ahead.max(high - next);
    // Nearest first: the reader that gets there soonest.
    let covers =
        |v: &View| v.span.and_then(|(from, pos)| (from <= next && next <= pos + reach).then_some((next - pos).max(0)));
    let shares = |back: i64| {
        move |v: &View| v.span.and_then(|(from, pos)| (next >= from - back).then_some((next - pos).max(from - next)))
    };
    pick(&covers)
        .or_else(|| share.and_then(|back| pick(&shares(back))))
        .or_else(|| pick(&|v| (v.parts == 0).then_some(0)))
        .or((views.len() < max).then_some(usize::MAX))
        .or_else(|| pick(&|v| v.span.is_none().then_some(v.parts as i64)))
        .or_else(|| pick(&|v| v.span.and_then(|(_, pos)| (pos < next).then_some(next - pos))))
        .or_else(|| pick(&|v| v.span.map(|(from, _)| from - next)))
        .filter(|&i| i != usize::MAX)
}

/// What a topic reader serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Reads near the tail; an older read goes to a backfill reader.
    Tail,
    /// Reads from far back; an older read moves its position back.
    Backfill,
}

struct TopicReader {
    topic: Arc<str>,
    role: Role,
    parts: HashMap<i32, Part>,
    /// What it follows, for the router of far reads.
    spans: Spans,
    cache_records: usize,
    seen: Arc<Mutex<HashMap<Tp, Arc<AtomicI64>>>>,
    timeout: Duration,
    inner: Weak<Inner>,
    /// When the consumer last returned a record of any partition (or the
    /// reader last waited for its budget): see [`TopicReader::stalled`].
    active: Instant,
    /// What the readers' caches hold ([`HistoryStats::cached_bytes`]).
    gauge: Arc<CacheGauge>,
}

impl TopicReader {
    fn count(&self, f: impl FnOnce(&Counters) -> &AtomicU64, n: u64) {
        if let Some(inner) = self.inner.upgrade() {
            Counters::add(f(&inner.counters), n);
        }
    }

    async fn run(mut self, consumer: StreamConsumer, mut rx: mpsc::UnboundedReceiver<(i32, Req)>) {
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        let mut parked_poll = tokio::time::interval(PARKED_POLL);
        parked_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let throttled = self.throttled();
            tokio::select! {
                req = rx.recv() => {
                    let Some((p, req)) = req else { return };
                    self.add(&consumer, p, req);
                    while let Ok((p, req)) = rx.try_recv() {
                        self.add(&consumer, p, req);
                    }
                    self.move_back(&consumer);
                }
                // Waiting for the budget is not the broker's stall.
                () = tokio::time::sleep(throttled.unwrap_or_default()), if throttled.is_some() => self.active = Instant::now(),
                m = consumer.recv(), if !self.parts.is_empty() && throttled.is_none() => match m {
                    Ok(m) => self.on_message(&consumer, &m),
                    Err(e) => tracing::debug!(topic = %self.topic, role = ?self.role, error = %e, "history reader: consumer error"),
                },
                _ = parked_poll.tick(), if self.parts.values().any(|p| !p.parked.is_empty()) => self.serve_parked(),
                _ = tick.tick() => self.housekeeping(&consumer),
            }
        }
    }

    /// For a backfill reader whose budget is spent: how long until it may
    /// take a record again.
    fn throttled(&self) -> Option<Duration> {
        if self.role != Role::Backfill {
            return None;
        }
        let inner = self.inner.upgrade()?;
        let mut budget = inner.budget.lock().unwrap_or_else(PoisonError::into_inner);
        budget.as_mut()?.wait(Instant::now())
    }

    fn serve_parked(&mut self) {
        let dropped: u64 = self.parts.values_mut().map(Part::serve_parked).sum();
        if dropped > 0 {
            self.count(|c| &c.parked_dropped, dropped);
        }
    }

    /// Hand a read older than this tail reader's cache to a backfill
    /// reader.
    fn hand_off(&self, p: i32, req: Req) {
        match self.inner.upgrade() {
            Some(inner) => inner.backfill(&self.topic, p, req),
            None => req.ticket.fail(ReplayError::Task("the shared history was dropped".into())),
        }
    }

    fn add(&mut self, consumer: &impl Fetcher, p: i32, req: Req) {
        let now = Instant::now();
        let far = match self.parts.get(&p) {
            Some(part) => req.next < part.covered_from,
            None => {
                let high = self.inner.upgrade().map_or(0, |inner| inner.known_high(&(Arc::clone(&self.topic), p)));
                high - req.next > self.cache_records as i64
            }
        };
        if far && self.role == Role::Tail {
            self.hand_off(p, req);
            return;
        }
        if let Some(part) = self.parts.get_mut(&p) {
            part.used = now;
            if part.paused {
                if let Err(e) = part.wake(consumer, &self.topic, p, self.timeout) {
                    req.ticket.fail(e.into());
                    return;
                }
                tracing::debug!(topic = %self.topic, partition = p, at = part.pos, "backfill reader resumes a partition");
            }
            if far {
                part.behind.push(req);
                part.behind_since.get_or_insert(now);
                return;
            }
            // Serve what the cache has, then follow the partition.
            match part.serve_cached(req) {
                Step::Go(r) => {
                    if part.reqs.is_empty() {
                        part.progress = now;
                    }
                    part.reqs.push(r);
                }
                Step::Full(r) => {
                    part.parked.push(r);
                    self.count(|c| &c.parked, 1);
                }
                Step::Done => self.count(|c| &c.range_reads_cached, 1),
            }
            return;
        }
        if let Err(e) = consumer.assign(&self.topic, p, req.next) {
            req.ticket.fail(e.into());
            return;
        }
        tracing::debug!(topic = %self.topic, partition = p, from = req.next, "history reader follows a partition");
        let probe = (req.next > 0).then_some(Probe { requested: req.next, back: 0 });
        let seen = Arc::clone(
            self.seen.lock().unwrap_or_else(PoisonError::into_inner).entry((Arc::clone(&self.topic), p)).or_default(),
        );
        let span = Arc::new(Span { covered_from: AtomicI64::new(req.next), pos: AtomicI64::new(req.next) });
        self.spans.lock().unwrap_or_else(PoisonError::into_inner).insert(p, Arc::clone(&span));
        let window = match (self.role, self.inner.upgrade()) {
            (Role::Tail, Some(inner)) => {
                let mut windows = inner.windows.lock().unwrap_or_else(PoisonError::into_inner);
                Some(Arc::clone(windows.entry((Arc::clone(&self.topic), p)).or_default()))
            }
            _ => None,
        };
        if let Some(w) = &window {
            w.clear();
        }
        self.parts.insert(
            p,
            Part {
                pos: req.next,
                covered_from: req.next,
                cache: VecDeque::new(),
                reqs: vec![req],
                parked: Vec::new(),
                behind: Vec::new(),
                behind_since: None,
                cache_bytes: 0,
                probe,
                progress: now,
                used: now,
                skipped: 0,
                seen,
                span,
                paused: false,
                window_taken: window.as_ref().map_or(0, |w| w.taken()),
                window,
                gauge: Arc::clone(&self.gauge),
            },
        );
    }

    /// Move the read position of partitions with older requests back.
    ///
    /// Only once the reads in progress are done (or have failed): moving
    /// back under them throws away the answer the broker is building and
    /// makes them read again what they had, so with clients resuming every
    /// few seconds from scattered offsets a backfill reader that moved back
    /// for each of them got almost nowhere (tens of records a second
    /// against tansu, whose answers take about a second to build). The
    /// reads waiting meanwhile are served by one sweep from the oldest.
    /// But not for longer than `BEHIND_MAX`: with clients reconnecting all
    /// the time, the reads in progress need not end for minutes; then it
    /// moves back under them (they go on from there, reading again what
    /// they passed, and none is lost). Nor while the reads in progress have
    /// received nothing since the last move: then there is nothing to
    /// throw away but the fetch in flight, and the reads that come within
    /// a second of each other (every client of a gateway that restarted)
    /// start one sweep from the oldest instead of waiting seconds for it.
    fn move_back(&mut self, consumer: &impl Fetcher) {
        let mut seeks = 0;
        for (p, part) in &mut self.parts {
            let overdue = part.behind_since.is_some_and(|since| since.elapsed() >= BEHIND_MAX);
            let nothing_yet = part.cache.is_empty();
            if (!part.reqs.is_empty() || !part.parked.is_empty()) && !overdue && !nothing_yet {
                continue;
            }
            let Some(to) = part.behind.iter().map(|r| r.next).min() else {
                continue;
            };
            if let Err(e) = consumer.seek(&self.topic, *p, to, self.timeout) {
                for r in part.behind.drain(..) {
                    r.ticket.fail(e.clone().into());
                }
                continue;
            }
            seeks += 1;
            tracing::debug!(topic = %self.topic, partition = p, from = part.pos, to, overdue, reads = part.reqs.len(), "backfill reader moves back");
            part.restart_at(to, (to > 0).then_some(Probe { requested: to, back: 0 }));
            part.progress = Instant::now();
            part.reqs.append(&mut part.behind);
            part.behind_since = None;
            // Parked reads (above `to`) are served again by the sweep.
            let parked = std::mem::take(&mut part.parked);
            part.reqs.extend(parked);
        }
        if seeks > 0 {
            self.count(|c| &c.seeks, seeks);
        }
    }

    fn on_message(&mut self, consumer: &StreamConsumer, m: &BorrowedMessage<'_>) {
        let topic = Arc::clone(&self.topic);
        self.on_record(consumer, m.partition(), m.offset(), || decode_message(topic, m));
    }

    /// A record the consumer returned; `rec` decodes it (only when it is
    /// used).
    fn on_record(&mut self, consumer: &impl Fetcher, p: i32, offset: i64, rec: impl FnOnce() -> Rec) {
        self.active = Instant::now();
        let Some(part) = self.parts.get_mut(&p) else {
            return;
        };
        if offset < part.pos {
            // Records from before a seek, or a consumer that went back on
            // its own (an offset reset): skipped, and said at debug level.
            if part.skipped == 0 {
                tracing::debug!(topic = %self.topic, role = ?self.role, partition = p, offset, at = part.pos, "history reader: a record below the read position; skipping");
            }
            part.skipped += 1;
            return;
        }
        if part.skipped > 0 {
            tracing::debug!(topic = %self.topic, role = ?self.role, partition = p, skipped = part.skipped, offset, "history reader: back at the read position");
            part.skipped = 0;
        }
        if let Some(probe) = part.probe.take() {
            let (to, next_probe) = part.step_back(&probe);
            if offset > next_probe.requested && part.pos > 0 {
                tracing::debug!(
                    partition = p,
                    requested = next_probe.requested,
                    first = offset,
                    seek = to,
                    "first record past the requested offset; reading from earlier"
                );
                match consumer.seek(&self.topic, p, to, self.timeout) {
                    Ok(()) => {
                        part.restart_at(to, Some(next_probe));
                        return;
                    }
                    Err(e) => {
                        // Records below `offset` may exist and cannot be
                        // read now: the reads that want them fail (and
                        // their joins end with the error), none skips them.
                        tracing::warn!(partition = p, error = %e, "history reader: seek failed");
                        let (failing, going_on) =
                            std::mem::take(&mut part.reqs).into_iter().partition(|r| r.next < offset);
                        part.reqs = going_on;
                        for r in failing {
                            let r: Req = r;
                            r.ticket.fail(ReplayError::Kafka(e.clone()));
                        }
                    }
                }
            }
            if offset > part.pos && part.pos > 0 {
                // Reading starts here. A broker may have skipped records
                // between the seek's target and this one (tansu's next
                // batch), and no waiting read needs them: they are neither
                // a hole nor covered by the cache. A read that wants them
                // later moves the position back.
                part.pos = offset;
                part.covered_from = offset;
            }
        }
        part.progress = Instant::now();
        if offset > part.pos {
            let (from, to) = (part.pos, offset);
            part.reqs = std::mem::take(&mut part.reqs).into_iter().filter_map(|r| r.hole(from, to)).collect();
        }
        part.pos = offset + 1;
        part.seen.fetch_max(offset + 1, Ordering::Relaxed);
        let rec = Arc::new(rec());
        let mut parked = 0;
        for r in std::mem::take(&mut part.reqs) {
            match r.offer(&rec) {
                Step::Go(r) => part.reqs.push(r),
                Step::Full(r) => {
                    part.parked.push(r);
                    parked += 1;
                }
                Step::Done => {}
            }
        }
        part.cache_bytes += rec.size;
        part.gauge.change(1, rec.size as i64);
        part.cache.push_back(rec);
        let dropped = part.serve_parked() + part.trim(self.cache_records);
        part.publish();
        if let Some(inner) = self.inner.upgrade() {
            Counters::add(&inner.counters.records_read, 1);
            if self.role == Role::Backfill {
                if let Some(b) = inner.budget.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
                    b.take();
                }
            }
        }
        if parked > 0 {
            self.count(|c| &c.parked, parked);
        }
        if dropped > 0 {
            self.count(|c| &c.parked_dropped, dropped);
        }
    }

    /// Whether a partition's reads have waited too long for a record: no
    /// record of any partition within the timeout (the broker does not
    /// answer), or none of this one within three times it (its leader does
    /// not, on a cluster where others do). A partition's own silence alone
    /// is not enough within the timeout: the consumer hands out whole fetch
    /// answers, thousands of records of one partition, before the next
    /// partition's, and a busy process, or a backfill reader waiting for
    /// its budget, takes them slowly (joins failed so in chaos runs, tens of
    /// seconds after the last broker fault).
    fn stalled(&self, part: &Part, now: Instant) -> bool {
        let quiet = now.saturating_duration_since(part.progress);
        !part.reqs.is_empty()
            && ((quiet > self.timeout && now.saturating_duration_since(self.active) > self.timeout)
                || quiet > self.timeout * 3)
    }

    fn housekeeping(&mut self, consumer: &impl Fetcher) {
        let timeout = self.timeout;
        let now = Instant::now();
        let stalled: Vec<i32> =
            self.parts.iter().filter(|(_, part)| self.stalled(part, now)).map(|(p, _)| *p).collect();
        let linger = match self.role {
            Role::Tail => FOLLOW_LINGER,
            Role::Backfill => BACKFILL_LINGER,
        };
        let mut drop_parts = Vec::new();
        for (p, part) in &mut self.parts {
            part.reqs.retain(|r| !r.tx.is_closed());
            part.parked.retain(|r| !r.tx.is_closed());
            part.behind.retain(|r| !r.tx.is_closed());
            if part.behind.is_empty() {
                part.behind_since = None;
            }
            let probing = part.probe.as_ref().filter(|_| stalled.contains(p) && part.pos > 0);
            if let Some((to, next_probe)) = probing.map(|probe| part.step_back(probe)) {
                // No first record after a seek: tansu answers a fetch from
                // inside its partition's last batch with nothing at all (not
                // with the next batch, there is none), so the probe never
                // sees a record. Read from earlier, as when the first record
                // is past the offset; failing the reads would only make
                // their joins ask again at the same offset.
                tracing::debug!(topic = %self.topic, partition = p, requested = next_probe.requested, seek = to, "history reader: no first record after a seek; reading from earlier");
                match consumer.seek(&self.topic, *p, to, timeout) {
                    Ok(()) => {
                        part.restart_at(to, (to > 0).then_some(next_probe));
                        part.progress = now;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(topic = %self.topic, partition = p, error = %e, "history reader: seek failed")
                    }
                }
            }
            if stalled.contains(p) {
                tracing::warn!(topic = %self.topic, role = ?self.role, partition = p, at = part.pos, "history reader: no record within the timeout");
                for r in part.reqs.drain(..) {
                    r.ticket.fail(ReplayError::Timeout {
                        what: "reading a record below the high watermark",
                        timeout_ms: timeout.as_millis() as u64,
                    });
                }
            }
            let unread = part.reqs.is_empty() && part.parked.is_empty() && part.behind.is_empty();
            // A join that takes its ranges from the window uses the
            // partition as much as one that asks the reader.
            if let Some(taken) = part.window.as_ref().map(|w| w.taken()) {
                if taken != part.window_taken {
                    part.window_taken = taken;
                    part.used = now;
                }
            }
            if unread && part.used.elapsed() > linger {
                drop_parts.push(*p);
            } else if unread && self.role == Role::Backfill && !part.paused && part.used.elapsed() > BACKFILL_PAUSE {
                match consumer.pause(&self.topic, *p) {
                    Ok(()) => part.paused = true,
                    Err(e) => tracing::warn!(topic = %self.topic, partition = p, error = %e, "history reader: pause failed"),
                }
            }
        }
        // Reads that waited for the ones in progress to end.
        self.move_back(consumer);
        if drop_parts.is_empty() {
            return;
        }
        let mut spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        for p in &drop_parts {
            self.parts.remove(p);
            spans.remove(p);
        }
        drop(spans);
        if let Err(e) = consumer.unassign(&self.topic, &drop_parts) {
            tracing::warn!(topic = %self.topic, error = %e, "history reader: unassign failed");
        }
    }
}

/// A consumed record, decoded once for every join.
fn decode_message(topic: Arc<str>, m: &BorrowedMessage<'_>) -> Rec {
    let headers = m.headers().map_or(0, |h| h.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len)).sum());
    let size = m.key_len() + m.payload_len() + headers;
    let event = event_of(m).map_err(|_| Raw {
        headers: m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default(),
        payload: m.payload().map(<[u8]>::to_vec),
    });
    Rec {
        position: Position::new(topic, m.partition(), m.offset()),
        key: m.key().map(Box::from),
        timestamp_ms: m.timestamp().to_millis(),
        event,
        size,
    }
}

#[cfg(test)]
mod tests {
    //! The topic reader's state machine, driven record by record against a
    //! broker that answers like tansu 0.6: a fetch from an offset inside a
    //! record batch returns the next batch.

    use std::cell::{Cell, RefCell};

    use super::*;

    /// A partition `[0, end)` in batches of `batch` records; record `o` has
    /// key "a" when `o % 3 == 0`, "b" otherwise.
    struct Tansu {
        batch: i64,
        /// The first offset stored (fetches below it start there).
        first: i64,
        end: i64,
        at: Cell<i64>,
        seeks: RefCell<Vec<i64>>,
        paused: Cell<bool>,
    }

    impl Tansu {
        fn new(batch: i64, end: i64) -> Self {
            Self { batch, first: 0, end, at: Cell::new(end), seeks: RefCell::new(Vec::new()), paused: Cell::new(false) }
        }

        /// Where a fetch from `offset` starts: the batch's base when
        /// `offset` is one, else the next batch.
        fn fetch_from(&self, offset: i64) {
            let start = if offset % self.batch == 0 { offset } else { (offset / self.batch + 1) * self.batch };
            self.at.set(start.max(self.first).min(self.end));
            self.seeks.borrow_mut().push(offset);
        }

        /// The next record the consumer returns.
        fn next(&self) -> Option<i64> {
            let o = self.at.get();
            (o < self.end && !self.paused.get()).then(|| {
                self.at.set(o + 1);
                o
            })
        }
    }

    impl Fetcher for Tansu {
        fn assign(&self, _: &str, _: i32, offset: i64) -> rdkafka::error::KafkaResult<()> {
            self.fetch_from(offset);
            Ok(())
        }

        fn seek(&self, _: &str, _: i32, offset: i64, _: Duration) -> rdkafka::error::KafkaResult<()> {
            self.fetch_from(offset);
            Ok(())
        }

        fn unassign(&self, _: &str, _: &[i32]) -> rdkafka::error::KafkaResult<()> {
            Ok(())
        }

        fn pause(&self, _: &str, _: i32) -> rdkafka::error::KafkaResult<()> {
            self.paused.set(true);
            Ok(())
        }

        fn resume(&self, _: &str, _: i32) -> rdkafka::error::KafkaResult<()> {
            self.paused.set(false);
            Ok(())
        }
    }

    fn key_of(o: i64) -> &'static str {
        if o % 3 == 0 {
            "a"
        } else {
            "b"
        }
    }

    fn rec(o: i64) -> Rec {
        Rec {
            position: Position::new(Arc::from("t"), 0, o),
            key: Some(key_of(o).as_bytes().into()),
            timestamp_ms: None,
            event: Err(Raw { headers: Vec::new(), payload: None }),
            size: 100,
        }
    }

    fn reader(cache_records: usize) -> TopicReader {
        TopicReader {
            topic: Arc::from("t"),
            role: Role::Backfill,
            parts: HashMap::new(),
            spans: Spans::default(),
            cache_records,
            seen: Arc::default(),
            timeout: Duration::from_secs(1),
            inner: Weak::new(),
            active: Instant::now(),
            gauge: Arc::default(),
        }
    }

    /// What a range read received, as a join sees it.
    struct Read {
        rx: mpsc::Receiver<Item>,
        got: Vec<i64>,
        holes: Vec<(i64, i64)>,
    }

    impl Read {
        fn new(from: i64, to: i64, key: &str) -> (Req, Self) {
            let (tx, rx) = mpsc::channel(RANGE_BUFFER);
            let ticket = Arc::new(Ticket { checked: AtomicI64::new(from), failed: Mutex::new(None) });
            (
                Req { next: from, to, key: key.as_bytes().into(), tx, ticket },
                Self { rx, got: Vec::new(), holes: Vec::new() },
            )
        }

        fn drain(&mut self) {
            while let Ok(item) = self.rx.try_recv() {
                match item {
                    Item::Record(r) => self.got.push(r.position.offset),
                    Item::Hole { from, to } => self.holes.push((from, to)),
                }
            }
        }
    }

    /// Hand the reader the broker's records while `go_on(offset)`; every
    /// read takes its items after each record (none is dropped from the
    /// sweep).
    fn pump(r: &mut TopicReader, broker: &Tansu, reads: &mut [&mut Read], go_on: impl Fn(i64) -> bool) {
        while let Some(o) = broker.next() {
            r.on_record(broker, 0, o, || rec(o));
            for read in reads.iter_mut() {
                read.drain();
            }
            if !go_on(o) {
                return;
            }
        }
    }

    fn of_key(from: i64, to: i64, key: &str) -> Vec<i64> {
        (from..to).filter(|o| key_of(*o) == key).collect()
    }

    /// A read from 550 (key "b"), which assigns the partition there; the
    /// broker answers with the next batch (600), the probe seeks back to 486
    /// and the broker answers from 500, the batch after 486's. A read from
    /// 490 (key "a") is added once the records up to `a_until` were handed
    /// to the reader, after the seeks `seeks_before`. Each must get exactly
    /// its key's records, and no hole (every record exists).
    fn a_second_read_below_the_probe(a_until: i64, seeks_before: &[i64]) {
        let broker = Tansu::new(100, 1_000);
        let mut r = reader(4_096);
        let (req_a, mut a) = Read::new(550, 1_000, "b");
        r.add(&broker, 0, req_a);
        pump(&mut r, &broker, &mut [&mut a], |o| o < a_until);
        assert_eq!(*broker.seeks.borrow(), seeks_before);

        let (req_b, mut b) = Read::new(490, 1_000, "a");
        r.add(&broker, 0, req_b);
        r.move_back(&broker);
        pump(&mut r, &broker, &mut [&mut a, &mut b], |_| true);
        // A read older than the cache waits for the one in progress.
        r.move_back(&broker);
        pump(&mut r, &broker, &mut [&mut a, &mut b], |_| true);
        b.drain();
        assert_eq!(b.holes, [], "no hole: the records exist");
        assert_eq!(b.got, of_key(490, 1_000, "a"), "every record of the key from 490");
        assert_eq!(a.got, of_key(550, 1_000, "b"));
    }

    /// A reader of `cache_records` that follows partition 0 for `first`,
    /// with a window on its cache, as the tail reader has.
    fn with_window(broker: &Tansu, cache_records: usize, first: (Req, Read)) -> (TopicReader, Arc<Window>, Read) {
        let mut r = reader(cache_records);
        let window = Arc::new(Window::default());
        let (req, read) = first;
        r.add(broker, 0, req);
        r.parts.get_mut(&0).expect("part").window = Some(Arc::clone(&window));
        (r, window, read)
    }

    /// Every range a join takes from the window, it takes whole: exactly
    /// its key's records, through the probe's seek back, the cache's trim,
    /// and a move back that reads the partition again (other records at
    /// the same offsets); a range the window does not cover whole is left
    /// to the reader. The readers' cache gauge follows the cache, and a
    /// partition no longer followed leaves neither records nor a window.
    #[test]
    fn a_join_takes_from_the_window_only_ranges_it_covers_whole() {
        let broker = Tansu::new(100, 3_000);
        let (mut r, window, mut read) = with_window(&broker, 256, Read::new(550, 1_500, "b"));
        let (mut hits, mut misses, mut far) = (0, 0, None);
        while let Some(o) = broker.next() {
            r.on_record(&broker, 0, o, || rec(o));
            read.drain();
            for from in (0..=o).step_by(97).chain([o.saturating_sub(3), o]) {
                for to in [from + 1, from + 50, o, o + 1, o + 2] {
                    let mut got = Vec::new();
                    if window.take(from, to, b"a", &mut got) {
                        hits += 1;
                        let got: Vec<i64> = got.iter().map(|r| r.position.offset).collect();
                        assert_eq!(got, of_key(from, to, "a"), "[{from}, {to}) at {o}");
                    } else {
                        misses += 1;
                        assert!(got.is_empty());
                    }
                }
            }
            // Halfway, a read from long before the cache: the reader moves
            // back once the first read is done with what it has, and reads
            // the partition again from there.
            if o == 1_500 && far.is_none() {
                let (req, later) = Read::new(120, 3_000, "a");
                r.add(&broker, 0, req);
                far = Some(later);
            }
            if let Some(f) = far.as_mut() {
                f.drain();
            }
            r.move_back(&broker);
        }
        assert!(hits > 1_000 && misses > 1_000, "{hits} hits, {misses} misses");
        assert!(broker.seeks.borrow().contains(&120), "the reader moved back: {:?}", broker.seeks.borrow());
        let part = &r.parts[&0];
        assert_eq!(r.gauge.records.load(Ordering::Relaxed), part.cache.len() as i64);
        assert_eq!(r.gauge.bytes.load(Ordering::Relaxed), part.cache_bytes as i64);
        let mut got = Vec::new();
        assert!(window.take(2_900, 3_000, b"a", &mut got), "the tail is covered");
        r.parts.clear();
        assert_eq!((r.gauge.records.load(Ordering::Relaxed), r.gauge.bytes.load(Ordering::Relaxed)), (0, 0));
        assert!(!window.take(2_900, 3_000, b"a", &mut got), "nothing is covered once the partition is dropped");
        assert!(window.state.lock().expect("window").records.is_empty());
    }

    /// A partition whose joins take all their ranges from the window, and
    /// so ask the reader for none, stays followed; once nobody takes a
    /// range for the linger, the reader stops following it.
    #[test]
    fn a_partition_read_only_through_the_window_stays_followed() {
        let broker = Tansu::new(100, 300);
        let (mut r, window, mut read) = with_window(&broker, 4_096, Read::new(0, 300, "a"));
        pump(&mut r, &broker, &mut [&mut read], |_| true);
        assert_eq!(read.got, of_key(0, 300, "a"));
        let long_ago = Instant::now() - Duration::from_secs(60);
        let mut got = Vec::new();
        assert!(window.take(10, 200, b"a", &mut got));
        r.parts.get_mut(&0).expect("part").used = long_ago;
        r.housekeeping(&broker);
        assert!(r.parts.contains_key(&0), "a join took a range since the last look: still followed");
        r.parts.get_mut(&0).expect("part").used = long_ago;
        r.housekeeping(&broker);
        assert!(!r.parts.contains_key(&0), "nobody read it for the linger: no longer followed");
        assert!(!window.take(10, 200, b"a", &mut got), "and its window is empty");
    }

    /// The lost events of issue #19: the cache used to say it covered the
    /// partition from 486 while it held nothing below 500, so the read from
    /// 490, added later, was served from the cache from 500, skipping
    /// 490..499 without a hole or an error.
    #[test]
    fn a_read_added_after_a_probe_gets_the_records_the_broker_skipped() {
        a_second_read_below_the_probe(700, &[550, 486]);
    }

    /// The same seeks, with the second read added while the probe waits for
    /// its first record (nothing taken yet after the seek back): the
    /// broker's answer from 500 used to be reported to it as a hole 490..500,
    /// which a join takes for offsets that never held a record (the low
    /// watermark is 0) and skips.
    #[test]
    fn a_read_added_during_a_probe_gets_no_hole_for_records_the_broker_skipped() {
        a_second_read_below_the_probe(600, &[550, 486]);
    }

    /// A read from inside the partition's last batch: tansu answers with
    /// nothing (there is no next batch), so the probe never sees a first
    /// record. Once the reader counts as stalled it reads from earlier, and
    /// the read gets every record; it used to fail with a timeout, and its
    /// join asked again at the same offset, until a write made a next batch.
    #[test]
    fn a_read_inside_the_last_batch_reads_from_earlier_when_nothing_comes() {
        let broker = Tansu::new(20, 20);
        let mut r = reader(4_096);
        let (req, mut read) = Read::new(1, 20, "b");
        r.add(&broker, 0, req);
        pump(&mut r, &broker, &mut [&mut read], |_| true);
        assert!(read.got.is_empty(), "nothing comes from inside the last batch");
        let long_ago = Instant::now() - Duration::from_secs(4);
        r.active = long_ago;
        r.parts.get_mut(&0).expect("part").progress = long_ago;
        r.housekeeping(&broker);
        pump(&mut r, &broker, &mut [&mut read], |_| true);
        read.drain();
        assert_eq!(*broker.seeks.borrow(), [1, 0]);
        assert_eq!(read.holes, [], "no hole: the records exist");
        assert_eq!(read.got, of_key(1, 20, "b"), "every record of the key from 1");
    }

    /// Offsets the broker really does not have (its first batch starts at
    /// 200, the rest was deleted) are still reported as a hole once the
    /// probe has gone back to offset 0, so the join can say `Truncated`.
    #[test]
    fn offsets_missing_from_offset_0_on_are_a_hole() {
        let broker = Tansu { first: 200, ..Tansu::new(100, 1_000) };
        let mut r = reader(4_096);
        let (req, mut read) = Read::new(150, 400, "a");
        r.add(&broker, 0, req);
        pump(&mut r, &broker, &mut [&mut read], |_| true);
        read.drain();
        assert_eq!(read.holes.first(), Some(&(150, 200)), "seeks: {:?}", broker.seeks.borrow());
        assert_eq!(read.got, of_key(200, 400, "a"));
    }

    /// `cache_records = 0`: the cache holds nothing, so it covers nothing
    /// below the read position. A read from an offset already passed moves
    /// the position back (it used to be served from the empty cache and
    /// skip to the position).
    #[test]
    fn without_a_cache_an_older_read_moves_the_position_back() {
        let broker = Tansu::new(100, 1_000);
        let mut r = reader(0);
        let (req_a, mut a) = Read::new(0, 1_000, "b");
        r.add(&broker, 0, req_a);
        pump(&mut r, &broker, &mut [&mut a], |o| o < 299);

        let (req_b, mut b) = Read::new(100, 1_000, "a");
        r.add(&broker, 0, req_b);
        r.move_back(&broker);
        pump(&mut r, &broker, &mut [&mut a, &mut b], |_| true);
        r.move_back(&broker);
        pump(&mut r, &broker, &mut [&mut a, &mut b], |_| true);
        b.drain();
        assert_eq!(b.holes, []);
        assert_eq!(b.got, of_key(100, 1_000, "a"));
        assert_eq!(a.got, of_key(0, 1_000, "b"));
    }

    /// A read of "b" from 500, followed to 700, then a read of "a" from 100
    /// (older than the 64-record cache), and a move back asked for.
    fn a_read_behind_a_read_in_progress() -> (Tansu, TopicReader, Read, Read) {
        let broker = Tansu::new(1, 1_000);
        let mut r = reader(64);
        let (req_a, mut a) = Read::new(500, 1_000, "b");
        r.add(&broker, 0, req_a);
        pump(&mut r, &broker, &mut [&mut a], |o| o < 700);
        let (req_b, b) = Read::new(100, 400, "a");
        r.add(&broker, 0, req_b);
        r.move_back(&broker);
        (broker, r, a, b)
    }

    /// A backfill reader does not move back under a read in progress: a
    /// read from older than its cache waits until the reads in progress are
    /// done, then one move back serves it (and every read that waited with
    /// it). It used to move back at once, throwing away the broker's answer
    /// in the making and the reads' progress; with clients resuming every
    /// few seconds from scattered offsets it got almost nowhere.
    #[test]
    fn a_backfill_reader_moves_back_only_once_the_reads_in_progress_are_done() {
        let (broker, mut r, mut a, mut b) = a_read_behind_a_read_in_progress();
        assert_eq!(*broker.seeks.borrow(), [500], "no move back while a read is in progress");
        pump(&mut r, &broker, &mut [&mut a, &mut b], |_| true);
        assert_eq!(a.got, of_key(500, 1_000, "b"), "the read in progress went on to its end");
        assert!(b.got.is_empty(), "the older read waited");
        r.move_back(&broker);
        assert_eq!(*broker.seeks.borrow(), [500, 100], "then one move back");
        pump(&mut r, &broker, &mut [&mut a, &mut b], |_| true);
        b.drain();
        assert_eq!((b.got, b.holes), (of_key(100, 400, "a"), vec![]));
    }

    /// Hand the reader the broker's records in answers of `answer` records;
    /// the joins take their items between answers only (a reader goes
    /// through a whole fetch answer faster than a join takes it), and the
    /// reader serves its parked reads until they have caught up.
    fn pump_in_answers(r: &mut TopicReader, broker: &Tansu, reads: &mut [&mut Read], answer: usize) {
        loop {
            let mut n = 0;
            while n < answer {
                let Some(o) = broker.next() else { break };
                r.on_record(broker, 0, o, || rec(o));
                n += 1;
            }
            loop {
                for read in reads.iter_mut() {
                    read.drain();
                }
                r.serve_parked();
                if r.parts.values().all(|p| p.parked.is_empty()) {
                    break;
                }
            }
            if n == 0 {
                return;
            }
        }
    }

    /// A join whose buffer fills in the middle of a fetch answer is parked
    /// and served from the cache once it takes its items: one read from the
    /// start, no move back. It used to be dropped from the sweep there, ask
    /// again from older than the cache (the rest of the answer had pushed
    /// its records out), and send the backfill reader back, once per
    /// answer and join: the gateway's catch-up fell behind the tail for good
    /// in 20-minute chaos runs.
    #[test]
    fn a_join_that_falls_behind_within_an_answer_is_parked_not_sent_back() {
        let broker = Tansu::new(1_000, 3_000);
        let mut r = reader(256);
        let (req, mut a) = Read::new(0, 3_000, "a");
        let ticket = Arc::clone(&req.ticket);
        r.add(&broker, 0, req);
        pump_in_answers(&mut r, &broker, &mut [&mut a], 1_000);
        a.drain();
        assert_eq!((a.got, a.holes), (of_key(0, 3_000, "a"), vec![]));
        assert_eq!(ticket.checked(), 3_000, "read to its end");
        assert_eq!(*broker.seeks.borrow(), [0], "no move back");
    }

    /// A join that takes nothing holds the cache only up to `PARKED_EXTRA`
    /// records past `cache_records`; then its read is dropped with the
    /// offset it got to (so its join asks again from there, skipping
    /// nothing), and the cache is back to its size.
    #[test]
    fn a_parked_read_is_dropped_where_it_stopped_once_the_cache_is_full() {
        let end = (PARKED_EXTRA + 2_000) as i64;
        let broker = Tansu::new(1, end);
        let mut r = reader(16);
        let (req, mut a) = Read::new(0, end, "a");
        let ticket = Arc::clone(&req.ticket);
        r.add(&broker, 0, req);
        while let Some(o) = broker.next() {
            r.on_record(&broker, 0, o, || rec(o));
        }
        a.drain();
        let first_not_taken = 3 * RANGE_BUFFER as i64;
        assert_eq!(a.got, of_key(0, first_not_taken, "a"), "its buffer's worth");
        assert_eq!(ticket.checked(), first_not_taken, "it asks again from the record it did not take");
        assert!(a.rx.is_closed() || r.parts[&0].parked.is_empty(), "no longer parked");
        assert!(r.parts[&0].cache.len() <= 16 + PARKED_EXTRA);
        assert_eq!(r.parts[&0].cache.len(), 16, "the cache shrank back once nobody needed its oldest records");
    }

    /// A read older than the cache moves the reader back at once while the
    /// reads in progress have received nothing since its last move (the
    /// resumes after a gateway restart arrive within a second): one sweep
    /// from the oldest serves them all.
    #[test]
    fn a_read_behind_moves_back_at_once_while_nothing_has_been_read() {
        let broker = Tansu::new(1, 1_000);
        let mut r = reader(64);
        let (req_a, mut a) = Read::new(500, 1_000, "b");
        r.add(&broker, 0, req_a);
        let (req_b, mut b) = Read::new(100, 400, "a");
        r.add(&broker, 0, req_b);
        r.move_back(&broker);
        assert_eq!(*broker.seeks.borrow(), [500, 100], "moved back before any record came");
        pump(&mut r, &broker, &mut [&mut a, &mut b], |_| true);
        a.drain();
        b.drain();
        assert_eq!((b.got, b.holes), (of_key(100, 400, "a"), vec![]));
        assert_eq!((a.got, a.holes), (of_key(500, 1_000, "b"), vec![]));
    }

    /// A backfill reader pauses a partition nobody reads and keeps its
    /// cache and position: a client that comes back from inside the cache
    /// is served from it, and the sweep goes on from where it was (fetching
    /// from a little below it, and from further back when the broker's
    /// first record is past it), with nothing missing. It used to drop the
    /// partition 5 s after its last read and start over.
    #[test]
    fn a_paused_sweep_keeps_its_cache_and_goes_on_from_its_position() {
        // 300: the broker's answer starts at the position; 398: past it
        // (its next batch starts at 400, and 398 is a record of "b").
        for stop in [300, 398] {
            let broker = Tansu::new(100, 1_000);
            let mut r = reader(1_000);
            let (req, mut a) = Read::new(100, stop, "a");
            r.add(&broker, 0, req);
            pump(&mut r, &broker, &mut [&mut a], |o| o + 1 < stop);
            a.drain();
            assert_eq!((a.got, a.holes), (of_key(100, stop, "a"), vec![]));
            r.housekeeping(&broker);
            assert!(!r.parts[&0].paused, "not within BACKFILL_PAUSE of its last read");
            r.parts.get_mut(&0).expect("part").used = Instant::now() - BACKFILL_PAUSE * 2;
            r.housekeeping(&broker);
            assert!(r.parts[&0].paused && broker.paused.get(), "paused");
            assert_eq!(broker.next(), None, "nothing fetched while paused");
            let (req, mut b) = Read::new(150, 800, "b");
            r.add(&broker, 0, req);
            assert!(!r.parts[&0].paused && !broker.paused.get(), "resumed");
            pump(&mut r, &broker, &mut [&mut b], |_| true);
            b.drain();
            assert_eq!((b.got, b.holes), (of_key(150, 800, "b"), vec![]), "stop {stop}: the cache, then the sweep");
        }
    }

    /// A read older than the cache does not wait for ever: after
    /// `BEHIND_MAX` the backfill reader moves back under the read in
    /// progress, and both get every record of their key.
    #[test]
    fn a_read_behind_waits_for_the_reads_in_progress_at_most_behind_max() {
        let (broker, mut r, mut a, mut b) = a_read_behind_a_read_in_progress();
        assert_eq!(*broker.seeks.borrow(), [500], "the read in progress goes on");
        r.parts.get_mut(&0).expect("followed").behind_since = Some(Instant::now() - BEHIND_MAX);
        r.move_back(&broker);
        assert_eq!(*broker.seeks.borrow(), [500, 100], "moved back under it once overdue");
        pump(&mut r, &broker, &mut [&mut a, &mut b], |_| true);
        a.drain();
        b.drain();
        assert_eq!((b.got, b.holes), (of_key(100, 400, "a"), vec![]));
        assert_eq!((a.got, a.holes), (of_key(500, 1_000, "b"), vec![]), "the read in progress lost nothing");
    }

    /// Large records: the cache keeps at most `CACHE_MAX_BYTES`, whatever
    /// `cache_records` says.
    #[test]
    fn the_cache_is_bounded_in_bytes() {
        let broker = Tansu::new(1, 100);
        let mut r = reader(4_096);
        let (req, mut a) = Read::new(0, 100, "a");
        r.add(&broker, 0, req);
        while let Some(o) = broker.next() {
            r.on_record(&broker, 0, o, || Rec { size: 1 << 20, ..rec(o) });
            a.drain();
        }
        assert_eq!(a.got, of_key(0, 100, "a"));
        let part = &r.parts[&0];
        assert_eq!((part.cache.len(), part.cache_bytes), (32, 32 << 20));
        assert_eq!(part.covered_from, 68);
    }

    fn failure() -> ReplayError {
        use rdkafka::error::KafkaError;
        ReplayError::Kafka(KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure))
    }

    /// A look-up of topic a that has not answered holds up the callers of
    /// a only: b is looked up and answered meanwhile (one lock for every
    /// topic used to hold b behind a).
    #[tokio::test(start_paused = true)]
    async fn a_pending_look_up_holds_up_its_topic_only() {
        let cache = Arc::new(CountCache::default());
        let (release, released) = oneshot::channel::<()>();
        let (started, a_started) = oneshot::channel::<()>();
        let a = tokio::spawn({
            let cache = Arc::clone(&cache);
            async move {
                cache
                    .get("a", async {
                        let _ = started.send(());
                        let _ = released.await;
                        Err(failure())
                    })
                    .await
            }
        });
        a_started.await.expect("a's look-up started");
        assert_eq!(cache.get("b", async { Ok(3) }).await.ok(), Some(3), "b answered while a waits");
        assert!(!a.is_finished());
        let _ = release.send(());
        assert!(a.await.expect("task").is_err());
    }

    /// A failure is returned from the cache until its back-off ends (100 ms,
    /// then 200 ms after a failed retry), then looked up again once; a
    /// success is kept.
    #[tokio::test(start_paused = true)]
    async fn a_failed_look_up_is_kept_for_a_doubling_back_off() {
        let cache = CountCache::default();
        let calls = AtomicU64::new(0);
        let look_up = |ok: bool| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if ok {
                    Ok(4)
                } else {
                    Err(failure())
                }
            }
        };
        let ms = |n| tokio::time::advance(Duration::from_millis(n));
        assert!(cache.get("a", look_up(false)).await.is_err());
        ms(99).await;
        assert!(cache.get("a", async { unreachable!("within the back-off") }).await.is_err());
        ms(1).await;
        assert!(cache.get("a", look_up(false)).await.is_err(), "retried after 100 ms");
        ms(199).await;
        assert!(cache.get("a", async { unreachable!("within the doubled back-off") }).await.is_err());
        ms(1).await;
        assert_eq!(cache.get("a", look_up(true)).await.ok(), Some(4), "retried after 200 ms");
        assert_eq!(cache.get("a", async { unreachable!("cached") }).await.ok(), Some(4));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// A count past its TTL is read at once while one caller looks it up
    /// again: a cached read never waits for a look-up. (A lock held across
    /// the look-up made every reader queue behind it, then pass the lock on
    /// one task at a time: in a reconnect storm, a turn of a busy runtime
    /// each.)
    #[tokio::test(start_paused = true)]
    async fn a_cached_count_is_read_while_it_is_looked_up_again() {
        let cache = CountCache::default();
        assert_eq!(cache.get("t", async { Ok(3) }).await.expect("looked up"), 3);
        tokio::time::advance(Duration::from_secs(61)).await;
        // One caller looks it up again and has no answer yet.
        let mut refresh = Box::pin(cache.get("t", std::future::pending()));
        assert!(futures::poll!(refresh.as_mut()).is_pending());
        let second = async { Err(ReplayError::Task("a second look-up".into())) };
        let read = tokio::time::timeout(Duration::from_secs(1), cache.get("t", second)).await;
        assert_eq!(read.expect("not held up by the look-up").expect("the count as last read"), 3);
    }

    /// A look-up dropped unanswered hands the look-up to a caller that was
    /// waiting for it, which is woken and not left waiting.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_look_up_wakes_its_waiters() {
        let cache = CountCache::default();
        let mut first = Box::pin(cache.get("u", std::future::pending()));
        assert!(futures::poll!(first.as_mut()).is_pending());
        let mut second = Box::pin(cache.get("u", async { Ok(5) }));
        assert!(futures::poll!(second.as_mut()).is_pending(), "it waits for the look-up under way");
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(1), second).await;
        assert_eq!(got.expect("woken when the first look-up was dropped").expect("its own look-up"), 5);
    }

    fn following(covered_from: i64, pos: i64, parts: usize) -> View {
        View { parts, span: Some((covered_from, pos)) }
    }

    fn other(parts: usize) -> View {
        View { parts, span: None }
    }

    /// Far reads go where nothing has to move back: a reader that covers
    /// the offset or gets there soon, an idle one, a new one, one that does
    /// not follow the partition; only then one that moves back, the least.
    #[test]
    fn a_far_read_goes_to_the_reader_that_serves_it_soonest() {
        // The partition ends at 10,000.
        let choose = |views: &[View], next| choose_backfill(views, next, 10_000, 3, 100, None);
        // Covered, or at most `ahead` past the position.
        assert_eq!(choose(&[following(0, 50, 1), following(1_000, 2_000, 1)], 1_500), Some(1));
        assert_eq!(choose(&[following(0, 50, 1), following(1_000, 2_000, 1)], 2_100), Some(1));
        assert_eq!(choose(&[following(0, 50, 1), following(1_000, 2_000, 1)], 20), Some(0));
        // Ahead of a reader, nearer to it than to the partition's end: that
        // reader's sweep, the nearest (not a sweep of its own).
        assert_eq!(choose(&[following(0, 50, 1), other(0)], 5_000), Some(0));
        assert_eq!(choose(&[following(0, 50, 1), following(1_000, 2_000, 1)], 5_000), Some(1));
        assert_eq!(choose(&[following(1_000, 2_000, 1), following(0, 50, 1)], 6_000), Some(0));
        // Nearer to the end: an idle reader, then a new one (fewer than 3).
        assert_eq!(choose(&[following(0, 50, 1), other(0)], 7_000), Some(1));
        assert_eq!(choose(&[following(0, 50, 1), following(1_000, 2_000, 1)], 7_000), None);
        assert_eq!(choose(&[], 5_000), None);
        // Three readers: one that does not follow the partition, the least busy.
        let full = [following(1_000, 2_000, 1), other(3), other(2)];
        assert_eq!(choose(&full, 500), Some(2));
        // All follow it: the one that reaches the offset first from below...
        let all = [following(6_000, 7_000, 1), following(0, 300, 2), following(0, 900, 2)];
        assert_eq!(choose(&all, 5_000), Some(2));
        // ...and when all are past it, the one that moves back least.
        let past = [following(3_000, 4_000, 1), following(1_000, 2_000, 1), following(2_000, 2_500, 1)];
        assert_eq!(choose(&past, 500), Some(1));
        // A pool of one: always that one.
        assert_eq!(choose_backfill(&[following(3_000, 4_000, 1)], 0, 10_000, 1, 100, None), Some(0));
    }

    /// Under a budget, a far read of a partition that a reader follows goes
    /// to that reader's sweep: from below however far ahead, from above
    /// when it is at most `back` records below the cache. Two sweeps of one
    /// partition would split the budget between them.
    #[test]
    fn under_a_budget_far_reads_of_a_partition_share_its_sweep() {
        let choose = |views: &[View], next| choose_backfill(views, next, 10_000, 3, 100, Some(500));
        let one = [following(1_000, 2_000, 1), other(0)];
        // Nearer to the end than to the position: the sweep, not the idle reader.
        assert_eq!(choose(&one, 9_000), Some(0));
        // Below the cache within `back`: the sweep moves back for it.
        assert_eq!(choose(&one, 500), Some(0));
        // Further below: a sweep of its own (the idle reader, then a new one).
        assert_eq!(choose(&one, 499), Some(1));
        assert_eq!(choose(&[following(1_000, 2_000, 1)], 100), None);
        // Below two sweeps: the one whose cache starts nearest above.
        let two = [following(5_000, 6_000, 1), following(1_000, 2_000, 1)];
        assert_eq!(choose(&two, 4_600), Some(1), "reader 1 reaches it from below");
        assert_eq!(choose(&two, 800), Some(1));
        let two = [following(1_200, 2_000, 1), following(1_000, 2_000, 1)];
        assert_eq!(choose(&two, 800), Some(1));
        // A reader that follows other partitions only is no sweep of this one.
        assert_eq!(choose(&[other(2)], 3_000), None);
    }

    /// The reader tells the router what its cache covers as it reads, after
    /// moving back, and stops once it no longer follows the partition.
    #[test]
    fn a_reader_publishes_what_its_cache_covers() {
        let broker = Tansu::new(1, 1_000);
        let mut r = reader(100);
        let (req, _read) = Read::new(500, 1_000, "a");
        r.add(&broker, 0, req);
        let span = |r: &TopicReader| {
            r.spans
                .lock()
                .expect("spans")
                .get(&0)
                .map(|s| (s.covered_from.load(Ordering::Relaxed), s.pos.load(Ordering::Relaxed)))
        };
        assert_eq!(span(&r), Some((500, 500)));
        for _ in 0..150 {
            let o = broker.next().expect("a record");
            r.on_record(&broker, 0, o, || rec(o));
        }
        assert_eq!(span(&r), Some((550, 650)), "the last 100 records");
        let (far, _far) = Read::new(10, 1_000, "b");
        r.add(&broker, 0, far);
        r.parts.get_mut(&0).expect("part").reqs.clear();
        r.move_back(&broker);
        assert_eq!(span(&r), Some((10, 10)), "moved back");
        r.parts.get_mut(&0).expect("part").reqs.clear();
        r.parts.get_mut(&0).expect("part").used = Instant::now() - BACKFILL_LINGER * 2;
        r.housekeeping(&broker);
        assert_eq!(span(&r), None, "no longer followed");
    }

    /// The backfill budget: a second's worth at most, refilled at its rate.
    #[test]
    fn the_backfill_budget_refills_at_its_rate_and_keeps_one_second() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, t0);
        for _ in 0..10 {
            assert_eq!(b.wait(t0), None);
            b.take();
        }
        let wait = b.wait(t0).expect("spent");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        let half = b.wait(t0 + Duration::from_millis(50)).expect("half a token");
        assert!((half.as_secs_f64() - 0.05).abs() < 1e-9, "{half:?}");
        assert_eq!(b.wait(t0 + Duration::from_millis(100)), None, "one token");
        // An idle minute keeps one second's worth, not sixty.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(b.wait(later), None);
            b.take();
        }
        assert!(b.wait(later).is_some());
    }

    /// A partition whose records wait behind another's in the consumer is not
    /// stalled while the consumer hands out records: only when nothing came
    /// within the timeout, or nothing of this partition within three times it.
    #[test]
    fn a_partition_is_stalled_only_when_the_reader_is_or_after_three_timeouts() {
        let broker = Tansu::new(1, 1_000);
        let mut r = reader(100);
        let (req, _read) = Read::new(500, 1_000, "a");
        r.add(&broker, 1, req);
        let now = Instant::now() + Duration::from_secs(10);
        r.parts.get_mut(&1).expect("part").progress = now - Duration::from_secs(2);
        r.active = now - Duration::from_millis(100);
        assert!(!r.stalled(&r.parts[&1], now), "other partitions' records keep coming");
        r.active = now - Duration::from_secs(2);
        assert!(r.stalled(&r.parts[&1], now), "nothing came for longer than the timeout");
        r.active = now;
        r.parts.get_mut(&1).expect("part").progress = now - Duration::from_millis(3_100);
        assert!(r.stalled(&r.parts[&1], now), "nothing of this partition for three timeouts");
        r.parts.get_mut(&1).expect("part").reqs.clear();
        assert!(!r.stalled(&r.parts[&1], now), "no read waits");
    }
}
