//! The lane stage: collecting batches and handing them to the durable sink.
//!
//! Each lane is one task with its own unbounded channel of [`Msg`]s (the
//! queue's bound is the engine's budget, reserved before a message is
//! sent). It collects what waits into a batch of about `max_batch_events`
//! events and `max_batch_bytes` bytes (waiting
//! `linger_ms` for more when set), hands it to the sink at once with
//! [`DualPublisher::enqueue_batch`] and passes it on to its own
//! [`ack`](crate::ack) stage without waiting for the acknowledgements. Up to
//! `max_in_flight_batches` of its batches are out at a time; while all are,
//! it keeps collecting, so under load batches grow rather than multiply.
//!
//! Guarantees: a source maps to one lane, and the lane hands its batches
//! over in the order it received the events, which the sink keeps per
//! partition. On `Stop` (shutdown) it refuses new messages and hands over
//! everything already accepted. If its ack stage died, the lane ends; what
//! it held is dropped, which resolves the callers with
//! [`BatchError::WorkerGone`] and gives the
//! queue share back.

use std::sync::Arc;

use dualstream_core::Event;
use dualstream_publisher::{DualPublisher, Receipt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::ack::{ack_stage, InFlight};
use crate::budget::{Budget, Held};
use crate::config::BatchConfig;
use crate::engine::{BatchError, Results, Waiter};
use crate::notify::Stored;

/// What a lane receives.
pub(crate) enum Msg {
    /// One event from `submit`, holding its share of the queue.
    One {
        event: Event,
        held: Held,
        reply: oneshot::Sender<Result<Receipt, BatchError>>,
    },
    /// Events of one source lane from `submit_many`, one reply for all.
    Many {
        events: Vec<Event>,
        held: Held,
        reply: oneshot::Sender<Results>,
    },
    Stop,
}

/// One lane: collect a batch, hand it to the durable sink, pass it on to the
/// lane's ack stage; repeat at once. The ack stage awaits each batch's
/// durable acknowledgements in order and gives its queue share back; the
/// engine's notification stage sends notifications and resolves callers, in
/// the order batches reach it. Per-source order holds on both paths: a source always maps to one
/// lane, the sink keeps the order of what it is handed, and each stage
/// works in batch order. Neither Redis nor the acknowledgements hold up the
/// next batch's hand-over.
pub(crate) async fn lane(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    publisher: DualPublisher,
    config: BatchConfig,
    budget: Arc<Budget>,
    notify: Option<mpsc::UnboundedSender<Stored>>,
) {
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<InFlight>();
    let acks = tokio::spawn(ack_stage(ack_rx, notify, publisher.clone(), budget));
    // Batches of this lane handed over and not yet acknowledged.
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight_batches));
    let mut events: Vec<Event> = Vec::with_capacity(config.max_batch_events.min(1024));
    let mut waiters: Vec<Waiter> = Vec::new();
    let mut held = Held::none();
    let mut bytes = 0usize;
    let mut stopping = false;
    let add =
        |msg: Msg, events: &mut Vec<Event>, waiters: &mut Vec<Waiter>, held: &mut Held, bytes: &mut usize| -> bool {
            match msg {
                Msg::One { event, held: h, reply } => {
                    *bytes += h.bytes() as usize;
                    held.merge(h);
                    events.push(event);
                    waiters.push(Waiter::One(reply));
                    true
                }
                Msg::Many { events: evs, held: h, reply } => {
                    *bytes += h.bytes() as usize;
                    held.merge(h);
                    waiters.push(Waiter::Many(reply, evs.len()));
                    events.extend(evs);
                    true
                }
                Msg::Stop => false,
            }
        };
    while !stopping {
        match rx.recv().await {
            Some(msg) => {
                if !add(msg, &mut events, &mut waiters, &mut held, &mut bytes) {
                    break;
                }
            }
            None => break,
        }
        let linger_until = Instant::now() + config.linger();
        while events.len() < config.max_batch_events && bytes < config.max_batch_bytes {
            let next = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) if config.linger_ms == 0 => break,
                Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(linger_until, rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match next {
                Some(msg) => {
                    if !add(msg, &mut events, &mut waiters, &mut held, &mut bytes) {
                        stopping = true;
                        break;
                    }
                }
                None => {
                    stopping = true;
                    break;
                }
            }
        }
        // Wait for an in-flight slot, collecting meanwhile: under load a
        // lane's batches grow instead of multiplying, and at low load a
        // batch goes at once.
        let slot = loop {
            if let Ok(p) = slots.clone().try_acquire_owned() {
                break Some(p);
            }
            let full = events.len() >= config.max_batch_events || bytes >= config.max_batch_bytes;
            tokio::select! {
                p = slots.clone().acquire_owned() => break p.ok(),
                m = rx.recv(), if !full && !stopping => match m {
                    Some(msg) => {
                        if !add(msg, &mut events, &mut waiters, &mut held, &mut bytes) {
                            stopping = true;
                        }
                    }
                    None => stopping = true,
                },
            }
        };
        if !hand_over(&publisher, &mut events, &mut waiters, &mut held, slot, &ack_tx).await {
            tracing::error!("batch ack stage is gone; the lane stops");
            return;
        }
        bytes = 0;
    }
    // Refuse new items, then publish everything already accepted.
    rx.close();
    while let Some(msg) = rx.recv().await {
        add(msg, &mut events, &mut waiters, &mut held, &mut bytes);
        if events.len() >= config.max_batch_events
            && !hand_over(&publisher, &mut events, &mut waiters, &mut held, None, &ack_tx).await
        {
            return;
        }
    }
    let _ = hand_over(&publisher, &mut events, &mut waiters, &mut held, None, &ack_tx).await;
    drop(ack_tx);
    if let Err(e) = acks.await {
        tracing::error!(error = %e, "batch ack stage ended abnormally");
    }
}

/// Hand a collected batch to the durable sink and pass it to the ack stage.
async fn hand_over(
    publisher: &DualPublisher,
    events: &mut Vec<Event>,
    waiters: &mut Vec<Waiter>,
    held: &mut Held,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    next: &mpsc::UnboundedSender<InFlight>,
) -> bool {
    if events.is_empty() {
        return true;
    }
    // Exactly sized: the batch lives until its acknowledgements, and the
    // lane's buffers keep their capacity for the next one.
    let batch: Vec<Event> = events.drain(..).collect();
    let pending = publisher.enqueue_batch(batch).await;
    let item = InFlight {
        pending,
        waiters: waiters.drain(..).collect(),
        held: std::mem::replace(held, Held::none()),
        _slot: slot,
    };
    // If the ack stage died (it panicked), dropping the item resolves its
    // callers with WorkerGone and gives the queue share back; the lane ends
    // too, so its sources are refused (LaneDead) from then on.
    next.send(item).is_ok()
}
