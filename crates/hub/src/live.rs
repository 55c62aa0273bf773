//! What a local subscriber of the hub gets, and the fan-out rules both of
//! the hub's tasks (one Redis in `hub.rs`, a Redis Cluster in
//! `shard_hub.rs`) share: [`LiveItem`]s on a bounded [`LiveStream`], handed
//! over with `try_send` only, the drops counted and reported in order.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use dualstream_core::{Limits, Notification};
use futures::task::AtomicWaker;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use crate::config::Overflow;
use crate::error::HubError;

/// Longest channel name or pattern accepted, in bytes.
pub const MAX_TARGET_LEN: usize = 4_096;

/// What to subscribe to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// One channel (`SUBSCRIBE`).
    Channel(String),
    /// A glob pattern (`PSUBSCRIBE`).
    Pattern(String),
}

impl Target {
    pub(crate) fn check(&self) -> Result<(), HubError> {
        let (field, text) = match self {
            Target::Channel(c) => ("channel", c),
            Target::Pattern(p) => ("pattern", p),
        };
        if text.is_empty() {
            return Err(HubError::InvalidTarget { field, reason: "must not be empty".into() });
        }
        if text.len() > MAX_TARGET_LEN {
            return Err(HubError::InvalidTarget {
                field,
                reason: format!("{} bytes is longer than the limit of {MAX_TARGET_LEN}", text.len()),
            });
        }
        Ok(())
    }
}

/// One item of a live subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LiveItem {
    /// A notification, decoded once and shared by every local subscriber.
    Notification(Arc<Notification>),
    /// A message on the channel that is not a valid notification.
    Malformed {
        /// The channel it came on.
        channel: Arc<str>,
        /// Why it could not be decoded.
        reason: Arc<str>,
    },
    /// The connection to Redis was lost (or could not be made when the
    /// subscription started). Notifications published from now until the
    /// next [`LiveItem::Gap`] are lost to this subscriber.
    Disconnected,
    /// The subscription is active again after [`LiveItem::Disconnected`].
    /// Anything published in between is missing: catch up from Kafka.
    Gap,
    /// This subscriber's buffer was full: `missed` notifications were
    /// dropped for it (not for the others). Catch up from Kafka.
    Lagged {
        /// How many were dropped.
        missed: u64,
    },
    /// The subscriber was removed for being too slow
    /// ([`Overflow::Disconnect`]); the stream ends after this item.
    Dropped {
        /// How many notifications it missed.
        missed: u64,
    },
}

/// Counters and state of a [`Hub`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Whether the subscription connection is up.
    pub connected: bool,
    /// Channels subscribed in Redis (one per distinct channel, however many
    /// local subscribers).
    pub channels: usize,
    /// Patterns subscribed in Redis.
    pub patterns: usize,
    /// Local subscribers.
    pub subscribers: usize,
    /// Messages received from Redis.
    pub received: u64,
    /// Items handed to local subscribers.
    pub delivered: u64,
    /// Items dropped for full subscriber buffers.
    pub missed: u64,
    /// Items waiting now in the subscribers' buffers, summed.
    pub queued: usize,
    /// Times the connection was lost.
    pub disconnects: u64,
}

/// What a subscriber's stream shares with its slot in the hub.
#[derive(Debug, Default)]
struct Lag {
    /// Notifications dropped for this subscriber and not yet reported; the
    /// hub reports them before its next item, the stream as soon as its
    /// buffer is empty, whichever comes first.
    missed: AtomicU64,
    /// Set when the hub removed the subscriber for lag.
    dropped: AtomicBool,
    /// The stream's task, registered before the stream reads `missed`: a
    /// drop counted after the stream found its buffer empty wakes it.
    waker: AtomicWaker,
}

impl Lag {
    fn add_missed(&self, n: u64) {
        self.missed.fetch_add(n, Ordering::AcqRel);
        self.waker.wake();
    }
}

