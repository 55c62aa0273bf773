//! The engine's queue bound: events and bytes accepted and not yet
//! acknowledged, as two Tokio semaphores, one permit an event and one a
//! byte.
//!
//! A reservation takes its events, then its bytes, with
//! [`Semaphore::acquire_many`]. The semaphores serve waiters in the order
//! they came, and a release hands its permits straight to the waiters in
//! that order: no wake-up can fall between a failed look and going to
//! sleep, and the first waiter is never left asleep while room for it is
//! free. Those behind it wait their turn: a large reservation at the head
//! (a `submit_many` chunk) is not overtaken by smaller ones, so it cannot
//! starve. A waiting request holds only its own share so far (its events
//! while it waits for bytes, or the part granted of either), and gives it
//! back at once when its wait runs out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::Gauge;
use tokio::sync::Semaphore;

/// `used` keeps events in the high 32 bits, bytes in the low 32 bits, for
/// [`Budget::used`]. The bounds are validated to fit (`max_queued_events` ≤
/// 2^30, `max_queued_bytes` < 2^32) and the semaphores never grant more
/// than them, so neither half can carry into the other.
const LOW: u64 = u32::MAX as u64;

fn pack(events: u64, bytes: u64) -> u64 {
    (events << 32) | bytes
}

pub(crate) struct Budget {
    events: Semaphore,
    bytes: Semaphore,
    max_events: u64,
    max_bytes: u64,
    /// What is reserved now (the semaphores' free permits also leave out
    /// what a waiter has been granted so far).
    used: AtomicU64,
    /// The engine's `dualstream_batch_queue_depth`: raised and lowered by
    /// each reservation's events, never set, so concurrent updates add up
    /// instead of the last one winning.
    depth: Gauge,
}

impl Budget {
    /// `max_events` and `max_bytes` are validated to fit a semaphore and a
    /// `u32` (`BatchConfig::validate`).
    pub(crate) fn new(max_events: u64, max_bytes: u64, depth: Gauge) -> Self {
        Self {
            events: Semaphore::new(max_events as usize),
            bytes: Semaphore::new(max_bytes as usize),
            max_events,
            max_bytes,
            used: AtomicU64::new(0),
            depth,
        }
    }

    /// (events, bytes) held now.
    pub(crate) fn used(&self) -> (u64, u64) {
        let u = self.used.load(Ordering::Acquire);
        (u >> 32, u & LOW)
    }

    /// The request as permit counts, if it can ever fit.
    fn fits(&self, events: u64, bytes: u64) -> Option<(u32, u32)> {
        if events > self.max_events || bytes > self.max_bytes {
            return None;
        }
        Some((u32::try_from(events).ok()?, u32::try_from(bytes).ok()?))
    }

    fn held(self: &Arc<Self>, events: u64, bytes: u64) -> Held {
        // The gauge first: once `used` shows a reservation, so does it.
        self.depth.increment(events as f64);
        self.used.fetch_add(pack(events, bytes), Ordering::AcqRel);
        Held { budget: Some(self.clone()), events, bytes }
    }

    /// Reserve room for `events` events of `bytes` bytes, if there is room
    /// now and nobody waits for it.
    pub(crate) fn try_take(self: &Arc<Self>, events: u64, bytes: u64) -> Option<Held> {
        let (e, b) = self.fits(events, bytes)?;
        let e_permits = self.events.try_acquire_many(e).ok()?;
        let b_permits = self.bytes.try_acquire_many(b).ok()?;
        e_permits.forget();
        b_permits.forget();
        Some(self.held(events, bytes))
    }

    /// Reserve room, waiting up to `wait` for it, behind the requests that
    /// came first. `None` when the wait ran out (or the request can never
    /// fit).
    pub(crate) async fn take(self: &Arc<Self>, events: u64, bytes: u64, wait: Duration) -> Option<Held> {
        let (e, b) = self.fits(events, bytes)?;
        let both = async {
            // Dropped at the deadline, a permit (or the part of one granted
            // so far) goes back to the semaphore.
            let e_permits = self.events.acquire_many(e).await.ok()?;
            let b_permits = self.bytes.acquire_many(b).await.ok()?;
            e_permits.forget();
            b_permits.forget();
            Some(())
        };
        tokio::time::timeout(wait, both).await.ok().flatten()?;
        Some(self.held(events, bytes))
    }

