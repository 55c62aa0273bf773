//! Replay from Kafka (docs/design.md, "Replay").

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use dualstream_core::{Event, Position, Source};
use dualstream_kafka::{partition_for_key, TopicRouting};
use futures::Stream;

use crate::config::{ConfigError, ReplayConfig};
use crate::error::ReplayError;
use crate::reader::{Fetched, Marks, Reader};

/// One event read back from Kafka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    /// The event, decoded and validated.
    pub event: Event,
    /// Where it is stored.
    pub position: Position,
    /// The record's Kafka timestamp, in milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

/// Which events to read.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scope {
    /// Every event of one source: only the partition its key maps to is read,
    /// and records of other keys are skipped without being decoded.
    Source(Source),
    /// Every event of one source type (its topic under per-source-type
    /// routing; filtered by type under a single topic).
    SourceType(String),
    /// Every record of the topic (single-topic routing only).
    All,
}

/// Where to start.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartAt {
    /// The oldest record still stored.
    Beginning,
    /// Only what is written after the stream starts.
    End,
    /// This offset (inclusive) in each partition read. For a source: resume
    /// after a delivered position `p` with `Offset(p.offset + 1)`. Below the
    /// first offset still stored, the stream says so first
    /// ([`ReplayError::Truncated`], or `Delivery::Truncated` in a join) and
    /// starts at the first stored record; beyond the end, it starts at the
    /// end.
    Offset(i64),
    /// The first record whose Kafka timestamp is at or after this time, in
    /// milliseconds since the Unix epoch.
    Timestamp(i64),
    /// The last `n` events of the source (needs [`Scope::Source`]).
    LastN(usize),
}

/// Where to stop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Until {
    /// At the high watermark taken when the stream started: the stream ends.
    #[default]
    Now,
    /// Never: keep following the tail.
    Follow,
}

/// What to replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayRequest {
    /// Which events.
    pub scope: Scope,
    /// From where.
    pub start: StartAt,
    /// Until when.
    pub until: Until,
    /// End the stream after the first undecodable record instead of yielding
    /// a [`ReplayError::Decode`] item and going on.
    pub stop_on_decode_error: bool,
}

impl ReplayRequest {
    /// Everything stored for `scope`, up to now.
    pub fn new(scope: Scope) -> Self {
        Self { scope, start: StartAt::Beginning, until: Until::Now, stop_on_decode_error: false }
    }

    /// Start elsewhere than at the beginning.
    pub fn start(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }

    /// Stop elsewhere than at the high watermark.
    pub fn until(mut self, until: Until) -> Self {
        self.until = until;
        self
    }

    /// End at the first undecodable record.
    pub fn stop_on_decode_error(mut self, stop: bool) -> Self {
        self.stop_on_decode_error = stop;
        self
    }
}

/// A replay: a stream of events in partition order (one partition for a
/// source; partitions interleaved otherwise). Memory is bounded by the
/// reader's prefetch bound (`prefetch_max_kbytes`).
pub type ReplayStream = Pin<Box<dyn Stream<Item = Result<Replayed, ReplayError>> + Send>>;

/// Reads events back from Kafka. Cheap to clone; each stream has its own
/// reader.
#[derive(Clone, Debug)]
pub struct Replay {
    config: Arc<ReplayConfig>,
}

/// A resolved scope: the topic, the partitions to read and the filter.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) topic: String,
    pub(crate) partitions: Vec<i32>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) filter: Filter,
}

#[derive(Debug, Clone)]
pub(crate) enum Filter {
    None,
    Source(Source),
    SourceType(String),
}

impl Filter {
    fn keeps(&self, event: &Event) -> bool {
        match self {
            Filter::None => true,
            Filter::Source(s) => event.source() == s,
            Filter::SourceType(t) => event.source().source_type() == t,
        }
    }
}

