use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dualstream_core::record::{self, HeaderScratch};
use dualstream_core::{DeliveryError, DurableSink, Event, PendingAcks, Position, SinkError, Source};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

use crate::config::{KafkaSinkConfig, TopicRouting};
use crate::error::{sink_error, ConfigError};
use crate::topics::{Lookup, TopicCache};

/// Framing counted besides a record's key, value and headers, in bytes:
/// librdkafka's upper bound for one record of message format v2 (36: the
/// length, attributes, timestamp and offset deltas, key and value lengths,
/// header count, as varints at their widest), which is what its producer
/// checks against `message.max.bytes`, plus the 61-byte header of the record
/// batch the record travels in, which the broker counts against its own
/// limit when the record is alone in its batch. An estimate on the safe side:
/// a record the sink accepts is never refused by librdkafka for its size.
pub const RECORD_FRAMING_BYTES: usize = 36 + 61;

/// The bytes of one varint-encoded length (zigzag, as in Kafka records).
fn varint_len(n: usize) -> usize {
    let mut v = (n as u64) << 1;
    let mut len = 1;
    while v >= 0x80 {
        v >>= 7;
        len += 1;
    }
    len
}

/// The size of `event`'s Kafka record as the sink checks it against the
/// producer's `message.max.bytes`: key, payload, every header (dualstream's
/// `ds-*` ones included) with its varint lengths, and
/// [`RECORD_FRAMING_BYTES`].
pub fn record_size(event: &Event) -> usize {
    let mut scratch = HeaderScratch::default();
    let headers: usize = record::headers(event, &mut scratch)
        .map(|(k, v)| varint_len(k.len()) + k.len() + varint_len(v.len()) + v.len())
        .sum();
    RECORD_FRAMING_BYTES + record::key(event).len() + event.payload().len() + headers
}

/// The producer the sink uses: librdkafka's polling thread calls
/// [`AckContext::delivery`] for every record.
pub type SinkProducer = ThreadedProducer<AckContext>;

/// The delivery reports of one enqueued batch, filled in by librdkafka's
/// polling thread. One completion per batch: the awaiting task is woken once,
/// when the last record of the batch is resolved. Opaque outside the sink.
pub struct Acks {
    slots: Vec<OnceLock<Result<(i32, i64), KafkaError>>>,
    remaining: AtomicUsize,
    done: tokio::sync::Notify,
}

impl Acks {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: (0..n).map(|_| OnceLock::new()).collect(),
            remaining: AtomicUsize::new(n),
            done: tokio::sync::Notify::new(),
        })
    }

    /// One record resolved (by a delivery report, or by failing before it
    /// reached the producer).
    fn resolve_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // notify_one keeps a permit if nobody waits yet: no lost wake-up.
            self.done.notify_one();
        }
    }

    async fn all_resolved(&self) {
        while self.remaining.load(Ordering::Acquire) != 0 {
            self.done.notified().await;
        }
    }
}

/// The producer context of the sink: hands each delivery report to its
/// batch's [`Acks`]. The opaque of a record is its batch and its index.
#[derive(Debug, Default)]
pub struct AckContext {
    offsets: OffsetGuard,
}

/// The offsets the broker acknowledged, per partition, to catch one it
/// cannot have meant.
///
/// A write acknowledged without a usable offset is reported with offset -1
/// (`Position::UNKNOWN_OFFSET`): stored, but where is not known. That is the
/// case for a negative offset (Kafka answers a retried batch it had stored
/// already with `DUPLICATE_SEQUENCE_NUMBER` and offset -1), and for an
/// offset at or below one the partition acknowledged before: librdkafka
/// reports a partition's writes in order, so the offsets of a correct broker
/// only grow. (tansu 0.6 answers such a retry with base offset 0, which made
/// receipts and notifications point at other events; `cargo xtask chaos`
/// found it.)
#[derive(Debug, Default)]
pub(crate) struct OffsetGuard {
    /// Only librdkafka's one polling thread reports deliveries, so the lock
    /// is never contended.
    highest: std::sync::Mutex<std::collections::HashMap<String, std::collections::HashMap<i32, i64>>>,
}

