//! Shared history: every join of one [`CatchUp`](crate::CatchUp) reads Kafka
//! through one consumer per topic, and learns the watermarks from one poller.
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
//!   the last watermark poll) is served from memory. A range older than the
//!   cache moves the partition's read position back; the joins already
//!   reading it skip what they have. The task never waits for a join: a join
//!   whose buffer is full is dropped from the sweep with the offset it got
//!   to ([`Ticket::checked`]), and asks again from there.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use dualstream_core::{record, DecodeError, Event, Limits, Position};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::config::ReplayConfig;
use crate::replay::ReplayError;

/// A topic and partition.
pub(crate) type Tp = (Arc<str>, i32);

/// The watermarks of a partition: the first offset still stored and the
/// offset the next record will get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Marks {
    pub(crate) low: i64,
    pub(crate) high: i64,
}

impl Marks {
    /// Watermarks made consistent: a broker that reports `low > high` (or
    /// negative values) gets `high = low`, never a panic.
    pub(crate) fn sane(low: i64, high: i64) -> Self {
        let low = low.max(0);
        Self { low, high: high.max(low) }
    }
}

/// One record of a partition, decoded once and shared by every join that
/// reads it.
#[derive(Debug)]
pub(crate) struct Rec {
    pub(crate) position: Position,
    pub(crate) key: Option<Box<[u8]>>,
    pub(crate) timestamp_ms: Option<i64>,
    /// The event, or the raw record when it does not decode (rare: each
    /// join decodes it again for its own error item).
    pub(crate) event: Result<Event, Raw>,
}

/// A record that is not a valid event, kept to report the error.
#[derive(Debug)]
pub(crate) struct Raw {
    headers: Vec<(String, Option<Vec<u8>>)>,
    payload: Option<Vec<u8>>,
}

impl Raw {
    /// Why the record is not a valid event.
    pub(crate) fn error(&self) -> DecodeError {
        let headers = self.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()));
        match record::decode(headers, self.payload.as_deref(), &decode_limits()) {
            Err(e) => e,
            Ok(_) => DecodeError::BadHeader { name: String::new(), reason: "decoded on a second attempt".into() },
        }
    }
}

/// The limits stored records are decoded with: lenient, since what the
/// broker stored was validated when it was produced, under whatever limits
/// the publisher had (see docs/consumer.md, "One set of limits").
pub(crate) fn decode_limits() -> Limits {
    Limits::lenient()
}

/// An item of a range read.
#[derive(Debug)]
pub(crate) enum Item {
    /// A record of the requested key.
    Record(Arc<Rec>),
    /// Offsets `[from, to)` of the partition were not returned by the broker
    /// (deleted by retention or delete-records, compacted, or control
    /// records): the reader checks the low watermark.
    Hole { from: i64, to: i64 },
}

/// How far a range read got; final once its channel is closed.
#[derive(Debug)]
pub(crate) struct Ticket {
    checked: AtomicI64,
    failed: Mutex<Option<ReplayError>>,
}

impl Ticket {
    /// Every offset below this was delivered or is not of the key.
    pub(crate) fn checked(&self) -> i64 {
        self.checked.load(Ordering::SeqCst)
    }

    /// The error that ended the read, if one did.
    pub(crate) fn take_error(&self) -> Option<ReplayError> {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn fail(&self, e: ReplayError) {
        *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
    }
}

/// A range read in progress: items until the channel closes, then the
/// ticket says how far it got.
pub(crate) struct Range {
    pub(crate) rx: mpsc::Receiver<Item>,
    pub(crate) ticket: Arc<Ticket>,
}

/// Items a range read may have waiting before the join takes them.
const RANGE_BUFFER: usize = 64;
/// A partition nobody asked for this long is no longer followed.
const FOLLOW_LINGER: Duration = Duration::from_secs(30);
/// How often the reader checks for stalled reads and idle partitions.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// How long a cached partition count is trusted.
const COUNT_TTL: Duration = Duration::from_secs(60);

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
    /// Times a partition's read position was moved back for an older range.
    pub seeks: u64,
    /// Records read from Kafka by the shared readers.
    pub records_read: u64,
}

#[derive(Default)]
struct Counters {
    consumers: AtomicU64,
    watermark_lookups: AtomicU64,
    metadata_lookups: AtomicU64,
    range_reads: AtomicU64,
    range_reads_cached: AtomicU64,
    seeks: AtomicU64,
    records_read: AtomicU64,
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
            records_read: get(&self.records_read),
        }
    }
}

