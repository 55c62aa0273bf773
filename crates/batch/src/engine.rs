use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dualstream_core::Event;
use dualstream_publisher::{DualPublisher, PublishError, Receipt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{BatchConfig, ConfigError};

/// Gauge: events accepted by the engine and not yet resolved.
const QUEUE_DEPTH: &str = "dualstream_batch_queue_depth";

/// Why a submitted event has no receipt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The queue stayed full for the whole submit timeout. The event was not
    /// accepted and is handed back.
    #[error("queue full: no room for event {} after waiting {waited:?}", event.id())]
    QueueFull {
        /// The event, not accepted.
        event: Event,
        /// How long `submit` waited.
        waited: Duration,
    },
    /// The event alone is larger than the queue's byte bound.
    #[error("event {} is {size} bytes; max_queued_bytes is {max}", event.id())]
    TooLarge {
        /// The event, not accepted.
        event: Event,
        /// Its size.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// The engine is shut down. The event was not accepted and is handed back.
    #[error("batch engine is closed; event {} not accepted", event.id())]
    Closed {
        /// The event, not accepted.
        event: Event,
    },
    /// The event was accepted but its worker stopped before resolving it (it
    /// panicked): its outcome is unknown.
    #[error("batch worker stopped before resolving this event; its outcome is unknown")]
    WorkerGone,
    /// The publisher did not store the event.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl BatchError {
    /// The event, when the error carries it.
    pub fn into_event(self) -> Option<Event> {
        match self {
            Self::QueueFull { event, .. } | Self::TooLarge { event, .. } | Self::Closed { event } => Some(event),
            Self::Publish(e) => e.into_event(),
            Self::WorkerGone => None,
        }
    }

    /// Whether submitting again may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::QueueFull { .. } => true,
            Self::Publish(e) => e.is_retriable(),
            Self::TooLarge { .. } | Self::Closed { .. } | Self::WorkerGone => false,
        }
    }
}

struct Item {
    event: Event,
    bytes: usize,
    reply: Reply,
    _permits: Permits,
}

enum Msg {
    Item(Item),
    Stop,
}

/// The batching engine. Cheap to clone; clones share the queue and workers.
#[derive(Clone)]
pub struct BatchEngine {
    inner: Arc<Shared>,
}

