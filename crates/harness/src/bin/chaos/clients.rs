//! The run's readers: catch-up join clients (`join` and `join_events`) and
//! the notification witness. Each keeps a log for the checker and loses
//! nothing it was given: an error ends a join's log, it does not drop it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dualstream::consumer::{CatchUp, Delivery, StartAt};
use dualstream::{Event, Source};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::checker::{self, JoinLog, Note};
use super::wire;
use super::{Counts, Sent, Told, PREFIX};

/// The checker's digest of an event a join delivered, from its accessors.
fn event_digest(e: &Event) -> Result<(u128, u32), String> {
    let id = wire::parse_uuid7(&e.id().to_string())?;
    let s = e.source();
    Ok((
        id,
        wire::digest(id, e.event_type(), s.source_type(), s.source_id(), e.occurred_at_ms(), e.payload(), e.headers()),
    ))
}

/// What one delivery adds to the log.
fn record(log: &mut JoinLog, d: &Delivery) {
    let whole = match d {
        Delivery::History(r) => Some(event_digest(&r.event)),
        _ => None,
    };
    if log.events && whole.is_none() {
        log.unreadable.push(format!("join_events delivered a notification, not an event: {d:?}"));
        return;
    }
    let id = match whole {
        Some(Ok((id, digest))) => Ok((id, Some(digest))),
        Some(Err(e)) => Err(e),
        None => {
            d.id().map_or_else(|| Err("no id".to_owned()), |id| wire::parse_uuid7(&id.to_string()).map(|id| (id, None)))
        }
    };
    match (d.position(), id) {
        (Some(p), Ok((id, digest))) if &*p.topic == super::TOPIC => log.got.push((p.offset, id, digest)),
        (p, id) => log.unreadable.push(format!("position {p:?}, id {id:?}")),
    }
}

/// A join client: joins a random source from one of its acknowledged
/// offsets or from the end, reads for 1–8 s, leaves, again until `stop`.
pub(crate) async fn join_client(
    catchup: CatchUp,
    sources: usize,
    sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
    seed: u64,
    events: bool,
    started: Instant,
) -> Vec<JoinLog> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut logs = Vec::new();
    let ms = || started.elapsed().as_millis() as u32;
    while !stop.load(Ordering::Relaxed) {
        let source = rng.random_range(0..sources);
        // Start from an acknowledged position of that source, or the end.
        let start = {
            let sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
            let acked: Vec<i64> = sent
                .iter()
                .rev()
                .take(5_000)
                .filter(|s| s.source == source)
                .filter_map(|s| match s.told {
                    Told::Acked { offset, .. } => Some(offset),
                    _ => None,
                })
                .collect();
            (!acked.is_empty() && rng.random_range(0..3) > 0).then(|| acked[rng.random_range(0..acked.len())])
        };
        let src = Source::new(checker::SOURCE_TYPE, format!("s{source}")).expect("source");
        let at = start.map_or(StartAt::End, StartAt::Offset);
        let mut log = JoinLog { source, events, start, ..JoinLog::default() };
        let lasts = Duration::from_millis(rng.random_range(1_000..8_000));
        let joining = async {
            if events {
                catchup.join_events(src, at).await
            } else {
                catchup.join(src, at).await
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), joining).await {
            Ok(Ok(mut stream)) => {
                log.ready_ms = Some(ms());
                let until = tokio::time::Instant::now() + lasts;
                loop {
                    match tokio::time::timeout_at(until, stream.next()).await {
                        Err(_) => break,
                        Ok(None) => {
                            log.error = Some((ms(), "the stream ended".to_owned()));
                            break;
                        }
                        Ok(Some(Ok(Delivery::Truncated { first_available, .. }))) => {
                            log.truncated_to = Some(first_available)
                        }
                        Ok(Some(Ok(d))) => record(&mut log, &d),
                        Ok(Some(Err(e))) => {
                            log.error = Some((ms(), e.to_string()));
                            break;
                        }
                    }
                }
            }
            Ok(Err(e)) => log.error = Some((ms(), format!("join: {e}"))),
            Err(_) => log.error = Some((ms(), "join: no stream within 10 s".to_owned())),
        }
        log.end_ms = log.error.as_ref().map_or_else(ms, |e| e.0);
        logs.push(log);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
    }
    logs
}

/// What the witness saw.
#[derive(Default)]
pub(crate) struct Witnessed {
    pub(crate) notes: Vec<Note>,
    pub(crate) malformed: u64,
    /// The first malformed ones, with the reason.
    pub(crate) examples: Vec<String>,
}

/// Notifications seen by a subscriber that is not our code's: redis-rs
/// PSUBSCRIBE, reconnecting after every Redis fault, each read by the
/// checker's own parser. One it cannot read is counted, never dropped.
pub(crate) async fn witness(url: String, stop: Arc<AtomicBool>, retain: bool, counts: Arc<Counts>) -> Witnessed {
    let mut got = Witnessed::default();
    while !stop.load(Ordering::Relaxed) {
        let client = deadpool_redis::redis::Client::open(url.as_str()).expect("the witness's Redis URL");
        let Ok(Ok(mut pubsub)) = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if pubsub.psubscribe(format!("{PREFIX}:*")).await.is_err() {
            continue;
        }
        let mut messages = pubsub.on_message();
        loop {
            match tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
                Ok(Some(m)) => {
                    counts.notifications.fetch_add(1, Ordering::Relaxed);
                    match checker::read_note(m.get_channel_name(), PREFIX, m.get_payload_bytes()) {
                        Ok(n) if retain => got.notes.push(n),
                        Ok(_) => {}
                        Err(e) => {
                            got.malformed += 1;
                            if got.examples.len() < 5 {
                                got.examples.push(format!("{e}: {}", String::from_utf8_lossy(m.get_payload_bytes())));
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(_) if stop.load(Ordering::Relaxed) => return got,
                Err(_) => {}
            }
        }
    }
    got
}
