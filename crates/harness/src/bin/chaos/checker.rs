//! The checker: an independent read of the whole topic (with the checker's
//! own decoder, `wire`), held against what every caller, the witness and
//! every join client was told.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::wire::{self, WireEvent};
use super::gateway::GatewayLog;
use super::{Sent, Told, PARTITIONS, TOPIC};

/// The event type, source type and user header the harness publishes with.
pub(crate) const EVENT_TYPE: &str = "chaos.tick";
pub(crate) const SOURCE_TYPE: &str = "chaos";
pub(crate) const SEQ_HEADER: &str = "chaos-seq";
/// How long after it was acknowledged a join must have delivered an event,
/// outside faults (and this long after a fault healed).
pub(crate) const TAIL_BOUND_MS: u32 = 5_000;
/// A join error this close after a broker fault healed is the outage's
/// (librdkafka's reconnect back-off grows to `reconnect.backoff.max.ms`,
/// 10 s by default, while the broker is down)...
pub(crate) const OUTAGE_GRACE_MS: u32 = 10_000;
/// ...and so is one whose wait began by then: the join's reader gives up
/// after waiting this long for a record below the high watermark.
pub(crate) const JOIN_READ_WAIT_MS: u32 = 10_000;

/// One record, as the checker needs it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stored {
    pub(crate) id: u128,
    pub(crate) source: usize,
    pub(crate) seq: u64,
    pub(crate) digest: u32,
}

/// A record the harness could have published: the documented format, and
/// the type, source, sequence (payload and header) and time it was sent with.
pub(crate) fn expect_chaos(e: &WireEvent, run_began_ms: u64) -> Result<Stored, String> {
    if e.event_type != EVENT_TYPE || e.source_type != SOURCE_TYPE {
        return Err(format!("type {:?} of source type {:?}", e.event_type, e.source_type));
    }
    let source = source_number(&e.source_id)?;
    let seq = serde_json::from_slice::<serde_json::Value>(&e.payload)
        .ok()
        .and_then(|v| v["seq"].as_u64())
        .ok_or_else(|| format!("payload {:?} without a seq", String::from_utf8_lossy(&e.payload)))?;
    if e.headers.len() != 1 || e.headers.get(SEQ_HEADER) != Some(&seq.to_string()) {
        return Err(format!("headers {:?}, sent with {SEQ_HEADER}={seq} only", e.headers));
    }
    let now = now_ms();
    if e.occurred_at_ms + 60_000 < run_began_ms || e.occurred_at_ms > now + 60_000 {
        return Err(format!("occurred at {} ms, outside the run ({run_began_ms}..{now})", e.occurred_at_ms));
    }
    Ok(Stored { id: e.id, source, seq, digest: e.digest() })
}

/// The harness names its sources `s0`, `s1`, …
fn source_number(source_id: &str) -> Result<usize, String> {
    source_id.strip_prefix('s').and_then(|n| n.parse().ok()).ok_or_else(|| format!("source id {source_id:?}"))
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Every record of the topic to every partition's high watermark, by a
/// plain consumer, each passed to `each` with its position: decoded by the
/// checker's own parser, or why it could not be.
pub(crate) fn read_back(
    brokers: &str,
    mut each: impl FnMut((i32, i64), Result<WireEvent, String>),
) -> Result<(), String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "chaos-checker")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("checker consumer");
    let mut tpl = TopicPartitionList::new();
    let mut highs = HashMap::new();
    for p in 0..PARTITIONS {
        // The broker may still be coming back from the last fault: ask
        // for up to two minutes, then fail the run saying so.
        let mut tries = 0;
        let (_, high) = loop {
            match consumer.fetch_watermarks(TOPIC, p, Duration::from_secs(10)) {
                Ok(marks) => break marks,
                Err(e) if tries < 12 => {
                    tries += 1;
                    eprintln!("checker: watermarks of partition {p}: {e}; asking again");
                }
                Err(e) => {
                    return Err(format!(
                        "the broker did not answer for the read-back: watermarks of partition {p}: {e}"
                    ))
                }
            }
        };
        highs.insert(p, high);
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut next: HashMap<i32, i64> = HashMap::new();
    // Until every partition is read to the watermark taken first (and 2
    // quiet seconds more), or nothing arrives for a minute.
    let mut quiet_since = Instant::now();
    loop {
        let done = highs.iter().all(|(p, h)| next.get(p).copied().unwrap_or(0) >= *h);
        if (done && quiet_since.elapsed() > Duration::from_secs(2)) || quiet_since.elapsed() > Duration::from_secs(60) {
            if !done {
                return Err(format!("the topic could not be read to its end: {next:?} of {highs:?}"));
            }
            return Ok(());
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                next.insert(m.partition(), m.offset() + 1);
                let headers: Vec<(&str, Option<&[u8]>)> =
                    m.headers().map(|h| h.iter().map(|h| (h.key, h.value)).collect()).unwrap_or_default();
                each((m.partition(), m.offset()), wire::parse_record(m.key(), headers, m.payload()));
            }
            Some(Err(e)) => eprintln!("checker: {e}"),
            None => {}
        }
    }
}