impl OffsetGuard {
    /// The offset to report for a write acknowledged at `offset`.
    pub(crate) fn check(&self, topic: &str, partition: i32, offset: i64) -> i64 {
        if offset < 0 {
            return Position::UNKNOWN_OFFSET;
        }
        let mut highest = self.highest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let partitions = match highest.get_mut(topic) {
            Some(p) => p,
            None => highest.entry(topic.to_owned()).or_default(),
        };
        let last = partitions.entry(partition).or_insert(-1);
        if offset <= *last {
            drop(highest);
            tracing::warn!(topic, partition, offset, "the broker acknowledged an offset at or below an earlier one: reported as unknown");
            return Position::UNKNOWN_OFFSET;
        }
        *last = offset;
        offset
    }
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<(Arc<Acks>, usize)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (acks, index) = *opaque;
        let outcome = match result {
            Ok(m) => Ok((m.partition(), self.offsets.check(m.topic(), m.partition(), m.offset()))),
            Err((e, _)) => Err(e.clone()),
        };
        if let Some(slot) = acks.slots.get(index) {
            let _ = slot.set(outcome);
        }
        acks.resolve_one();
    }
}

impl std::fmt::Debug for Acks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acks").field("remaining", &self.remaining.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

/// The Kafka durable sink. Cheap to clone; clones share one producer.
#[derive(Clone)]
pub struct KafkaSink {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced by a fresh producer after a fatal error (see `recover`).
    producer: RwLock<SinkProducer>,
    config: KafkaSinkConfig,
    /// The topic of every event when routing to a single topic.
    single: Option<Arc<str>>,
    /// Topic name per source type, shared with every position handed out;
    /// failures to create one are cached with a back-off.
    topics: TopicCache,
    /// The producer's effective `message.max.bytes`.
    max_record_bytes: usize,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

fn create_producer(config: &KafkaSinkConfig) -> Result<SinkProducer, ConfigError> {
    config.client_config()?.create_with_context(AckContext::default()).map_err(ConfigError::Client)
}

/// What became of one event of a batch while it was handed over.
enum Handed {
    /// In the producer; its delivery report will come.
    Sent(Arc<str>),
    /// Not handed over: its result is this error.
    Failed(SinkError),
}

impl KafkaSink {
    /// Validate the configuration and create the producer. Connecting happens
    /// in the background; call [`DurableSink::health_check`] to wait for the
    /// broker.
    pub fn new(config: KafkaSinkConfig) -> Result<Self, ConfigError> {
        let producer = create_producer(&config)?;
        let topics = TopicCache::new(2 * Duration::from_millis(config.health_timeout_ms));
        let single = match (&config.topic, &config.create_topics) {
            (TopicRouting::Single { topic }, None) => Some(Arc::from(topic.as_str())),
            _ => None,
        };
        let max_record_bytes = config.message_max_bytes();
        let inner = Inner { producer: RwLock::new(producer), config, single, topics, max_record_bytes };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaSinkConfig {
        &self.inner.config
    }

    /// The current producer (a cheap handle), for statistics or advanced use.
    pub fn producer(&self) -> SinkProducer {
        self.inner.producer.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Records handed to the producer whose delivery reports librdkafka has
    /// not finished handing back. A report event can hold many records and
    /// is released after the last of them resolves its caller, so right after
    /// a batch fails the count may still be above zero for a moment.
    pub fn in_flight(&self) -> i32 {
        self.producer().in_flight_count()
    }

    /// After a failed delivery: if the producer hit a fatal error (for
    /// example the broker fenced its producer id after an outage), it can
    /// never deliver again, so replace it with a fresh one. Later publishes
    /// go to the new producer; nothing acknowledged is affected.
    fn recover(&self, failed: &SinkProducer, error: &KafkaError) {
        let fenced = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
        );
        let Some((code, reason)) = failed
            .client()
            .fatal_error()
            .or_else(|| fenced.then(|| (RDKafkaErrorCode::ProducerFenced, error.to_string())))
        else {
            return;
        };
        let mut current = self.inner.producer.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !std::ptr::eq(current.client().native_ptr(), failed.client().native_ptr()) {
            return; // another call replaced it already
        }
        match create_producer(&self.inner.config) {
            Ok(fresh) => {
                tracing::warn!(?code, %reason, "kafka producer hit a fatal error; replaced it with a new producer");
                *current = fresh;
            }
            Err(e) => {
                tracing::error!(error = %e, "kafka producer hit a fatal error and could not be replaced")
            }
        }
    }

    /// Create these topics if they do not exist, with the configured
    /// [`CreateTopics`](crate::CreateTopics) settings (or one partition,
    /// replication factor one, when none are configured).
    pub async fn ensure_topics(&self, names: &[&str]) -> Result<(), SinkError> {
        let cfg = &self.inner.config;
        let (partitions, rf) = cfg.create_topics.as_ref().map_or((1, 1), |c| (c.partitions, c.replication_factor));
        let mut admin_config = ClientConfig::new();
        for (k, v) in &cfg.librdkafka_options {
            admin_config.set(k, v);
        }
        admin_config.set("bootstrap.servers", &cfg.bootstrap_servers);
        let admin: AdminClient<DefaultClientContext> =
            admin_config.create().map_err(|e| SinkError::Broker { message: e.to_string(), retriable: false })?;
        let topics: Vec<NewTopic<'_>> =
            names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(rf))).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_millis(cfg.health_timeout_ms)));
        let results = admin
            .create_topics(&topics, &opts)
            .await
            .map_err(|e| SinkError::Broker { message: format!("create topics: {e}"), retriable: true })?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(SinkError::Broker { message: format!("create topic {topic}: {code}"), retriable: true })
                }
            }
        }
        Ok(())
    }

    /// The topic of a source type, created first when so configured.
    async fn topic_for(&self, event: &Event) -> Result<Arc<str>, SinkError> {
        if let Some(t) = &self.inner.single {
            return Ok(t.clone());
        }
        let st = event.source().source_type();
        match self.inner.topics.lookup(st, Instant::now()) {
            Lookup::Ready(topic) => return Ok(topic),
            // A recent failure, cached: no admin call per event.
            Lookup::Failing(e) => return Err(e),
            Lookup::Resolve => {}
        }
        let name: Arc<str> = self.inner.config.topic.topic_for(st).into();
        if self.inner.config.create_topics.is_some() {
            if let Err(e) = self.ensure_topics(&[&name]).await {
                self.inner.topics.failed(st, &e, Instant::now());
                return Err(e);
            }
        }
        self.inner.topics.resolved(st, name.clone());
        Ok(name)
    }

    /// Hand one record to the producer, waiting for room while the local
    /// queue is full, up to `until`.
    async fn enqueue(
        &self,
        producer: &SinkProducer,
        topic: &str,
        event: &Event,
        opaque: Box<(Arc<Acks>, usize)>,
        until: Instant,
    ) -> Result<(), SinkError> {
        let mut scratch = HeaderScratch::default();
        let mut headers = OwnedHeaders::new_with_capacity(5 + event.headers().len());
        for (key, value) in record::headers(event, &mut scratch) {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        let mut rec = BaseRecord::with_opaque_to(topic, opaque)
            .key(record::key(event))
            .payload(event.payload().as_ref())
            .headers(headers);
        let mut pause = Duration::from_millis(1);
        loop {
            match producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    let now = Instant::now();
                    if now >= until {
                        let waited = Duration::from_millis(self.inner.config.enqueue_timeout_ms);
                        return Err(SinkError::QueueFull { waited });
                    }
                    tokio::time::sleep(pause.min(until - now)).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                    rec = back;
                }
                Err((e, _)) => return Err(sink_error(&e, self.inner.config.message_timeout())),
            }
        }
    }

    /// Refuse a record librdkafka or the broker would refuse for its size,
    /// before it reaches the producer.
    fn check_size(&self, event: &Event) -> Result<(), SinkError> {
        let (size, max) = (record_size(event), self.inner.max_record_bytes);
        if size > max {
            return Err(SinkError::RecordTooLarge { size, max, limit: "message.max.bytes" });
        }
        Ok(())
    }

    /// Check one event's size, find its topic and hand it to the producer.
    async fn send_one(
        &self,
        producer: &SinkProducer,
        acks: &Arc<Acks>,
        index: usize,
        event: &Event,
        until: Instant,
    ) -> Result<Arc<str>, SinkError> {
        self.check_size(event)?;
        let topic = self.topic_for(event).await?;
        self.enqueue(producer, &topic, event, Box::new((acks.clone(), index)), until).await?;
        Ok(topic)
    }

    fn enqueue_deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.inner.config.enqueue_timeout_ms)
    }

    /// Hand every event of a batch to the producer. Once the local queue
    /// stays full past the enqueue timeout, that event and every later one
    /// fail with "queue full" at once; any other failure (a record over
    /// `message.max.bytes`, a topic that cannot be had, a refusal by the
    /// producer) fails the later events of the same source. Either way no
    /// event overtakes an earlier one of its source that was not sent.
    async fn hand_over(&self, producer: &SinkProducer, acks: &Arc<Acks>, events: &[Event]) -> Vec<Handed> {
        let until = self.enqueue_deadline();
        let mut handed = Vec::with_capacity(events.len());
        let mut full: Option<Duration> = None;
        // Sources with a failed event in this batch (rare: allocated on the
        // first failure only).
        let mut failed: Vec<(&Source, String, bool)> = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let refused = if let Some(waited) = full {
                Some(SinkError::QueueFull { waited })
            } else {
                failed.iter().find(|(s, ..)| *s == event.source()).map(|(_, earlier, retriable)| {
                    SinkError::EarlierFailed {
                        earlier: earlier.clone(),
                        retriable: *retriable,
                    }
                })
            };
            let outcome = match refused {
                Some(e) => Err(e),
                None => self.send_one(producer, acks, index, event, until).await,
            };
            match outcome {
                Ok(topic) => handed.push(Handed::Sent(topic)),
                Err(e) => {
                    match &e {
                        SinkError::QueueFull { waited } => full = Some(*waited),
                        SinkError::EarlierFailed { .. } => {}
                        other => failed.push((event.source(), other.to_string(), other.is_retriable())),
                    }
                    acks.resolve_one();
                    handed.push(Handed::Failed(e));
                }
            }
        }
        handed
    }
}

