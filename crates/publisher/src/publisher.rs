use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dualstream_core::trace::{self, Traced};
use dualstream_core::{
    DeliveryError, DurableSink, Event, EventId, Notification, NotifyError, PendingAcks, Position, RealtimeNotifier,
};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::{BuildError, Mode, PublisherConfig};
use crate::metric_names as m;

/// What happened to an event's notification. Informational only: it never
/// decides whether a publish succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationOutcome {
    /// The notifier accepted it.
    Sent,
    /// Handed to the high-volume queue, or still in a pipeline the batching
    /// engine stopped waiting for at the notify bound: sent in the
    /// background, delivery not confirmed.
    Queued,
    /// Not sent: the notifier's breaker was open, or the high-volume queue
    /// was full.
    Skipped,
    /// The notifier failed: not delivered, or not all of it.
    Failed,
    /// Not confirmed in time: the notifier's own timeout, or the
    /// publisher's bound (`notify_timeout_ms`, or `pipeline_timeout_ms` for
    /// a background pipeline), ended first. The outcome is unknown: the
    /// notification may well have been delivered (on a busy machine it
    /// usually has).
    TimedOut,
    /// The mode sends no notifications.
    Disabled,
}

/// The result of a successful publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The event's id.
    pub event_id: EventId,
    /// Where the durable sink stored it: `None` in the real-time-only mode,
    /// and for a write a custom sink reports as stored at an unknown offset
    /// ([`Position::UNKNOWN_OFFSET`]; the notification then has no position
    /// either, and a catch-up join finds the event in Kafka). The Kafka sink
    /// never does: an acknowledgement whose offset it cannot reconcile fails
    /// the publish with `SinkError::OutcomeUnknown`, since such a write may
    /// not be stored.
    pub position: Option<Position>,
    /// What happened to its notification.
    pub notification: NotificationOutcome,
}

/// A failed publish. The event is handed back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The durable sink did not store the event.
    #[error(transparent)]
    Durable(#[from] DeliveryError),
    /// A custom durable sink returned fewer batch results than events: the
    /// event's outcome is unknown. This is a bug in that sink.
    #[error("durable sink returned no result for this event (sink contract broken)")]
    MissingResult,
}

impl PublishError {
    /// The event that was not stored, if the error carries it.
    pub fn into_event(self) -> Option<Event> {
        match self {
            Self::Durable(e) => Some(e.into_event()),
            Self::MissingResult => None,
        }
    }

    /// Whether publishing again may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Durable(e) => e.is_retriable(),
            Self::MissingResult => false,
        }
    }
}

/// Publishes every event durably first and notifies in real time after.
/// Cheap to clone: clones share the sinks and the background task.
#[derive(Clone)]
pub struct DualPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    durable: Option<Arc<dyn DurableSink>>,
    notifier: Option<Arc<dyn RealtimeNotifier>>,
    config: PublisherConfig,
    high_volume: Option<HighVolume>,
}

struct HighVolume {
    tx: mpsc::Sender<Notification>,
    stop: Arc<Notify>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for DualPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DualPublisher").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// Builds a [`DualPublisher`].
#[derive(Default)]
#[must_use]
pub struct DualPublisherBuilder {
    durable: Option<Arc<dyn DurableSink>>,
    notifier: Option<Arc<dyn RealtimeNotifier>>,
    config: PublisherConfig,
}

impl std::fmt::Debug for DualPublisherBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DualPublisherBuilder").field("config", &self.config).finish_non_exhaustive()
    }
}