/// One subscriber's buffer: what the hub handed over and the stream has not
/// taken yet, at most `cap` items. A queue under a plain lock, not tokio's
/// bounded channel: that one allocates its items in blocks of 32 (about
/// 700 bytes here), one when it is made and two or three once items flow,
/// which for 10,891 subscriptions was about 20 MiB whatever they held
/// (docs/benchmark-analysis.md). This holds what is waiting, and gives back
/// what a burst made it grow by once it is empty.
#[derive(Debug)]
struct Buffer {
    items: Mutex<VecDeque<LiveItem>>,
    cap: usize,
    /// The stream's task, registered before it looks at an empty buffer.
    waker: AtomicWaker,
    /// The hub's side ([`Slot`]) is gone: once empty, the stream ends.
    sender_gone: AtomicBool,
    /// The stream is gone: the hub drops the subscriber.
    receiver_gone: AtomicBool,
}

/// What an empty [`Buffer`] keeps room for.
const IDLE_BUFFER: usize = 8;

/// Why [`Slot::try_send`] did not take an item.
enum Refused {
    Full,
    Closed,
}

impl Buffer {
    fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            items: Mutex::new(VecDeque::new()),
            cap: cap.max(1),
            waker: AtomicWaker::new(),
            sender_gone: AtomicBool::new(false),
            receiver_gone: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<LiveItem>> {
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next item, if one is waiting; an emptied buffer shrinks.
    fn pop(&self) -> Option<LiveItem> {
        let mut items = self.lock();
        let item = items.pop_front();
        if items.is_empty() && items.capacity() > IDLE_BUFFER {
            items.shrink_to(IDLE_BUFFER);
        }
        item
    }

    /// The next item, or the end once the hub's side is gone and nothing is
    /// left, or `Pending` with the task registered.
    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<LiveItem>> {
        if let Some(item) = self.pop() {
            return Poll::Ready(Some(item));
        }
        // Registered before looking again: an item or the end that comes
        // after the look wakes this task.
        self.waker.register(cx.waker());
        if let Some(item) = self.pop() {
            return Poll::Ready(Some(item));
        }
        if self.sender_gone.load(Ordering::Acquire) {
            // Items handed over before the hub's side went are in the
            // buffer already (under its lock): take them first.
            return Poll::Ready(self.pop());
        }
        Poll::Pending
    }
}

pub(crate) struct Slot {
    tx: Arc<Buffer>,
    lag: Arc<Lag>,
    /// Told [`LiveItem::Disconnected`] and not yet [`LiveItem::Gap`]: gets
    /// no notification until the gap is announced.
    pub(crate) awaiting_gap: bool,
}

impl Slot {
    /// Items waiting in its buffer now.
    pub(crate) fn queued(&self) -> usize {
        self.tx.lock().len()
    }

    /// Whether the subscriber's stream is gone.
    fn is_closed(&self) -> bool {
        self.tx.receiver_gone.load(Ordering::Acquire)
    }

    /// Whether its buffer is full.
    fn is_full(&self) -> bool {
        self.queued() >= self.tx.cap
    }

    /// Hand `item` over without waiting, and wake the stream.
    fn try_send(&self, item: LiveItem) -> Result<(), Refused> {
        if self.is_closed() {
            return Err(Refused::Closed);
        }
        {
            let mut items = self.tx.lock();
            if items.len() >= self.tx.cap {
                return Err(Refused::Full);
            }
            items.push_back(item);
        }
        self.tx.waker.wake();
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tx.sender_gone.store(true, Ordering::Release);
        self.tx.waker.wake();
    }
}

/// Items waiting now in the buffers of `slots`' subscribers.
pub(crate) fn queued<'a>(slots: impl IntoIterator<Item = &'a Slot>) -> usize {
    slots.into_iter().map(Slot::queued).sum()
}

#[cfg(test)]
impl LiveStream {
    /// A stream of channel "c" outside any hub, and the slot that feeds it.
    pub(crate) fn for_test(buffer: usize) -> (Slot, LiveStream) {
        let (cmd, _cmd_rx) = mpsc::unbounded_channel();
        subscriber(buffer, cmd, Target::Channel("c".into()), 0)
    }
}