/// Records in the topic: the sum of its partitions' watermark spans.
pub(crate) fn stored_count(brokers: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("checker consumer");
    (0..PARTITIONS)
        .map(|p| {
            let (low, high) = consumer.fetch_watermarks(TOPIC, p, Duration::from_secs(30)).expect("watermarks");
            high - low
        })
        .sum()
}

/// A notification the witness saw, read by `wire`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Note {
    pub(crate) id: u128,
    pub(crate) source: usize,
    pub(crate) position: Option<(i32, i64)>,
}

/// A notification the harness could have caused: the documented format, on
/// the channel of its source, for the harness's topic, type and sources.
pub(crate) fn read_note(channel: &str, prefix: &str, payload: &[u8]) -> Result<Note, String> {
    let n = wire::parse_notification(payload)?;
    if n.event_type != EVENT_TYPE || n.source_type != SOURCE_TYPE {
        return Err(format!("type {:?} of source type {:?}", n.event_type, n.source_type));
    }
    let source = source_number(&n.source_id)?;
    let want = wire::channel(prefix, &n.source_type, &n.source_id);
    if channel != want {
        return Err(format!("published on {channel:?}, its source's channel is {want:?}"));
    }
    let position = match n.position {
        Some((topic, _, _)) if topic != TOPIC => return Err(format!("topic {topic:?}")),
        Some((_, p, o)) => Some((p, o)),
        None => None,
    };
    Ok(Note { id: n.id, source, position })
}

/// One join client's connection: what it asked for and what it got.
#[derive(Debug, Default)]
pub(crate) struct JoinLog {
    pub(crate) source: usize,
    /// Made with `CatchUp::join_events` (every item a whole event).
    pub(crate) events: bool,
    /// The offset asked for; `None`: from the end.
    pub(crate) start: Option<i64>,
    /// When `join` returned the stream (ms since the run began); `None`: it failed.
    pub(crate) ready_ms: Option<u32>,
    /// When the client stopped reading, or its error.
    pub(crate) end_ms: u32,
    /// (offset, event id, digest of the whole event when the delivery held one).
    pub(crate) got: Vec<(i64, u128, Option<u32>)>,
    /// A `Truncated` delivery: the join goes on from here.
    pub(crate) truncated_to: Option<i64>,
    /// The join's error (ms since the run began, the error).
    pub(crate) error: Option<(u32, String)>,
    /// Deliveries the checker could not read (no position, an unreadable
    /// id), and live notifications delivered by a `join_events` join.
    pub(crate) unreadable: Vec<String>,
}

#[derive(Default, Debug)]
pub(crate) struct Anomalies {
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) order: u64,
    pub(crate) failed_but_stored: u64,
    pub(crate) wrong_position: u64,
    pub(crate) bad_notifications: u64,
    pub(crate) malformed_records: u64,
    pub(crate) malformed_notifications: u64,
    pub(crate) join_gaps: u64,
    pub(crate) join_duplicates: u64,
    pub(crate) join_order: u64,
    /// A wrong event at the right offset (another id, or another payload or
    /// field in a whole event), or a delivery the checker cannot read.
    pub(crate) join_wrong: u64,
    /// Another source's event.
    pub(crate) join_foreign: u64,
    /// Join errors outside broker outages.
    pub(crate) join_errors: u64,
    /// Gateway clients, each channel across its connections: a record of
    /// its source from the first token's offset not delivered (the tail
    /// included), delivered twice, out of order, or another event.
    pub(crate) gateway_gaps: u64,
    pub(crate) gateway_duplicates: u64,
    pub(crate) gateway_order: u64,
    pub(crate) gateway_wrong: u64,
    /// Refused or broken connections and `error` items outside broker
    /// outages and gateway restarts.
    pub(crate) gateway_errors: u64,
    /// `reset` items: nothing is deleted during a run, so none is due.
    pub(crate) gateway_resets: u64,
}