impl DualPublisherBuilder {
    /// The durable sink.
    pub fn durable(mut self, sink: Arc<dyn DurableSink>) -> Self {
        self.durable = Some(sink);
        self
    }
    /// The real-time notifier.
    pub fn notifier(mut self, notifier: Arc<dyn RealtimeNotifier>) -> Self {
        self.notifier = Some(notifier);
        self
    }
    /// The configuration.
    pub fn config(mut self, config: PublisherConfig) -> Self {
        self.config = config;
        self
    }
    /// Shorthand for setting only the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.config.mode = mode;
        self
    }

    /// Validate and build. The high-volume mode starts its background task
    /// here and needs a Tokio runtime.
    pub fn build(self) -> Result<DualPublisher, BuildError> {
        self.config.validate()?;
        let mode = self.config.mode;
        if mode != Mode::RealtimeOnly && self.durable.is_none() {
            return Err(BuildError::MissingDurable { mode });
        }
        if mode != Mode::DurableOnly && self.notifier.is_none() {
            return Err(BuildError::MissingNotifier { mode });
        }
        let high_volume = match (mode, &self.notifier) {
            (Mode::HighVolume, Some(notifier)) => {
                let rt = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
                let (tx, rx) = mpsc::channel(self.config.high_volume.queue_capacity);
                let stop = Arc::new(Notify::new());
                let worker = rt.spawn(drain_notifications(
                    rx,
                    notifier.clone(),
                    stop.clone(),
                    self.config.clone(),
                    self.config.high_volume.max_batch,
                ));
                Some(HighVolume { tx, stop, worker: Mutex::new(Some(worker)) })
            }
            _ => None,
        };
        let notifier = if mode == Mode::DurableOnly { None } else { self.notifier };
        let durable = if mode == Mode::RealtimeOnly { None } else { self.durable };
        Ok(DualPublisher { inner: Arc::new(Inner { durable, notifier, config: self.config, high_volume }) })
    }
}

fn record_outcome(outcome: NotificationOutcome, count: u64) {
    let label = match outcome {
        NotificationOutcome::Sent => "sent",
        NotificationOutcome::Queued => "queued",
        NotificationOutcome::Skipped => "skipped",
        NotificationOutcome::Failed => "failed",
        NotificationOutcome::TimedOut => "timed_out",
        NotificationOutcome::Disabled => return,
    };
    metrics::counter!(m::NOTIFICATIONS, "outcome" => label).increment(count);
}

/// Count `n` events stored in `topic`, under OpenTelemetry's
/// `messaging.client.sent.messages` (the label shares the topic's `Arc`).
fn count_stored(topic: &Arc<str>, n: u64) {
    metrics::counter!(m::SENT_MESSAGES, "messaging_system" => "kafka", "messaging_operation_name" => "send",
        "messaging_destination_name" => Arc::clone(topic))
    .increment(n);
}

/// Count one event the durable sink did not store, by its error's kind.
fn count_failed(kind: &'static str) {
    metrics::counter!(m::SENT_MESSAGES, "messaging_system" => "kafka", "messaging_operation_name" => "send",
        "error_type" => kind)
    .increment(1);
}

/// The durable write's duration, under OpenTelemetry's
/// `messaging.client.operation.duration`.
fn record_duration(started: Instant) {
    metrics::histogram!(m::OPERATION_SECONDS, "messaging_system" => "kafka", "messaging_operation_name" => "send")
        .record(started.elapsed().as_secs_f64());
}

/// One bounded notifier call, mapped to an outcome.
async fn notify_bounded(
    notifier: &dyn RealtimeNotifier,
    batch: &[Notification],
    bound: Duration,
) -> NotificationOutcome {
    let call = async {
        if let [one] = batch {
            notifier.notify(one).await
        } else {
            notifier.notify_batch(batch).await
        }
    };
    // With `otel`, a `publish` span for each notification of a traced event.
    let spans: Vec<Traced> =
        if trace::ENABLED { batch.iter().filter_map(Traced::publish).collect() } else { Vec::new() };
    let outcome = match tokio::time::timeout(bound, call).await {
        Ok(Ok(())) => NotificationOutcome::Sent,
        Ok(Err(NotifyError::CircuitOpen)) => NotificationOutcome::Skipped,
        Ok(Err(e @ NotifyError::Timeout { .. })) => {
            tracing::debug!(error = %e, count = batch.len(), "notification not confirmed in time");
            NotificationOutcome::TimedOut
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, count = batch.len(), "notification failed");
            NotificationOutcome::Failed
        }
        Err(_) => {
            tracing::debug!(?bound, count = batch.len(), "notifier did not answer in time");
            NotificationOutcome::TimedOut
        }
    };
    record_outcome(outcome, batch.len() as u64);
    // The notifier answered for these (not skipped, not only queued).
    let n = batch.len() as u64;
    let (system, operation) = (("messaging_system", "redis"), ("messaging_operation_name", "publish"));
    match outcome {
        NotificationOutcome::Sent => metrics::counter!(m::SENT_MESSAGES, &[system, operation]).increment(n),
        NotificationOutcome::Failed | NotificationOutcome::TimedOut => {
            let kind = if outcome == NotificationOutcome::Failed { "failed" } else { "timeout" };
            metrics::counter!(m::SENT_MESSAGES, &[system, operation, ("error_type", kind)]).increment(n);
        }
        _ => {}
    }
    for span in spans {
        span.notified(&outcome);
    }
    outcome
}