#[async_trait]
impl DurableSink for KafkaSink {
    async fn publish(&self, event: Event) -> Result<Position, DeliveryError> {
        let results = self.enqueue_batch(vec![event]).await.await;
        // Invariant: enqueue_batch returns exactly one result per event.
        #[allow(clippy::expect_used)]
        results.into_iter().next().expect("one result for one event")
    }

    async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<Position, DeliveryError>> {
        self.enqueue_batch(events).await.await
    }

    /// Every record is handed to the producer (see the order rules above),
    /// then the returned future awaits the batch's delivery reports: one
    /// wake-up for the whole batch. librdkafka keeps the order of records of
    /// one partition across batches, so the next batch may be handed over
    /// while this one is in flight.
    async fn enqueue_batch(&self, events: Vec<Event>) -> PendingAcks {
        let producer = self.producer();
        let acks = Acks::new(events.len());
        let handed = self.hand_over(&producer, &acks, &events).await;
        let sink = self.clone();
        Box::pin(async move {
            acks.all_resolved().await;
            let mut out = Vec::with_capacity(events.len());
            for ((event, handed), slot) in events.into_iter().zip(handed).zip(&acks.slots) {
                out.push(match handed {
                    Handed::Failed(e) => Err(DeliveryError::new(e, event)),
                    Handed::Sent(topic) => match slot.get() {
                        Some(Ok((partition, offset))) => Ok(Position { topic, partition: *partition, offset: *offset }),
                        Some(Err(e)) => {
                            sink.recover(&producer, e);
                            Err(DeliveryError::new(sink_error(e, sink.inner.config.message_timeout()), event))
                        }
                        // Every record is resolved once `all_resolved`
                        // returns; a missing report would be a librdkafka bug.
                        None => Err(DeliveryError::new(SinkError::other("no delivery report for this record"), event)),
                    },
                });
            }
            out
        })
    }

