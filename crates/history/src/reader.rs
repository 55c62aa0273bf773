//! A Kafka reader that assigns partitions itself (no consumer group, no
//! commits), for the replay; the watermark look-up the shared readers use too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dualstream_core::{DecodeError, Event, Position};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::ReplayConfig;
use crate::decode::event_of;
use crate::error::ReplayError;

/// The number of partitions of `topic` (a blocking metadata request).
pub(crate) fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    c: &impl Consumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<i32, ReplayError> {
    let md = c.fetch_metadata(Some(topic), timeout)?;
    let count = md
        .topics()
        .iter()
        .find(|m| m.name() == topic && m.error().is_none())
        .map(|m| m.partitions().len() as i32)
        .unwrap_or(0);
    if count == 0 {
        return Err(ReplayError::UnknownTopic { topic: topic.to_owned() });
    }
    Ok(count)
}

/// Whether a broker answered that it no longer leads the partition (or that
/// the partition has no leader for the moment): its leadership is moving.
/// librdkafka refreshes its metadata on these answers.
fn leader_moved(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::FencedLeaderEpoch
                | RDKafkaErrorCode::UnknownLeaderEpoch
        )
    )
}

/// Whether the broker asked could not be reached: it may be down, with the
/// partition led by another broker since. librdkafka does not refresh its
/// metadata on these errors by itself. Its local `UnknownPartition` belongs
/// here too: right after the leader went down, its metadata names no leader
/// for the partition until the refresh (the partitions asked for come from
/// the topic's own partition count, so the partition exists).
fn broker_gone(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::DestroyBroker
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}

/// A partition's `(low, high)` watermarks: a blocking look-up at the leader
/// librdkafka's metadata names. When that broker no longer leads the
/// partition, or cannot be reached, the look-up is asked again (after a pause
/// of 10 ms doubling to 200 ms, and a metadata refresh when the broker could
/// not be reached) until `timeout` has passed, so a leader move or a failover
/// costs a join or a replay a moment, not an error.
pub(crate) fn watermarks_at_leader<C: rdkafka::consumer::ConsumerContext>(
    c: &impl Consumer<C>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> KafkaResult<(i64, i64)> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let mut pause = Duration::from_millis(10);
    loop {
        match c.fetch_watermarks(topic, partition, left()) {
            Err(e) if (leader_moved(&e) || broker_gone(&e)) && Instant::now() + pause < deadline => {
                tracing::debug!(topic, partition, error = %e, "watermark look-up missed the leader; asking again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
                if broker_gone(&e) {
                    // Learn the partition's leader afresh; a failure shows in the next look-up.
                    let _ = c.fetch_metadata(Some(topic), left());
                }
            }
            other => return other,
        }
    }
}

/// The watermarks of many partitions at once: one `ListOffsets` request per
/// leader for the high marks, and one for the low marks of the partitions
/// in `low` (the others get `None`), where a look-up per partition makes
/// two requests for each.
///
/// The low marks are asked for apart because their cost differs by broker:
/// tansu 0.6 on PostgreSQL answers "earliest" by sorting the whole
/// partition (1.5 s for a partition of 820,000 records, growing with it),
/// while "latest" is an index look-up. Asked for every partition on every
/// poll round, they took most of the database's time in 20-minute chaos
/// runs, and everyone waiting for fresh watermarks (a join starting, a
/// gateway subscribe) waited seconds for each round.
///
/// When the batch fails other than by timing out (a leader moved, one
/// partition has no leader), each partition is looked up on its own, with
/// the retries of [`watermarks_at_leader`]; a timeout, or no broker up,
/// fails them all (a broker that does not answer one request would not
/// answer forty, one after another).
pub(crate) fn watermarks_of<C: rdkafka::consumer::ConsumerContext>(
    c: &impl Consumer<C>,
    tps: &[(Arc<str>, i32)],
    low: &[bool],
    timeout: Duration,
) -> Vec<KafkaResult<(Option<i64>, i64)>> {
    let deadline = Instant::now() + timeout;
    let offsets = |tps: &[&(Arc<str>, i32)], at: Offset| -> KafkaResult<Vec<i64>> {
        if tps.is_empty() {
            return Ok(Vec::new());
        }
        let mut tpl = TopicPartitionList::with_capacity(tps.len());
        for (t, p) in tps {
            tpl.add_partition_offset(t, *p, at)?;
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let out = c.offsets_for_times(tpl, left)?;
        tps.iter()
            .map(|(t, p)| match out.find_partition(t, *p).map(|e| (e.error(), e.offset())) {
                Some((Ok(()), Offset::Offset(o))) if o >= 0 => Ok(o),
                Some((Err(e), _)) => Err(e),
                _ => Err(KafkaError::OffsetFetch(RDKafkaErrorCode::OffsetNotAvailable)),
            })
            .collect()
    };
    let all: Vec<&(Arc<str>, i32)> = tps.iter().collect();
    let wanted: Vec<&(Arc<str>, i32)> = tps.iter().zip(low).filter(|(_, l)| **l).map(|(tp, _)| tp).collect();
    let batch = offsets(&all, Offset::End).and_then(|high| Ok((high, offsets(&wanted, Offset::Beginning)?)));
    match batch {
        Ok((high, lows)) => {
            let mut lows = lows.into_iter();
            high.into_iter().zip(low).map(|(h, l)| Ok((if *l { lows.next() } else { None }, h))).collect()
        }
        Err(e)
            if matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::AllBrokersDown)
            ) =>
        {
            tps.iter().map(|_| Err(e.clone())).collect()
        }
        Err(e) => {
            tracing::debug!(error = %e, partitions = tps.len(), "batched watermark look-up failed; asking per partition");
            tps.iter().map(|(t, p)| watermarks_at_leader(c, t, *p, timeout).map(|(l, h)| (Some(l), h))).collect()
        }
    }
}