    fn release(&self, events: u64, bytes: u64) {
        self.used.fetch_sub(pack(events, bytes), Ordering::AcqRel);
        self.depth.decrement(events as f64);
        // Both bounded by the maxima the semaphores were created with.
        self.events.add_permits(events as usize);
        self.bytes.add_permits(bytes as usize);
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

    fn budget(max_events: u64, max_bytes: u64) -> Arc<Budget> {
        Arc::new(Budget::new(max_events, max_bytes, Gauge::noop()))
    }

    #[test]
    fn reservations_stay_within_both_bounds_and_come_back_on_drop() {
        let b = budget(3, 100);
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
        let b = budget(10, 1000);
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
        let b = budget(1 << 30, u32::MAX as u64);
        let h = b.try_take(1 << 30, u32::MAX as u64).expect("room");
        assert_eq!(b.used(), (1 << 30, u32::MAX as u64));
        drop(h);
        assert_eq!(b.used(), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_reservation_gets_room_when_it_is_given_back() {
        let b = budget(1, 10);
        let first = b.try_take(1, 10).expect("room");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.take(1, 10, Duration::from_secs(10)).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("task"));
    }

    /// Lets every other task of a paused-time runtime run until it waits.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// One release that frees room for many lets them all in (paused time:
    /// the 100 ms bound is a point on the paused clock, far before the
    /// waiters' 10 s).
    #[tokio::test(start_paused = true)]
    async fn one_release_lets_in_every_waiter_that_fits() {
        let b = budget(10, 1000);
        let all = b.try_take(10, 10).expect("room");
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.take(1, 1, Duration::from_secs(10)).await.map(std::mem::forget).is_some() })
            })
            .collect();
        settle().await;
        drop(all);
        for w in waiters {
            assert!(tokio::time::timeout(Duration::from_millis(100), w).await.expect("woken").expect("task"));
        }
    }

    /// Mixed sizes, one release at a time, on paused time (a wait the
    /// runtime sleeps through is its timeout at once, not a slow test). The
    /// first waiter is woken by a release that does not make room for it;
    /// the next release does, and it must get in then, not when its 5 s
    /// run out. The outer bound of 100 ms is a point on the paused clock.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_woken_without_room_still_gets_the_room_of_the_next_release() {
        let b = budget(10, 100);
        let h1 = b.try_take(1, 30).expect("room");
        let h2 = b.try_take(1, 40).expect("room");
        let h3 = b.try_take(1, 30).expect("room");
        let wait = Duration::from_secs(5);
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.take(1, 60, wait).await }
        });
        settle().await;
        let second = tokio::spawn({
            let b = b.clone();
            async move { b.take(1, 90, wait).await }
        });
        settle().await;
        drop(h1);
        settle().await;
        drop(h2);
        let first = tokio::time::timeout(Duration::from_millis(100), first)
            .await
            .expect("the first waiter got the room of the second release, not its timeout")
            .expect("task")
            .expect("room");
        assert_eq!(b.used(), (2, 90), "the first waiter's share and h3");
        drop((first, h3));
        let second = tokio::time::timeout(Duration::from_millis(100), second)
            .await
            .expect("the second waiter got room once it fit")
            .expect("task")
            .expect("room");
        assert_eq!(b.used(), (1, 90));
        drop(second);
        assert_eq!(b.used(), (0, 0));
    }

    /// Waiters of mixed sizes on two threads, while shares come back from
    /// both: each reservation may wait 60 s, the whole run is bounded at
    /// 20 s, so a waiter left asleep with room free (until its 60 s ran
    /// out) fails the test, not a slow machine. Every reservation must get
    /// room, and the bounds hold throughout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_of_mixed_sizes_all_get_room_while_shares_come_back_concurrently() {
        let b = budget(8, 1000);
        let tasks: Vec<_> = (0..16u64)
            .map(|t| {
                let b = b.clone();
                tokio::spawn(async move {
                    for i in 0..200u64 {
                        let (events, bytes) = (1 + (t + i) % 3, [1, 90, 400, 700, 999][((t * 7 + i) % 5) as usize]);
                        let Some(h) = b.take(events, bytes, Duration::from_secs(60)).await else {
                            return false;
                        };
                        let (e, by) = b.used();
                        assert!(e <= 8 && by <= 1000, "over the bounds: ({e}, {by})");
                        if i % 2 == 0 {
                            tokio::task::yield_now().await;
                        }
                        drop(h);
                    }
                    true
                })
            })
            .collect();
        let all = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(tasks))
            .await
            .expect("no waiter was left asleep with room free");
        assert!(all.into_iter().all(|r| r.expect("task")), "every reservation got room");
        assert_eq!(b.used(), (0, 0));
    }

    /// A release that races a waiter's first look at the budget: the
    /// waiter must see the room or be woken by the release, never sleep
    /// through it. Many rounds, a release on another thread each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_racing_a_new_waiter_is_never_missed() {
        for round in 0..20_000u32 {
            let b = budget(1, 10);
            let held = b.try_take(1, 10).expect("room");
            let waiter = tokio::spawn({
                let b = b.clone();
                async move { b.take(1, 10, Duration::from_secs(60)).await.is_some() }
            });
            let releaser = tokio::spawn(async move {
                for _ in 0..round % 4 {
                    tokio::task::yield_now().await;
                }
                drop(held);
            });
            let got = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .unwrap_or_else(|_| panic!("round {round}: the waiter slept through the release"))
                .expect("task");
            assert!(got, "round {round}");
            releaser.await.expect("task");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_that_finds_no_room_gives_up_after_its_wait() {
        let b = budget(1, 10);
        let _held = b.try_take(1, 10).expect("room");
        assert!(b.take(1, 1, Duration::from_millis(100)).await.is_none());
        assert!(b.take(2, 1, Duration::from_secs(1)).await.is_none(), "can never fit");
    }
}
