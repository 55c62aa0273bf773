use std::ffi::c_void;
use std::ptr::NonNull;
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
use rdkafka::util::{IntoOpaque, Timeout};
use rdkafka::ClientConfig;

use crate::config::{KafkaSinkConfig, TopicRouting};
use crate::error::{delivery_error, sink_error, ConfigError};
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
    let headers: usize = record::header_lengths(event).map(|(k, v)| varint_len(k) + k + varint_len(v) + v).sum();
    RECORD_FRAMING_BYTES + record::key(event).len() + event.payload().len() + headers
}

/// The producer the sink uses: librdkafka's polling thread calls
/// [`AckContext::delivery`] for every record.
pub type SinkProducer = ThreadedProducer<AckContext>;

/// The delivery reports of one enqueued batch, filled in by librdkafka's
/// polling thread. One completion per batch: the awaiting task is woken once,
/// when the last record of the batch is resolved. Opaque outside the sink.
pub struct Acks {
    slots: Box<[Slot]>,
    remaining: AtomicUsize,
    done: tokio::sync::Notify,
}

/// One record's place in its batch's [`Acks`].
struct Slot {
    report: OnceLock<Report>,
    /// The batch this slot is part of: the `Acks` that holds it, which never
    /// moves while a strong count of it is held.
    owner: *const Acks,
}

// SAFETY: `owner` is only a back-reference to the `Acks` that holds the
// slot, dereferenced by a `SlotRef` while that holds a strong count of it;
// every other field is `Send + Sync`.
#[allow(unsafe_code)]
unsafe impl Send for Slot {}
// SAFETY: as above; shared access reads `owner` and goes through `OnceLock`.
#[allow(unsafe_code)]
unsafe impl Sync for Slot {}

impl Acks {
    fn new(n: usize) -> Arc<Self> {
        Arc::new_cyclic(|me| {
            let owner = me.as_ptr();
            Self {
                slots: (0..n).map(|_| Slot { report: OnceLock::new(), owner }).collect(),
                remaining: AtomicUsize::new(n),
                done: tokio::sync::Notify::new(),
            }
        })
    }

    /// The delivery opaque of record `index` (below the batch's length).
    fn slot_ref(self: &Arc<Self>, index: usize) -> SlotRef {
        let slot = NonNull::from(&self.slots[index]);
        // The count the `SlotRef` holds, given back by its `Drop`.
        std::mem::forget(Arc::clone(self));
        SlotRef(slot)
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

/// A record's delivery opaque: a pointer to its slot, holding one strong
/// count of the slot's batch. It is a pointer, not a `Box` of the batch and
/// the index, so that a record costs no allocation of its own on the caller's
/// thread and no free on librdkafka's polling thread; the count goes back
/// when it is dropped (after the report, or with a record the producer
/// refused).
pub struct SlotRef(NonNull<Slot>);

// SAFETY: a `SlotRef` owns a strong count of the `Acks` its slot lies in, so
// the slot stays valid wherever the `SlotRef` goes; the slot is `Sync`.
#[allow(unsafe_code)]
unsafe impl Send for SlotRef {}
// SAFETY: as above; `&SlotRef` only reads the slot.
#[allow(unsafe_code)]
unsafe impl Sync for SlotRef {}

impl SlotRef {
    fn slot(&self) -> &Slot {
        // SAFETY: the strong count this `SlotRef` holds keeps the `Acks`,
        // and so its boxed slots, alive and in place.
        #[allow(unsafe_code)]
        unsafe {
            self.0.as_ref()
        }
    }

    fn acks(&self) -> &Acks {
        // SAFETY: `owner` is the `Acks` holding the slot (set by
        // `Acks::new`), alive for the same reason.
        #[allow(unsafe_code)]
        unsafe {
            &*self.slot().owner
        }
    }
}

impl Drop for SlotRef {
    fn drop(&mut self) {
        let owner = self.slot().owner;
        // SAFETY: gives back the count taken in `Acks::slot_ref`; `owner`
        // came from that `Arc`. Nothing of the slot is used after this.
        #[allow(unsafe_code)]
        unsafe {
            Arc::decrement_strong_count(owner);
        }
    }
}

impl IntoOpaque for SlotRef {
    fn into_ptr(self) -> *mut c_void {
        let ptr = self.0.as_ptr().cast::<c_void>();
        // The count travels with the pointer through librdkafka.
        std::mem::forget(self);
        ptr
    }

    #[allow(unsafe_code)]
    unsafe fn from_ptr(ptr: *mut c_void) -> Self {
        // SAFETY: the caller passes a pointer made by `into_ptr` (rdkafka
        // does so once per record: with its delivery report, or when it hands
        // a refused record back), so it is a non-null slot pointer whose
        // count is taken back here.
        Self(unsafe { NonNull::new_unchecked(ptr.cast::<Slot>()) })
    }
}

impl std::fmt::Debug for SlotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotRef").finish_non_exhaustive()
    }
}

