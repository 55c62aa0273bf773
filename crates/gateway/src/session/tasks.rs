//! The task behind each subscription of a session: a channel's catch-up
//! join ([`ChannelTask`]) or a pattern's hub subscription ([`LiveTask`]).
//!
//! Each turns what it reads into the client's items and hands them to its
//! connection's buffer ([`Outbox::hand`]), bounded in items and in bytes,
//! waiting only for that buffer: the hub and the shared Kafka reader never
//! wait for a client.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use dualstream_consumer::{Delivery, HubError, JoinError, LiveItem, LiveStream, ReplayError, StartAt};
use dualstream_core::trace::{self, TraceContext, Traced};
use dualstream_core::{Backoff, Source};
use futures::StreamExt;

use super::{Mode, Msg, Outbox};
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
pub(super) struct ChannelTask {
    pub(super) state: Arc<AppState>,
    pub(super) channel: Arc<str>,
    /// The channel's hash, as in the resume token.
    pub(super) hash: u32,
    pub(super) source: Source,
    pub(super) partition: i32,
    /// The first offset the client has not been given.
    pub(super) next: i64,
    pub(super) mode: Mode,
    pub(super) out: Outbox,
    /// For a far resume: the offset its pacing ends at (where the partition
    /// ended when it subscribed) and the token subject it is paced under.
    pub(super) pace: Option<(i64, Arc<str>)>,
    /// Counts the subscription while the task lives.
    pub(super) _counted: Counted,
}

/// One subscription in `dualstream_gateway_subscriptions`, from its start
/// until its task ends or is stopped (the task's future is dropped).
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

impl ChannelTask {
    /// Join from `next`; when the join fails, join again from where it got
    /// to, after a backoff, so a Kafka outage delays items but loses none.
    pub(super) async fn run(mut self) {
        let mut backoff = REJOIN_BACKOFF.first();
        loop {
            let start = StartAt::Offset(self.next);
            // Boxed: starting a join is a large future, and the task would
            // hold its room for as long as the subscription lasts.
            let joined = match self.mode {
                Mode::Full => Box::pin(self.state.catchup.join_events(self.source.clone(), start)).await,
                Mode::Notify => Box::pin(self.state.catchup.join(self.source.clone(), start)).await,
            };
            match joined {
                Ok(mut stream) => {
                    while let Some(item) = stream.next().await {
                        backoff = REJOIN_BACKOFF.first();
                        self.pace(&item).await;
                        let msg = match self.step(item) {
                            Step::Send(msg) => msg,
                            Step::Skip => continue,
                            Step::Rejoin => break,
                        };
                        if !self.out.hand(msg, self.state.send_timeout()).await {
                            return;
                        }
                    }
                }
                Err(e) if permanent(&e) => {
                    let item = ErrorItem::of_channel(&self.channel, ErrorCode::SubscriptionFailed, e.to_string());
                    self.out.hand(Msg::error(&item), self.state.send_timeout()).await;
                    return;
                }
                Err(e) => tracing::warn!(channel = %short(&self.channel), error = %e, "join failed; retrying"),
            }
            if self.out.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = REJOIN_BACKOFF.after(backoff);
        }
    }

    /// Wait for the subject's pace (`limits.far_items_per_sec`) when `item`
    /// is far history; once an item reaches where the partition ended at
    /// subscribe time, never again.
    async fn pace(&mut self, item: &Result<Delivery, JoinError>) {
        let Some((until, subject)) = &self.pace else { return };
        match item {
            Ok(Delivery::History(r)) if r.position.offset < *until => {}
            Ok(Delivery::History(_) | Delivery::Live(_)) => {
                self.pace = None;
                return;
            }
            _ => return,
        }
        let per_sec = self.state.config.limits.far_items_per_sec;
        let mut waited = false;
        loop {
            let take = self.state.far_pace.lock().unwrap_or_else(PoisonError::into_inner).take(
                subject,
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

/// A pattern's or an aggregate channel's live subscription.
pub(super) struct LiveTask {
    pub(super) state: Arc<AppState>,
    /// The name the client subscribed to.
    pub(super) name: Arc<str>,
    pub(super) out: Outbox,
    /// Counts the subscription while the task lives.
    pub(super) _counted: Counted,
}

impl LiveTask {
    pub(super) async fn run(self, mut live: LiveStream) {
        let mut channel = String::new();
        while let Some(item) = live.next().await {
            let msg = match item {
                LiveItem::Notification(n) => {
                    channel.clear();
                    self.state.namer.write_channel(&n.source_type, &n.source_id, &mut channel);
                    Msg::event(&EventItem::notification(&channel, &n).through(&self.name), None)
                }
                LiveItem::Gap | LiveItem::Lagged { .. } | LiveItem::Dropped { .. } => {
                    let reason = match item {
                        LiveItem::Gap => "Redis reconnected: notifications published meanwhile were missed",
                        _ => "this connection fell behind the live notifications: some were missed",
                    };
                    Msg::reset(&ResetItem::new(&self.name, reason), None)
                }
                LiveItem::Malformed { channel, reason } => {
                    Msg::error(&ErrorItem::of_channel(&channel, ErrorCode::Undeliverable, &*reason))
                }
                _ => continue,
            };
            if !self.out.hand(msg, self.state.send_timeout()).await {
                return;
            }
        }
    }
}