/// End the `send` spans of a batch (`otel`), each with its event's result:
/// `traced` holds the index of each traced event ([`Traced::send_all`]).
#[doc(hidden)]
pub fn end_send_spans<E: std::fmt::Display>(traced: Vec<(usize, Traced)>, results: &[Result<Receipt, E>]) {
    for (i, t) in traced {
        if let Some(r) = results.get(i) {
            end_send_span(Some(t), r);
        }
    }
}

/// End one event's `send` span (`otel`) with its result.
#[doc(hidden)]
#[inline]
pub fn end_send_span<E: std::fmt::Display>(traced: Option<Traced>, result: &Result<Receipt, E>) {
    match (traced, result) {
        (Some(t), Ok(receipt)) => t.stored(receipt.position.as_ref()),
        (Some(t), Err(e)) => t.failed(e),
        (None, _) => {}
    }
}

/// What a short queue's pipelines carry at most: [`pipeline_size`].
const SHORT_PIPELINE: usize = 64;

/// The high-volume mode's next pipeline size: the queue's `backlog` shared
/// by the `pipelines` in flight, at least [`SHORT_PIPELINE`] and at most
/// `max_batch`. While the queue is short, pipelines stay small: Redis
/// answers, and the subscribers read, a long pipeline's PUBLISHes one
/// after another, so its last ones wait for all the others (1–2 ms at p99 at
/// 20,000 events/s with 512, docs/benchmark-analysis.md). As the queue
/// grows they grow to `max_batch`, so a backlog drains in few round trips
/// instead of being shed.
pub(crate) fn pipeline_size(backlog: usize, pipelines: usize, max_batch: usize) -> usize {
    (backlog / pipelines.max(1)).clamp(SHORT_PIPELINE.min(max_batch), max_batch)
}

/// The high-volume mode's background task: coalesce queued notifications
/// into pipelined batches ([`pipeline_size`]), up to
/// `high_volume.pipelines` of them in flight (started in queue order),
/// until stopped; then drain what is queued.
async fn drain_notifications(
    mut rx: mpsc::Receiver<Notification>,
    notifier: Arc<dyn RealtimeNotifier>,
    stop: Arc<Notify>,
    config: PublisherConfig,
    max_batch: usize,
) {
    use futures::stream::{FuturesOrdered, StreamExt};
    let pipelines = config.high_volume.pipelines;
    // Each pipeline's buffer comes back when it is answered and serves a
    // later one: at most `pipelines` + 1 buffers, allocated once.
    let send = |batch: Vec<Notification>| {
        let (notifier, bound) = (notifier.clone(), config.pipeline_bound(batch.len()));
        async move {
            notify_bounded(&*notifier, &batch, bound).await;
            batch
        }
    };
    let mut in_flight = FuturesOrdered::new();
    let mut spare: Vec<Vec<Notification>> = Vec::new();
    let mut open = true;
    loop {
        let room = in_flight.len() < pipelines;
        let mut batch = spare.pop().unwrap_or_else(|| Vec::with_capacity(max_batch));
        tokio::select! {
            biased;
            Some(sent) = in_flight.next(), if !in_flight.is_empty() => {
                let mut sent: Vec<Notification> = sent;
                sent.clear();
                spare.extend([batch, sent]);
            }
            n = rx.recv_many(&mut batch, pipeline_size(rx.len(), pipelines, max_batch)), if room => {
                // 0: stopped and drained, or every sender gone.
                if n == 0 {
                    break;
                }
                metrics::gauge!(m::NOTIFY_QUEUE_DEPTH).set(rx.len() as f64);
                in_flight.push_back(send(batch));
            }
            () = stop.notified(), if open => {
                // Take nothing new; what is queued is still sent.
                open = false;
                rx.close();
                spare.push(batch);
            }
        }
    }
    while in_flight.next().await.is_some() {}
}