impl Replay {
    /// Validate the configuration. No connection is made until a stream
    /// starts.
    pub fn new(config: ReplayConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self { config: Arc::new(config) })
    }

    /// The configuration.
    pub fn config(&self) -> &ReplayConfig {
        &self.config
    }

    pub(crate) fn reader(&self) -> Result<Reader, ReplayError> {
        Reader::new(&self.config)
    }

    /// Topic and partition that hold the events of `source`.
    pub async fn partition_of(&self, source: &Source) -> Result<(String, i32), ReplayError> {
        let reader = self.reader()?;
        let t = self.resolve(&reader, &Scope::Source(source.clone())).await?;
        Ok((t.topic, t.partitions[0]))
    }

    pub(crate) async fn resolve(&self, reader: &Reader, scope: &Scope) -> Result<Resolved, ReplayError> {
        let routing = &self.config.topic;
        let (topic, key, filter) = match scope {
            Scope::Source(s) => {
                (routing.topic_for(s.source_type()), Some(s.source_id().as_bytes().to_vec()), Filter::Source(s.clone()))
            }
            Scope::SourceType(t) => {
                dualstream_core::Limits::lenient()
                    .check_source_type(t)
                    .map_err(|e| ReplayError::Request { field: "scope", reason: e.to_string() })?;
                let filter = match routing {
                    TopicRouting::Single { .. } => Filter::SourceType(t.clone()),
                    TopicRouting::PerSourceType { .. } => Filter::None,
                };
                (routing.topic_for(t), None, filter)
            }
            Scope::All => match routing {
                TopicRouting::Single { topic } => (topic.clone(), None, Filter::None),
                TopicRouting::PerSourceType { .. } => {
                    return Err(ReplayError::Request {
                        field: "scope",
                        reason: "Scope::All needs single-topic routing; with one topic per source type use \
                                 Scope::SourceType"
                            .into(),
                    })
                }
            },
        };
        let count = reader.partition_count(&topic).await?;
        let partitions = match &key {
            Some(k) => vec![partition_for_key(k, count)],
            None => (0..count).collect(),
        };
        Ok(Resolved { topic, partitions, key, filter })
    }

    /// Start offsets for `start`, one per partition of the target.
    pub(crate) async fn start_offsets(
        &self,
        reader: &Reader,
        target: &Resolved,
        start: &StartAt,
        truncated: &mut Vec<ReplayError>,
    ) -> Result<Vec<(i32, i64)>, ReplayError> {
        let mut out = Vec::with_capacity(target.partitions.len());
        match start {
            StartAt::Timestamp(ts) => {
                if *ts < 0 {
                    return Err(ReplayError::Request { field: "start", reason: format!("timestamp {ts} is negative") });
                }
                return reader.offsets_for_time(&target.topic, &target.partitions, *ts).await;
            }
            StartAt::Offset(o) if *o < 0 => {
                return Err(ReplayError::Request { field: "start", reason: format!("offset {o} is negative") });
            }
            StartAt::LastN(n) => {
                let Filter::Source(source) = &target.filter else {
                    return Err(ReplayError::Request { field: "start", reason: "LastN needs Scope::Source".into() });
                };
                let p = target.partitions[0];
                let (low, high) = reader.watermarks(&target.topic, p).await?;
                let Marks { low, high } = Marks::sane(low, high);
                let start = last_n_start(reader, target, source, p, *n, low, high).await?;
                return Ok(vec![(p, start)]);
            }
            _ => {}
        }
        for p in &target.partitions {
            let (low, high) = reader.watermarks(&target.topic, *p).await?;
            let Marks { low, high } = Marks::sane(low, high);
            let o = match start {
                StartAt::End => high,
                StartAt::Offset(o) if *o < low => {
                    truncated.push(ReplayError::Truncated {
                        topic: target.topic.clone(),
                        partition: *p,
                        requested: *o,
                        first_available: low,
                    });
                    low
                }
                StartAt::Offset(o) => (*o).min(high),
                // Beginning (Timestamp and LastN returned above).
                _ => low,
            };
            out.push((*p, o));
        }
        Ok(out)
    }

    /// Start a replay.
    pub async fn stream(&self, request: ReplayRequest) -> Result<ReplayStream, ReplayError> {
        let reader = self.reader()?;
        let target = self.resolve(&reader, &request.scope).await?;
        let mut truncated = Vec::new();
        let starts = self.start_offsets(&reader, &target, &request.start, &mut truncated).await?;
        let mut ends = HashMap::new();
        let mut assign = Vec::new();
        for (p, o) in starts {
            if request.until == Until::Now {
                let (_, high) = reader.watermarks(&target.topic, p).await?;
                if o >= high {
                    continue;
                }
                ends.insert(p, high);
            }
            assign.push((p, o));
        }
        let next: HashMap<i32, i64> = assign.iter().copied().collect();
        let done = request.until == Until::Now && ends.is_empty();
        if !done {
            reader.assign(&target.topic, &assign)?;
        }
        // Brokers may answer an offsets-for-times look-up with an earlier
        // offset (or the first one, for a time after every record): skip
        // what is older than asked.
        let min_timestamp = match request.start {
            StartAt::Timestamp(ts) => Some(ts),
            _ => None,
        };
        let state = State {
            reader,
            target,
            ends,
            next,
            until: request.until,
            stop_on_decode: request.stop_on_decode_error,
            min_timestamp,
            done,
            truncated: truncated.into(),
        };
        Ok(Box::pin(futures::stream::unfold(state, |mut s| async move {
            let item = s.next_item().await?;
            Some((item, s))
        })))
    }
}