struct Shared {
    config: BatchConfig,
    lanes: Vec<mpsc::UnboundedSender<Msg>>,
    events: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    closed: AtomicBool,
    workers: Mutex<Vec<JoinHandle<()>>>,
    publisher: DualPublisher,
    hasher: std::collections::hash_map::RandomState,
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
    /// Validate the configuration and start one worker per lane.
    pub fn new(publisher: DualPublisher, config: BatchConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
        let mut lanes = Vec::with_capacity(config.lanes);
        let mut workers = Vec::with_capacity(config.lanes);
        for _ in 0..config.lanes {
            let (tx, rx) = mpsc::unbounded_channel();
            lanes.push(tx);
            workers.push(rt.spawn(lane(rx, publisher.clone(), config.clone())));
        }
        Ok(Self {
            inner: Arc::new(Shared {
                events: Arc::new(Semaphore::new(config.max_queued_events)),
                bytes: Arc::new(Semaphore::new(config.max_queued_bytes)),
                config,
                lanes,
                closed: AtomicBool::new(false),
                workers: Mutex::new(workers),
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

    /// Events accepted and not yet resolved.
    pub fn queued(&self) -> usize {
        self.inner.config.max_queued_events - self.inner.events.available_permits()
    }

    fn lane_of(&self, event: &Event) -> usize {
        let mut h = self.inner.hasher.build_hasher();
        event.source().hash(&mut h);
        (h.finish() % self.inner.lanes.len() as u64) as usize
    }

    /// Submit one event and wait for its own result.
    ///
    /// Waits up to the submit timeout for room in the queue. Once accepted,
    /// the event is resolved even if this future is dropped.
    pub async fn submit(&self, event: Event) -> Result<Receipt, BatchError> {
        let shared = &self.inner;
        if shared.closed.load(Ordering::Acquire) {
            return Err(BatchError::Closed { event });
        }
        let size = event.size_hint();
        if size > shared.config.max_queued_bytes {
            return Err(BatchError::TooLarge { event, size, max: shared.config.max_queued_bytes });
        }
        let waited = shared.config.submit_timeout();
        let acquire = async {
            let e = shared.events.clone().acquire_owned().await?;
            let b = shared.bytes.clone().acquire_many_owned(size as u32).await?;
            Ok::<_, tokio::sync::AcquireError>((e, b))
        };
        // Fast path without awaiting: with room in the queue, an event enters
        // its lane in the very first poll, so submits of one caller keep
        // their order even when they are not awaited one by one.
        let fast = shared.events.clone().try_acquire_owned().ok().and_then(|e| {
            shared.bytes.clone().try_acquire_many_owned(size as u32).ok().map(|b| (e, b))
        });
        let permits = match fast {
            Some(p) => p,
            None => match tokio::time::timeout(waited, acquire).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return Err(BatchError::Closed { event }),
                Err(_) => return Err(BatchError::QueueFull { event, waited }),
            },
        };
        let (reply, rx) = oneshot::channel();
        let lane = self.lane_of(&event);
        let item = Item { event, bytes: size, reply, _permits: permits };
        if let Err(mpsc::error::SendError(msg)) = shared.lanes[lane].send(Msg::Item(item)) {
            return match msg {
                Msg::Item(item) => Err(BatchError::Closed { event: item.event }),
                Msg::Stop => Err(BatchError::WorkerGone),
            };
        }
        metrics::gauge!(QUEUE_DEPTH).set(self.queued() as f64);
        rx.await.unwrap_or(Err(BatchError::WorkerGone))
    }

    /// Stop accepting, publish every accepted event, resolve every caller,
    /// then shut the publisher down (drain its notification queue, flush the
    /// durable sink, within 30 s).
    pub async fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for lane in &self.inner.lanes {
            let _ = lane.send(Msg::Stop);
        }
        let workers = std::mem::take(&mut *self.inner.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in workers {
            if let Err(e) = w.await {
                tracing::error!(error = %e, "batch worker ended abnormally");
            }
        }
        if let Err(e) = self.inner.publisher.shutdown(Duration::from_secs(30)).await {
            tracing::warn!(error = %e, "flushing the durable sink at shutdown");
        }
    }
}

/// The callers of one stored batch, waiting for its notifications.
type Stored = (dualstream_publisher::StoredBatch, Vec<(Reply, Permits)>);
type Reply = oneshot::Sender<Result<Receipt, BatchError>>;
type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// One lane: collect a batch, store it durably, hand it to the lane's
/// notification stage; repeat. The notification stage sends each batch's
/// notifications and resolves its callers, in batch order, while the lane
/// already stores the next batch: per-source order holds on both paths (one
/// durable write in flight per lane; notifications in lane order), and the
/// durable path never waits for Redis.
async fn lane(mut rx: mpsc::UnboundedReceiver<Msg>, publisher: DualPublisher, config: BatchConfig) {
    // Unbounded, but every event in it still holds its queue permits.
    let (notify_tx, notify_rx) = mpsc::unbounded_channel::<Stored>();
    let notifier = tokio::spawn(notify_stage(notify_rx, publisher.clone()));
    let mut batch: Vec<Item> = Vec::with_capacity(config.max_batch_events.min(1024));
    let mut stopping = false;
    while !stopping {
        match rx.recv().await {
            Some(Msg::Item(item)) => batch.push(item),
            Some(Msg::Stop) | None => break,
        }
        let mut bytes = batch[0].bytes;
        let linger_until = Instant::now() + config.linger();
        while batch.len() < config.max_batch_events && bytes < config.max_batch_bytes {
            let next = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(linger_until, rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match next {
                Some(Msg::Item(item)) => {
                    bytes += item.bytes;
                    batch.push(item);
                }
                Some(Msg::Stop) | None => {
                    stopping = true;
                    break;
                }
            }
        }
        store(&publisher, &mut batch, &notify_tx).await;
    }
    // Refuse new items, then publish everything already accepted.
    rx.close();
    while let Some(msg) = rx.recv().await {
        if let Msg::Item(item) = msg {
            batch.push(item);
            if batch.len() >= config.max_batch_events {
                store(&publisher, &mut batch, &notify_tx).await;
            }
        }
    }
    store(&publisher, &mut batch, &notify_tx).await;
    drop(notify_tx);
    if let Err(e) = notifier.await {
        tracing::error!(error = %e, "batch notification stage ended abnormally");
    }
}

/// Store a batch durably and queue it for the notification stage.
async fn store(publisher: &DualPublisher, batch: &mut Vec<Item>, notify: &mpsc::UnboundedSender<Stored>) {
    if batch.is_empty() {
        return;
    }
    let mut replies = Vec::with_capacity(batch.len());
    let mut events = Vec::with_capacity(batch.len());
    for item in batch.drain(..) {
        events.push(item.event);
        replies.push((item.reply, item._permits));
    }
    let stored = publisher.store_batch(events).await;
    if !stored.waits_for_notifier() {
        // Nothing to wait for: resolve here, without a hop.
        resolve(publisher.notify_stored(stored).await, replies);
        return;
    }
    if let Err(mpsc::error::SendError((stored, replies))) = notify.send((stored, replies)) {
        // The stage is gone (it panicked): resolve here, in order.
        resolve(publisher.notify_stored(stored).await, replies);
    }
}

async fn notify_stage(mut rx: mpsc::UnboundedReceiver<Stored>, publisher: DualPublisher) {
    while let Some((stored, replies)) = rx.recv().await {
        resolve(publisher.notify_stored(stored).await, replies);
    }
}

fn resolve(results: Vec<Result<Receipt, PublishError>>, replies: Vec<(Reply, Permits)>) {
    for ((reply, permits), result) in replies.into_iter().zip(results) {
        // The caller may have gone away; the result is dropped then.
        let _ = reply.send(result.map_err(BatchError::from));
        drop(permits);
    }
}