impl DualPublisher {
    /// Start building a publisher.
    pub fn builder() -> DualPublisherBuilder {
        DualPublisherBuilder::default()
    }

    /// The configuration.
    pub fn config(&self) -> &PublisherConfig {
        &self.inner.config
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.inner.config.mode
    }

    /// Send (or queue) notifications; a call that waits is bounded by
    /// `bound(config, count)`.
    async fn send_notifications(
        &self,
        batch: Vec<Notification>,
        bound: fn(&PublisherConfig, usize) -> Duration,
    ) -> NotificationOutcome {
        if batch.is_empty() {
            return NotificationOutcome::Disabled;
        }
        if let Some(hv) = &self.inner.high_volume {
            let (mut queued, mut full) = (0u64, 0u64);
            for n in batch {
                match hv.tx.try_send(n) {
                    Ok(()) => queued += 1,
                    Err(_) => full += 1,
                }
            }
            record_outcome(NotificationOutcome::Queued, queued);
            record_outcome(NotificationOutcome::Skipped, full);
            return if full == 0 { NotificationOutcome::Queued } else { NotificationOutcome::Skipped };
        }
        match &self.inner.notifier {
            Some(n) => notify_bounded(&**n, &batch, bound(&self.inner.config, batch.len())).await,
            None => NotificationOutcome::Disabled,
        }
    }

    /// Publish one event (docs/design.md, "The contract").
    ///
    /// Resolves once the durable sink acknowledged the write; then the
    /// notification is sent (or queued), bounded in time. Fails only if the
    /// durable write fails, and then hands the event back.
    pub async fn publish(&self, mut event: Event) -> Result<Receipt, PublishError> {
        // With `otel` and a trace under way: the event's `send` span, whose
        // context the event carries to Kafka and Redis.
        let traced = Traced::send(&mut event);
        let span = tracing::debug_span!("publish", id = %event.id(), source_type = event.source().source_type());
        let result = async move {
            let event_id = event.id();
            let Some(durable) = &self.inner.durable else {
                let n = Notification::for_event(&event, None);
                let notification = self.send_notifications(vec![n], PublisherConfig::notify_bound).await;
                return Ok(Receipt { event_id, position: None, notification });
            };
            let n = self.inner.notifier.is_some().then(|| Notification::for_event(&event, None));
            let started = Instant::now();
            let position = match durable.publish(event).await {
                Ok(p) => p,
                Err(e) => {
                    count_failed(e.error.kind());
                    tracing::debug!(error = %e.error, "durable write failed");
                    return Err(e.into());
                }
            };
            record_duration(started);
            count_stored(&position.topic, 1);
            // Stored, but the sink cannot say where: no position rather
            // than a wrong one.
            let position = Some(position).filter(Position::is_known);
            let notification = match n {
                Some(n) => {
                    let n = Notification { position: position.clone(), ..n };
                    self.send_notifications(vec![n], PublisherConfig::notify_bound).await
                }
                None => NotificationOutcome::Disabled,
            };
            Ok(Receipt { event_id, position, notification })
        }
        .instrument(span)
        .await;
        end_send_span(traced, &result);
        result
    }

