//! Items rendered once and shared ([`Renders`]): every subscriber of a
//! channel gets the same JSON text for one event, so an event delivered to
//! fifty clients is serialised (and in `full` mode its payload decoded) once,
//! not fifty times. Each connection's buffer holds the shared text; only the
//! resume token that goes with it is the client's own.
//!
//! A small direct-mapped cache: a slot per (form, partition, offset), the
//! last item rendered there kept. Nothing is ever wrong for a miss: the item
//! is rendered again. A hit needs the same form, topic, partition, offset
//! and channel name, so two channels of one record, or a live notification
//! and the record it points at, never share a text.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use dualstream_core::Position;

/// Slots of the gateway's cache. At 5,000 events/s, with a live and a
/// `full` item for most events, an item stays about 6 s: clients a few
/// seconds behind (a gateway running late) still share it. With 16,384
/// (about 1.6 s) they rendered two items for each one shared
/// (docs/benchmark-analysis.md). The texts stay within `BYTES`.
pub(crate) const SLOTS: usize = 65_536;

/// Most bytes of text the cache holds. Items are small (about 250 bytes
/// without a payload), but a `full` item can be a megabyte: without a bound,
/// a publisher of large events would make every slot hold one.
pub(crate) const BYTES: usize = 32 << 20;

/// What an item was rendered from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// A live notification.
    Live,
    /// A record from Kafka, notification fields only (`mode=notify`).
    Record,
    /// A record from Kafka, the whole event (`mode=full`).
    Full,
}

struct Entry {
    form: Form,
    partition: i32,
    offset: i64,
    topic: Arc<str>,
    channel: Arc<str>,
    json: Arc<str>,
}

/// The shared cache of rendered items.
pub(crate) struct Renders {
    slots: Box<[Mutex<Option<Entry>>]>,
    /// Bytes of text held, at most `budget`.
    held: AtomicUsize,
    budget: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for Renders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renders").field("slots", &self.slots.len()).finish_non_exhaustive()
    }
}

impl Renders {
    /// A cache of `slots` items (rounded up to a power of two, at least 1)
    /// and at most `budget` bytes of text.
    pub(crate) fn new(slots: usize, budget: usize) -> Self {
        let n = slots.max(1).next_power_of_two();
        Self {
            slots: (0..n).map(|_| Mutex::new(None)).collect(),
            held: AtomicUsize::new(0),
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn slot(&self, form: Form, p: &Position) -> &Mutex<Option<Entry>> {
        let key = (p.offset as u64) ^ ((p.partition as u64) << 40) ^ ((form as u64) << 60);
        // Fibonacci hashing: consecutive offsets spread over every slot.
        let i = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - self.slots.len().trailing_zeros().max(1));
        &self.slots[i as usize & (self.slots.len() - 1)]
    }

    /// The text of the `form` item of the event at `position` on `channel`:
    /// the one rendered already, or `render()`'s, kept for the channel's
    /// other subscribers.
    pub(crate) fn get(
        &self,
        form: Form,
        position: &Position,
        channel: &Arc<str>,
        render: impl FnOnce() -> String,
    ) -> Arc<str> {
        let slot = self.slot(form, position);
        {
            let kept = slot.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = kept.as_ref().filter(|e| {
                e.form == form
                    && e.offset == position.offset
                    && e.partition == position.partition
                    && (Arc::ptr_eq(&e.topic, &position.topic) || *e.topic == *position.topic)
                    && (Arc::ptr_eq(&e.channel, channel) || *e.channel == **channel)
            }) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Arc::clone(&e.json);
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let json: Arc<str> = render().into();
        let mut kept = slot.lock().unwrap_or_else(PoisonError::into_inner);
        // The slot's earlier item goes either way; the new one is kept
        // only within the byte budget (else it is this client's alone).
        if let Some(old) = kept.take() {
            self.held.fetch_sub(old.json.len(), Ordering::Relaxed);
        }
        let fits = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                h.checked_add(json.len()).filter(|&after| after <= self.budget)
            })
            .is_ok();
        if fits {
            *kept = Some(Entry {
                form,
                partition: position.partition,
                offset: position.offset,
                topic: Arc::clone(&position.topic),
                channel: Arc::clone(channel),
                json: Arc::clone(&json),
            });
        }
        json
    }