struct State {
    reader: Reader,
    target: Resolved,
    /// Until::Now: the end offset (exclusive) of each partition still open.
    ends: HashMap<i32, i64>,
    /// The next offset expected per partition (older ones are stale).
    next: HashMap<i32, i64>,
    until: Until,
    stop_on_decode: bool,
    min_timestamp: Option<i64>,
    done: bool,
    /// Truncation items to yield before any record.
    truncated: VecDeque<ReplayError>,
}

impl State {
    async fn next_item(&mut self) -> Option<Result<Replayed, ReplayError>> {
        if let Some(t) = self.truncated.pop_front() {
            return Some(Err(t));
        }
        loop {
            if self.done {
                return None;
            }
            let fetched = match self.until {
                Until::Now => self.reader.recv(self.target.key.as_deref()).await,
                Until::Follow => self.reader.recv_follow(self.target.key.as_deref()).await,
            };
            let fetched = match fetched {
                Ok(f) => f,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            let pos = fetched.position().clone();
            let expected = self.next.get(&pos.partition).copied().unwrap_or(0);
            if pos.offset < expected {
                continue;
            }
            if self.until == Until::Now {
                match self.ends.get(&pos.partition) {
                    // This partition is finished; ignore what came after.
                    None => continue,
                    Some(end) if pos.offset >= *end => continue,
                    Some(end) => {
                        if pos.offset + 1 >= *end {
                            self.ends.remove(&pos.partition);
                            if self.ends.is_empty() {
                                // Deliver this record, then end.
                                self.done = true;
                            }
                        }
                    }
                }
            }
            self.next.insert(pos.partition, pos.offset + 1);
            let Fetched::Record { position, timestamp_ms, event } = fetched else { continue };
            if let (Some(min), Some(ts)) = (self.min_timestamp, timestamp_ms) {
                if ts < min {
                    continue;
                }
            }
            match event {
                Ok(event) if self.target.filter.keeps(&event) => {
                    // With `otel`: a traced event's `receive` span, at the read.
                    let _span = if dualstream_core::trace::ENABLED {
                        dualstream_core::Traced::receive(&event, &position)
                    } else {
                        None
                    };
                    return Some(Ok(Replayed { event, position, timestamp_ms }));
                }
                Ok(_) => continue,
                Err(error) => {
                    if self.stop_on_decode {
                        self.done = true;
                    }
                    return Some(Err(ReplayError::Decode { position, error }));
                }
            }
        }
    }
}

/// The offset of the `n`-th last event of `source` in partition `p`, found
/// by reading windows backwards from the high watermark, each four times the
/// last. Keeps at most `n` offsets in memory.
async fn last_n_start(
    reader: &Reader,
    target: &Resolved,
    source: &Source,
    p: i32,
    n: usize,
    low: i64,
    high: i64,
) -> Result<i64, ReplayError> {
    if n == 0 {
        return Ok(high);
    }
    let key = target.key.as_deref();
    let mut found_after = 0usize; // matches in [window_end, high)
    let mut window_end = high;
    let mut step = (n as i64).saturating_mul(8).max(512);
    while window_end > low {
        let from = window_end.saturating_sub(step).max(low);
        reader.assign(&target.topic, &[(p, from)])?;
        let need = n - found_after;
        let mut last: VecDeque<i64> = VecDeque::with_capacity(need.min(4096));
        let mut next = from;
        while next < window_end {
            let f = reader.recv(key).await?;
            let off = f.position().offset;
            if off < next {
                continue;
            }
            next = off + 1;
            if off >= window_end {
                break;
            }
            if let Fetched::Record { event: Ok(e), .. } = &f {
                if e.source() == source {
                    if last.len() == need {
                        last.pop_front();
                    }
                    last.push_back(off);
                }
            }
        }
        if last.len() == need {
            return Ok(last[0]);
        }
        found_after += last.len();
        window_end = from;
        step = step.saturating_mul(4);
    }
    // Fewer than n stored: all of them.
    Ok(low)
}