impl Anomalies {
    pub(crate) fn total(&self) -> u64 {
        self.lost
            + self.duplicates
            + self.order
            + self.failed_but_stored
            + self.wrong_position
            + self.bad_notifications
            + self.malformed_records
            + self.malformed_notifications
            + self.join_gaps
            + self.join_duplicates
            + self.join_order
            + self.join_wrong
            + self.join_foreign
            + self.join_errors
            + self.gateway_gaps
            + self.gateway_duplicates
            + self.gateway_order
            + self.gateway_wrong
            + self.gateway_errors
            + self.gateway_resets
    }
}

/// One anomalous write, for the run's detail lines.
#[derive(Debug)]
pub(crate) struct Finding {
    pub(crate) kind: &'static str,
    /// Its index in the submitted events, when the checker can tell.
    pub(crate) sent: Option<usize>,
    /// Where Kafka holds it.
    pub(crate) stored_at: Vec<(i32, i64)>,
}

/// A fault's window in ms since the run began, and whether it was the broker's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    pub(crate) from: u32,
    pub(crate) to: u32,
    pub(crate) broker: bool,
    /// The gateway's kill -9 and restart.
    pub(crate) gateway: bool,
}

pub(crate) struct Input<'a> {
    pub(crate) stored: &'a BTreeMap<(i32, i64), Stored>,
    pub(crate) sent: &'a [Sent],
    pub(crate) ids: &'a [u128],
    pub(crate) notes: &'a [Note],
    pub(crate) joins: &'a [JoinLog],
    pub(crate) gateway: &'a [GatewayLog],
    pub(crate) faults: &'a [Window],
}

pub(crate) struct Outcome {
    pub(crate) anomalies: Anomalies,
    pub(crate) unknown_stored: u64,
    pub(crate) findings: Vec<Finding>,
    /// Join errors inside a broker outage (counted apart, not anomalies).
    pub(crate) join_errors_in_outage: u64,
    /// One line per anomalous join (the first ones).
    pub(crate) join_lines: Vec<String>,
    /// Gateway client errors inside a broker outage or a gateway restart
    /// (counted apart, not anomalies).
    pub(crate) gateway_errors_in_outage: u64,
    /// One line per anomalous gateway client channel (the first ones).
    pub(crate) gateway_lines: Vec<String>,
}