/// The answer to a caller of [`History::fresh`].
type FreshReply = oneshot::Sender<Result<Marks, ReplayError>>;
/// Range reads to a topic's reader task: the partition and the read.
type RangeSender = mpsc::UnboundedSender<(i32, Req)>;

struct Watched {
    tx: watch::Sender<Marks>,
    /// Callers of `fresh` waiting for the next poll round.
    waiting: Vec<FreshReply>,
}

struct Inner {
    config: Arc<ReplayConfig>,
    poll_every: Duration,
    cache_records: usize,
    meta: Arc<BaseConsumer>,
    counts: Mutex<HashMap<String, (i32, Instant)>>,
    count_lookup: tokio::sync::Mutex<()>,
    watched: Mutex<HashMap<Tp, Watched>>,
    wake: Notify,
    readers: Mutex<HashMap<Arc<str>, RangeSender>>,
    /// Per partition, one past the highest offset the topic readers have
    /// received. A broker never returns a record at or above its high
    /// watermark, so this is at most the watermark on Apache Kafka; on a
    /// broker that under-reports its watermark (tansu 0.6 reports the last
    /// batch's base offset + 1), the poller raises the watermark to it, so
    /// the rest of that batch is not left unseen until the next write.
    seen: Arc<Mutex<HashMap<Tp, Arc<AtomicI64>>>>,
    counters: Counters,
    poller_started: std::sync::Once,
}

/// The shared readers of one `CatchUp` (and its clones).
#[derive(Clone)]
pub(crate) struct History {
    inner: Arc<Inner>,
}

impl History {
    pub(crate) fn new(config: Arc<ReplayConfig>, poll_every: Duration, cache_records: usize) -> Result<Self, ReplayError> {
        let meta: BaseConsumer = config.client_config()?.create()?;
        let inner = Inner {
            config,
            poll_every,
            cache_records,
            meta: Arc::new(meta),
            counts: Mutex::new(HashMap::new()),
            count_lookup: tokio::sync::Mutex::new(()),
            watched: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            readers: Mutex::new(HashMap::new()),
            seen: Arc::new(Mutex::new(HashMap::new())),
            counters: Counters::default(),
            poller_started: std::sync::Once::new(),
        };
        Counters::add(&inner.counters.consumers, 1);
        Ok(Self { inner: Arc::new(inner) })
    }