pub(crate) enum Cmd {
    Subscribe {
        target: Target,
        id: u64,
        slot: Slot,
        reply: oneshot::Sender<()>,
    },
    Unsubscribe {
        target: Target,
        id: u64,
    },
    Stats {
        reply: oneshot::Sender<HubStats>,
    },
    /// Follow every source channel for [`SeenOffsets`](crate::seen::SeenOffsets).
    Follow {
        pattern: String,
    },
}

/// A new local subscriber of `target`: the slot its hub task hands items
/// to, and the stream it reads them from (`buffer` items at most).
pub(crate) fn subscriber(
    buffer: usize,
    cmd: mpsc::UnboundedSender<Cmd>,
    target: Target,
    id: u64,
) -> (Slot, LiveStream) {
    let tx = Buffer::new(buffer);
    let rx = Arc::clone(&tx);
    let lag = Arc::new(Lag::default());
    let slot = Slot { tx, lag: Arc::clone(&lag), awaiting_gap: false };
    (slot, LiveStream { rx, cmd, target, id, lag, ended: false })
}

/// One local subscriber's stream. Dropping it unsubscribes; the Redis
/// subscription goes when the last local subscriber of it goes.
pub struct LiveStream {
    rx: Arc<Buffer>,
    cmd: mpsc::UnboundedSender<Cmd>,
    target: Target,
    id: u64,
    lag: Arc<Lag>,
    ended: bool,
}

impl std::fmt::Debug for LiveStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStream").field("target", &self.target).finish_non_exhaustive()
    }
}

impl LiveStream {
    /// What this stream is subscribed to.
    pub fn target(&self) -> &Target {
        &self.target
    }
}

impl Stream for LiveStream {
    type Item = LiveItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LiveItem>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) => {
                let missed = self.lag.missed.swap(0, Ordering::AcqRel);
                if self.lag.dropped.load(Ordering::Acquire) {
                    self.ended = true;
                    return Poll::Ready(Some(LiveItem::Dropped { missed }));
                }
                if missed > 0 {
                    // Drops counted after the last item a hub that then
                    // went away handed over: said before the end.
                    return Poll::Ready(Some(LiveItem::Lagged { missed }));
                }
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Everything buffered was taken; the drops came after it.
                // Register before reading: a drop the hub counts after the
                // read wakes this task.
                self.lag.waker.register(cx.waker());
                match self.lag.missed.swap(0, Ordering::AcqRel) {
                    0 => Poll::Pending,
                    missed if self.lag.dropped.load(Ordering::Acquire) => {
                        // Removed for lag: the count comes with `Dropped`
                        // once the channel closes, which wakes this task.
                        self.lag.missed.fetch_add(missed, Ordering::AcqRel);
                        Poll::Pending
                    }
                    missed => Poll::Ready(Some(LiveItem::Lagged { missed })),
                }
            }
            ready => ready,
        }
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.rx.receiver_gone.store(true, Ordering::Release);
        let _ = self.cmd.send(Cmd::Unsubscribe { target: self.target.clone(), id: self.id });
    }
}

/// Hand one message to the subscribers in `slots`, without waiting.
/// `decode` runs once, and only when some subscriber has room for the item,
/// so a burst to subscribers that do not read costs little.
pub(crate) fn fan_out(
    slots: &mut HashMap<u64, Slot>,
    overflow: Overflow,
    stats: &mut HubStats,
    decode: impl Fn() -> LiveItem,
) {
    let mut item = None;
    slots.retain(|_, slot| {
        if slot.awaiting_gap {
            // Told `Disconnected`; `Gap` covers this message.
            return true;
        }
        if slot.is_closed() {
            return false;
        }
        if slot.is_full() {
            return missed_one(slot, overflow, stats);
        }
        deliver(slot, item.get_or_insert_with(&decode).clone(), overflow, stats)
    });
}