pub(crate) fn check(input: &Input<'_>) -> Outcome {
    let Input { stored, sent, ids, notes, .. } = *input;
    let mut a = Anomalies::default();
    let mut findings = Vec::new();
    let mut where_: HashMap<u128, Vec<(i32, i64)>> = HashMap::new();
    for (pos, s) in stored {
        where_.entry(s.id).or_default().push(*pos);
    }
    let index_of: HashMap<u128, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    a.duplicates = where_.values().map(|v| v.len() as u64 - 1).sum();
    for (id, at) in where_.iter().filter(|(_, v)| v.len() > 1) {
        findings.push(Finding { kind: "duplicate", sent: index_of.get(id).copied(), stored_at: at.clone() });
    }
    let mut unknown_stored = 0;
    for (i, (s, id)) in sent.iter().zip(ids).enumerate() {
        let found = where_.get(id);
        match &s.told {
            Told::Acked { partition, offset } => match found {
                None => {
                    a.lost += 1;
                    findings.push(Finding { kind: "lost", sent: Some(i), stored_at: Vec::new() });
                }
                Some(v) if !v.contains(&(*partition, *offset)) => {
                    if a.wrong_position < 5 {
                        let there = stored
                            .get(&(*partition, *offset))
                            .map(|r| format!("{} (s{} seq {})", wire::uuid_text(r.id), r.source, r.seq));
                        eprintln!(
                            "checker: {} (s{} seq {}) acknowledged at {partition}/{offset}, stored at {v:?}; that position holds {there:?}",
                            wire::uuid_text(*id),
                            s.source,
                            s.seq
                        );
                    }
                    a.wrong_position += 1;
                }
                Some(_) => {}
            },
            Told::AckedSomewhere if found.is_none() => {
                a.lost += 1;
                findings.push(Finding { kind: "lost", sent: Some(i), stored_at: Vec::new() });
            }
            Told::Failed(_) if found.is_some() => {
                a.failed_but_stored += 1;
                findings.push(Finding {
                    kind: "failed but stored",
                    sent: Some(i),
                    stored_at: found.cloned().unwrap_or_default(),
                });
            }
            Told::Unknown(_) if found.is_some() => unknown_stored += 1,
            _ => {}
        }
        // What was stored is what was sent.
        if let Some(&(p, o)) = found.and_then(|v| v.first()) {
            let r = stored[&(p, o)];
            if (r.source, r.seq) != (s.source, s.seq) {
                a.malformed_records += 1;
                findings.push(Finding {
                    kind: "stored with another source or seq",
                    sent: Some(i),
                    stored_at: vec![(p, o)],
                });
            }
        }
    }
    // Per source, the stored seqs in Kafka order must increase.
    let mut last: HashMap<usize, u64> = HashMap::new();
    for (pos, r) in stored {
        if let Some(prev) = last.insert(r.source, r.seq) {
            if r.seq <= prev {
                a.order += 1;
                let stored_at = where_.get(&r.id).cloned().unwrap_or_else(|| vec![*pos]);
                findings.push(Finding {
                    kind: "order (stored after a later seq)",
                    sent: index_of.get(&r.id).copied(),
                    stored_at,
                });
            }
        }
    }
    // A notification's position holds its event.
    for n in notes {
        if let Some(p) = n.position {
            if !stored.get(&p).is_some_and(|r| r.id == n.id && r.source == n.source) {
                a.bad_notifications += 1;
            }
        }
    }
    let by_source = source_logs(input, &index_of);
    let source_of: HashMap<u128, usize> =
        where_.iter().filter_map(|(id, at)| Some((*id, input.stored.get(at.first()?)?.source))).collect();
    let (join_errors_in_outage, join_lines) = check_joins(input, &by_source, &source_of, &mut a);
    let (gateway_errors_in_outage, gateway_lines) = check_gateway(input, &by_source, &source_of, &mut a);
    Outcome {
        anomalies: a,
        unknown_stored,
        findings,
        join_errors_in_outage,
        join_lines,
        gateway_errors_in_outage,
        gateway_lines,
    }
}

/// A source's records in offset order: (offset, id, digest, index in `sent`).
type SourceLog = Vec<(i64, u128, u32, Option<usize>)>;

/// Every source's records, in offset order.
fn source_logs(input: &Input<'_>, index_of: &HashMap<u128, usize>) -> HashMap<usize, SourceLog> {
    let mut by_source: HashMap<usize, SourceLog> = HashMap::new();
    for ((_, offset), r) in input.stored {
        by_source.entry(r.source).or_default().push((*offset, r.id, r.digest, index_of.get(&r.id).copied()));
    }
    by_source
}

/// Whether an error at `at` falls in an outage of the kinds `counts` picks:
/// from its start until `OUTAGE_GRACE_MS` after it healed, or a wait of up
/// to `JOIN_READ_WAIT_MS` that began by then.
fn in_outage(faults: &[Window], at: u32, counts: impl Fn(&Window) -> bool) -> bool {
    faults
        .iter()
        .any(|f| counts(f) && f.from <= at && at.saturating_sub(JOIN_READ_WAIT_MS) <= f.to + OUTAGE_GRACE_MS)
}