/// The watermarks of a partition: the first offset still stored and the
/// offset the next record will get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    /// The first offset still stored.
    pub low: i64,
    /// The offset the next record will get.
    pub high: i64,
}

impl Marks {
    /// Watermarks made consistent: a broker that reports `low > high` (or
    /// negative values) gets `high = low`, never a panic.
    pub fn sane(low: i64, high: i64) -> Self {
        let low = low.max(0);
        Self { low, high: high.max(low) }
    }
}

/// One record read, decoded unless it was filtered out by key.
pub(crate) enum Fetched {
    /// Not of the wanted key: only its position matters.
    Skipped(Position),
    /// Of the wanted key (or no key filter).
    Record { position: Position, timestamp_ms: Option<i64>, event: Result<Event, DecodeError> },
}

impl Fetched {
    pub(crate) fn position(&self) -> &Position {
        match self {
            Fetched::Skipped(p) | Fetched::Record { position: p, .. } => p,
        }
    }
}

pub(crate) struct Reader {
    consumer: Arc<StreamConsumer>,
    timeout: Duration,
    /// Partitions whose first record after an assignment has not come yet.
    probes: Mutex<HashMap<i32, Probe>>,
}

/// Checks that reading starts at or before the requested offset. Some
/// Kafka-compatible brokers (tansu 0.6) answer a fetch from an offset inside
/// a record batch with the *next* batch, silently skipping the rest of the
/// batch the offset is in. Real Kafka returns the whole batch. When the first
/// record is past the requested offset, the reader seeks further back (the
/// callers skip records below the requested offset) until the first record
/// is at or before it, or the seek reached offset 0.
struct Probe {
    topic: String,
    requested: i64,
    back: i64,
}

impl Reader {
    pub(crate) fn new(config: &ReplayConfig) -> Result<Self, ReplayError> {
        let consumer: StreamConsumer = config.client_config()?.create()?;
        Ok(Self { consumer: Arc::new(consumer), timeout: config.timeout(), probes: Mutex::new(HashMap::new()) })
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout.as_millis() as u64
    }