/// [`Task::announce`] for the subscribers of one channel or pattern.
pub(crate) fn announce_to(slots: &mut HashMap<u64, Slot>, item: &LiveItem, awaiting: bool, stats: &mut HubStats) {
    slots.retain(|_, slot| {
        if slot.awaiting_gap == awaiting {
            return true;
        }
        slot.awaiting_gap = awaiting;
        deliver(slot, item.clone(), Overflow::Signal, stats)
    });
}

/// The notification in a message's payload, decoded with the lenient limits
/// of the consuming side (docs/consumer.md, "One set of limits").
pub(crate) fn decode(channel: &str, payload: &[u8]) -> LiveItem {
    match Notification::from_json_with_limits(payload, &Limits::lenient()) {
        Ok(n) => LiveItem::Notification(Arc::new(n)),
        Err(e) => LiveItem::Malformed { channel: channel.into(), reason: e.to_string().into() },
    }
}

/// What [`offer`] did with an item.
#[derive(Debug, PartialEq, Eq)]
enum Offer {
    Taken,
    Full,
    Closed,
}

/// Step one of [`deliver`]: report the subscriber's pending lag before the
/// item, then try to hand the item over.
fn offer(slot: &Slot, item: LiveItem) -> Offer {
    let pending = slot.lag.missed.swap(0, Ordering::AcqRel);
    if pending > 0 {
        match slot.try_send(LiveItem::Lagged { missed: pending }) {
            Ok(()) => {}
            Err(Refused::Closed) => return Offer::Closed,
            Err(Refused::Full) => {
                // Put back, with a wake-up: the subscriber may have emptied
                // its buffer since the swap.
                slot.lag.add_missed(pending);
                return Offer::Full;
            }
        }
    }
    match slot.try_send(item) {
        Ok(()) => Offer::Taken,
        Err(Refused::Closed) => Offer::Closed,
        Err(Refused::Full) => Offer::Full,
    }
}

/// Step two of [`deliver`], for an item that did not fit: count it and wake
/// the subscriber, which may have emptied its buffer and gone to sleep since
/// the failed `try_send`. Returns whether to keep the subscriber.
fn missed_one(slot: &Slot, overflow: Overflow, stats: &mut HubStats) -> bool {
    stats.missed += 1;
    let keep = match overflow {
        Overflow::Signal => true,
        Overflow::Disconnect => {
            // Before the count, so a stream that sees the count sees this.
            slot.lag.dropped.store(true, Ordering::Release);
            false
        }
    };
    slot.lag.add_missed(1);
    keep
}

