//! The stream behind each subscription of a session: a channel's catch-up
//! join ([`ChannelSub`]) or a pattern's hub subscription ([`live`]).
//!
//! A subscription is a stream that the session's connection polls itself,
//! when its transport can take the next item: it costs no task of its own,
//! and an item is rendered only when it goes out. While a client does not
//! read, its subscriptions are not polled: their joins read ahead only as
//! far as the connection's [`ReadyBudget`] allows, their hub subscriptions'
//! buffers overflow, and the joins read what was missed from Kafka once the
//! client reads again. The hub and the shared Kafka reader never wait for a
//! client.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use dualstream_consumer::{
    Delivery, HubError, JoinError, JoinStream, LiveItem, LiveStream, ReadyBudget, ReplayError, StartAt,
};
use dualstream_core::trace::{self, TraceContext, Traced};
use dualstream_core::{Backoff, Source};
use futures::stream::BoxStream;
use futures::StreamExt;

use super::{Mode, Msg};
use crate::error::ErrorCode;
use crate::renders::Form;
use crate::state::AppState;
use crate::wire::{to_json, ErrorItem, EventItem, ResetItem};

/// What one item of a join becomes.
enum Step {
    /// An item for the client.
    Send(Msg),
    /// Nothing for the client.
    Skip,
    /// The join ended: join again from where it got to.
    Rejoin,
}

/// One channel's catch-up join, from `next`.
pub(super) struct ChannelSub {
    pub(super) state: Arc<AppState>,
    pub(super) channel: Arc<str>,
    /// The channel's hash, as in the resume token.
    pub(super) hash: u32,
    pub(super) source: Source,
    pub(super) partition: i32,
    /// The first offset the client has not been given.
    pub(super) next: i64,
    pub(super) mode: Mode,
    /// What the connection's joins may hold ready.
    pub(super) budget: ReadyBudget,
    /// For a far resume: the offset its pacing ends at (where the partition
    /// ended when it subscribed).
    pub(super) pace_until: Option<i64>,
    /// The token subject, whose far-items pace applies to a far resume's
    /// history and once the client falls further behind than the tail
    /// cache.
    pub(super) subject: Arc<str>,
    /// The partition's end as last looked up, and when.
    pub(super) end: Option<(i64, std::time::Instant)>,
    /// Counts the subscription while it lives.
    pub(super) _counted: Counted,
}

/// One subscription in `dualstream_gateway_subscriptions`, from its start
/// until its stream ends or is dropped.
#[derive(Debug)]
pub(crate) struct Counted(metrics::Gauge);

impl Counted {
    pub(crate) fn new(transport: &'static str, mode: &'static str) -> Self {
        let gauge = metrics::gauge!(crate::metric_names::SUBSCRIPTIONS, "transport" => transport, "mode" => mode);
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The waits between a channel's failed joins.
const REJOIN_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

impl ChannelSub {
    /// The subscription's items: the join from `next`; when the join fails,
    /// join again from where it got to, after a backoff, so a Kafka outage
    /// delays items but loses none. A permanent failure is one error item,
    /// then the end.
    pub(super) fn stream(self) -> BoxStream<'static, Msg> {
        let state = Joining { sub: self, join: None, backoff: REJOIN_BACKOFF.first(), wait: None, done: false };
        futures::stream::unfold(state, |mut s| async move { s.next_msg().await.map(|m| (m, s)) }).boxed()
    }
}

/// A [`ChannelSub`] and its join, between two items.
struct Joining {
    sub: ChannelSub,
    /// Boxed by the consumer: a join is a large future, and the stream
    /// holds its room for as long as the subscription lasts.
    join: Option<JoinStream>,
    backoff: Duration,
    /// A wait before joining again.
    wait: Option<Duration>,
    /// A permanent failure was reported.
    done: bool,
}

impl Joining {
    async fn next_msg(&mut self) -> Option<Msg> {
        loop {
            if self.done {
                return None;
            }
            let Some(join) = self.join.as_mut() else {
                if let Some(wait) = self.wait.take() {
                    tokio::time::sleep(wait).await;
                }
                let sub = &self.sub;
                let start = StartAt::Offset(sub.next);
                let full = sub.mode == Mode::Full;
                let joined = Box::pin(sub.state.catchup.join_within(
                    sub.source.clone(),
                    start,
                    full,
                    sub.budget.clone(),
                ))
                .await;
                match joined {
                    Ok(stream) => self.join = Some(stream),
                    Err(e) if permanent(&e) => {
                        self.done = true;
                        let item = ErrorItem::of_channel(&sub.channel, ErrorCode::SubscriptionFailed, e.to_string());
                        return Some(Msg::error(&item));
                    }
                    Err(e) => {
                        tracing::warn!(channel = %short(&sub.channel), error = %e, "join failed; retrying");
                        self.again();
                    }
                }
                continue;
            };
            let Some(item) = join.next().await else {
                self.again();
                continue;
            };
            self.backoff = REJOIN_BACKOFF.first();
            self.sub.pace(&item).await;
            match self.sub.step(item) {
                Step::Send(msg) => return Some(msg),
                Step::Skip => {}
                Step::Rejoin => self.again(),
            }
        }
    }

