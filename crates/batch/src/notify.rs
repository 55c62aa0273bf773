//! The notification stage: one per engine, sending the notifications of
//! acknowledged events and resolving their callers.
//!
//! Every lane's ack stage passes its released events here ([`Stored`]),
//! each source's in order. Everything waiting when a pipeline can start
//! goes into that one notifier call, with up to `notify_pipelines` calls in
//! flight, started in the order events arrived; callers are resolved in
//! that order too.
//!
//! Guarantees: each source's notifications are sent, and its callers
//! resolved, in the order the ack stage released them, which is the
//! source's order; no caller waits longer than the publisher's
//! `notify_timeout_ms` here (then `NotificationOutcome::Queued`: still being
//! sent); at most `max_queued_events` notifications wait to be sent, the
//! oldest beyond that skipped (`NotificationOutcome::Skipped`) and counted.
//! The stage holds no queue share: Redis never holds up the durable path.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use dualstream_core::Notification;
use dualstream_publisher::{DualPublisher, NotificationOutcome, PublishError, Receipt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::engine::{resolve, Waiter};

/// Acknowledged events released by an ack stage, in order: one result per
/// event, the stored events' notifications (`None` for a failed one; for
/// each batch either one per event or none at all, so read them flattened),
/// and the waiters of those events.
#[derive(Default)]
pub(crate) struct Stored {
    pub(crate) results: Vec<Result<Receipt, PublishError>>,
    pub(crate) notes: Vec<Option<Notification>>,
    pub(crate) waiters: Vec<Waiter>,
}

impl Stored {
    /// Add `later`'s events after these.
    pub(crate) fn append(&mut self, mut later: Stored) {
        self.results.append(&mut later.results);
        self.notes.append(&mut later.notes);
        self.waiters.append(&mut later.waiters);
    }
}

type Pipeline = Pin<Box<dyn Future<Output = (u64, NotificationOutcome)> + Send>>;

/// Released events whose callers wait for their notifications.
struct Awaiting {
    results: Vec<Result<Receipt, PublishError>>,
    waiters: Vec<Waiter>,
    /// Its callers are resolved by then at the latest.
    deadline: Instant,
    /// The pipeline that carries (or will carry) its notifications.
    pipeline: u64,
    /// Its notifications in the not-yet-sent buffer (until a pipeline
    /// takes them).
    notes: usize,
    /// Set when its notifications were shed.
    outcome: Option<NotificationOutcome>,
}

impl Awaiting {
    fn resolve(self, outcome: NotificationOutcome) {
        resolve(self.results, self.outcome.unwrap_or(outcome), self.waiters);
    }
}

/// Send notifications and resolve callers, in the order events arrive.
///
/// - Everything that waits when a pipeline can start goes into that one
///   pipeline, with up to `max_in_flight` pipelines in flight, started in
///   arrival order: a slow Redis (answering within the bound) costs latency,
///   not throughput or notifications.
/// - No caller waits more than the publisher's notify bound here: events
///   whose notifications are not confirmed by then are resolved as
///   [`NotificationOutcome::Queued`] (they are still on their way).
/// - At most `cap` notifications wait to be sent; beyond that the oldest
///   are dropped and their events resolved as skipped.
pub(crate) async fn notify_stage(
    mut rx: mpsc::UnboundedReceiver<Stored>,
    publisher: DualPublisher,
    max_in_flight: usize,
    cap: usize,
) {
    use futures::stream::{FuturesOrdered, StreamExt};
    let bound = Duration::from_millis(publisher.config().notify_timeout_ms);
    let mut in_flight: FuturesOrdered<Pipeline> = FuturesOrdered::new();
    let mut queue: VecDeque<Awaiting> = VecDeque::new();
    let mut unsent: VecDeque<Notification> = VecDeque::new();
    let mut next_pipeline = 0u64;
    let mut incoming: Vec<Stored> = Vec::new();
    let mut open = true;
    while open || !queue.is_empty() || !in_flight.is_empty() {
        // An arrival at the front with nothing left to send (all its events
        // failed, or its notifications were shed) has only its turn to wait
        // for.
        while queue.front().is_some_and(|a| a.pipeline >= next_pipeline && a.notes == 0) {
            if let Some(a) = queue.pop_front() {
                a.resolve(NotificationOutcome::Disabled);
            }
        }
        if !unsent.is_empty() && in_flight.len() < max_in_flight {
            let notes: Vec<Notification> = unsent.drain(..).collect();
            for a in queue.iter_mut().rev().take_while(|a| a.pipeline == next_pipeline) {
                a.notes = 0;
            }
            let (seq, publisher) = (next_pipeline, publisher.clone());
            in_flight.push_back(Box::pin(async move { (seq, publisher.notify(notes).await) }));
            next_pipeline += 1;
        }
        let first_deadline = queue.front().map(|a| a.deadline);
        tokio::select! {
            biased;
            Some((seq, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                while queue.front().is_some_and(|a| a.pipeline == seq) {
                    if let Some(a) = queue.pop_front() {
                        a.resolve(outcome);
                    }
                }
            }
            () = tokio::time::sleep_until(first_deadline.unwrap_or_else(Instant::now)), if first_deadline.is_some() => {
                let now = Instant::now();
                while queue.front().is_some_and(|a| a.deadline <= now) {
                    if let Some(a) = queue.pop_front() {
                        a.resolve(NotificationOutcome::Queued);
                    }
                }
            }
            n = rx.recv_many(&mut incoming, usize::MAX), if open => {
                if n == 0 {
                    open = false;
                    continue;
                }
                let deadline = Instant::now() + bound;
                for stored in incoming.drain(..) {
                    let before = unsent.len();
                    unsent.extend(stored.notes.into_iter().flatten());
                    queue.push_back(Awaiting {
                        results: stored.results,
                        waiters: stored.waiters,
                        deadline,
                        pipeline: next_pipeline,
                        notes: unsent.len() - before,
                        outcome: None,
                    });
                }
                shed_over(&mut queue, &mut unsent, cap);
            }
        }
    }
}

/// While more than `cap` notifications wait to be sent, drop the oldest
/// arrivals' notifications; those events resolve as skipped in their turn.
fn shed_over(queue: &mut VecDeque<Awaiting>, unsent: &mut VecDeque<Notification>, cap: usize) {
    if unsent.len() <= cap {
        return;
    }
    let mut shed = 0usize;
    for a in queue.iter_mut().filter(|a| a.notes > 0) {
        if unsent.len() - shed <= cap {
            break;
        }
        shed += a.notes;
        a.notes = 0;
        a.outcome = Some(NotificationOutcome::Skipped);
    }
    // The unsent buffer holds the arrivals' notifications in arrival order.
    unsent.drain(..shed.min(unsent.len()));
    tracing::warn!(shed, cap, "notification backlog over its bound; oldest notifications skipped");
    metrics::counter!("dualstream_notifications_total", "outcome" => "skipped").increment(shed as u64);
}