/// One record's delivery report, as the sink judges it.
#[derive(Debug)]
enum Report {
    /// Acknowledged at this partition and offset.
    Stored(i32, i64),
    /// Acknowledged at an offset the broker cannot have meant (see
    /// [`OffsetGuard`]): the write may or may not be stored.
    Unreconciled { partition: i32, offset: i64 },
    /// The producer reported an error; `possibly_stored` is librdkafka's
    /// own judgement (the request may have reached the broker).
    Failed { error: KafkaError, possibly_stored: bool },
}

/// Whether librdkafka says a record whose delivery failed may nonetheless
/// be stored: it tracks whether the record's request was sent and whether
/// the broker's answer was seen (`rd_kafka_message_status`).
#[allow(unsafe_code)]
fn possibly_stored(m: &rdkafka::message::BorrowedMessage<'_>) -> bool {
    use rdkafka::bindings::{rd_kafka_message_status, rd_kafka_msg_status_t};
    // SAFETY: `m.ptr()` is the message librdkafka handed to this delivery
    // report callback, valid for the callback's duration; the call only
    // reads its status field.
    let status = unsafe { rd_kafka_message_status(m.ptr()) };
    status != rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED
}

/// The producer context of the sink: hands each delivery report to its
/// batch's [`Acks`]. The opaque of a record is its slot in the batch ([`SlotRef`]).
#[derive(Debug)]
pub struct AckContext {
    /// Shared by every producer of one sink, so a replaced producer's
    /// successor keeps checking against what the broker already answered.
    pub(crate) offsets: Arc<OffsetGuard>,
}

/// The offsets the broker acknowledged, per partition, to catch one it
/// cannot have meant.
///
/// librdkafka reports a partition's writes in order, so the offsets a
/// correct broker acknowledges to one producer only grow (other producers'
/// writes only make them jump ahead). When a broker answers a produce
/// request with `DUPLICATE_SEQUENCE_NUMBER` ("stored already"), librdkafka
/// reports the batch as delivered at the answer's base offset, -1, plus each
/// record's index: -1, 0, 1, … That answer is only as good as the broker's
/// idempotence, and tansu 0.6's PostgreSQL engine gives it for batches it
/// never stored (a race in its sequence check: docs/reliability.md).
///
/// So an acknowledgement is refused, and the sink reports
/// [`SinkError::OutcomeUnknown`] instead of a position, when its offset is
/// negative, at or below an offset the partition acknowledged before, or
/// continues a run that began at -1 (the later records of a duplicate
/// answer, which can lie above everything acknowledged while a partition is
/// young). A run is at most one batch long (`batch_num_messages`), and ends
/// at the first offset accepted.
#[derive(Debug)]
pub(crate) struct OffsetGuard {
    /// Only librdkafka's polling thread of the current producer reports
    /// deliveries (a replaced producer has drained first), so the lock is
    /// never contended.
    ///
    /// By topic (a sink writes to one or a few: a short list beats hashing
    /// the name for every record), then by partition id.
    partitions: std::sync::Mutex<Vec<(String, Vec<Seen>)>>,
    /// The longest batch librdkafka sends (`batch.num.messages`).
    max_run: u32,
}

/// What one partition's acknowledgements said so far.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// The highest offset accepted.
    highest: i64,
    /// The last offset of a refused run that began at -1, and its length.
    run: Option<(i64, u32)>,
}

impl OffsetGuard {
    pub(crate) fn new(max_run: u32) -> Self {
        Self { partitions: std::sync::Mutex::default(), max_run }
    }

