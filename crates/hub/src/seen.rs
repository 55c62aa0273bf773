//! Which offsets of each partition the hub has seen a notification of, and
//! of which source: what lets a catch-up join deliver a live notification
//! without reading Kafka first.
//!
//! A join that has delivered its source's events up to offset `next` and
//! gets a notification at a higher offset must know that no event of its
//! source lies in between. Offsets within a partition are contiguous (an
//! idempotent, non-transactional producer), so when the hub has seen a
//! notification for every offset in between, and none of them was of the
//! join's source, there is none ([`Seen::Clear`]). Otherwise the join waits
//! a little for a notification still on its way (several publishers of one
//! partition do not publish in offset order), then reads Kafka: an offset
//! whose notification never came (Redis was down, the write's outcome was
//! unknown) or that is of its own source ([`Seen::Mine`]) is never assumed
//! away.
//!
//! The hub follows every source channel with one pattern subscription
//! ([`Hub::follow_partitions`](crate::Hub::follow_partitions)) and records
//! each notification's position here in its own task, before it hands the
//! next message to anyone. Redis sends one publish's message to channel
//! subscribers before pattern subscribers, and publishes in order, so by the
//! time a join receives a notification, every notification published before
//! it has been recorded.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use dualstream_core::{Notification, Source};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Offsets of each partition remembered: the latest `WINDOW` from the
/// highest seen. A check reaching below them answers [`Seen::Missing`].
pub const WINDOW: usize = 16_384;

/// What the hub knows of the offsets `[from, to)` of a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A notification of another source was seen for every offset.
    Clear,
    /// A notification of this source was seen at `offset`.
    Mine {
        /// The first such offset.
        offset: i64,
    },
    /// No notification was seen for `offset` (yet).
    Missing {
        /// The first such offset.
        offset: i64,
    },
}

/// The identity of a source in [`SeenOffsets`]: a hash of its type and id.
/// Two sources with the same hash only make a check answer `Mine` (and the
/// join read Kafka), never `Clear` wrongly.
pub fn source_key(source_type: &str, source_id: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    source_type.hash(&mut h);
    source_id.hash(&mut h);
    // 0 marks an offset not seen.
    h.finish().max(1)
}

/// The key of `source` (see [`source_key`]).
pub fn key_of(source: &Source) -> u64 {
    source_key(source.source_type(), source.source_id())
}

/// One partition's latest `WINDOW` offsets: `slots[o % WINDOW]` is the
/// source key of offset `o` in `[base, base + WINDOW)`, 0 when not seen.
struct Window {
    base: i64,
    slots: Box<[u64]>,
}

impl Window {
    fn new(first: i64) -> Self {
        // Offsets a little below the first one seen may still arrive (out
        // of order); below that nothing is known.
        Self { base: (first - WINDOW as i64 / 2).max(0), slots: vec![0; WINDOW].into_boxed_slice() }
    }

    fn slot(o: i64) -> usize {
        o.rem_euclid(WINDOW as i64) as usize
    }

    fn record(&mut self, o: i64, key: u64) {
        if o < self.base {
            return;
        }
        let end = self.base + WINDOW as i64;
        if o >= end {
            let base = o - WINDOW as i64 + 1;
            if base - self.base >= WINDOW as i64 {
                self.slots.fill(0);
            } else {
                for old in self.base..base {
                    self.slots[Self::slot(old)] = 0;
                }
            }
            self.base = base;
        }
        self.slots[Self::slot(o)] = key;
    }

    fn check(&self, from: i64, to: i64, key: u64) -> Seen {
        if from < self.base {
            return Seen::Missing { offset: from };
        }
        for o in from..to.min(self.base + WINDOW as i64) {
            match self.slots[Self::slot(o)] {
                0 => return Seen::Missing { offset: o },
                k if k == key => return Seen::Mine { offset: o },
                _ => {}
            }
        }
        if to > self.base + WINDOW as i64 {
            return Seen::Missing { offset: self.base + WINDOW as i64 };
        }
        Seen::Clear
    }
}

/// The notifications a hub has seen, by partition (see the module's
/// description). Shared by the hub's task, which records, and the joins,
/// which check.
#[derive(Default)]
pub struct SeenOffsets {
    parts: Mutex<HashMap<Arc<str>, HashMap<i32, Window>>>,
    changed: Notify,
}

