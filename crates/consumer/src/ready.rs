//! [`ReadyBudget`]: a bound, in items and in bytes, on the events that the
//! joins of one consumer may read ahead of it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What the joins of one consumer (a gateway's connection, say) may hold
/// ready for it: at most `items` events read from Kafka and at most `bytes`
/// of them, across every join made with it
/// ([`CatchUp::join_within`](crate::CatchUp::join_within)). A join that has
/// that much ready waits for its consumer to take some before it reads on;
/// a consumer that never takes anything holds no more than this of the
/// process's memory, whatever the size of its events. One event larger than
/// the whole bound is still read, alone.
///
/// An event counts its [`size_hint`](dualstream_core::Event::size_hint), and
/// at least `bytes / items`, so that small events are bounded by `items`.
/// Live notifications are shared with the hub's other subscribers and are
/// bounded by [`JoinConfig::buffer`](crate::JoinConfig::buffer) alone.
#[derive(Clone, Debug)]
pub struct ReadyBudget {
    room: Arc<Semaphore>,
    /// `bytes`, as permits.
    bound: usize,
    /// The least an event counts.
    least: usize,
    /// The bytes held, added to whatever else shares this counter.
    held: Arc<AtomicUsize>,
}

impl ReadyBudget {
    /// A budget of `items` events and `bytes` bytes (each at least 1), whose
    /// holding is added to `held` while it lasts: one counter can sum many
    /// budgets.
    pub fn new(items: usize, bytes: usize, held: Arc<AtomicUsize>) -> Self {
        let bound = bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let least = (bound / items.max(1)).max(1);
        Self { room: Arc::new(Semaphore::new(bound)), bound, least, held }
    }

    /// The bytes held now by events ready under this budget (and any other
    /// that shares its counter).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// What an event of `size` bytes counts.
    fn cost(&self, size: usize) -> u32 {
        size.clamp(self.least, self.bound) as u32
    }

    /// Room for an event of `size` bytes, waiting for it; `None` only if the
    /// budget was closed (it never is).
    pub(crate) async fn take(&self, size: usize) -> Option<Charge> {
        let permit = Arc::clone(&self.room).acquire_many_owned(self.cost(size)).await.ok()?;
        let n = permit.num_permits();
        self.held.fetch_add(n, Ordering::Relaxed);
        Some(Charge { _permit: permit, n, held: Arc::clone(&self.held) })
    }
}

/// An event's room in a [`ReadyBudget`], given back when it is dropped: when
/// the consumer takes the event.
#[derive(Debug)]
pub(crate) struct Charge {
    _permit: OwnedSemaphorePermit,
    n: usize,
    held: Arc<AtomicUsize>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.fetch_sub(self.n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn room_is_bounded_in_bytes_and_items_and_given_back() {
        let held = Arc::new(AtomicUsize::new(0));
        let budget = ReadyBudget::new(4, 10_000, Arc::clone(&held));
        let a = budget.take(3_000).await.expect("room");
        let b = budget.take(6_000).await.expect("room");
        assert_eq!(budget.held(), 9_000);
        let more = tokio::time::timeout(Duration::from_millis(50), budget.take(3_000)).await;
        assert!(more.is_err(), "past the byte bound it waits");
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), budget.take(3_000)).await.expect("room made").expect("room");
        drop((b, c));
        assert_eq!(held.load(Ordering::Relaxed), 0, "everything given back");
        // Small events count bytes / items each: 4 of them fill it.
        let small: Vec<_> = futures::future::join_all((0..4).map(|_| budget.take(10))).await;
        assert_eq!(budget.held(), 10_000);
        assert!(tokio::time::timeout(Duration::from_millis(50), budget.take(10)).await.is_err(), "the fifth waits");
        drop(small);
        // One event larger than the whole bound takes all of it, and goes.
        let big = tokio::time::timeout(Duration::from_secs(5), budget.take(850_000)).await.expect("alone").expect("room");
        assert_eq!(budget.held(), 10_000);
        drop(big);
        assert_eq!(budget.held(), 0);
    }
}
