//! A connection's buffer of items, bounded twice: in items
//! (`limits.client_buffer`, the channel's capacity) and in bytes
//! (`limits.client_buffer_bytes`, a semaphore of bytes). A client that
//! never reads holds at most that many bytes of the gateway's memory,
//! whatever the size of its events; one item larger than the whole bound
//! still goes, alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{CloseReason, Msg};

/// The bytes an item holds of its connection's bound while it waits in the
/// buffer; given back when it is dropped (taken by the connection, or
/// dropped with the buffer).
#[derive(Debug)]
pub(crate) struct Charge {
    _permit: OwnedSemaphorePermit,
    n: usize,
    total: Arc<AtomicUsize>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.total.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// The sending side of a connection's buffer, one clone per subscription
/// task.
#[derive(Clone, Debug)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Msg>,
    bytes: Arc<Semaphore>,
    /// `limits.client_buffer_bytes`.
    bound: usize,
    /// Bytes buffered for every client of the gateway, for `/readyz`.
    total: Arc<AtomicUsize>,
    close: Arc<watch::Sender<Option<CloseReason>>>,
}

impl Outbox {
    /// A buffer of at most `items` items and `bytes` bytes, and its
    /// receiving side. `total` counts the bytes buffered.
    pub(crate) fn new(
        items: usize,
        bytes: usize,
        total: Arc<AtomicUsize>,
        close: Arc<watch::Sender<Option<CloseReason>>>,
    ) -> (Self, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel(items);
        let bound = bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        (Self { tx, bytes: Arc::new(Semaphore::new(bound)), bound, total, close }, rx)
    }

    /// What an item of `len` bytes takes of the bound: all of it at most.
    fn cost(&self, len: usize) -> u32 {
        len.clamp(1, self.bound) as u32
    }

    fn charge(&self, permit: OwnedSemaphorePermit, msg: &mut Msg) {
        let n = permit.num_permits();
        self.total.fetch_add(n, Ordering::Relaxed);
        msg.charge = Some(Charge { _permit: permit, n, total: Arc::clone(&self.total) });
    }

    /// Close the connection as too slow (once).
    pub(crate) fn close_slow(&self) {
        self.close.send_if_modified(|r| {
            let set = r.is_none();
            if set {
                *r = Some(CloseReason::SlowClient);
            }
            set
        });
    }

    /// Hand one item over without waiting; a full buffer closes the
    /// connection as too slow.
    pub(crate) fn push(&self, mut msg: Msg) {
        let Ok(permit) = Arc::clone(&self.bytes).try_acquire_many_owned(self.cost(msg.json.len())) else {
            self.close_slow();
            return;
        };
        self.charge(permit, &mut msg);
        if self.tx.try_send(msg).is_err() {
            self.close_slow();
        }
    }

    /// Hand one item over, waiting up to `wait` for room in items and in
    /// bytes; `false` when the client stayed too slow for that long (the
    /// connection is then closed with `slow_client`) or is gone. Only the
    /// caller waits: the hub and the shared Kafka reader never wait for a
    /// client.
    pub(crate) async fn hand(&self, mut msg: Msg, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let cost = self.cost(msg.json.len());
        let permit = match Arc::clone(&self.bytes).try_acquire_many_owned(cost) {
            Ok(p) => p,
            Err(_) => match tokio::time::timeout_at(deadline, Arc::clone(&self.bytes).acquire_many_owned(cost)).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return false,
                Err(_) => return self.too_slow(wait),
            },
        };
        self.charge(permit, &mut msg);
        let msg = match self.tx.try_send(msg) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
        };
        match self.tx.send_timeout(msg, deadline.saturating_duration_since(Instant::now())).await {
            Ok(()) => true,
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => self.too_slow(wait),
        }
    }

    fn too_slow(&self, wait: Duration) -> bool {
        tracing::debug!(?wait, "a client's buffer stayed full: closing it as too slow");
        self.close_slow();
        false
    }

    /// Whether the connection is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Kind;

    fn msg(len: usize) -> Msg {
        Msg { kind: Kind::Event, json: "x".repeat(len).into(), advance: None, charge: None }
    }

    fn outbox(items: usize, bytes: usize) -> (Outbox, mpsc::Receiver<Msg>, watch::Receiver<Option<CloseReason>>) {
        let (close, close_rx) = watch::channel(None);
        let (out, rx) = Outbox::new(items, bytes, Arc::new(AtomicUsize::new(0)), Arc::new(close));
        (out, rx, close_rx)
    }

    const WAIT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_client_that_never_reads_holds_at_most_its_bytes() {
        // Room for 1,024 items but 10,000 bytes: the fourth 3,000-byte item
        // does not fit, and the client is closed as too slow.
        let (out, mut rx, close) = outbox(1_024, 10_000);
        for _ in 0..3 {
            assert!(out.hand(msg(3_000), WAIT).await);
        }
        assert_eq!(out.total.load(Ordering::Relaxed), 9_000);
        assert!(!out.hand(msg(3_000), WAIT).await, "past the byte bound");
        assert_eq!(*close.borrow(), Some(CloseReason::SlowClient));
        assert_eq!(out.total.load(Ordering::Relaxed), 9_000, "the refused item holds nothing");
        // What the connection takes is given back.
        drop(rx.recv().await.expect("an item"));
        assert_eq!(out.total.load(Ordering::Relaxed), 6_000);
        drop(rx);
        assert_eq!(out.total.load(Ordering::Relaxed), 0, "a dropped buffer gives everything back");
    }

    #[tokio::test]
    async fn an_item_waits_for_room_in_bytes_and_goes_when_the_client_reads() {
        let (out, mut rx, close) = outbox(1_024, 10_000);
        assert!(out.hand(msg(6_000), WAIT).await);
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let first = rx.recv().await.expect("first");
            (first.json.len(), rx)
        });
        assert!(out.hand(msg(6_000), Duration::from_secs(5)).await, "room was made in time");
        let (first, mut rx) = reader.await.expect("reader");
        assert_eq!(first, 6_000);
        assert_eq!(rx.recv().await.expect("second").json.len(), 6_000);
        assert_eq!(*close.borrow(), None);
    }

    #[tokio::test]
    async fn an_item_larger_than_the_bound_goes_alone() {
        let (out, mut rx, _close) = outbox(1_024, 10_000);
        assert!(out.hand(msg(850_000), WAIT).await, "an empty buffer takes it");
        assert_eq!(out.total.load(Ordering::Relaxed), 10_000, "it counts as the whole bound");
        assert!(!out.hand(msg(10), WAIT).await, "nothing else fits beside it");
        assert_eq!(rx.recv().await.expect("it").json.len(), 850_000);
    }

    #[tokio::test]
    async fn the_item_count_still_bounds_small_items() {
        let (out, _rx, close) = outbox(2, 1 << 20);
        assert!(out.hand(msg(10), WAIT).await);
        assert!(out.hand(msg(10), WAIT).await);
        assert!(!out.hand(msg(10), WAIT).await);
        assert_eq!(*close.borrow(), Some(CloseReason::SlowClient));
    }

    #[tokio::test]
    async fn push_never_waits() {
        let (out, _rx, close) = outbox(1_024, 100);
        out.push(msg(60));
        assert_eq!(*close.borrow(), None);
        out.push(msg(60));
        assert_eq!(*close.borrow(), Some(CloseReason::SlowClient));
    }
}
