//! The lane stage: collecting batches and handing them to the durable sink.
//!
//! Each lane is one task with its own unbounded channel of [`Msg`]s (the
//! queue's bound is the engine's budget, reserved before a message is
//! sent). It collects what waits into a batch of at most
//! `max_batch_events` events (a message that would take it past that
//! starts the next batch) until it reaches `max_batch_bytes` bytes (waiting
//! `linger_ms` for more when set), hands it to the sink at once with
//! [`DualPublisher::enqueue_batch`] and passes it on to its own
//! [`ack`](crate::ack) stage without waiting for the acknowledgements. Up to
//! `max_in_flight_batches` of its batches are out at a time; while all are,
//! it keeps collecting, so under load batches grow rather than multiply.
//!
//! Each event comes with its order key (its source's hash, which also chose
//! its lane: [`BatchEngine`](crate::BatchEngine) hashes a source once), by
//! which the ack stage releases it.
//!
//! Guarantees: a source maps to one lane, and the lane hands its batches
//! over in the order it received the events, which the sink keeps per
//! partition. On `Stop` (shutdown) it refuses new messages and hands over
//! everything already accepted. If its ack stage died, the lane ends; what
//! it held is dropped, which resolves the callers with
//! [`BatchError::WorkerGone`] and gives the
//! queue share back.

use std::collections::VecDeque;
use std::sync::Arc;

use dualstream_core::Event;
use dualstream_publisher::{DualPublisher, Receipt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::ack::{ack_stage, InFlight};
use crate::budget::Held;
use crate::config::BatchConfig;
use crate::engine::{BatchError, Results, Waiter};
use crate::notify::Stored;

/// What a lane receives.
pub(crate) enum Msg {
    /// One event from `submit`, holding its share of the queue, with its
    /// order key.
    One {
        event: Event,
        key: u64,
        held: Held,
        reply: oneshot::Sender<Result<Receipt, BatchError>>,
    },
    /// Events of one lane from `submit_many`, one reply for all: at most
    /// `max_batch_events` of them (the chunks are no larger).
    Many {
        events: Vec<Event>,
        /// Each event's order key.
        keys: Vec<u64>,
        held: Held,
        reply: oneshot::Sender<Results>,
    },
    Stop,
}

/// One lane: collect a batch, hand it to the durable sink, pass it on to the
/// lane's ack stage; repeat at once. The ack stage awaits the batches'
/// durable acknowledgements, gives each batch's queue share back at its own,
/// and releases each event once it and the earlier events of its source are
/// acknowledged; the engine's notification stage sends notifications and
/// resolves callers in the order events reach it. Per-source order holds on
/// both paths: a source always maps to one lane, the sink keeps the order of
/// what it is handed, and each stage keeps the order of each source. Neither
/// Redis nor the acknowledgements hold up the next batch's hand-over.
pub(crate) async fn lane(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    publisher: DualPublisher,
    config: BatchConfig,
    notify: Option<mpsc::UnboundedSender<Stored>>,
) {
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<InFlight>();
    let acks = tokio::spawn(ack_stage(ack_rx, notify, publisher.clone()));
    // Batches of this lane handed over and not yet acknowledged.
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight_batches));
    let mut batch = Collecting::new(&config);
    let mut stopping = false;
    while !stopping {
        // Messages carried over from the last batch start this one;
        // otherwise wait for one.
        if batch.is_empty() {
            match rx.recv().await {
                Some(msg) => {
                    if !batch.add(msg) {
                        break;
                    }
                }
                None => break,
            }
        }
        let linger_until = Instant::now() + config.linger();
        while !batch.full() {
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
                    if !batch.add(msg) {
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
            let full = batch.full();
            tokio::select! {
                p = slots.clone().acquire_owned() => break p.ok(),
                m = rx.recv(), if !full && !stopping => match m {
                    Some(msg) => {
                        if !batch.add(msg) {
                            stopping = true;
                        }
                    }
                    None => stopping = true,
                },
            }
        };
        if !hand_over(&publisher, &mut batch, slot, &ack_tx).await {
            tracing::error!("batch ack stage is gone; the lane stops");
            return;
        }
    }
    // Refuse new items, then publish everything already accepted.
    rx.close();
    while let Some(msg) = rx.recv().await {
        batch.add(msg);
        if batch.full() && !hand_over(&publisher, &mut batch, None, &ack_tx).await {
            return;
        }
    }
    // What is left, the carried-over messages last.
    while !batch.is_empty() {
        if !hand_over(&publisher, &mut batch, None, &ack_tx).await {
            return;
        }
    }
    drop(ack_tx);
    if let Err(e) = acks.await {
        tracing::error!(error = %e, "batch ack stage ended abnormally");
    }
}