    /// Publish many events (docs/design.md, "Batch publishing"): one durable
    /// burst, then one batch of notifications for the events that were
    /// stored.
    ///
    /// Returns one result per event, in input order. A partial failure is
    /// reported per event and hands the failed events back.
    pub async fn publish_batch(&self, mut events: Vec<Event>) -> Vec<Result<Receipt, PublishError>> {
        let traced = Traced::send_all(&mut events);
        let stored = self.store_batch(events).await;
        let out = self.notify_stored(stored).await;
        end_send_spans(traced, &out);
        out
    }

    /// Whether sending notifications waits for the notifier (rather than
    /// queueing them at once, as the high-volume mode does, or having none).
    /// A pipeline that sends notifications in a stage of its own only needs
    /// the stage when this is true.
    pub fn notify_waits(&self) -> bool {
        self.inner.notifier.is_some() && self.inner.high_volume.is_none()
    }

    /// The durable write of a batch, awaited: [`enqueue_batch`](Self::enqueue_batch)
    /// then [`PendingStore::stored`].
    pub async fn store_batch(&self, events: Vec<Event>) -> StoredBatch {
        self.enqueue_batch(events).await.stored().await
    }

    /// Hand a batch to the durable sink ([`DurableSink::enqueue_batch`]) and
    /// return its acknowledgements still to come. A pipeline can hand over
    /// the next batch before this one is acknowledged (the batching engine
    /// does); the sink keeps the order of each source.
    pub async fn enqueue_batch(&self, events: Vec<Event>) -> PendingStore {
        let count = events.len();
        let notify = self.inner.notifier.is_some();
        if count == 0 {
            return PendingStore { ids: Vec::new(), notes: Vec::new(), acks: None, started: Instant::now() };
        }
        metrics::histogram!(m::BATCH_SIZE).record(count as f64);
        // Notifications are prepared only when a notifier will get them;
        // otherwise the ids are enough for the receipts (and take 16 bytes
        // an event, not a notification's room).
        let ids: Vec<EventId> = events.iter().map(Event::id).collect();
        let notes: Vec<Notification> =
            if notify { events.iter().map(|e| Notification::for_event(e, None)).collect() } else { Vec::new() };
        let started = Instant::now();
        let acks = match &self.inner.durable {
            Some(durable) => Some(durable.enqueue_batch(events).await),
            None => None,
        };
        PendingStore { ids, notes, acks, started }
    }

    /// Send notifications as a background pipeline and say what became of
    /// them, bounded by [`PublisherConfig::pipeline_timeout_ms`] (plus the
    /// per-notification allowance). The batching engine merges the
    /// notifications of several stored batches into one call; its callers
    /// stop waiting at `notify_timeout_ms`.
    pub async fn notify(&self, notifications: Vec<Notification>) -> NotificationOutcome {
        self.send_notifications(notifications, PublisherConfig::pipeline_bound).await
    }

    /// The second half of [`publish_batch`](Self::publish_batch): send the
    /// notifications of a stored batch and return one result per event, in
    /// input order.
    pub async fn notify_stored(&self, mut batch: StoredBatch) -> Vec<Result<Receipt, PublishError>> {
        let notifications = batch.take_notifications();
        let outcome = self.send_notifications(notifications, PublisherConfig::notify_bound).await;
        batch.finish(outcome)
    }

    /// Check both paths. The durable sink's health decides; the notifier's
    /// result is returned alongside for information.
    pub async fn health_check(&self) -> (Result<(), dualstream_core::SinkError>, Option<Result<(), NotifyError>>) {
        let durable = match &self.inner.durable {
            Some(d) => d.health_check().await,
            None => Ok(()),
        };
        let notifier = match &self.inner.notifier {
            Some(n) => Some(n.health_check().await),
            None => None,
        };
        (durable, notifier)
    }

    /// Graceful shutdown of the publisher's own work: the high-volume queue is
    /// drained (each call still bounded), then the durable sink is flushed.
    /// Publishing after shutdown still works but queues no notifications.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), dualstream_core::SinkError> {
        let deadline = Instant::now() + timeout;
        if let Some(hv) = &self.inner.high_volume {
            hv.stop.notify_one();
            let worker = hv.worker.lock().ok().and_then(|mut w| w.take());
            if let Some(worker) = worker {
                let _ = tokio::time::timeout_at(deadline.into(), worker).await;
            }
        }
        match &self.inner.durable {
            Some(d) => d.flush(deadline.saturating_duration_since(Instant::now())).await,
            None => Ok(()),
        }
    }
}

