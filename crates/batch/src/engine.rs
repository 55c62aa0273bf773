//! The engine's front: the public [`BatchEngine`] and [`BatchError`], the
//! wiring of the stages, and the callers' side.
//!
//! `submit` and `submit_many` reserve the events' share of the queue
//! ([`Budget`]) and send them to the lane their source maps to; each caller
//! then awaits its own reply. The stages behind it are in their own modules:
//! [`lane`](crate::lane) collects batches and hands them to the durable
//! sink, [`ack`](crate::ack) awaits each batch's acknowledgements and gives
//! its queue share back, [`notify`](crate::notify) sends the notifications
//! and resolves callers. [`resolve`] is where every caller gets its result.
//!
//! Guarantees kept here: an event that is refused (queue full, too large,
//! closed, lane dead) is handed back, never dropped; an accepted event's
//! caller gets a result even when a stage died with it
//! ([`BatchError::WorkerGone`]); `submit_many` returns one result per
//! event, in input order, and once a chunk is refused nothing later of the
//! call is accepted, so nothing overtakes.

use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use dualstream_core::Event;
use dualstream_core::Traced;
use dualstream_publisher::{end_send_span, end_send_spans, DualPublisher, NotificationOutcome, PublishError, Receipt};
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio::task::JoinHandle;

use crate::budget::{Budget, Held};
use crate::config::{BatchConfig, ConfigError};
use crate::lane::{lane, Msg};
use crate::notify::{notify_stage, Stored};

/// Gauge, labelled `engine` (`BatchConfig::name`): events accepted by the
/// engine and not yet acknowledged by the durable sink (or failed).
const QUEUE_DEPTH: &str = "dualstream_batch_queue_depth";

/// Why a submitted event has no receipt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The queue stayed full for the whole submit timeout. The event was not
    /// accepted and is handed back.
    #[error("queue full: no room for event {} after waiting {waited:?}", event.id())]
    QueueFull {
        /// The event, not accepted (boxed: see `DeliveryError`).
        event: Box<Event>,
        /// How long `submit` waited.
        waited: Duration,
    },
    /// The event alone is larger than the queue's byte bound.
    #[error("event {} is {size} bytes; max_queued_bytes is {max}", event.id())]
    TooLarge {
        /// The event, not accepted (boxed: see `DeliveryError`).
        event: Box<Event>,
        /// Its size.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// The engine is shut down. The event was not accepted and is handed back.
    #[error("batch engine is closed; event {} not accepted", event.id())]
    Closed {
        /// The event, not accepted (boxed: see `DeliveryError`).
        event: Box<Event>,
    },
    /// The event was accepted but its worker stopped before resolving it (it
    /// panicked): its outcome is unknown.
    #[error("batch worker stopped before resolving this event; its outcome is unknown")]
    WorkerGone,
    /// The lane this event's source maps to has no worker any more (it
    /// panicked earlier). The event was not accepted and is handed back;
    /// [`BatchEngine::dead_lanes`] reports the lanes.
    #[error("lane {lane} of the batch engine has no worker (it died); event {} not accepted", event.id())]
    LaneDead {
        /// The event, not accepted (boxed: see `DeliveryError`).
        event: Box<Event>,
        /// The lane.
        lane: usize,
    },
    /// The publisher did not store the event.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl BatchError {
    /// The event, when the error carries it.
    pub fn into_event(self) -> Option<Event> {
        match self {
            Self::QueueFull { event, .. }
            | Self::TooLarge { event, .. }
            | Self::Closed { event }
            | Self::LaneDead { event, .. } => Some(*event),
            Self::Publish(e) => e.into_event(),
            Self::WorkerGone => None,
        }
    }

    /// Whether submitting again may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::QueueFull { .. } => true,
            Self::Publish(e) => e.is_retriable(),
            Self::TooLarge { .. } | Self::Closed { .. } | Self::WorkerGone | Self::LaneDead { .. } => false,
        }
    }
}