fn check_joins(
    input: &Input<'_>,
    by_source: &HashMap<usize, SourceLog>,
    source_of: &HashMap<u128, usize>,
    a: &mut Anomalies,
) -> (u64, Vec<String>) {
    let mut in_outage_count = 0;
    let mut lines = Vec::new();
    let empty = Vec::new();
    for (n, j) in input.joins.iter().enumerate() {
        let mut found = Anomalies::default();
        if let Some((at, _)) = &j.error {
            if in_outage(input.faults, *at, |f| f.broker) {
                in_outage_count += 1;
            } else {
                found.join_errors += 1;
            }
        }
        found.join_wrong += j.unreadable.len() as u64;
        let log = by_source.get(&j.source).unwrap_or(&empty);
        let cutoff = tail_cutoff(j.end_ms, input.faults);
        check_one_join(j, log, source_of, input.sent, cutoff, &mut found);
        if found.total() > 0 && lines.len() < 20 {
            lines.push(format!(
                "join {n} ({}, source s{}, from {}, ready at {:?} ms, ended at {} ms, {} deliveries{}{}): {found:?}",
                if j.events { "join_events" } else { "join" },
                j.source,
                j.start.map_or("the end".to_owned(), |o| format!("offset {o}")),
                j.ready_ms,
                j.end_ms,
                j.got.len(),
                j.error.as_ref().map(|(t, e)| format!(", error at {t} ms: {e}")).unwrap_or_default(),
                j.unreadable.first().map(|u| format!(", unreadable: {u}")).unwrap_or_default(),
            ));
        }
        a.join_errors += found.join_errors;
        a.join_wrong += found.join_wrong;
        a.join_gaps += found.join_gaps;
        a.join_duplicates += found.join_duplicates;
        a.join_order += found.join_order;
        a.join_foreign += found.join_foreign;
    }
    (in_outage_count, lines)
}

/// Every gateway client's channels, each as one sequence across the
/// client's connections (the join check, from the offset of the first
/// token that named the channel to the end of its last connection); its
/// errors outside broker outages and gateway restarts; its resets.
fn check_gateway(
    input: &Input<'_>,
    by_source: &HashMap<usize, SourceLog>,
    source_of: &HashMap<u128, usize>,
    a: &mut Anomalies,
) -> (u64, Vec<String>) {
    let mut in_outage_count = 0;
    let mut lines = Vec::new();
    let empty = Vec::new();
    for g in input.gateway {
        let mut errors = 0;
        for (at, e) in &g.errors {
            if in_outage(input.faults, *at, |f| f.broker || f.gateway) {
                in_outage_count += 1;
            } else {
                errors += 1;
                if lines.len() < 20 {
                    lines.push(format!("gateway client {} ({:?}, {}): error at {at} ms outside outages: {e}", g.client, g.transport, mode(g.full)));
                }
            }
        }
        a.gateway_errors += errors;
        a.gateway_resets += g.resets.len() as u64;
        for (at, r) in g.resets.iter().take(3) {
            if lines.len() < 20 {
                lines.push(format!("gateway client {} ({:?}, {}): reset at {at} ms: {r}", g.client, g.transport, mode(g.full)));
            }
        }
        for c in &g.channels {
            let mut found = Anomalies { join_wrong: c.unreadable.len() as u64, ..Anomalies::default() };
            if c.start.is_some() {
                let j = JoinLog {
                    source: c.source,
                    events: g.full,
                    start: c.start,
                    ready_ms: c.ready_ms,
                    end_ms: g.end_ms,
                    got: c.got.clone(),
                    ..JoinLog::default()
                };
                let cutoff = tail_cutoff(g.end_ms, input.faults);
                check_one_join(&j, by_source.get(&c.source).unwrap_or(&empty), source_of, input.sent, cutoff, &mut found);
            }
            if found.total() > 0 && lines.len() < 20 {
                // Where the missing records are: inside what was delivered, or a tail not caught up.
                let log = by_source.get(&c.source).unwrap_or(&empty);
                let delivered: HashSet<i64> = c.got.iter().map(|g| g.0).collect();
                let last = c.got.iter().map(|g| g.0).max().unwrap_or(-1);
                let missing: Vec<&(i64, u128, u32, Option<usize>)> =
                    log.iter().filter(|r| c.start.is_some_and(|s| r.0 >= s) && !delivered.contains(&r.0)).collect();
                let inside = missing.iter().filter(|r| r.0 < last).count();
                let first_tail_acked =
                    missing.iter().find(|r| r.0 > last).and_then(|r| r.3).map(|i| input.sent[i].told_ms);
                let waits: Vec<u32> =
                    g.sessions.iter().filter_map(|s| s.first_item_ms.map(|f| f - s.began_ms)).collect();
                let mut sorted = waits.clone();
                sorted.sort_unstable();
                lines.push(format!(
                    "gateway client {} ({:?}, {}), source s{}, from offset {:?} at {:?} ms, last connection ended at {} ms, {} items over {} connections: {found:?}{}",
                    g.client,
                    g.transport,
                    mode(g.full),
                    c.source,
                    c.start,
                    c.ready_ms,
                    g.end_ms,
                    c.got.len(),
                    g.connections,
                    c.unreadable.first().map(|u| format!(", unreadable: {u}")).unwrap_or_default(),
                ));
                lines.push(format!(
                    "  missing: {inside} inside what was delivered, {} after the last delivered offset {last} \
                     (the first acknowledged at {first_tail_acked:?} ms); connect to first item: median {:?} ms, max {:?} ms \
                     over {} connections with items",
                    missing.len() - inside,
                    sorted.get(sorted.len() / 2),
                    sorted.last(),
                    sorted.len()
                ));
            }
            a.gateway_gaps += found.join_gaps;
            a.gateway_duplicates += found.join_duplicates;
            a.gateway_order += found.join_order;
            a.gateway_wrong += found.join_wrong + found.join_foreign;
        }
    }
    (in_outage_count, lines)
}