    /// Join again from where the join got to, after the backoff.
    fn again(&mut self) {
        self.join = None;
        self.wait = Some(self.backoff);
        self.backoff = REJOIN_BACKOFF.after(self.backoff);
    }
}

impl ChannelSub {
    /// Wait for the subject's pace (`limits.far_items_per_sec`) when `item`
    /// is far history; once an item reaches where the partition ended at
    /// subscribe time, never again.
    async fn pace(&mut self, item: &Result<Delivery, JoinError>) {
        match (self.pace_until, item) {
            (Some(until), Ok(Delivery::History(r))) if r.position.offset < until => {}
            (Some(_), Ok(Delivery::History(_) | Delivery::Live(_))) => {
                self.pace_until = None;
                return;
            }
            (None, Ok(Delivery::History(r))) if self.fell_far_behind(r) => {}
            _ => return,
        }
        let per_sec = self.state.config.limits.far_items_per_sec;
        let mut waited = false;
        loop {
            let take = self.state.far_pace.lock().unwrap_or_else(PoisonError::into_inner).take(
                &self.subject,
                per_sec,
                std::time::Instant::now(),
            );
            match take {
                Ok(()) => break,
                Err(wait) => {
                    waited = true;
                    tokio::time::sleep(wait).await;
                }
            }
        }
        if waited {
            self.state.far_items_paced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether `r`, read from Kafka, lies further behind its partition's end
    /// than the tail cache keeps (`join.cache_records`): a client that fell
    /// that far behind (it read slowly, or not at all for a while) catches
    /// up through the backfill readers like a far resume, and is paced like
    /// one. Records written in the last second are never far; older ones
    /// are compared with the high watermark as last polled.
    fn fell_far_behind(&mut self, r: &dualstream_consumer::Replayed) -> bool {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        if r.timestamp_ms.is_some_and(|ts| ts >= now_ms.saturating_sub(1_000)) {
            return false;
        }
        // The partition's end as last polled, looked up at most every
        // 250 ms: the look-up takes the shared readers' locks.
        let now = std::time::Instant::now();
        let end = match self.end {
            Some((end, at)) if now.duration_since(at) < std::time::Duration::from_millis(250) => end,
            _ => {
                let Some(end) = self.state.catchup.polled_end(&r.position) else { return false };
                self.end = Some((end, now));
                end
            }
        };
        let cached = i64::try_from(self.state.config.join.cache_records).unwrap_or(i64::MAX);
        end - r.position.offset - 1 > cached
    }

    /// The client's item for one item of the join, moving `next` past it.
    fn step(&mut self, item: Result<Delivery, JoinError>) -> Step {
        match item {
            Ok(Delivery::History(r)) => {
                // With `otel`: a `process` span of the event's trace.
                let _span = if trace::ENABLED {
                    Traced::process(TraceContext::of(&r.event).as_ref(), &r.position, "kafka", &self.channel)
                } else {
                    None
                };
                self.next = r.position.offset + 1;
                let full = self.mode == Mode::Full;
                let form = if full { Form::Full } else { Form::Record };
                let json = self.state.renders.get(form, &r.position, &self.channel, || {
                    to_json(&EventItem::record(&self.channel, &r.event, &r.position, full))
                });
                Step::Send(Msg::shared_event(json, Some((self.hash, r.position.partition, self.next))))
            }
            Ok(Delivery::Live(n)) => {
                let Some(p) = n.position.as_ref() else { return Step::Skip };
                let _span =
                    if trace::ENABLED { Traced::process(n.trace.as_ref(), p, "redis", &self.channel) } else { None };
                self.next = p.offset + 1;
                let advance = Some((self.hash, p.partition, self.next));
                let json = self
                    .state
                    .renders
                    .get(Form::Live, p, &self.channel, || to_json(&EventItem::notification(&self.channel, &n)));
                Step::Send(Msg::shared_event(json, advance))
            }
            Ok(Delivery::Truncated { requested, first_available }) => {
                metrics::counter!(crate::metric_names::TRUNCATED).increment(1);
                self.next = first_available;
                let item = ResetItem::truncated(&self.channel, requested, first_available);
                Step::Send(Msg::reset(&item, Some((self.hash, self.partition, first_available))))
            }
            Ok(_) => Step::Skip,
            Err(
                e @ (JoinError::Replay(ReplayError::Decode { .. })
                | JoinError::Unmergeable { .. }
                | JoinError::Malformed { .. }),
            ) => Step::Send(Msg::error(&ErrorItem::of_channel(&self.channel, ErrorCode::Undeliverable, e.to_string()))),
            Err(e) => {
                tracing::warn!(channel = %short(&self.channel), error = %e, "join ended; joining again");
                Step::Rejoin
            }
        }
    }
}

/// A join error that joining again cannot cure.
fn permanent(e: &JoinError) -> bool {
    matches!(
        e,
        JoinError::Replay(ReplayError::Request { .. } | ReplayError::Config(_))
            | JoinError::Hub(HubError::InvalidTarget { .. } | HubError::Channel(_) | HubError::Config(_))
    )
}

/// At most 200 characters of a name, for logs.
fn short(name: &str) -> String {
    name.chars().take(200).collect()
}

/// A pattern's or an aggregate channel's live subscription, as the client's
/// items; `name` is the name the client subscribed to. `counted` counts it
/// while it lives.
pub(super) fn live(state: Arc<AppState>, name: Arc<str>, live: LiveStream, counted: Counted) -> BoxStream<'static, Msg> {
    let mut channel = String::new();
    live.filter_map(move |item| {
        let _counted = &counted;
        let msg = match item {
            LiveItem::Notification(n) => {
                channel.clear();
                state.namer.write_channel(&n.source_type, &n.source_id, &mut channel);
                Some(Msg::event(&EventItem::notification(&channel, &n).through(&name), None))
            }
            LiveItem::Gap | LiveItem::Lagged { .. } | LiveItem::Dropped { .. } => {
                let reason = match item {
                    LiveItem::Gap => "Redis reconnected: notifications published meanwhile were missed",
                    _ => "this connection fell behind the live notifications: some were missed",
                };
                Some(Msg::reset(&ResetItem::new(&name, reason), None))
            }
            LiveItem::Malformed { channel, reason } => {
                Some(Msg::error(&ErrorItem::of_channel(&channel, ErrorCode::Undeliverable, &*reason)))
            }
            _ => None,
        };
        futures::future::ready(msg)
    })
    .boxed()
}
