//! The ack stage: one per lane, awaiting each batch's durable
//! acknowledgements.
//!
//! It takes the lane's batches in the order they were handed over
//! ([`InFlight`]), awaits each one's acknowledgements, then gives the
//! batch's share of the queue and its in-flight slot back (so a slow Redis
//! never holds Kafka capacity), and passes the stored batch to the engine's
//! [`notify`](crate::notify) stage. Without a notification stage (no
//! notifier, or the high-volume mode that queues notifications without
//! waiting) it resolves the callers itself.
//!
//! Guarantees: batches leave it in lane order; a queue share is given back
//! exactly once, when the batch's outcome is known (or when it is dropped,
//! if the stage dies); if the notification stage is gone, callers are
//! resolved here without notifications rather than left waiting.

use dualstream_core::Notification;
use dualstream_publisher::{DualPublisher, NotificationOutcome, PendingStore, PublishError, Receipt, StoredBatch};
use tokio::sync::mpsc;

use crate::budget::Held;
use crate::engine::{resolve, Waiter};
use crate::notify::Stored;

/// A batch handed to the durable sink, on its way through the lane's stages.
pub(crate) struct InFlight {
    pub(crate) pending: PendingStore,
    pub(crate) waiters: Vec<Waiter>,
    pub(crate) held: Held,
    /// The lane's in-flight slot, given back with the queue share.
    pub(crate) _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Await each batch's durable acknowledgements in order, give its queue
/// share back, then resolve it (no notifier, or one that does not wait) or
/// pass it to the notification stage.
pub(crate) async fn ack_stage(
    mut rx: mpsc::UnboundedReceiver<InFlight>,
    notify: Option<mpsc::UnboundedSender<Stored>>,
    publisher: DualPublisher,
) {
    while let Some(InFlight { pending, waiters, held, _slot }) = rx.recv().await {
        let batch = pending.stored().await;
        // Also lowers the engine's queue gauge.
        drop((held, _slot));
        let (results, notes) = per_event(batch);
        let stored = Stored { results, notes, waiters };
        match &notify {
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
}

/// A stored batch's results and each event's notification (`None`: not
/// stored, or no notifier), the outcome still to be set.
fn per_event(mut batch: StoredBatch) -> (Vec<Result<Receipt, PublishError>>, Vec<Option<Notification>>) {
    let mut notes = batch.take_notifications().into_iter().peekable();
    let results = batch.finish(NotificationOutcome::Disabled);
    // The publisher makes one notification per stored event, in order, when
    // it has a notifier.
    let notes = results
        .iter()
        .map(|r| r.as_ref().ok().and_then(|receipt| notes.next_if(|n| n.id == receipt.event_id)))
        .collect();
    (results, notes)
}