fn mode(full: bool) -> &'static str {
    if full {
        "full"
    } else {
        "notify"
    }
}

/// Events acknowledged by this time (ms since the run began) must have been
/// delivered to a join that ended at `end_ms`: `TAIL_BOUND_MS` before its
/// end, moved before any fault that was on or had healed less than the bound
/// before.
pub(crate) fn tail_cutoff(end_ms: u32, faults: &[Window]) -> u32 {
    let mut cutoff = end_ms.saturating_sub(TAIL_BOUND_MS);
    while let Some(f) =
        faults.iter().find(|f| f.from.saturating_sub(TAIL_BOUND_MS) <= cutoff && cutoff <= f.to + TAIL_BOUND_MS)
    {
        let before = f.from.saturating_sub(TAIL_BOUND_MS);
        if before == cutoff || before == 0 {
            return 0;
        }
        cutoff = before.saturating_sub(1);
    }
    cutoff
}

/// One join's deliveries against its source's records: exactly the records
/// from its start, in order, the same events; and every record acknowledged
/// by `cutoff` delivered.
fn check_one_join(
    j: &JoinLog,
    log: &SourceLog,
    source_of: &HashMap<u128, usize>,
    sent: &[Sent],
    cutoff: u32,
    found: &mut Anomalies,
) {
    let acked_by = |s: Option<usize>, t: u32| s.is_some_and(|i| sent[i].told_ms <= t);
    // Where the join's sequence starts.
    let start = match (j.truncated_to, j.start, j.got.first()) {
        (Some(t), _, _) => t,
        (None, Some(o), _) => o,
        (None, None, Some(first)) => {
            // From the end: its first delivery, and nothing submitted after
            // the join was ready may come before it.
            let ready = j.ready_ms.unwrap_or(u32::MAX);
            found.join_gaps +=
                log.iter().filter(|r| r.0 < first.0 && r.3.is_some_and(|i| sent[i].submitted_ms > ready)).count()
                    as u64;
            first.0
        }
        (None, None, None) => {
            // From the end, nothing delivered: nothing submitted after it
            // was ready and acknowledged by the cutoff may exist.
            let Some(ready) = j.ready_ms else { return };
            found.join_gaps += log
                .iter()
                .filter(|r| r.3.is_some_and(|i| sent[i].submitted_ms > ready) && acked_by(r.3, cutoff))
                .count() as u64;
            return;
        }
    };
    let want: Vec<_> = log.iter().filter(|r| r.0 >= start).collect();
    let mut wi = 0;
    let mut seen = HashSet::new();
    for &(offset, id, digest) in &j.got {
        if !seen.insert(offset) {
            found.join_duplicates += 1;
            continue;
        }
        if wi < want.len() && offset < want[wi].0 {
            // Behind the sequence: an earlier record of its source out of
            // order, or a position its source has no record at.
            if want.iter().any(|r| r.0 == offset) {
                found.join_order += 1;
            } else if source_of.get(&id).is_some_and(|s| *s != j.source) {
                found.join_foreign += 1;
            } else {
                found.join_wrong += 1;
            }
            continue;
        }
        while wi < want.len() && want[wi].0 < offset {
            found.join_gaps += 1;
            wi += 1;
        }
        match want.get(wi) {
            Some(r) if r.0 == offset => {
                if r.1 != id {
                    if source_of.get(&id).is_some_and(|s| *s != j.source) {
                        found.join_foreign += 1;
                    } else {
                        found.join_wrong += 1;
                    }
                } else if digest.is_some_and(|d| d != r.2) {
                    found.join_wrong += 1;
                }
                wi += 1;
            }
            // Past the source's last record, or none at this offset.
            _ => {
                if source_of.get(&id).is_some_and(|s| *s != j.source) {
                    found.join_foreign += 1;
                } else {
                    found.join_wrong += 1;
                }
            }
        }
    }
    // The tail: every record acknowledged by the cutoff.
    found.join_gaps += want[wi.min(want.len())..].iter().filter(|r| acked_by(r.3, cutoff)).count() as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(n: usize, told_ms: u32) -> Vec<Sent> {
        (0..n)
            .map(|i| Sent {
                source: 1,
                seq: i as u64,
                told: Told::Acked { partition: 0, offset: i as i64 },
                submitted_ms: told_ms,
                told_ms,
            })
            .collect()
    }

    /// Source 1 holds offsets 10, 12, 14, 16 (ids 100..=103, sent 0..=3); source 2 holds 11.
    fn log() -> SourceLog {
        (0..4).map(|i| (10 + 2 * i as i64, 100 + i as u128, 7, Some(i))).collect()
    }

    fn run(got: &[(i64, u128)], start: Option<i64>, cutoff: u32) -> Anomalies {
        let j = JoinLog {
            source: 1,
            start,
            // Joins from the end were ready after every event was submitted (at 1 s), unless told.
            ready_ms: Some(if start.is_none() { 5_000 } else { 0 }),
            end_ms: 60_000,
            got: got.iter().map(|(o, id)| (*o, *id, None)).collect(),
            ..JoinLog::default()
        };
        let source_of: HashMap<u128, usize> = [(100, 1), (101, 1), (102, 1), (103, 1), (200, 2)].into_iter().collect();
        let mut found = Anomalies::default();
        check_one_join(&j, &log(), &source_of, &sent(4, 1_000), cutoff, &mut found);
        found
    }

    #[test]
    fn the_exact_sequence_passes() {
        assert_eq!(run(&[(12, 101), (14, 102), (16, 103)], Some(12), 50_000).total(), 0);
        // From the end: from its first delivery.
        assert_eq!(run(&[(14, 102), (16, 103)], None, 50_000).total(), 0);
    }

    #[test]
    fn each_wrong_sequence_is_an_anomaly() {
        assert_eq!(run(&[(14, 102), (12, 101), (16, 103)], Some(12), 50_000).join_order, 1);
        assert_eq!(run(&[(12, 101), (14, 999), (16, 103)], Some(12), 50_000).join_wrong, 1);
        assert_eq!(run(&[(12, 101), (14, 200), (16, 103)], Some(12), 50_000).join_foreign, 1);
        assert_eq!(run(&[(12, 101), (13, 200), (14, 102), (16, 103)], Some(12), 50_000).join_foreign, 1);
        assert_eq!(run(&[(12, 101), (16, 103)], Some(12), 50_000).join_gaps, 1);
        assert_eq!(run(&[(12, 101), (14, 102)], Some(12), 50_000).join_gaps, 1, "a missing tail");
        assert_eq!(run(&[(12, 101), (14, 102), (14, 102), (16, 103)], Some(12), 50_000).join_duplicates, 1);
        assert_eq!(run(&[], Some(12), 50_000).join_gaps, 3, "delivered nothing");
        assert_eq!(run(&[(14, 102), (16, 103)], Some(12), 50_000).join_gaps, 1, "skipped its start");
        assert_eq!(run(&[(16, 103)], None, 50_000).total(), 0);
    }

    #[test]
    fn a_join_from_the_end_misses_nothing_submitted_after_it_was_ready() {
        let j = JoinLog {
            source: 1,
            ready_ms: Some(500),
            end_ms: 60_000,
            got: vec![(14, 102, None)],
            ..JoinLog::default()
        };
        let mut found = Anomalies::default();
        check_one_join(&j, &log(), &HashMap::new(), &sent(4, 1_000), 50_000, &mut found);
        assert_eq!(found.join_gaps, 3, "10 and 12, submitted after it was ready, and the tail 16");
        let none = JoinLog { got: Vec::new(), ..j };
        let mut found = Anomalies::default();
        check_one_join(&none, &log(), &HashMap::new(), &sent(4, 1_000), 50_000, &mut found);
        assert_eq!(found.join_gaps, 4, "delivered nothing of four");
    }

    #[test]
    fn a_tail_acknowledged_after_the_cutoff_may_be_missing() {
        assert_eq!(run(&[(12, 101)], Some(12), 500).total(), 0);
        assert_eq!(run(&[], Some(12), 500).total(), 0);
    }

    /// A gateway client's channel on source 1 from offset 12, over two
    /// connections; errors at these times; the anomalies the whole check finds.
    fn gateway_run(connections: [&[(i64, u128)]; 2], errors: &[u32], resets: usize) -> Anomalies {
        use crate::gateway::{ChannelLog, GatewayLog, Transport};
        let mut stored = BTreeMap::new();
        for (i, (offset, id, ..)) in log().into_iter().enumerate() {
            stored.insert((0, offset), Stored { id, source: 1, seq: i as u64, digest: 7 });
        }
        let got: Vec<(i64, u128, Option<u32>)> =
            connections.iter().flat_map(|c| c.iter()).map(|(o, id)| (*o, *id, None)).collect();
        let g = GatewayLog {
            client: 0,
            transport: Transport::Sse,
            full: false,
            channels: vec![ChannelLog { source: 1, start: Some(12), ready_ms: Some(0), got, got_ms: Vec::new(), unreadable: Vec::new() }],
            connections: 2,
            errors: errors.iter().map(|at| (*at, "the stream broke".to_owned())).collect(),
            resets: (0..resets).map(|_| (30_000, "{}".to_owned())).collect(),
            slow_closes: 0,
            end_ms: 60_000,
            sessions: Vec::new(),
            final_began_ms: 0,
            caught_up_ms: None,
        };
        let mut sent = sent(4, 1_000);
        for (i, s) in sent.iter_mut().enumerate() {
            s.told = Told::Acked { partition: 0, offset: 10 + 2 * i as i64 };
        }
        let ids: Vec<u128> = (100..104).collect();
        let faults = [Window { from: 20_000, to: 22_000, broker: false, gateway: true }];
        let input = Input { stored: &stored, sent: &sent, ids: &ids, notes: &[], joins: &[], gateway: &[g], faults: &faults };
        check(&input).anomalies
    }

    #[test]
    fn a_gateway_client_is_held_to_its_sequence_across_reconnects() {
        assert_eq!(gateway_run([&[(12, 101)], &[(14, 102), (16, 103)]], &[], 0).total(), 0);
        // A resume token that skipped 14, or repeated 12.
        assert_eq!(gateway_run([&[(12, 101)], &[(16, 103)]], &[], 0).gateway_gaps, 1);
        assert_eq!(gateway_run([&[(12, 101)], &[(12, 101), (14, 102), (16, 103)]], &[], 0).gateway_duplicates, 1);
        assert_eq!(gateway_run([&[(12, 101)], &[(14, 102)]], &[], 0).gateway_gaps, 1, "a missing tail");
        assert_eq!(gateway_run([&[(12, 101)], &[(14, 999), (16, 103)]], &[], 0).gateway_wrong, 1);
        // An error during the gateway's restart, or within 10 s after it, is the outage's.
        assert_eq!(gateway_run([&[(12, 101)], &[(14, 102), (16, 103)]], &[21_000, 31_000], 0).total(), 0);
        assert_eq!(gateway_run([&[(12, 101)], &[(14, 102), (16, 103)]], &[10_000, 45_000], 0).gateway_errors, 2);
        assert_eq!(gateway_run([&[(12, 101)], &[(14, 102), (16, 103)]], &[], 1).gateway_resets, 1);
    }

    #[test]
    fn the_cutoff_moves_before_faults() {
        assert_eq!(tail_cutoff(60_000, &[]), 55_000);
        let f = [Window { from: 50_000, to: 54_000, broker: false, gateway: false }];
        assert_eq!(tail_cutoff(60_000, &f), 44_999);
        assert_eq!(tail_cutoff(70_000, &f), 65_000);
    }
}