    /// Items taken from the cache, and rendered.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(topic: &str, partition: i32, offset: i64) -> Position {
        Position::new(topic, partition, offset)
    }

    #[test]
    fn an_item_is_rendered_once_for_every_subscriber_of_its_channel() {
        let r = Renders::new(64, 1 << 20);
        let c: Arc<str> = "events:user:a".into();
        let mut renders = 0;
        let mut texts = Vec::new();
        for _ in 0..50 {
            texts.push(r.get(Form::Live, &at("t", 1, 7), &c, || {
                renders += 1;
                "{\"x\":1}".to_owned()
            }));
        }
        assert_eq!(renders, 1);
        assert!(texts.iter().all(|t| Arc::ptr_eq(t, &texts[0])), "one shared text");
        assert_eq!(r.counts(), (49, 1));
    }

    #[test]
    fn a_text_is_shared_only_by_the_same_form_position_and_channel() {
        let r = Renders::new(64, 1 << 20);
        let (a, b): (Arc<str>, Arc<str>) = ("events:user:a".into(), "events:user:b".into());
        let first = r.get(Form::Live, &at("t", 1, 7), &a, || "first".into());
        for (form, p, c) in [
            (Form::Record, at("t", 1, 7), &a),
            (Form::Full, at("t", 1, 7), &a),
            (Form::Live, at("t", 2, 7), &a),
            (Form::Live, at("t", 1, 8), &a),
            (Form::Live, at("u", 1, 7), &a),
            (Form::Live, at("t", 1, 7), &b),
        ] {
            let other = r.get(form, &p, c, || "other".into());
            assert_eq!(&*other, "other", "{form:?} {p} {c}");
        }
        // Two entries in one slot: the last rendered is kept, the first
        // rendered again when asked for.
        let tiny = Renders::new(1, 1 << 20);
        assert_eq!(&*tiny.get(Form::Live, &at("t", 1, 7), &a, || "7".into()), "7");
        assert_eq!(&*tiny.get(Form::Live, &at("t", 1, 8), &a, || "8".into()), "8");
        assert_eq!(&*tiny.get(Form::Live, &at("t", 1, 7), &a, || "7 again".into()), "7 again");
        drop(first);
    }

    #[test]
    fn the_texts_kept_stay_within_the_byte_budget() {
        let r = Renders::new(64, 10_000);
        let c: Arc<str> = "events:user:a".into();
        // Large items (a full event of 4,000 bytes each): at most two kept.
        for offset in 0..20 {
            let text = r.get(Form::Full, &at("t", 0, offset), &c, || "x".repeat(4_000));
            assert_eq!(text.len(), 4_000, "every caller gets its item, kept or not");
            assert!(r.held.load(Ordering::Relaxed) <= 10_000, "{} bytes held", r.held.load(Ordering::Relaxed));
        }
        // Small items displace them slot by slot and are shared again.
        for offset in 100..164 {
            r.get(Form::Live, &at("t", 0, offset), &c, || "y".repeat(100));
        }
        let (_, before) = r.counts();
        let mut renders = 0;
        r.get(Form::Live, &at("t", 0, 163), &c, || {
            renders += 1;
            String::new()
        });
        assert_eq!((renders, r.counts().1), (0, before), "the last small item is shared");
        assert!(r.held.load(Ordering::Relaxed) <= 10_000);
        // An item larger than the whole budget is never kept.
        let big = Renders::new(4, 100);
        big.get(Form::Full, &at("t", 0, 1), &c, || "z".repeat(101));
        assert_eq!(big.held.load(Ordering::Relaxed), 0);
    }
}