pub(crate) type Results = Vec<Result<Receipt, BatchError>>;

/// Whom to resolve, in batch order.
pub(crate) enum Waiter {
    One(oneshot::Sender<Result<Receipt, BatchError>>),
    Many(oneshot::Sender<Results>, usize),
    /// Events `from..from + count` of a `submit_many` reply whose events are
    /// released at different times (ack.rs): it is sent once all are in.
    Part(Arc<Mutex<Gather>>, usize, usize),
}

/// The results of a `submit_many` reply released in parts.
pub(crate) struct Gather {
    results: Vec<Option<Result<Receipt, BatchError>>>,
    left: usize,
    /// Dropped unsent with the last part if a stage died: the caller then
    /// gets `WorkerGone` for every event.
    reply: Option<oneshot::Sender<Results>>,
}

impl Waiter {
    /// Its events.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(_, count) | Self::Part(_, _, count) => *count,
        }
    }

    /// Split into runs of events that go the same way: `free[i]` says where
    /// its event `i` goes. Each run is `(free, its waiter)`, in order.
    pub(crate) fn split(self, free: &[bool]) -> Vec<(bool, Waiter)> {
        let first = free.first().copied().unwrap_or(true);
        if free.iter().all(|f| *f == first) {
            return vec![(first, self)];
        }
        let (gather, base) = match self {
            Self::Many(reply, count) => {
                let gather = Gather { results: (0..count).map(|_| None).collect(), left: count, reply: Some(reply) };
                (Arc::new(Mutex::new(gather)), 0)
            }
            Self::Part(gather, from, _) => (gather, from),
            // One event goes one way (above).
            one @ Self::One(_) => return vec![(first, one)],
        };
        let mut runs = Vec::new();
        let mut start = 0;
        for (i, f) in free.iter().enumerate() {
            if free.get(i + 1) != Some(f) {
                runs.push((*f, Self::Part(gather.clone(), base + start, i + 1 - start)));
                start = i + 1;
            }
        }
        runs
    }
}

/// The batching engine. Cheap to clone; clones share the queue and workers.
#[derive(Clone)]
pub struct BatchEngine {
    inner: Arc<Shared>,
}

struct Shared {
    config: BatchConfig,
    lanes: Vec<mpsc::UnboundedSender<Msg>>,
    budget: Arc<Budget>,
    closed: AtomicBool,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Set once by the first `shutdown`; later calls wait for it.
    shut: OnceCell<()>,
    publisher: DualPublisher,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for BatchEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEngine")
            .field("config", &self.inner.config)
            .field("queued", &self.queued())
            .finish_non_exhaustive()
    }
}