impl std::fmt::Debug for SeenOffsets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeenOffsets").finish_non_exhaustive()
    }
}

impl SeenOffsets {
    /// Record a notification's position (one without a known position
    /// tells nothing). The hub's task calls it for every notification of
    /// the pattern it follows; a test, or a feed of one's own, may too.
    pub fn record(&self, n: &Notification) {
        let Some(p) = n.position.as_ref().filter(|p| p.is_known()) else { return };
        let key = source_key(&n.source_type, &n.source_id);
        {
            let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
            let topic = match parts.get_mut(&*p.topic) {
                Some(t) => t,
                None => parts.entry(Arc::clone(&p.topic)).or_default(),
            };
            topic.entry(p.partition).or_insert_with(|| Window::new(p.offset)).record(p.offset, key);
        }
        self.changed.notify_waiters();
    }

    /// What was seen of offsets `[from, to)` of `topic`/`partition`, for
    /// the source with key `key` ([`key_of`]).
    pub fn check(&self, topic: &str, partition: i32, from: i64, to: i64, key: u64) -> Seen {
        if to <= from {
            return Seen::Clear;
        }
        let parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        match parts.get(topic).and_then(|t| t.get(&partition)) {
            Some(w) => w.check(from, to, key),
            None => Seen::Missing { offset: from },
        }
    }

    /// Completes at the next recorded notification. Made before a
    /// [`check`](Self::check), it misses none recorded after it.
    pub fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }
}

#[cfg(test)]
mod tests {
    use dualstream_core::{EventId, Position};

    use super::*;

    fn n(source_id: &str, offset: i64) -> Notification {
        Notification {
            id: EventId::new(),
            event_type: "t".into(),
            source_type: "user".into(),
            source_id: source_id.into(),
            position: Some(Position::new(Arc::from("events"), 0, offset)),
            trace: None,
        }
    }

    #[test]
    fn every_offset_of_others_is_clear_and_one_of_mine_or_unseen_is_not() {
        let seen = SeenOffsets::default();
        let me = source_key("user", "me");
        for o in 100..110 {
            seen.record(&n(if o == 105 { "me" } else { "other" }, o));
        }
        assert_eq!(seen.check("events", 0, 100, 105, me), Seen::Clear);
        assert_eq!(seen.check("events", 0, 101, 106, me), Seen::Mine { offset: 105 });
        assert_eq!(seen.check("events", 0, 106, 112, me), Seen::Missing { offset: 110 });
        assert_eq!(seen.check("events", 1, 100, 101, me), Seen::Missing { offset: 100 }, "another partition");
        assert_eq!(seen.check("other", 0, 100, 101, me), Seen::Missing { offset: 100 }, "another topic");
        assert_eq!(seen.check("events", 0, 7, 7, me), Seen::Clear, "an empty range");
    }

    #[test]
    fn a_notification_without_a_position_records_nothing() {
        let seen = SeenOffsets::default();
        seen.record(&Notification { position: None, ..n("other", 0) });
        assert_eq!(seen.check("events", 0, 0, 1, 1), Seen::Missing { offset: 0 });
    }

    #[test]
    fn out_of_order_offsets_fill_in_and_old_ones_are_forgotten() {
        let seen = SeenOffsets::default();
        let me = source_key("user", "me");
        seen.record(&n("other", 1_000));
        seen.record(&n("other", 998));
        assert_eq!(seen.check("events", 0, 998, 1_001, me), Seen::Missing { offset: 999 });
        seen.record(&n("other", 999));
        assert_eq!(seen.check("events", 0, 998, 1_001, me), Seen::Clear);
        let far = 1_000 + WINDOW as i64 + 10;
        seen.record(&n("other", far));
        assert_eq!(seen.check("events", 0, 998, 1_001, me), Seen::Missing { offset: 998 }, "below the window");
        assert_eq!(seen.check("events", 0, far, far + 1, me), Seen::Clear);
        assert_eq!(seen.check("events", 0, far - 1, far + 1, me), Seen::Missing { offset: far - 1 });
    }

    #[tokio::test]
    async fn changed_completes_at_the_next_record() {
        let seen = Arc::new(SeenOffsets::default());
        let changed = seen.changed();
        let s = Arc::clone(&seen);
        tokio::spawn(async move { s.record(&n("other", 5)) });
        tokio::time::timeout(std::time::Duration::from_secs(5), changed).await.expect("notified");
    }
}
