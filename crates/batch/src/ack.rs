//! The ack stage: one per lane, awaiting its batches' durable
//! acknowledgements and releasing each event as soon as it and every
//! earlier event of its source are acknowledged.
//!
//! It takes the lane's batches in the order they were handed over
//! ([`InFlight`]) and awaits their acknowledgements all at once, in
//! whatever order they come. A batch's share of the queue goes back at its
//! own acknowledgement (so neither Redis nor another batch holds Kafka
//! capacity). An acknowledged event is *released* (passed to the engine's
//! [`notify`](crate::notify) stage, or resolved here when there is none: no
//! notifier, or the high-volume mode that queues notifications without
//! waiting) once no batch handed over before its own and not yet
//! acknowledged holds an event of its source. A batch's in-flight slot goes
//! back when its last event is released, which bounds what waits here. A
//! `submit_many` reply whose events are released at different times is
//! sent with the last of them; its notifications go as its events are
//! released.
//!
//! # The order key: the source
//!
//! The engine keeps order per source, not across sources, and the Kafka
//! sink stores a source in one partition (the record key is the source id;
//! dualstream-kafka's `partition_for_key` is the partitioner's rule). Keying
//! releases by partition would need an event's partition before its
//! acknowledgement, which the engine does not have: the partition count is
//! the sink's (a custom sink may have no partitions at all), and the
//! `Position` of a receipt comes with the acknowledgement, too late to say
//! which earlier, unacknowledged batches an event must wait for. The source
//! is known at hand-over and is exactly the unit of the guarantee, so the
//! key is the source's hash ([`InFlight::keys`], made by the lane). It is
//! finer than the partition: two sources of one partition are released
//! independently, which the contract allows (each has its own channel, and a
//! catch-up join orders a channel by offset itself). Two sources whose
//! hashes collide are released in their joint order, which keeps each one's:
//! a collision costs latency, never order.
//!
//! A sink acknowledges a batch as a whole (`PendingAcks` is one future; the
//! Kafka sink wakes it at the batch's last delivery report), so an event
//! waits for its own batch's slowest partition and for the earlier batches
//! that hold its source, and for nothing else.
//!
//! Guarantees: each source's events are released in the order they were
//! handed over, none before it and every earlier event of its source are
//! acknowledged; only stored events have notifications; a queue share is
//! given back exactly once, at the batch's acknowledgement (or when the
//! acknowledgement's future is dropped, if the stage dies); once every batch
//! is acknowledged, every event is released, so shutdown flushes everything
//! handed over; if the notification stage is gone, callers are resolved here
//! without notifications rather than left waiting.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;

use dualstream_core::Notification;
use dualstream_publisher::{DualPublisher, NotificationOutcome, PendingStore, PublishError, Receipt, StoredBatch};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::budget::Held;
use crate::engine::{resolve, Waiter};
use crate::notify::Stored;

/// A batch handed to the durable sink, on its way through the lane's stages.
pub(crate) struct InFlight {
    pub(crate) pending: PendingStore,
    /// Each event's order key (its source's hash), in batch order.
    pub(crate) keys: Vec<u64>,
    pub(crate) waiters: Vec<Waiter>,
    pub(crate) held: Held,
    /// The lane's in-flight slot, given back once every event is released.
    pub(crate) slot: Option<OwnedSemaphorePermit>,
}