impl BatchEngine {
    /// Validate the configuration and start the workers of every lane.
    pub fn new(publisher: DualPublisher, config: BatchConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
        // A handle of the engine's own: install the metrics recorder first.
        let depth = metrics::gauge!(QUEUE_DEPTH, "engine" => config.name.clone());
        let budget = Arc::new(Budget::new(config.max_queued_events as u64, config.max_queued_bytes as u64, depth));
        let mut lanes = Vec::with_capacity(config.lanes);
        let mut workers = Vec::with_capacity(config.lanes + 1);
        // One notification stage for the engine: the lanes' notifications
        // merge into the same pipelines, so one Redis connection carries a
        // few large pipelines rather than many small ones queued behind each
        // other. It ends when the last lane is done, and is awaited last.
        let (notify_tx, notify_stage) = if publisher.notify_waits() {
            let (tx, rx) = mpsc::unbounded_channel::<Stored>();
            let stage =
                rt.spawn(notify_stage(rx, publisher.clone(), config.notify_pipelines, config.max_queued_events));
            (Some(tx), Some(stage))
        } else {
            (None, None)
        };
        for _ in 0..config.lanes {
            let (tx, rx) = mpsc::unbounded_channel();
            lanes.push(tx);
            workers.push(rt.spawn(lane(rx, publisher.clone(), config.clone(), notify_tx.clone())));
        }
        drop(notify_tx);
        workers.extend(notify_stage);
        Ok(Self {
            inner: Arc::new(Shared {
                budget,
                config,
                lanes,
                closed: AtomicBool::new(false),
                workers: Mutex::new(workers),
                shut: OnceCell::new(),
                publisher,
                hasher: Default::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BatchConfig {
        &self.inner.config
    }

    /// The publisher batches go to.
    pub fn publisher(&self) -> &DualPublisher {
        &self.inner.publisher
    }

    /// Events accepted and not yet acknowledged by the durable sink (or
    /// failed). Their queue share is given back at the durable
    /// acknowledgement; the notification that follows holds none.
    pub fn queued(&self) -> usize {
        self.inner.budget.used().0 as usize
    }

    /// Lanes whose worker died (a sink or notifier panicked). Their sources
    /// are refused with [`BatchError::LaneDead`]; an empty list means the
    /// engine is whole.
    pub fn dead_lanes(&self) -> Vec<usize> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.inner.lanes.iter().enumerate().filter(|(_, l)| l.is_closed()).map(|(i, _)| i).collect()
    }

    /// The event's lane and its order key: its source's hash, taken once
    /// for both (lane.rs, ack.rs).
    fn lane_of(&self, event: &Event) -> (usize, u64) {
        let key = self.inner.hasher.hash_one(event.source());
        ((key % self.inner.lanes.len() as u64) as usize, key)
    }

    fn refused(&self, lane: usize, event: Event) -> BatchError {
        if self.inner.closed.load(Ordering::Acquire) {
            BatchError::Closed { event: Box::new(event) }
        } else {
            tracing::error!(lane, "batch engine lane has no worker; refusing its sources");
            BatchError::LaneDead { event: Box::new(event), lane }
        }
    }

    /// Submit one event and wait for its own result.
    ///
    /// Waits up to the submit timeout for room in the queue, behind the
    /// submits that were waiting before it. Once accepted,
    /// the event is resolved even if this future is dropped.
    ///
    /// Nothing happens until the future is first polled, except that with
    /// `otel` and a trace under way the event's `send` span starts (under
    /// the span current at this call). The future is small (a test bounds
    /// it): a caller that spawns a task per event moves it whole.
    pub fn submit(&self, mut event: Event) -> impl Future<Output = Result<Receipt, BatchError>> + Send + '_ {
        // The event's `send` span, whose context the event carries to Kafka
        // and Redis.
        let traced = Traced::send(&mut event);
        Submit { engine: self, state: SubmitState::Start(event), traced }
    }

    /// The fast path of a submit, in its first poll: with room in the queue
    /// now, the event enters its lane at once (so submits of one caller keep
    /// their order even when they are not awaited one by one) and the future
    /// waits for its reply only. A refusal is its result at once. Without
    /// room, the wait for it ([`wait_for_room`](Self::wait_for_room)),
    /// boxed.
    fn start_one(&self, event: Event) -> SubmitState<'_> {
        let (event, size) = match self.admit(event) {
            Ok(admitted) => admitted,
            Err(e) => return SubmitState::Done(Some(Err(e))),
        };
        let Some(held) = self.inner.budget.try_take(1, size as u64) else {
            return SubmitState::Slow(Box::pin(self.wait_for_room(event, size)));
        };
        match self.send_one(event, held) {
            Ok((rx, lane)) => SubmitState::Reply(rx, lane),
            Err(e) => SubmitState::Done(Some(Err(e))),
        }
    }

    /// An event the engine can take, and its size; or why not: the engine
    /// is closed, or the event is larger than the whole queue.
    fn admit(&self, event: Event) -> Result<(Event, usize), BatchError> {
        let shared = &self.inner;
        if shared.closed.load(Ordering::Acquire) {
            return Err(BatchError::Closed { event: Box::new(event) });
        }
        let size = event.size_hint();
        if size > shared.config.max_queued_bytes {
            return Err(BatchError::TooLarge { event: Box::new(event), size, max: shared.config.max_queued_bytes });
        }
        Ok((event, size))
    }

    /// Send an event that holds its share of the queue to its lane: its
    /// reply's receiver and the lane, or the refusal.
    fn send_one(&self, event: Event, held: Held) -> Result<(ReplyRx, usize), BatchError> {
        let (reply, rx) = oneshot::channel();
        let (lane, key) = self.lane_of(&event);
        match self.inner.lanes[lane].send(Msg::One { event, key, held, reply }) {
            Ok(()) => Ok((rx, lane)),
            Err(mpsc::error::SendError(Msg::One { event, .. })) => Err(self.refused(lane, event)),
            Err(_) => Err(BatchError::WorkerGone),
        }
    }

    /// A submit that found the queue full: wait for room, up to the submit
    /// timeout, behind the submits that were waiting before it. Boxed by
    /// [`start_one`](Self::start_one): its state would otherwise make every
    /// submit's future (and every task a caller spawns for one) several
    /// times larger, copied as it moves.
    async fn wait_for_room(&self, event: Event, size: usize) -> Result<Receipt, BatchError> {
        let waited = self.inner.config.submit_timeout();
        let Some(held) = self.inner.budget.take(1, size as u64, waited).await else {
            return Err(BatchError::QueueFull { event: Box::new(event), waited });
        };
        let (rx, lane) = self.send_one(event, held)?;
        self.reply(rx, lane).await
    }

    /// Await an accepted event's reply.
    async fn reply(&self, rx: ReplyRx, lane: usize) -> Result<Receipt, BatchError> {
        match rx.await {
            Ok(result) => result,
            Err(_) => {
                self.lane_gone(lane).await;
                Err(BatchError::WorkerGone)
            }
        }
    }

    /// A caller's reply was dropped: its lane's worker is unwinding. Wait
    /// (briefly) until the lane is closed, so that once a caller has
    /// `WorkerGone`, `dead_lanes` lists the lane and its sources get
    /// `LaneDead` with their event handed back.
    async fn lane_gone(&self, lane: usize) {
        let _ = tokio::time::timeout(Duration::from_millis(100), self.inner.lanes[lane].closed()).await;
    }

    /// Submit many events and wait for all their results, in input order.
    ///
    /// The fast path for callers that have a batch at hand: one queue
    /// reservation and one completion per lane and chunk instead of one per
    /// event. Per-source order is the input order. Events go in chunks of at
    /// most [`BatchConfig::max_batch_events`] (and a quarter of the queue's
    /// bounds); each chunk waits up to the submit timeout for room. Once a
    /// chunk cannot get room, it and every later event fail with
    /// [`BatchError::QueueFull`] (handed back), so nothing overtakes; an
    /// event larger than the queue's byte bound fails alone with
    /// [`BatchError::TooLarge`], and the later events of its source with
    /// [`SinkError::EarlierFailed`](dualstream_core::SinkError::EarlierFailed).
    pub async fn submit_many(&self, events: Vec<Event>) -> Vec<Result<Receipt, BatchError>> {
        let mut out = Vec::new();
        self.submit_many_into(events, &mut out).await;
        out
    }

    /// Like [`submit_many`](Self::submit_many), appending the results to
    /// `out`, one per event in input order after what `out` already holds.
    /// A caller that submits batch after batch can keep one buffer (and
    /// clear it after reading): no allocation for the results, whose slots
    /// are written in place.
    pub async fn submit_many_into(&self, mut events: Vec<Event>, out: &mut Vec<Result<Receipt, BatchError>>) {
        let traced = Traced::send_all(&mut events);
        let start = out.len();
        // Every slot starts as `WorkerGone`: what a slot still holds once
        // every lane answered (its lane died without an answer).
        out.extend((0..events.len()).map(|_| Err(BatchError::WorkerGone)));
        self.submit_all(events, &mut out[start..]).await;
        end_send_spans(traced, &out[start..]);
    }

    async fn submit_all(&self, events: Vec<Event>, out: &mut [Result<Receipt, BatchError>]) {
        let shared = &self.inner;
        let n = events.len();
        let max_events = shared.config.max_batch_events.min((shared.config.max_queued_events / 4).max(1));
        let max_bytes = (shared.config.max_queued_bytes / 4).max(1);
        let mut chunk = Chunk::new(shared.lanes.len(), n.min(max_events));
        let mut pending: Vec<(usize, Vec<usize>, oneshot::Receiver<Results>)> = Vec::new();
        let mut stop: Option<Refusal> = None;
        let mut too_large: Vec<(dualstream_core::Source, String)> = Vec::new();
        for (index, event) in events.into_iter().enumerate() {
            if let Some(first) = &stop {
                out[index] = Err(again(first, event));
                continue;
            }
            if shared.closed.load(Ordering::Acquire) {
                out[index] = Err(BatchError::Closed { event: Box::new(event) });
                stop = Some(Refusal::Closed);
                continue;
            }
            let size = event.size_hint();
            if let Some((_, why)) = too_large.iter().find(|(s, _)| s == event.source()) {
                let error = dualstream_core::SinkError::EarlierFailed { earlier: why.clone(), retriable: false };
                out[index] =
                    Err(BatchError::Publish(PublishError::Durable(dualstream_core::DeliveryError::new(error, event))));
                continue;
            }
            if size > shared.config.max_queued_bytes {
                let max = shared.config.max_queued_bytes;
                too_large.push((event.source().clone(), format!("{size} bytes; max_queued_bytes is {max}")));
                out[index] = Err(BatchError::TooLarge { event: Box::new(event), size, max });
                continue;
            }
            if chunk.count > 0 && (chunk.count >= max_events || chunk.bytes + size > max_bytes) {
                if let Err(e) = self.dispatch(&mut chunk, &mut pending, out).await {
                    out[index] = Err(again(&e, event));
                    stop = Some(e);
                    continue;
                }
            }
            let (lane, key) = self.lane_of(&event);
            chunk.push(lane, key, index, event, size);
        }
        if chunk.count > 0 {
            // A refusal here has already resolved every event of the chunk.
            let _ = self.dispatch(&mut chunk, &mut pending, out).await;
        }
        for (lane, indices, rx) in pending {
            // A worker that died leaves its slots empty: WorkerGone below.
            match rx.await {
                Ok(results) => {
                    for (i, r) in indices.into_iter().zip(results) {
                        out[i] = r;
                    }
                }
                Err(_) => self.lane_gone(lane).await,
            }
        }
    }

    /// Reserve room for a gathered chunk and send each lane its part. If the
    /// queue stays full, every event of the chunk gets `QueueFull` (handed
    /// back) and the error is returned for the later events.
    async fn dispatch(
        &self,
        chunk: &mut Chunk,
        pending: &mut Vec<(usize, Vec<usize>, oneshot::Receiver<Results>)>,
        out: &mut [Result<Receipt, BatchError>],
    ) -> Result<(), Refusal> {
        let shared = &self.inner;
        let (count, bytes) = (chunk.count as u64, chunk.bytes as u64);
        let waited = shared.config.submit_timeout();
        let held = match shared.budget.try_take(count, bytes) {
            Some(h) => Some(h),
            None => shared.budget.take(count, bytes, waited).await,
        };
        let mut first: Option<Refusal> = None;
        let mut held = held;
        for (lane, Part { indices, events, keys, bytes: part_bytes }) in chunk.take().into_iter().enumerate() {
            if indices.is_empty() {
                continue;
            }
            let Some(all) = held.as_mut() else {
                for (i, event) in indices.into_iter().zip(events) {
                    out[i] = Err(BatchError::QueueFull { event: Box::new(event), waited });
                }
                first = Some(Refusal::QueueFull(waited));
                continue;
            };
            let part = all.split(events.len() as u64, part_bytes as u64);
            let (reply, rx) = oneshot::channel();
            match shared.lanes[lane].send(Msg::Many { events, keys, held: part, reply }) {
                Ok(()) => pending.push((lane, indices, rx)),
                Err(mpsc::error::SendError(msg)) => {
                    if let Msg::Many { events, .. } = msg {
                        for (i, event) in indices.into_iter().zip(events) {
                            out[i] = Err(self.refused(lane, event));
                        }
                    }
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Stop accepting, publish every accepted event, resolve every caller,
    /// then shut the publisher down (drain its notification queue, flush the
    /// durable sink, within 30 s). A second call, concurrent or later, waits
    /// for the first to finish.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner
            .shut
            .get_or_init(|| async {
                inner.closed.store(true, Ordering::Release);
                for lane in &inner.lanes {
                    let _ = lane.send(Msg::Stop);
                }
                let workers = std::mem::take(&mut *inner.workers.lock().unwrap_or_else(|p| p.into_inner()));
                for w in workers {
                    if let Err(e) = w.await {
                        tracing::error!(error = %e, "batch worker ended abnormally");
                    }
                }
                if let Err(e) = inner.publisher.shutdown(Duration::from_secs(30)).await {
                    tracing::warn!(error = %e, "flushing the durable sink at shutdown");
                }
            })
            .await;
    }
}

/// The future of [`BatchEngine::submit`], by hand: an `async fn` keeps its
/// argument and the local it moves into apart, and the slow paths' state
/// beside the fast path's. This one holds the event until its first poll
/// and then only its reply's receiver.
struct Submit<'a> {
    engine: &'a BatchEngine,
    state: SubmitState<'a>,
    traced: Option<Traced>,
}

/// The receiving end of one submitted event's reply.
type ReplyRx = oneshot::Receiver<Result<Receipt, BatchError>>;

enum SubmitState<'a> {
    /// Not polled yet.
    Start(Event),
    /// Accepted: its reply, from this lane.
    Reply(ReplyRx, usize),
    /// Waiting for room, or its lane gone: the rest, boxed.
    Slow(Pin<Box<dyn Future<Output = Result<Receipt, BatchError>> + Send + 'a>>),
    /// Its result, taken by the poll that returns it.
    Done(Option<Result<Receipt, BatchError>>),
}

impl Future for Submit<'_> {
    type Output = Result<Receipt, BatchError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is `Unpin` (the slow paths are boxed).
        let this = self.get_mut();
        let result = loop {
            match &mut this.state {
                SubmitState::Start(_) => {
                    let SubmitState::Start(event) = std::mem::replace(&mut this.state, SubmitState::Done(None)) else {
                        unreachable!("matched above");
                    };
                    this.state = this.engine.start_one(event);
                }
                SubmitState::Reply(rx, lane) => match Pin::new(rx).poll(cx) {
                    Poll::Ready(Ok(result)) => break result,
                    Poll::Ready(Err(_)) => {
                        let (engine, lane) = (this.engine, *lane);
                        this.state = SubmitState::Slow(Box::pin(async move {
                            engine.lane_gone(lane).await;
                            Err(BatchError::WorkerGone)
                        }));
                    }
                    Poll::Pending => return Poll::Pending,
                },
                SubmitState::Slow(slow) => match slow.as_mut().poll(cx) {
                    Poll::Ready(result) => break result,
                    Poll::Pending => return Poll::Pending,
                },
                SubmitState::Done(result) => match result.take() {
                    Some(result) => break result,
                    None => panic!("`submit` future polled after it completed"),
                },
            }
        };
        this.state = SubmitState::Done(None);
        end_send_span(this.traced.take(), &result);
        Poll::Ready(result)
    }
}

/// Why the rest of a `submit_many` is refused.
#[derive(Clone, Copy)]
enum Refusal {
    QueueFull(Duration),
    Closed,
}

/// The error for an event after an earlier one of the same `submit_many`
/// was refused: the same kind, with this event handed back.
fn again(first: &Refusal, event: Event) -> BatchError {
    match *first {
        Refusal::QueueFull(waited) => BatchError::QueueFull { event: Box::new(event), waited },
        Refusal::Closed => BatchError::Closed { event: Box::new(event) },
    }
}

/// The events of one `submit_many` chunk, per lane, with their input
/// indices.
struct Chunk {
    lanes: Vec<Part>,
    count: usize,
    bytes: usize,
    /// What a lane's part reserves at its first event: a fair share of a
    /// chunk and a quarter more, so the parts do not grow (and copy their
    /// events) step by step.
    reserve: usize,
}

/// One lane's part of a chunk.
#[derive(Default)]
struct Part {
    indices: Vec<usize>,
    events: Vec<Event>,
    /// Each event's order key.
    keys: Vec<u64>,
    bytes: usize,
}

impl Chunk {
    /// For a chunk of at most `events` events over `lanes` lanes.
    fn new(lanes: usize, events: usize) -> Self {
        let share = events.div_ceil(lanes.max(1));
        Self {
            lanes: (0..lanes).map(|_| Part::default()).collect(),
            count: 0,
            bytes: 0,
            reserve: share + share / 4 + 4,
        }
    }

    fn push(&mut self, lane: usize, key: u64, index: usize, event: Event, size: usize) {
        let part = &mut self.lanes[lane];
        if part.events.capacity() == 0 {
            part.indices.reserve(self.reserve);
            part.events.reserve(self.reserve);
            part.keys.reserve(self.reserve);
        }
        part.indices.push(index);
        part.events.push(event);
        part.keys.push(key);
        part.bytes += size;
        self.count += 1;
        self.bytes += size;
    }

    /// Take the gathered events, leaving the chunk empty.
    fn take(&mut self) -> Vec<Part> {
        self.count = 0;
        self.bytes = 0;
        let lanes = self.lanes.len();
        std::mem::replace(&mut self.lanes, (0..lanes).map(|_| Part::default()).collect())
    }
}

/// Give each waiter its results, with `outcome` as the notification outcome
/// of every stored event.
pub(crate) fn resolve(results: Vec<Result<Receipt, PublishError>>, outcome: NotificationOutcome, waiters: Vec<Waiter>) {
    let mut results = results.into_iter();
    for waiter in waiters {
        match waiter {
            Waiter::One(reply) => {
                // The caller may have gone away; the result is dropped then.
                let _ = reply.send(answer(results.next(), outcome));
            }
            Waiter::Many(reply, count) => {
                let mut rs: Results = Vec::with_capacity(count);
                for _ in 0..count {
                    rs.push(answer(results.next(), outcome));
                }
                let _ = reply.send(rs);
            }
            Waiter::Part(gather, from, count) => {
                let mut g = gather.lock().unwrap_or_else(|p| p.into_inner());
                for slot in g.results.iter_mut().skip(from).take(count) {
                    *slot = Some(answer(results.next(), outcome));
                }
                g.left = g.left.saturating_sub(count);
                if g.left == 0 {
                    let mut rs: Results = Vec::with_capacity(g.results.len());
                    for r in std::mem::take(&mut g.results) {
                        rs.push(r.unwrap_or(Err(BatchError::WorkerGone)));
                    }
                    if let Some(reply) = g.reply.take() {
                        let _ = reply.send(rs);
                    }
                }
            }
        }
    }
}

/// A caller's result: `result` (`None`: the sink gave none) with `outcome`
/// as its notification outcome.
#[allow(clippy::result_large_err)] // The error hands the event back, by design.
fn answer(result: Option<Result<Receipt, PublishError>>, outcome: NotificationOutcome) -> Result<Receipt, BatchError> {
    match result {
        Some(Ok(mut receipt)) => {
            receipt.notification = outcome;
            Ok(receipt)
        }
        Some(Err(e)) => Err(e.into()),
        None => Err(BatchError::WorkerGone),
    }
}
