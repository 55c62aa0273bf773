//! The engine's queue bound: events and bytes accepted and not yet
//! acknowledged, in one atomic word, instead of two semaphore permits per
//! event.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// Events in the high 32 bits, bytes in the low 32 bits. The bounds are
/// validated to fit (`max_queued_events` ≤ 2^30, `max_queued_bytes` <
/// 2^32) and a reservation never takes the sum past them, so neither half
/// can carry into the other.
const LOW: u64 = u32::MAX as u64;

fn pack(events: u64, bytes: u64) -> u64 {
    (events << 32) | bytes
}

pub(crate) struct Budget {
    used: AtomicU64,
    max_events: u64,
    max_bytes: u64,
    freed: Notify,
    waiting: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(max_events: u64, max_bytes: u64) -> Self {
        Self { used: AtomicU64::new(0), max_events, max_bytes, freed: Notify::new(), waiting: AtomicUsize::new(0) }
    }

    /// (events, bytes) held now.
    pub(crate) fn used(&self) -> (u64, u64) {
        let u = self.used.load(Ordering::Acquire);
        (u >> 32, u & LOW)
    }

    /// Reserve room for `events` events of `bytes` bytes, if there is room now.
    pub(crate) fn try_take(self: &Arc<Self>, events: u64, bytes: u64) -> Option<Held> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let (e, b) = (cur >> 32, cur & LOW);
            if e + events > self.max_events || b + bytes > self.max_bytes {
                return None;
            }
            match self.used.compare_exchange_weak(cur, cur + pack(events, bytes), Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Held { budget: Some(self.clone()), events, bytes }),
                Err(now) => cur = now,
            }
        }
    }

    /// Reserve room, waiting up to `wait` for it. `None` when the wait ran
    /// out (or the request can never fit).
    pub(crate) async fn take(self: &Arc<Self>, events: u64, bytes: u64, wait: Duration) -> Option<Held> {
        if events > self.max_events || bytes > self.max_bytes {
            return None;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Register before checking, so a release in between is not missed.
            freed.as_mut().enable();
            if let Some(h) = self.try_take(events, bytes) {
                return Some(h);
            }
            self.waiting.fetch_add(1, Ordering::AcqRel);
            let woke = tokio::time::timeout_at(deadline, freed).await;
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if woke.is_err() {
                return self.try_take(events, bytes);
            }
            // Woken by a release: take the room, then pass the wake-up on,
            // since what was given back may fit the next waiter too. One
            // waiter at a time, not all of them per release.
            if let Some(h) = self.try_take(events, bytes) {
                self.wake_one();
                return Some(h);
            }
        }
    }

    fn wake_one(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.freed.notify_one();
        }
    }

    fn release(&self, events: u64, bytes: u64) {
        self.used.fetch_sub(pack(events, bytes), Ordering::AcqRel);
        self.wake_one();
    }
}

/// A share of the queue, given back when dropped (also when a worker dies
/// with it).
pub(crate) struct Held {
    budget: Option<Arc<Budget>>,
    events: u64,
    bytes: u64,
}

impl Held {
    /// Holds nothing.
    pub(crate) fn none() -> Self {
        Self { budget: None, events: 0, bytes: 0 }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Take over `other`'s share (both must come from the same budget).
    pub(crate) fn merge(&mut self, mut other: Held) {
        if self.budget.is_none() {
            self.budget = other.budget.take();
        }
        self.events += std::mem::take(&mut other.events);
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Split off a share of `events` and `bytes` (at most what is held).
    pub(crate) fn split(&mut self, events: u64, bytes: u64) -> Held {
        let (events, bytes) = (events.min(self.events), bytes.min(self.bytes));
        self.events -= events;
        self.bytes -= bytes;
        Held { budget: self.budget.clone(), events, bytes }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            if self.events > 0 || self.bytes > 0 {
                b.release(self.events, self.bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_both_bounds_and_come_back_on_drop() {
        let b = Arc::new(Budget::new(3, 100));
        let a = b.try_take(2, 60).expect("room");
        assert!(b.try_take(1, 41).is_none(), "bytes bound");
        let c = b.try_take(1, 40).expect("room");
        assert!(b.try_take(1, 0).is_none(), "events bound");
        assert_eq!(b.used(), (3, 100));
        drop(a);
        assert_eq!(b.used(), (1, 40));
        drop(c);
        assert_eq!(b.used(), (0, 0));
    }

    #[test]
    fn merged_and_split_shares_release_exactly_once() {
        let b = Arc::new(Budget::new(10, 1000));
        let mut all = Held::none();
        for _ in 0..4 {
            all.merge(b.try_take(1, 10).expect("room"));
        }
        assert_eq!(b.used(), (4, 40));
        let part = all.split(3, 30);
        drop(all);
        assert_eq!(b.used(), (3, 30));
        drop(part);
        assert_eq!(b.used(), (0, 0));
    }

    #[test]
    fn the_largest_bounds_do_not_carry_between_halves() {
        let b = Arc::new(Budget::new(1 << 30, u32::MAX as u64));
        let h = b.try_take(1 << 30, u32::MAX as u64).expect("room");
        assert_eq!(b.used(), (1 << 30, u32::MAX as u64));
        drop(h);
        assert_eq!(b.used(), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_reservation_gets_room_when_it_is_given_back() {
        let b = Arc::new(Budget::new(1, 10));
        let first = b.try_take(1, 10).expect("room");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.take(1, 10, Duration::from_secs(10)).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("task"));
    }

    /// Waiters are woken one at a time, each passing the wake-up on once it
    /// took its room: one release that frees room for many lets them all in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_release_lets_in_every_waiter_that_fits() {
        let b = Arc::new(Budget::new(10, 1000));
        let all = b.try_take(10, 10).expect("room");
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.take(1, 1, Duration::from_secs(10)).await.map(std::mem::forget).is_some() })
            })
            .collect();
        while b.waiting.load(Ordering::Acquire) < 10 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(all);
        for w in waiters {
            assert!(tokio::time::timeout(Duration::from_secs(5), w).await.expect("woken").expect("task"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_that_finds_no_room_gives_up_after_its_wait() {
        let b = Arc::new(Budget::new(1, 10));
        let _held = b.try_take(1, 10).expect("room");
        assert!(b.take(1, 1, Duration::from_millis(100)).await.is_none());
        assert!(b.take(2, 1, Duration::from_secs(1)).await.is_none(), "can never fit");
    }
}