/// The batch a lane is collecting.
struct Collecting {
    events: Vec<Event>,
    /// An empty buffer kept for the next batch: the lane's own, set aside
    /// when a `submit_many` part was taken in whole instead of copied.
    spare: Vec<Event>,
    /// Each event's order key: its source's hash (ack.rs says why the
    /// source). Two sources of one hash are released in their joint order,
    /// which keeps each one's.
    keys: Vec<u64>,
    waiters: Vec<Waiter>,
    held: Held,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Messages that would have taken the batch past `max_batch_events`, in
    /// the order they came: they start the next batch.
    carried: VecDeque<Msg>,
}

impl Collecting {
    fn new(config: &BatchConfig) -> Self {
        Self {
            events: Vec::with_capacity(config.max_batch_events.min(1024)),
            spare: Vec::new(),
            keys: Vec::with_capacity(config.max_batch_events.min(1024)),
            waiters: Vec::new(),
            held: Held::none(),
            bytes: 0,
            max_events: config.max_batch_events,
            max_bytes: config.max_batch_bytes,
            carried: VecDeque::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.carried.is_empty()
    }

    /// Nothing more goes into this batch: it holds `max_batch_events`, its
    /// bytes reached `max_batch_bytes`, or a message waits for the next one.
    fn full(&self) -> bool {
        !self.carried.is_empty() || self.events.len() >= self.max_events || self.bytes >= self.max_bytes
    }

    /// Take a message in, or carry it over to the next batch if it would
    /// take this one past `max_batch_events` (or an earlier one was carried
    /// over: order holds). A message alone always fits an empty batch: a
    /// `submit_many` part is at most `max_batch_events` events. False on
    /// `Stop`.
    fn add(&mut self, msg: Msg) -> bool {
        let count = match &msg {
            Msg::One { .. } => 1,
            Msg::Many { events, .. } => events.len(),
            Msg::Stop => return false,
        };
        if !self.carried.is_empty() || (!self.events.is_empty() && self.events.len() + count > self.max_events) {
            self.carried.push_back(msg);
            return true;
        }
        match msg {
            Msg::One { event, key, held, reply } => {
                if self.events.capacity() == 0 {
                    self.events = std::mem::take(&mut self.spare);
                    self.events.reserve(self.max_events.min(1024));
                }
                self.bytes += held.bytes() as usize;
                self.held.merge(held);
                self.keys.push(key);
                self.events.push(event);
                self.waiters.push(Waiter::One(reply));
            }
            Msg::Many { events, keys, held, reply } => {
                self.bytes += held.bytes() as usize;
                self.held.merge(held);
                self.waiters.push(Waiter::Many(reply, events.len()));
                self.keys.extend(keys);
                if self.events.is_empty() {
                    // The part becomes the batch without copying its events.
                    let own = std::mem::replace(&mut self.events, events);
                    if own.capacity() > self.spare.capacity() {
                        self.spare = own;
                    }
                } else {
                    self.events.extend(events);
                }
            }
            Msg::Stop => return false,
        }
        true
    }

    /// Take the batch out and start the next one with what was carried
    /// over.
    fn take(&mut self) -> (Vec<Event>, Vec<u64>, Vec<Waiter>, Held) {
        // The batch lives until its acknowledgements: a batch that fills at
        // least half its buffer takes the buffer along (no copy; the spare
        // one, if any, serves the next batch), a smaller one is copied out
        // exactly sized and the lane keeps its buffer.
        let events = if self.events.len() * 2 >= self.events.capacity() {
            let spare = std::mem::take(&mut self.spare);
            std::mem::replace(&mut self.events, spare)
        } else {
            self.events.drain(..).collect()
        };
        let out = (
            events,
            self.keys.drain(..).collect(),
            self.waiters.drain(..).collect(),
            std::mem::replace(&mut self.held, Held::none()),
        );
        self.bytes = 0;
        for msg in std::mem::take(&mut self.carried) {
            self.add(msg);
        }
        out
    }
}

/// Hand a collected batch to the durable sink and pass it to the ack stage.
async fn hand_over(
    publisher: &DualPublisher,
    batch: &mut Collecting,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    next: &mpsc::UnboundedSender<InFlight>,
) -> bool {
    let (events, keys, waiters, held) = batch.take();
    if events.is_empty() {
        return true;
    }
    let pending = publisher.enqueue_batch(events).await;
    let item = InFlight { pending, keys, waiters, held, slot };
    // If the ack stage died (it panicked), dropping the item resolves its
    // callers with WorkerGone and gives the queue share back; the lane ends
    // too, so its sources are refused (LaneDead) from then on.
    next.send(item).is_ok()
}