    /// Whether an acknowledgement at `offset` can be right; a right one
    /// raises the partition's highest offset.
    pub(crate) fn check(&self, topic: &str, partition: i32, offset: i64) -> bool {
        // A delivered record always has a partition id, far below this bound
        // (a broker's answer should not size this table); one outside cannot
        // be placed, so its outcome is unknown.
        const MAX_PARTITIONS: usize = 1 << 17;
        let Some(slot) = usize::try_from(partition).ok().filter(|&p| p < MAX_PARTITIONS) else {
            tracing::warn!(
                topic,
                partition,
                offset,
                "the broker acknowledged a write at a partition it cannot have meant: outcome unknown"
            );
            return false;
        };
        let mut all = self.partitions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = match all.iter().position(|(t, _)| t == topic) {
            Some(at) => at,
            None => {
                all.push((topic.to_owned(), Vec::new()));
                all.len() - 1
            }
        };
        let partitions = &mut all[at].1;
        if partitions.len() <= slot {
            partitions.resize(slot + 1, Seen { highest: -1, run: None });
        }
        let seen = &mut partitions[slot];
        let run = match seen.run {
            Some((last, len)) if offset == last + 1 && len < self.max_run => Some((offset, len + 1)),
            _ if offset == -1 => Some((-1, 1)),
            _ => None,
        };
        if run.is_none() && offset > seen.highest {
            *seen = Seen { highest: offset, run: None };
            return true;
        }
        seen.run = run;
        let highest = seen.highest;
        drop(all);
        tracing::warn!(
            topic,
            partition,
            offset,
            highest,
            "the broker acknowledged a write at an offset it cannot have meant: outcome unknown"
        );
        false
    }
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = SlotRef;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(m) if self.offsets.check(m.topic(), m.partition(), m.offset()) => {
                Report::Stored(m.partition(), m.offset())
            }
            Ok(m) => Report::Unreconciled { partition: m.partition(), offset: m.offset() },
            Err((e, m)) => Report::Failed { error: e.clone(), possibly_stored: possibly_stored(m) },
        };
        let _ = opaque.slot().report.set(outcome);
        opaque.acks().resolve_one();
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
    /// The acknowledged offsets, shared by every producer of the sink.
    offsets: Arc<OffsetGuard>,
    /// A replacement is waiting for the failed producer to drain.
    replacing: std::sync::atomic::AtomicBool,
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