/// A batch from its hand-over until its last event is released.
struct Entry {
    /// Its place in the lane's hand-over order.
    seq: u64,
    /// The order keys of its events not released yet, in batch order.
    keys: Vec<u64>,
    /// Those events: their waiters from the start, their results and
    /// notifications once acknowledged.
    stored: Stored,
    acked: bool,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Entry {
    /// The batch's acknowledgements are in.
    fn acknowledged(&mut self, batch: StoredBatch) {
        (self.stored.results, self.stored.notes) = per_event(batch);
        self.acked = true;
    }

    /// Take out the acknowledged events whose keys `blocked` does not hold,
    /// in order, with their waiters (split where a reply's events go both
    /// ways).
    fn release(&mut self, blocked: &HashSet<u64>) -> Option<Stored> {
        if !self.acked || self.keys.is_empty() {
            return None;
        }
        if blocked.is_empty() || !self.keys.iter().any(|k| blocked.contains(k)) {
            self.keys.clear();
            return Some(std::mem::take(&mut self.stored));
        }
        let free: Vec<bool> = self.keys.iter().map(|k| !blocked.contains(k)).collect();
        if !free.contains(&true) {
            return None;
        }
        let (mut out, mut kept) = (Stored::default(), Stored::default());
        let mut start = 0;
        for waiter in std::mem::take(&mut self.stored.waiters) {
            let end = (start + waiter.len()).min(free.len());
            for (f, part) in waiter.split(&free[start..end]) {
                if f { &mut out } else { &mut kept }.waiters.push(part);
            }
            start = end;
        }
        let keys = std::mem::take(&mut self.keys);
        let results = std::mem::take(&mut self.stored.results);
        // One per event, or none at all (see `per_event`).
        let mut notes = std::mem::take(&mut self.stored.notes).into_iter();
        let has_notes = notes.len() > 0;
        for ((f, key), result) in free.into_iter().zip(keys).zip(results) {
            let to = if f {
                &mut out
            } else {
                self.keys.push(key);
                &mut kept
            };
            to.results.push(result);
            if has_notes {
                to.notes.push(notes.next().flatten());
            }
        }
        self.stored = kept;
        Some(out)
    }
}

/// A stored batch's results and each event's notification (`None`: not
/// stored), the outcome still to be set; no notifications at all, not one
/// `None` per event, when the batch has none (no notifier, or nothing
/// stored): a notification's room per event would be a large buffer
/// written once and thrown away, for every batch of a durable-only engine.
fn per_event(mut batch: StoredBatch) -> (Vec<Result<Receipt, PublishError>>, Vec<Option<Notification>>) {
    let notes = batch.take_notifications();
    let results = batch.finish(NotificationOutcome::Disabled);
    if notes.is_empty() {
        return (results, Vec::new());
    }
    let mut notes = notes.into_iter().peekable();
    // The publisher makes one notification per stored event, in order, when
    // it has a notifier.
    let notes = results
        .iter()
        .map(|r| r.as_ref().ok().and_then(|receipt| notes.next_if(|n| n.id == receipt.event_id)))
        .collect();
    (results, notes)
}

/// Release, in hand-over order, every acknowledged event whose source has
/// no event in an unacknowledged batch before it; drop the batches left
/// empty (their slots go back). `blocked` is scratch space.
fn release(entries: &mut VecDeque<Entry>, blocked: &mut HashSet<u64>) -> Option<Stored> {
    let last = entries.iter().rposition(|e| e.acked)?;
    blocked.clear();
    let mut out: Option<Stored> = None;
    for entry in entries.iter_mut().take(last + 1) {
        if !entry.acked {
            blocked.extend(entry.keys.iter().copied());
        } else if let Some(part) = entry.release(blocked) {
            match &mut out {
                Some(o) => o.append(part),
                None => out = Some(part),
            }
        }
    }
    entries.retain(|e| !(e.acked && e.keys.is_empty()));
    out
}

type Ack = Pin<Box<dyn Future<Output = (u64, StoredBatch)> + Send>>;

/// Await the lane's batches' durable acknowledgements, give each batch's
/// queue share back at its own, and release each event once every earlier
/// event of its source is acknowledged: resolve it (no notifier, or one
/// that does not wait) or pass it to the notification stage.
pub(crate) async fn ack_stage(
    mut rx: mpsc::UnboundedReceiver<InFlight>,
    notify: Option<mpsc::UnboundedSender<Stored>>,
    publisher: DualPublisher,
) {
    let mut acks: FuturesUnordered<Ack> = FuturesUnordered::new();
    let mut entries: VecDeque<Entry> = VecDeque::new();
    let mut blocked: HashSet<u64> = HashSet::new();
    let mut next_seq = 0u64;
    let mut open = true;
    while open || !acks.is_empty() {
        tokio::select! {
            biased;
            Some((seq, batch)) = acks.next(), if !acks.is_empty() => {
                if let Ok(i) = entries.binary_search_by_key(&seq, |e| e.seq) {
                    entries[i].acknowledged(batch);
                }
                if let Some(stored) = release(&mut entries, &mut blocked) {
                    pass_on(stored, notify.as_ref(), &publisher).await;
                }
            }
            item = rx.recv(), if open => match item {
                Some(InFlight { pending, keys, waiters, held, slot }) => {
                    let seq = next_seq;
                    next_seq += 1;
                    let stored = Stored { waiters, ..Stored::default() };
                    entries.push_back(Entry { seq, keys, stored, acked: false, _slot: slot });
                    acks.push(Box::pin(async move {
                        let batch = pending.stored().await;
                        // Also lowers the engine's queue gauge. Dropped
                        // unacknowledged (the stage died), it goes back too.
                        drop(held);
                        (seq, batch)
                    }));
                }
                None => open = false,
            },
            else => break,
        }
    }
}

/// Pass released events to the notification stage, or resolve them here.
async fn pass_on(stored: Stored, notify: Option<&mpsc::UnboundedSender<Stored>>, publisher: &DualPublisher) {
    match notify {
        Some(tx) => {
            if let Err(mpsc::error::SendError(stored)) = tx.send(stored) {
                // The notification stage died: resolve here, without
                // notifications, rather than leave callers waiting.
                resolve(stored.results, NotificationOutcome::Failed, stored.waiters);
            }
        }
        None => {
            // High-volume mode queues notifications without waiting;
            // without a notifier there are none.
            let outcome = publisher.notify(stored.notes.into_iter().flatten().collect()).await;
            resolve(stored.results, outcome, stored.waiters);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualstream_core::{EventId, Notification};
    use tokio::sync::oneshot;

    /// An acknowledged batch of two events of two sources (keys 1 and 2),
    /// each with its own caller, with or without notifications.
    fn entry(with_notes: bool) -> (Entry, Vec<oneshot::Receiver<Result<Receipt, crate::BatchError>>>) {
        let ids = [EventId::new(), EventId::new()];
        let results = ids
            .iter()
            .map(|&event_id| Ok(Receipt { event_id, position: None, notification: NotificationOutcome::Disabled }))
            .collect();
        let notes = if with_notes {
            let event =
                |id| dualstream_core::Event::builder("t", "user", "s").id(id).payload("{}").build().expect("event");
            ids.iter().map(|&id| Some(Notification::for_event(&event(id), None))).collect()
        } else {
            Vec::new()
        };
        let (mut waiters, mut rxs) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let (tx, rx) = oneshot::channel();
            waiters.push(Waiter::One(tx));
            rxs.push(rx);
        }
        let stored = Stored { results, notes, waiters };
        (Entry { seq: 0, keys: vec![1, 2], stored, acked: true, _slot: None }, rxs)
    }

    #[test]
    fn a_split_batch_keeps_its_notifications_with_their_events_or_has_none() {
        for with_notes in [true, false] {
            let (mut entry, _rxs) = entry(with_notes);
            let ids: Vec<EventId> = entry.stored.results.iter().map(|r| r.as_ref().expect("ok").event_id).collect();
            // Source 1 is held by an earlier batch: only the second event goes.
            let first = entry.release(&HashSet::from([1])).expect("the free event");
            assert_eq!(first.results.len(), 1);
            assert_eq!(first.results[0].as_ref().expect("ok").event_id, ids[1]);
            let rest = entry.release(&HashSet::new()).expect("the held event, once free");
            assert_eq!(rest.results[0].as_ref().expect("ok").event_id, ids[0]);
            if with_notes {
                // Each part carries exactly its own events' notifications.
                let note_ids = |s: &Stored| s.notes.iter().flatten().map(|n| n.id).collect::<Vec<_>>();
                assert_eq!((note_ids(&first), note_ids(&rest)), (vec![ids[1]], vec![ids[0]]));
            } else {
                assert!(first.notes.is_empty() && rest.notes.is_empty(), "no room kept per event");
            }
            assert!(entry.keys.is_empty());
        }
    }
}