    /// Run a blocking librdkafka call off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StreamConsumer, Duration) -> Result<T, ReplayError> + Send + 'static,
    ) -> Result<T, ReplayError> {
        let consumer = Arc::clone(&self.consumer);
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || f(&consumer, timeout))
            .await
            .map_err(|e| ReplayError::Task(e.to_string()))?
    }

    /// The number of partitions of `topic`.
    pub(crate) async fn partition_count(&self, topic: &str) -> Result<i32, ReplayError> {
        let t = topic.to_owned();
        self.blocking(move |c, timeout| partition_count(c, &t, timeout)).await
    }

    /// `(low, high)` watermarks: the first offset still stored and the offset
    /// the next record will get.
    pub(crate) async fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), ReplayError> {
        let t = topic.to_owned();
        self.blocking(move |c, timeout| Ok(watermarks_at_leader(c, &t, partition, timeout)?)).await
    }

    /// The first offset whose record timestamp is at or after `ts_ms`, per
    /// partition; the high watermark where there is none.
    pub(crate) async fn offsets_for_time(
        &self,
        topic: &str,
        partitions: &[i32],
        ts_ms: i64,
    ) -> Result<Vec<(i32, i64)>, ReplayError> {
        let t = topic.to_owned();
        let parts = partitions.to_vec();
        let found = self
            .blocking(move |c, timeout| {
                let mut tpl = TopicPartitionList::new();
                for p in &parts {
                    tpl.add_partition_offset(&t, *p, Offset::Offset(ts_ms))?;
                }
                let out = c.offsets_for_times(tpl, timeout)?;
                Ok(parts.iter().map(|p| (*p, out.find_partition(&t, *p).map(|e| e.offset()))).collect::<Vec<_>>())
            })
            .await?;
        let mut result = Vec::with_capacity(found.len());
        for (p, off) in found {
            let offset = match off {
                Some(Offset::Offset(o)) => o,
                // No record at or after the time: start at the end.
                _ => self.watermarks(topic, p).await?.1,
            };
            result.push((p, offset));
        }
        tracing::debug!(topic, ts_ms, ?result, "offsets for time");
        Ok(result)
    }

    /// Read `topic` from the given offsets (replaces any earlier assignment).
    pub(crate) fn assign(&self, topic: &str, starts: &[(i32, i64)]) -> Result<(), ReplayError> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in starts {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
        }
        self.consumer.assign(&tpl)?;
        let mut probes = self.probes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        probes.clear();
        for (p, o) in starts {
            if *o > 0 {
                probes.insert(*p, Probe { topic: topic.to_owned(), requested: *o, back: 0 });
            }
        }
        Ok(())
    }

    /// Whether a record at `offset` of `partition` may be handed on, or a
    /// seek further back was started (see [`Probe`]).
    fn check_start(&self, partition: i32, offset: i64) -> Result<bool, ReplayError> {
        let mut probes = self.probes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(probe) = probes.get_mut(&partition) else { return Ok(true) };
        let seek_from = probe.requested - probe.back;
        if offset <= probe.requested || seek_from <= 0 {
            probes.remove(&partition);
            return Ok(true);
        }
        probe.back = (probe.back * 4).max(64);
        let to = (probe.requested - probe.back).max(0);
        tracing::debug!(
            partition,
            requested = probe.requested,
            first = offset,
            seek = to,
            "first record past the requested offset; reading from earlier"
        );
        self.consumer.seek(&probe.topic, partition, Offset::Offset(to), Duration::ZERO)?;
        Ok(false)
    }

    /// The next record of the assignment. Records whose key is not `key`
    /// (when given) come back as [`Fetched::Skipped`] without being decoded.
    /// Fails when none arrives within the timeout: call it only when the
    /// watermarks say a record exists, or in follow mode via `recv_follow`.
    pub(crate) async fn recv(&self, key: Option<&[u8]>) -> Result<Fetched, ReplayError> {
        match tokio::time::timeout(self.timeout, self.recv_follow(key)).await {
            Ok(r) => r,
            Err(_) => Err(ReplayError::Timeout {
                what: "reading a record below the high watermark",
                timeout_ms: self.timeout_ms(),
            }),
        }
    }

    /// The next record, waiting as long as it takes.
    pub(crate) async fn recv_follow(&self, key: Option<&[u8]>) -> Result<Fetched, ReplayError> {
        let m = loop {
            let m = self.consumer.recv().await?;
            if self.check_start(m.partition(), m.offset())? {
                break m;
            }
        };
        let position = Position::new(m.topic(), m.partition(), m.offset());
        if let Some(k) = key {
            if m.key() != Some(k) {
                return Ok(Fetched::Skipped(position));
            }
        }
        Ok(Fetched::Record { position, timestamp_ms: m.timestamp().to_millis(), event: event_of(&m) })
    }
}