    async fn health_check(&self) -> Result<(), SinkError> {
        let cfg = &self.inner.config;
        let topic = match &cfg.topic {
            TopicRouting::Single { topic } => Some(topic.clone()),
            TopicRouting::PerSourceType { .. } => None,
        };
        if let (Some(t), Some(_)) = (&topic, &cfg.create_topics) {
            self.ensure_topics(&[t]).await?;
        }
        let producer = self.producer();
        let timeout = Duration::from_millis(cfg.health_timeout_ms);
        let t = topic.clone();
        let metadata = tokio::task::spawn_blocking(move || producer.client().fetch_metadata(t.as_deref(), timeout))
            .await
            .map_err(|e| SinkError::other(e.to_string()))?
            .map_err(|e| SinkError::Broker { message: format!("metadata: {e}"), retriable: true })?;
        if let Some(t) = topic {
            let found = metadata.topics().iter().find(|m| m.name() == t);
            match found {
                Some(m) if m.error().is_none() && !m.partitions().is_empty() => {}
                _ => {
                    return Err(SinkError::Rejected {
                        reason: format!("topic {t:?} does not exist (create it, or set create_topics)"),
                    })
                }
            }
        }
        Ok(())
    }

    async fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| SinkError::other(e.to_string()))?
            .map_err(|e| sink_error(&e, timeout))
    }
}

#[cfg(test)]
mod offset_guard_tests {
    use super::*;

    #[test]
    fn offsets_that_cannot_be_right_are_reported_as_unknown() {
        let g = OffsetGuard::default();
        assert_eq!(g.check("t", 0, 5), 5);
        assert_eq!(g.check("t", 0, 6), 6);
        assert_eq!(g.check("t", 1, 0), 0, "partitions are apart");
        assert_eq!(g.check("u", 0, 1), 1, "topics are apart");
        // A retried batch answered with base offset 0 (tansu 0.6), or the
        // same offset twice.
        assert_eq!(g.check("t", 0, 0), Position::UNKNOWN_OFFSET);
        assert_eq!(g.check("t", 0, 6), Position::UNKNOWN_OFFSET);
        // Kafka's own answer for a duplicate: -1.
        assert_eq!(g.check("t", 0, -1), Position::UNKNOWN_OFFSET);
        assert_eq!(g.check("t", 0, 7), 7, "later writes are reported as before");
    }
}