    pub(crate) fn stats(&self) -> HistoryStats {
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

    fn cached_count(&self, topic: &str) -> Option<i32> {
        let counts = self.inner.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(topic).filter(|(_, at)| at.elapsed() < COUNT_TTL).map(|(n, _)| *n)
    }

    /// The partition count of `topic`, cached for a minute. Joins that
    /// start together wait for one look-up.
    pub(crate) async fn partition_count(&self, topic: &str) -> Result<i32, ReplayError> {
        if let Some(n) = self.cached_count(topic) {
            return Ok(n);
        }
        let _one_at_a_time = self.inner.count_lookup.lock().await;
        if let Some(n) = self.cached_count(topic) {
            return Ok(n);
        }
        Counters::add(&self.inner.counters.metadata_lookups, 1);
        let t = topic.to_owned();
        let n = self.blocking(move |c, timeout| crate::reader::partition_count(c, &t, timeout)).await?;
        self.inner.counts.lock().unwrap_or_else(PoisonError::into_inner).insert(topic.to_owned(), (n, Instant::now()));
        Ok(n)
    }

    /// The first offset whose timestamp is at or after `ts_ms` (the high
    /// watermark when there is none).
    pub(crate) async fn offset_for_time(&self, tp: &Tp, ts_ms: i64) -> Result<Option<i64>, ReplayError> {
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
    pub(crate) fn watch(&self, tp: &Tp) -> watch::Receiver<Marks> {
        self.start_poller();
        let mut watched = self.inner.watched.lock().unwrap_or_else(PoisonError::into_inner);
        watched
            .entry(tp.clone())
            .or_insert_with(|| Watched { tx: watch::channel(Marks::default()).0, waiting: Vec::new() })
            .tx
            .subscribe()
    }

    /// Watermarks read from the broker after this call: waits for the next
    /// poll round, which serves every caller waiting for it.
    pub(crate) async fn fresh(&self, tp: &Tp) -> Result<Marks, ReplayError> {
        self.start_poller();
        let (reply, rx) = oneshot::channel();
        {
            let mut watched = self.inner.watched.lock().unwrap_or_else(PoisonError::into_inner);
            watched
                .entry(tp.clone())
                .or_insert_with(|| Watched { tx: watch::channel(Marks::default()).0, waiting: Vec::new() })
                .waiting
                .push(reply);
        }
        self.inner.wake.notify_one();
        rx.await.map_err(|_| ReplayError::Task("the watermark poller stopped".into()))?
    }

    fn start_poller(&self) {
        let weak = Arc::downgrade(&self.inner);
        self.inner.poller_started.call_once(|| {
            tokio::spawn(poll_watermarks(weak));
        });
    }

    /// Read the records of `key` in `[from, to)` of a partition.
    pub(crate) fn read(&self, tp: &Tp, from: i64, to: i64, key: Arc<[u8]>) -> Result<Range, ReplayError> {
        Counters::add(&self.inner.counters.range_reads, 1);
        let (tx, rx) = mpsc::channel(RANGE_BUFFER);
        let ticket = Arc::new(Ticket { checked: AtomicI64::new(from), failed: Mutex::new(None) });
        let req = Req { next: from, to, key, tx, ticket: Arc::clone(&ticket) };
        let mut readers = self.inner.readers.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = match readers.get(&tp.0) {
            Some(s) if !s.is_closed() => s.clone(),
            _ => {
                let consumer: StreamConsumer = self.inner.config.client_config()?.create()?;
                Counters::add(&self.inner.counters.consumers, 1);
                let (s, r) = mpsc::unbounded_channel();
                let reader = TopicReader {
                    topic: Arc::clone(&tp.0),
                    parts: HashMap::new(),
                    cache_records: self.inner.cache_records,
                    seen: Arc::clone(&self.inner.seen),
                    timeout: self.timeout(),
                    inner: Arc::downgrade(&self.inner),
                };
                tokio::spawn(reader.run(consumer, r));
                readers.insert(Arc::clone(&tp.0), s.clone());
                s
            }
        };
        sender.send((tp.1, req)).map_err(|_| ReplayError::Task("the history reader stopped".into()))?;
        Ok(Range { rx, ticket })
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
        // Whom this round serves: waiters registered from now on need a
        // later round.
        let mut round: Vec<(Tp, Vec<FreshReply>)> = Vec::new();
        {
            let mut watched = inner.watched.lock().unwrap_or_else(PoisonError::into_inner);
            watched.retain(|_, w| w.tx.receiver_count() > 0 || !w.waiting.is_empty());
            for (tp, w) in watched.iter_mut() {
                if full || !w.waiting.is_empty() {
                    round.push((tp.clone(), std::mem::take(&mut w.waiting)));
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
        let looked_up = tokio::task::spawn_blocking(move || {
            let marks = |(t, p): &Tp| {
                crate::reader::watermarks_at_leader(&*meta, t, *p, timeout).map(|(l, h)| Marks::sane(l, h))
            };
            tps.iter().map(marks).collect()
        })
        .await;
        let results: Vec<Result<Marks, rdkafka::error::KafkaError>> = match looked_up {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "watermark look-up task failed");
                vec![Err(rdkafka::error::KafkaError::Canceled); n]
            }
        };
        let seen: HashMap<Tp, i64> = inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(tp, high)| (tp.clone(), high.load(Ordering::Relaxed)))
            .collect();
        let watched = inner.watched.lock().unwrap_or_else(PoisonError::into_inner);
        for ((tp, waiting), result) in round.into_iter().zip(results) {
            match result {
                Ok(marks) => {
                    let marks = match seen.get(&tp) {
                        Some(&high) if high > marks.high => Marks::sane(marks.low, high),
                        _ => marks,
                    };
                    if let Some(w) = watched.get(&tp) {
                        w.tx.send_if_modified(|m| std::mem::replace(m, marks) != marks);
                    }
                    for reply in waiting {
                        let _ = reply.send(Ok(marks));
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "watermark look-up failed");
                    for reply in waiting {
                        let _ = reply.send(Err(ReplayError::Kafka(e.clone())));
                    }
                }
            }
        }
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

impl Req {
    /// Finish: every offset below `checked` was delivered or not of the key.
    fn finish(&self, checked: i64) {
        self.ticket.checked.store(checked, Ordering::SeqCst);
    }

    /// Offer a record. `Some(self)` while the read goes on.
    fn offer(mut self, rec: &Arc<Rec>) -> Option<Self> {
        let offset = rec.position.offset;
        if offset < self.next {
            return Some(self);
        }
        if offset >= self.to {
            self.finish(self.to);
            return None;
        }
        if rec.key.as_deref() == Some(&*self.key) {
            use mpsc::error::TrySendError;
            match self.tx.try_send(Item::Record(Arc::clone(rec))) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    // The join is busy: it asks again from here.
                    self.finish(offset);
                    return None;
                }
                Err(TrySendError::Closed(_)) => return None,
            }
        }
        self.next = offset + 1;
        if self.next >= self.to {
            self.finish(self.to);
            return None;
        }
        Some(self)
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

/// Checks that reading starts at or before the requested offset. Some
/// Kafka-compatible brokers (tansu 0.6) answer a fetch from an offset inside
/// a record batch with the *next* batch. When the first record is past the
/// requested offset the reader seeks further back until the first record is
/// at or before it, or the seek reached offset 0.
struct Probe {
    requested: i64,
    back: i64,
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
    /// Requests older than the cache, waiting for the position to move back.
    behind: Vec<Req>,
    probe: Option<Probe>,
    /// When a record last arrived or a read last started.
    progress: Instant,
    /// When a join last asked for this partition.
    used: Instant,
    /// One past the highest offset received, shared with the watermark
    /// poller (`Inner::seen`).
    seen: Arc<AtomicI64>,
}

struct TopicReader {
    topic: Arc<str>,
    parts: HashMap<i32, Part>,
    cache_records: usize,
    seen: Arc<Mutex<HashMap<Tp, Arc<AtomicI64>>>>,
    timeout: Duration,
    inner: Weak<Inner>,
}

impl TopicReader {
    fn count(&self, f: impl FnOnce(&Counters) -> &AtomicU64, n: u64) {
        if let Some(inner) = self.inner.upgrade() {
            Counters::add(f(&inner.counters), n);
        }
    }

    async fn run(mut self, consumer: StreamConsumer, mut rx: mpsc::UnboundedReceiver<(i32, Req)>) {
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        loop {
            tokio::select! {
                req = rx.recv() => {
                    let Some((p, req)) = req else { return };
                    self.add(&consumer, p, req);
                    while let Ok((p, req)) = rx.try_recv() {
                        self.add(&consumer, p, req);
                    }
                    self.move_back(&consumer);
                }
                m = consumer.recv(), if !self.parts.is_empty() => match m {
                    Ok(m) => self.on_record(&consumer, &m),
                    Err(e) => tracing::debug!(topic = %self.topic, error = %e, "history reader: consumer error"),
                },
                _ = tick.tick() => self.housekeeping(&consumer),
            }
        }
    }

    fn assign(&self, consumer: &StreamConsumer, p: i32, offset: i64) -> Result<(), ReplayError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, Offset::Offset(offset))?;
        consumer.incremental_assign(&tpl)?;
        Ok(())
    }

    fn add(&mut self, consumer: &StreamConsumer, p: i32, req: Req) {
        let now = Instant::now();
        if let Some(part) = self.parts.get_mut(&p) {
            part.used = now;
            if req.next < part.covered_from {
                part.behind.push(req);
                return;
            }
            // Serve what the cache has, then follow the partition.
            let start = part.cache.partition_point(|r| r.position.offset < req.next);
            let mut req = Some(req);
            for rec in part.cache.range(start..) {
                req = match req.take() {
                    Some(r) => r.offer(rec),
                    None => break,
                };
            }
            if let Some(mut r) = req {
                r.next = r.next.max(part.pos);
                if r.next >= r.to {
                    r.finish(r.to);
                    self.count(|c| &c.range_reads_cached, 1);
                } else {
                    if part.reqs.is_empty() {
                        part.progress = now;
                    }
                    part.reqs.push(r);
                }
            } else {
                self.count(|c| &c.range_reads_cached, 1);
            }
            return;
        }
        if let Err(e) = self.assign(consumer, p, req.next) {
            req.ticket.fail(e);
            return;
        }
        tracing::debug!(topic = %self.topic, partition = p, from = req.next, "history reader follows a partition");
        let probe = (req.next > 0).then_some(Probe { requested: req.next, back: 0 });
        let seen = Arc::clone(
            self.seen.lock().unwrap_or_else(PoisonError::into_inner).entry((Arc::clone(&self.topic), p)).or_default(),
        );
        self.parts.insert(
            p,
            Part {
                pos: req.next,
                covered_from: req.next,
                cache: VecDeque::new(),
                reqs: vec![req],
                behind: Vec::new(),
                probe,
                progress: now,
                used: now,
                seen,
            },
        );
    }

    /// Move the read position of partitions with older requests back.
    fn move_back(&mut self, consumer: &StreamConsumer) {
        let mut seeks = 0;
        for (p, part) in &mut self.parts {
            let Some(to) = part.behind.iter().map(|r| r.next).min() else { continue };
            if let Err(e) = consumer.seek(&self.topic, *p, Offset::Offset(to), self.timeout) {
                for r in part.behind.drain(..) {
                    r.ticket.fail(e.clone().into());
                }
                continue;
            }
            seeks += 1;
            part.pos = to;
            part.covered_from = to;
            part.cache.clear();
            part.probe = (to > 0).then_some(Probe { requested: to, back: 0 });
            part.progress = Instant::now();
            part.reqs.append(&mut part.behind);
        }
        if seeks > 0 {
            self.count(|c| &c.seeks, seeks);
        }
    }

    fn on_record(&mut self, consumer: &StreamConsumer, m: &BorrowedMessage<'_>) {
        let (p, offset) = (m.partition(), m.offset());
        let Some(part) = self.parts.get_mut(&p) else { return };
        if offset < part.pos {
            return;
        }
        if let Some(probe) = &mut part.probe {
            let seek_from = probe.requested - probe.back;
            if offset > probe.requested && seek_from > 0 {
                probe.back = (probe.back * 4).max(64);
                let to = (probe.requested - probe.back).max(0);
                tracing::debug!(partition = p, requested = probe.requested, first = offset, seek = to, "first record past the requested offset; reading from earlier");
                match consumer.seek(&self.topic, p, Offset::Offset(to), self.timeout) {
                    Ok(()) => {
                        part.pos = to;
                        part.covered_from = to;
                        part.cache.clear();
                        return;
                    }
                    Err(e) => tracing::warn!(partition = p, error = %e, "history reader: seek failed"),
                }
            }
            part.probe = None;
        }
        part.progress = Instant::now();
        if offset > part.pos {
            let (from, to) = (part.pos, offset);
            part.reqs = std::mem::take(&mut part.reqs).into_iter().filter_map(|r| r.hole(from, to)).collect();
        }
        part.pos = offset + 1;
        part.seen.fetch_max(offset + 1, Ordering::Relaxed);
        let key = m.key().map(Box::from);
        let limits = decode_limits();
        let event = match m.headers() {
            Some(h) => record::decode(h.iter().map(|h| (h.key, h.value)), m.payload(), &limits),
            None => record::decode(std::iter::empty(), m.payload(), &limits),
        }
        .map_err(|_| Raw {
            headers: m
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
                .unwrap_or_default(),
            payload: m.payload().map(<[u8]>::to_vec),
        });
        let rec = Arc::new(Rec {
            position: Position::new(Arc::clone(&self.topic), p, offset),
            key,
            timestamp_ms: m.timestamp().to_millis(),
            event,
        });
        part.reqs = std::mem::take(&mut part.reqs).into_iter().filter_map(|r| r.offer(&rec)).collect();
        part.cache.push_back(rec);
        while part.cache.len() > self.cache_records {
            part.cache.pop_front();
            if let Some(front) = part.cache.front() {
                part.covered_from = front.position.offset;
            }
        }
        self.count(|c| &c.records_read, 1);
    }

    fn housekeeping(&mut self, consumer: &StreamConsumer) {
        let timeout = self.timeout;
        let mut drop_parts = Vec::new();
        for (p, part) in &mut self.parts {
            part.reqs.retain(|r| !r.tx.is_closed());
            if !part.reqs.is_empty() && part.progress.elapsed() > timeout {
                tracing::warn!(topic = %self.topic, partition = p, at = part.pos, "history reader: no record within the timeout");
                for r in part.reqs.drain(..) {
                    r.ticket.fail(ReplayError::Timeout {
                        what: "reading a record below the high watermark",
                        timeout_ms: timeout.as_millis() as u64,
                    });
                }
            }
            if part.reqs.is_empty() && part.behind.is_empty() && part.used.elapsed() > FOLLOW_LINGER {
                drop_parts.push(*p);
            }
        }
        if drop_parts.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for p in &drop_parts {
            self.parts.remove(p);
            tpl.add_partition(&self.topic, *p);
        }
        if let Err(e) = consumer.incremental_unassign(&tpl) {
            tracing::warn!(topic = %self.topic, error = %e, "history reader: unassign failed");
        }
    }
}