/// Hand `item` to one subscriber without waiting. Returns whether to keep
/// the subscriber.
pub(crate) fn deliver(slot: &Slot, item: LiveItem, overflow: Overflow, stats: &mut HubStats) -> bool {
    match offer(slot, item) {
        Offer::Taken => {
            stats.delivered += 1;
            true
        }
        Offer::Closed => false,
        Offer::Full => missed_one(slot, overflow, stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualstream_core::{Event, Notification};

    fn pair(buffer: usize) -> (Slot, LiveStream) {
        LiveStream::for_test(buffer)
    }

    fn note(i: u32) -> LiveItem {
        let e = Event::builder("t", "user", format!("u{i}")).build().expect("valid");
        LiveItem::Notification(Arc::new(Notification::for_event(&e, None)))
    }

    fn show(item: &LiveItem) -> String {
        match item {
            LiveItem::Notification(n) => format!("n:{}", n.source_id),
            LiveItem::Lagged { missed } => format!("lagged:{missed}"),
            LiveItem::Dropped { missed } => format!("dropped:{missed}"),
            other => format!("{other:?}"),
        }
    }

    /// What the stream has ready now, without waiting.
    fn ready(s: &mut LiveStream) -> Vec<String> {
        let mut out = Vec::new();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(Some(item)) = Pin::new(&mut *s).poll_next(&mut cx) {
            out.push(show(&item));
        }
        out
    }

    #[test]
    fn a_full_buffer_drops_for_that_subscriber_and_reports_the_count_in_order() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(2);
        for i in 0..5 {
            assert!(deliver(&slot, note(i), Overflow::Signal, &mut stats));
        }
        assert_eq!((stats.delivered, stats.missed), (2, 3));
        assert_eq!(queued([&slot]), 2, "the two that fit wait in the buffer");
        // The two that fit, then the count of the three that did not.
        assert_eq!(ready(&mut stream), ["n:u0", "n:u1", "lagged:3"]);
        assert_eq!(queued([&slot]), 0);
        // Reported once; later items flow again.
        assert!(deliver(&slot, note(5), Overflow::Signal, &mut stats));
        assert_eq!(ready(&mut stream), ["n:u5"]);
    }

    #[test]
    fn the_hub_reports_the_lag_before_its_next_item_when_it_gets_there_first() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(2);
        for i in 0..3 {
            deliver(&slot, note(i), Overflow::Signal, &mut stats);
        }
        // The subscriber takes one item only, so its buffer is not empty.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Some(first)) = Pin::new(&mut stream).poll_next(&mut cx) else { panic!("an item") };
        assert_eq!(show(&first), "n:u0");
        deliver(&slot, note(3), Overflow::Signal, &mut stats);
        deliver(&slot, note(4), Overflow::Signal, &mut stats);
        // Item 2 was dropped: the hub reports it before item 3, which no longer
        // fits; items 3 and 4 are reported by the stream once it is empty.
        assert_eq!(ready(&mut stream), ["n:u1", "lagged:1", "lagged:2"]);
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicU64);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(s: &mut LiveStream, cx: &mut Context<'_>) -> Poll<Option<String>> {
        Pin::new(s).poll_next(cx).map(|item| item.as_ref().map(show))
    }

    /// The race of issue 11: the hub's `try_send` fails, the subscriber then
    /// empties its buffer, polls (nothing buffered, nothing missed yet) and
    /// sleeps, and only then does the hub count the drop. Without a wake-up
    /// from the count, the subscriber sleeps until the next item, which may
    /// never come.
    #[test]
    fn a_drop_counted_after_the_subscriber_went_to_sleep_wakes_it() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(1);
        assert!(deliver(&slot, note(0), Overflow::Signal, &mut stats));
        // The hub: the buffer holds item 0, item 1 does not fit.
        assert_eq!(offer(&slot, note(1)), Offer::Full);
        // The subscriber: takes item 0, finds nothing more and sleeps.
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("n:u0".into())));
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        // The hub counts the drop: the sleeping subscriber is woken ...
        assert!(missed_one(&slot, Overflow::Signal, &mut stats));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the count wakes the subscriber");
        // ... and hears of it at once.
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("lagged:1".into())));
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending);
    }

    /// The same race on the hub's other path: it takes the pending count to
    /// report it before an item, the report does not fit, and the subscriber
    /// empties its buffer and sleeps before the count is put back.
    #[test]
    fn a_lag_report_put_back_after_the_subscriber_went_to_sleep_wakes_it() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(1);
        assert!(deliver(&slot, note(0), Overflow::Signal, &mut stats));
        assert!(deliver(&slot, note(1), Overflow::Signal, &mut stats), "missed: the buffer is full");
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        // The subscriber takes item 0; its next poll would report the lag.
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("n:u0".into())));
        // The hub, first, takes the count (1) to report it before item 2 ...
        let pending = slot.lag.missed.swap(0, Ordering::AcqRel);
        assert_eq!(pending, 1);
        // ... the subscriber polls meanwhile: nothing buffered, nothing
        // counted, so it sleeps ...
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending);
        // ... and the hub, finding no room (a test stand-in for the item
        // that took it), puts the count back.
        slot.lag.add_missed(pending);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "putting the count back wakes the subscriber");
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("lagged:1".into())));
    }

    #[test]
    fn a_subscriber_removed_for_lag_gets_the_whole_count_with_dropped() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(1);
        assert!(deliver(&slot, note(0), Overflow::Disconnect, &mut stats));
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        assert_eq!(offer(&slot, note(1)), Offer::Full);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("n:u0".into())));
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending);
        // Counted and marked for removal; the subscriber, woken, polls
        // before the hub drops its slot.
        assert!(!missed_one(&slot, Overflow::Disconnect, &mut stats));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending, "no Lagged: the count comes with Dropped");
        drop(slot);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("dropped:1".into())));
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(None));
    }

    #[test]
    fn disconnect_policy_removes_the_subscriber_and_says_so() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(1);
        assert!(deliver(&slot, note(0), Overflow::Disconnect, &mut stats));
        assert!(!deliver(&slot, note(1), Overflow::Disconnect, &mut stats), "removed");
        drop(slot);
        assert_eq!(ready(&mut stream), ["n:u0", "dropped:1"]);
        assert!(ready(&mut stream).is_empty(), "ended");
    }

    /// The buffer's hand-over: an item that comes after the stream found
    /// the buffer empty wakes it; the stream ends once the hub's side is
    /// gone and what it handed over is taken; the hub's side sees the
    /// stream gone.
    #[test]
    fn the_buffer_wakes_the_stream_ends_after_its_items_and_sees_the_stream_go() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(4);
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Pending);
        assert!(deliver(&slot, note(0), Overflow::Signal, &mut stats));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "woken by the item");
        assert!(deliver(&slot, note(1), Overflow::Signal, &mut stats));
        drop(slot);
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("n:u0".into())));
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(Some("n:u1".into())), "taken before the end");
        assert_eq!(poll(&mut stream, &mut cx), Poll::Ready(None));

        let (slot, stream) = pair(4);
        assert!(!slot.is_closed());
        drop(stream);
        assert!(slot.is_closed());
        assert!(!deliver(&slot, note(2), Overflow::Signal, &mut stats), "a gone stream's subscriber is dropped");
    }

    /// An idle subscriber holds no room for items, and a burst's room is
    /// given back once the stream has taken it.
    #[test]
    fn an_emptied_buffer_gives_back_what_a_burst_made_it_grow_by() {
        let mut stats = HubStats::default();
        let (slot, mut stream) = pair(1_024);
        assert_eq!(slot.tx.lock().capacity(), 0, "nothing held before the first item");
        for i in 0..1_000 {
            assert!(deliver(&slot, note(i), Overflow::Signal, &mut stats));
        }
        assert!(slot.tx.lock().capacity() >= 1_000);
        assert_eq!(ready(&mut stream).len(), 1_000);
        assert!(slot.tx.lock().capacity() <= IDLE_BUFFER, "{}", slot.tx.lock().capacity());
    }

    /// The hub's task and the subscriber on two threads: every item arrives,
    /// in order, and what did not fit is counted, none lost in between.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn items_handed_over_from_another_thread_all_arrive_in_order_or_are_counted() {
        use futures::StreamExt;
        const N: u32 = 200_000;
        let (slot, stream) = pair(16);
        let hub = tokio::task::spawn_blocking(move || {
            let mut stats = HubStats::default();
            for i in 0..N {
                deliver(&slot, note(i), Overflow::Signal, &mut stats);
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            stats
        });
        let got = tokio::spawn(stream.map(|item| show(&item)).collect::<Vec<String>>());
        let stats = hub.await.expect("hub");
        let got = tokio::time::timeout(std::time::Duration::from_secs(60), got)
            .await
            .expect("the stream ends once the hub's side is gone")
            .expect("stream");
        let mut next = 0;
        let mut missed = 0;
        for item in &got {
            if let Some(n) = item.strip_prefix("n:u") {
                let n: u32 = n.parse().expect("number");
                assert!(n >= next, "in order: {n} after {next}");
                next = n + 1;
            } else {
                missed += item.strip_prefix("lagged:").expect("a notification or a count").parse::<u64>().expect("count");
            }
        }
        let delivered = got.iter().filter(|i| i.starts_with("n:")).count() as u64;
        assert_eq!(delivered, stats.delivered);
        assert_eq!(delivered + missed, u64::from(N), "every item arrived or was counted");
        assert_eq!(missed, stats.missed);
    }
}