/// A batch handed to the durable sink whose acknowledgements are still to
/// come: from [`DualPublisher::enqueue_batch`].
#[must_use = "the durable results come from stored()"]
pub struct PendingStore {
    ids: Vec<EventId>,
    /// One per event, in order, when the publisher has a notifier; else
    /// empty.
    notes: Vec<Notification>,
    acks: Option<PendingAcks>,
    started: Instant,
}

impl std::fmt::Debug for PendingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingStore").field("events", &self.ids.len()).finish_non_exhaustive()
    }
}

impl PendingStore {
    /// Events in the batch.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Await the durable acknowledgements: one result per event, and the
    /// notifications of the stored events, not sent yet.
    pub async fn stored(self) -> StoredBatch {
        let PendingStore { ids, notes, acks, started } = self;
        let count = ids.len();
        let Some(acks) = acks else {
            // No durable sink (real-time only): every event is "published";
            // its notification has no position.
            let out = ids
                .into_iter()
                .map(|event_id| Ok(Receipt { event_id, position: None, notification: NotificationOutcome::Disabled }))
                .collect();
            return StoredBatch { out, notifications: notes };
        };
        let notify = !notes.is_empty();
        let mut notes = notes.into_iter();
        let results = acks.await;
        record_duration(started);
        if results.len() != count {
            tracing::error!(expected = count, got = results.len(), "durable sink broke the batch contract");
        }
        let mut notifications = Vec::with_capacity(if notify { count } else { 0 });
        let mut out: Vec<Result<Receipt, PublishError>> = Vec::with_capacity(count);
        // Stored events are counted per topic, one run of equal topics at a time.
        let mut run: Option<(Arc<str>, u64)> = None;
        let mut results = results.into_iter();
        for event_id in ids {
            let n = if notify { notes.next() } else { None };
            match results.next() {
                Some(Ok(position)) => {
                    match &mut run {
                        Some((topic, n)) if *topic == position.topic => *n += 1,
                        _ => {
                            if let Some((topic, n)) = run.replace((Arc::clone(&position.topic), 1)) {
                                count_stored(&topic, n);
                            }
                        }
                    }
                    let position = Some(position).filter(Position::is_known);
                    if let Some(n) = n {
                        notifications.push(Notification { position: position.clone(), ..n });
                    }
                    out.push(Ok(Receipt { event_id, position, notification: NotificationOutcome::Disabled }));
                }
                Some(Err(e)) => {
                    count_failed(e.error.kind());
                    out.push(Err(e.into()));
                }
                None => {
                    count_failed("_OTHER");
                    out.push(Err(PublishError::MissingResult));
                }
            }
        }
        if let Some((topic, n)) = run {
            count_stored(&topic, n);
        }
        StoredBatch { out, notifications }
    }
}

/// A batch whose durable write is done and whose notifications are not sent
/// yet: from [`PendingStore::stored`] or [`DualPublisher::store_batch`].
#[derive(Debug)]
#[must_use = "the receipts come from finish() or DualPublisher::notify_stored"]
pub struct StoredBatch {
    out: Vec<Result<Receipt, PublishError>>,
    notifications: Vec<Notification>,
}

impl StoredBatch {
    /// Events in the batch.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// The notifications of the stored events, in order (empty when the
    /// publisher has no notifier). Send them with [`DualPublisher::notify`],
    /// possibly merged with other batches', then call
    /// [`finish`](Self::finish) with the outcome.
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        std::mem::take(&mut self.notifications)
    }

    /// The receipts, in input order, with `outcome` as the notification
    /// outcome of every stored event.
    pub fn finish(self, outcome: NotificationOutcome) -> Vec<Result<Receipt, PublishError>> {
        let mut out = self.out;
        for receipt in out.iter_mut().flatten() {
            receipt.notification = outcome;
        }
        out
    }
}