fn create_producer(config: &KafkaSinkConfig, offsets: &Arc<OffsetGuard>) -> Result<SinkProducer, ConfigError> {
    let context = AckContext { offsets: offsets.clone() };
    config.client_config()?.create_with_context(context).map_err(ConfigError::Client)
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
        let offsets = Arc::new(OffsetGuard::new(config.batch_num_messages));
        let producer = create_producer(&config, &offsets)?;
        let topics = TopicCache::new(2 * Duration::from_millis(config.health_timeout_ms));
        let single = match (&config.topic, &config.create_topics) {
            (TopicRouting::Single { topic }, None) => Some(Arc::from(topic.as_str())),
            _ => None,
        };
        let max_record_bytes = config.message_max_bytes();
        let inner = Inner {
            producer: RwLock::new(producer),
            offsets,
            replacing: std::sync::atomic::AtomicBool::new(false),
            config,
            single,
            topics,
            max_record_bytes,
        };
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
    /// never deliver again, so replace it with a fresh one.
    ///
    /// The replacement waits until the failed producer has drained: every
    /// record it holds has its delivery report (librdkafka purges what it
    /// had not sent and reports what is in flight with the broker's answer).
    /// Until then publishes still reach the failed producer, which refuses
    /// them at once ([`SinkError::Unavailable`]: not sent). So no event is
    /// sent by the new producer while an earlier event of its source may
    /// still be stored by the old one: order holds, and the idempotent
    /// producer's sequence of each partition starts afresh only when nothing
    /// of the old one is pending. The wait is bounded by the delivery
    /// deadline (`message_timeout_ms`).
    ///
    /// A batch refused with `UNKNOWN_SERVER_ERROR` is treated the same way.
    /// After a record times out, librdkafka bumps its producer epoch by
    /// itself; a broker without that part of the protocol (tansu 0.6) then
    /// refuses every later batch with that error, and librdkafka bumps
    /// again, so the producer would never deliver again. A fresh producer
    /// asks the broker for its id and epoch. On Kafka the error is rare,
    /// and a replacement costs a new producer id.
    fn recover(&self, failed: &SinkProducer, error: &KafkaError) {
        let replaceable = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch | RDKafkaErrorCode::Unknown)
        );
        let Some((code, reason)) = failed.client().fatal_error().or_else(|| {
            replaceable.then(|| (error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Unknown), error.to_string()))
        }) else {
            return;
        };
        if !self.is_current(failed) || self.inner.replacing.swap(true, Ordering::AcqRel) {
            return; // replaced already, or a replacement is under way
        }
        tracing::warn!(?code, %reason, "kafka producer cannot deliver again; replacing it once its writes in flight have their outcomes");
        let (sink, failed) = (self.clone(), failed.clone());
        let deadline = Instant::now() + self.inner.config.message_timeout() + Duration::from_secs(1);
        // A thread of its own: rare, and independent of the caller's runtime.
        let spawned = std::thread::Builder::new().name("dualstream-kafka-replace".into()).spawn(move || {
            while failed.in_flight_count() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if failed.in_flight_count() > 0 {
                tracing::error!(
                    left = failed.in_flight_count(),
                    "the failed producer did not drain within the delivery deadline; replacing it anyway"
                );
            }
            sink.replace(&failed);
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the producer replacement; the sink keeps the failed producer");
            self.inner.replacing.store(false, Ordering::Release);
        }
    }

    fn is_current(&self, producer: &SinkProducer) -> bool {
        let current = self.inner.producer.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::ptr::eq(current.client().native_ptr(), producer.client().native_ptr())
    }

    /// Put a fresh producer in the failed one's place.
    fn replace(&self, failed: &SinkProducer) {
        let mut current = self.inner.producer.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if std::ptr::eq(current.client().native_ptr(), failed.client().native_ptr()) {
            match create_producer(&self.inner.config, &self.inner.offsets) {
                Ok(fresh) => {
                    tracing::warn!("kafka producer replaced");
                    *current = fresh;
                }
                Err(e) => tracing::error!(error = %e, "kafka producer hit a fatal error and could not be replaced"),
            }
        }
        drop(current);
        self.inner.replacing.store(false, Ordering::Release);
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
        opaque: SlotRef,
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
        self.enqueue(producer, &topic, event, acks.slot_ref(index), until).await?;
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
        // While a replacement waits for the failed producer to drain, nothing
        // more is handed to it: the drain ends, and nothing overtakes.
        let replacing = self.inner.replacing.load(Ordering::Acquire);
        // Sources with a failed event in this batch (rare: allocated on the
        // first failure only).
        let mut failed: Vec<(&Source, String, bool)> = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let refused = if replacing {
                Some(SinkError::Unavailable {
                    reason: "the Kafka producer is being replaced once its writes in flight have their outcomes".into(),
                })
            } else if let Some(waited) = full {
                Some(SinkError::QueueFull { waited })
            } else {
                failed.iter().find(|(s, ..)| *s == event.source()).map(|(_, earlier, retriable)| {
                    SinkError::EarlierFailed { earlier: earlier.clone(), retriable: *retriable }
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
                        _ if replacing => {}
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
            for ((event, handed), slot) in events.into_iter().zip(handed).zip(acks.slots.iter()) {
                out.push(match handed {
                    Handed::Failed(e) => Err(DeliveryError::new(e, event)),
                    Handed::Sent(topic) => match slot.report.get() {
                        Some(Report::Stored(partition, offset)) => {
                            Ok(Position { topic, partition: *partition, offset: *offset })
                        }
                        Some(Report::Unreconciled { partition, offset }) => {
                            let reason = format!(
                                "the broker acknowledged {topic}/{partition} at offset {offset}, which it cannot have \
                                 meant (negative, or at or below an offset it acknowledged before)"
                            );
                            Err(DeliveryError::new(SinkError::OutcomeUnknown { reason }, event))
                        }
                        Some(Report::Failed { error, possibly_stored }) => {
                            sink.recover(&producer, error);
                            let deadline = sink.inner.config.message_timeout();
                            Err(DeliveryError::new(delivery_error(error, *possibly_stored, deadline), event))
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
    fn offsets_that_cannot_be_right_are_refused() {
        let g = OffsetGuard::new(10_000);
        assert!(g.check("t", 0, 5));
        assert!(g.check("t", 0, 6));
        assert!(g.check("t", 1, 0), "partitions are apart");
        assert!(g.check("u", 0, 1), "topics are apart");
        // A duplicate answer's records at -1 + index (librdkafka), or the
        // same offset twice.
        assert!(!g.check("t", 0, 0));
        assert!(!g.check("t", 0, 6));
        // Kafka's own answer for a duplicate: -1.
        assert!(!g.check("t", 0, -1));
        assert!(g.check("t", 0, 7), "later writes are accepted as before");
    }

    #[test]
    fn a_duplicate_answer_is_refused_whole_even_above_the_highest_offset() {
        // A young partition: offsets 0..=2 acknowledged. A batch of six
        // answered DUPLICATE_SEQUENCE_NUMBER is reported at -1, 0, 1, 2, 3, 4:
        // 3 and 4 lie above everything acknowledged, yet are no positions.
        let g = OffsetGuard::new(10_000);
        for o in 0..=2 {
            assert!(g.check("t", 0, o));
        }
        for o in -1..=4 {
            assert!(!g.check("t", 0, o), "offset {o} of the duplicate answer");
        }
        // The next real answer starts at the partition's end, not at 5.
        assert!(g.check("t", 0, 3));
        assert!(g.check("t", 0, 4));
        assert!(!g.check("t", 0, 4), "the same offset twice");
        assert!(g.check("t", 0, 5), "only a run that began at -1 continues");
    }

    #[test]
    fn a_partition_id_that_cannot_be_is_refused_and_sizes_nothing() {
        let g = OffsetGuard::new(10_000);
        assert!(!g.check("t", -1, 0), "no partition");
        assert!(!g.check("t", i32::MAX, 0), "a broker's answer must not size the table");
        assert!(g.check("t", 7, 0), "partitions are placed by id, the ones before them empty");
        assert!(g.check("t", 3, 0));
        assert!(!g.check("t", 7, 0));
        let table = g.partitions.lock().expect("lock");
        assert_eq!((table.len(), table[0].1.len()), (1, 8));
    }

    #[test]
    fn a_run_is_at_most_one_batch_long() {
        // A partition whose next real offset happens to continue a refused
        // run is refused for at most batch.num.messages records.
        let g = OffsetGuard::new(4);
        for o in -1..=2 {
            assert!(!g.check("t", 0, o));
        }
        assert!(g.check("t", 0, 3), "past one batch, offsets are accepted again");
        assert!(g.check("t", 0, 4));
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    /// Every record's opaque gives its count of the batch back: after its
    /// delivery report, and when the producer hands a refused record back
    /// (queue full). A count kept would leak the batch; one given back twice
    /// would free it under the slots still in flight.
    #[test]
    fn every_slot_ref_gives_its_count_back_delivered_or_refused() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 2, 1).expect("topic");
        let config = KafkaSinkConfig {
            bootstrap_servers: cluster.bootstrap_servers(),
            topic: TopicRouting::Single { topic: "t".into() },
            linger_ms: 1,
            queue_max_messages: 5,
            ..KafkaSinkConfig::default()
        };
        let offsets = Arc::new(OffsetGuard::new(config.batch_num_messages));
        let producer = create_producer(&config, &offsets).expect("producer");
        let acks = Acks::new(20);
        let (mut sent, mut refused) = (Vec::new(), 0);
        for i in 0..20 {
            let key = format!("k{i}");
            let rec = BaseRecord::with_opaque_to("t", acks.slot_ref(i)).key(&key).payload("v");
            match producer.send(rec) {
                Ok(()) => sent.push(i),
                Err((e, back)) => {
                    assert_eq!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::QueueFull));
                    drop(back);
                    refused += 1;
                }
            }
        }
        assert!(refused > 0 && !sent.is_empty(), "a queue of 5 takes some of 20 and refuses the rest");
        producer.flush(Timeout::After(Duration::from_secs(10))).expect("flush");
        // The polling thread may still be inside the last callback.
        let until = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&acks) > 1 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(Arc::strong_count(&acks), 1, "every opaque gave its count back, once");
        for (i, slot) in acks.slots.iter().enumerate() {
            let stored = matches!(slot.report.get(), Some(Report::Stored(..)));
            assert_eq!(stored, sent.contains(&i), "record {i}: a report exactly for the records sent");
        }
        assert_eq!(acks.remaining.load(Ordering::Acquire), 20 - sent.len());
    }
}
