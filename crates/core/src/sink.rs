//! The sink contract: what the durable path and the real-time path must do.

use std::time::Duration;

use async_trait::async_trait;

use crate::event::Event;
use crate::notification::{Notification, Position};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The acknowledgements of a batch already handed to the store: resolves to
/// one result per event, in input order. From [`DurableSink::enqueue_batch`].
pub type PendingAcks =
    std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Result<Position, DeliveryError>>> + Send>>;

/// Why the durable sink did not store an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The sink's local queue stayed full for the whole wait (backpressure).
    #[error("queue full: no room in the local queue after waiting {waited:?}")]
    QueueFull {
        /// How long the publish waited for room.
        waited: Duration,
    },
    /// The broker did not acknowledge within the delivery deadline.
    #[error("not acknowledged within the delivery deadline of {deadline:?}")]
    Timeout {
        /// The deadline.
        deadline: Duration,
    },
    /// The broker or the client reported an error.
    #[error("broker error: {message}")]
    Broker {
        /// What the client said.
        message: String,
        /// Whether trying again may succeed.
        retriable: bool,
    },
    /// The event can never be stored as it is (too large, no such topic…).
    #[error("rejected: {reason}")]
    Rejected {
        /// Why.
        reason: String,
    },
    /// The event's record is larger than the store takes: for Kafka, the
    /// producer's `message.max.bytes`, which counts the key, the headers and
    /// the framing besides the payload. It can never be stored as it is;
    /// nothing was sent. (The payload's share is the length of the payload
    /// of the event handed back.)
    #[error("record too large: {size} bytes (payload, key, headers and framing) exceeds {limit} = {max} bytes")]
    RecordTooLarge {
        /// The record's size in bytes, as checked.
        size: usize,
        /// The limit in bytes.
        max: usize,
        /// The setting the limit comes from, for example `message.max.bytes`.
        limit: &'static str,
    },
    /// The event was handed to the store, but the store's answer does not
    /// prove where, or whether, it was stored: an acknowledgement the sink
    /// cannot reconcile (for Kafka: a negative offset, or one at or below an
    /// offset the partition already acknowledged), or a failure reported
    /// after the write may already have reached the broker (a fatal
    /// producer error). The event may be stored or not. Publishing it again
    /// is allowed, and may store it twice: consumers that need exactly one
    /// copy drop repeats by event id.
    #[error("outcome unknown: {reason}")]
    OutcomeUnknown {
        /// What the sink could not reconcile.
        reason: String,
    },
    /// Nothing was sent: the sink cannot send for a moment (for Kafka:
    /// its producer hit a fatal error and is being replaced once the
    /// writes already in flight have their outcomes). Certainly not stored;
    /// publishing again may succeed.
    #[error("not sent: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The sink was shut down.
    #[error("sink is closed")]
    Closed,
    /// Not sent, so that it cannot overtake an earlier event of the same
    /// source in the same batch that failed.
    #[error("not sent: an earlier event of the same source in this batch failed ({earlier})")]
    EarlierFailed {
        /// Why the earlier event failed.
        earlier: String,
        /// Whether the earlier failure was retriable (and so is this one).
        retriable: bool,
    },
    /// Anything else, from a custom sink.
    #[error(transparent)]
    Other(BoxError),
}

impl SinkError {
    /// Whether publishing the same event again may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::QueueFull { .. } | Self::Timeout { .. } | Self::OutcomeUnknown { .. } | Self::Unavailable { .. } => {
                true
            }
            Self::Broker { retriable, .. } | Self::EarlierFailed { retriable, .. } => *retriable,
            Self::Rejected { .. } | Self::RecordTooLarge { .. } | Self::Closed | Self::Other(_) => false,
        }
    }

    /// A short, stable name of the error's kind, for the `error_type`
    /// label of metrics and the `error.type` attribute of spans
    /// (OpenTelemetry's `_OTHER` for a custom sink's own errors).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::QueueFull { .. } => "queue_full",
            Self::Timeout { .. } => "timeout",
            Self::Broker { .. } => "broker",
            Self::Rejected { .. } => "rejected",
            Self::RecordTooLarge { .. } => "record_too_large",
            Self::OutcomeUnknown { .. } => "outcome_unknown",
            Self::Unavailable { .. } => "unavailable",
            Self::Closed => "closed",
            Self::EarlierFailed { .. } => "earlier_failed",
            Self::Other(_) => "_OTHER",
        }
    }

    /// Wrap any error or message as [`SinkError::Other`].
    pub fn other(e: impl Into<BoxError>) -> Self {
        Self::Other(e.into())
    }
}

/// A failed durable publish: the error, and the event handed back so nothing
/// accepted is lost.
///
/// The event is boxed: every write's result carries room for its error, so
/// an event held by value would make each `Result<Position, DeliveryError>`
/// (and the batch engine's per-event result) three times larger, and the
/// success path would move those bytes for every event.
#[derive(Debug, thiserror::Error)]
#[error("event {} was not stored: {error}", event.id())]
pub struct DeliveryError {
    /// What went wrong.
    #[source]
    pub error: SinkError,
    /// The event that was not stored.
    pub event: Box<Event>,
}

impl DeliveryError {
    /// Pair an error with the event it concerns.
    pub fn new(error: SinkError, event: Event) -> Self {
        Self { error, event: Box::new(event) }
    }

    /// The event that was not stored.
    pub fn into_event(self) -> Event {
        *self.event
    }

    /// Whether publishing the event again may succeed.
    pub fn is_retriable(&self) -> bool {
        self.error.is_retriable()
    }
}

/// Why a notification was not delivered. The real-time path is best effort:
/// the publisher counts these and never fails a publish because of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// The notifier's circuit breaker is open: the notification was skipped
    /// without contacting the server.
    #[error("skipped: circuit breaker open")]
    CircuitOpen,
    /// The server did not answer in time.
    #[error("no answer within {after:?}")]
    Timeout {
        /// The bound that expired.
        after: Duration,
    },
    /// The connection failed or the server returned an error.
    #[error("connection error: {0}")]
    Connection(String),
    /// Anything else, from a custom notifier.
    #[error(transparent)]
    Other(BoxError),
}

impl NotifyError {
    /// Whether trying again may succeed.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, Self::Other(_))
    }
}

/// The durable path (docs/design.md, "The contract"): it must succeed, and it
/// says where it stored each event.
///
/// Implementations must be cheap to call concurrently. Each event's result is
/// its [`Position`] once the store acknowledged it, or a [`DeliveryError`] that
/// hands the event back.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait DurableSink: Send + Sync + 'static {
    /// Store one event; resolve once it is acknowledged.
    async fn publish(&self, event: Event) -> Result<Position, DeliveryError>;

    /// Store many events with one result per event, in the input order.
    ///
    /// Implementations should hand every event to the store before awaiting
    /// any acknowledgement (docs/design.md, "Batch publishing"). If an event
    /// cannot be handed over, the later events of its source in the batch
    /// must fail too ([`SinkError::EarlierFailed`]), so that none overtakes
    /// it. The default publishes one by one and follows that rule.
    async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<Position, DeliveryError>> {
        let mut out: Vec<Result<Position, DeliveryError>> = Vec::with_capacity(events.len());
        let mut failed: Vec<(crate::Source, String, bool)> = Vec::new();
        for e in events {
            if let Some((_, earlier, retriable)) = failed.iter().find(|(s, ..)| s == e.source()) {
                let error = SinkError::EarlierFailed { earlier: earlier.clone(), retriable: *retriable };
                out.push(Err(DeliveryError::new(error, e)));
                continue;
            }
            let r = self.publish(e).await;
            if let Err(d) = &r {
                failed.push((d.event.source().clone(), d.error.to_string(), d.error.is_retriable()));
            }
            out.push(r);
        }
        out
    }

    /// The first half of [`publish_batch`](Self::publish_batch): hand every
    /// event to the store (waiting, if need be, for room in a local queue)
    /// and return the acknowledgements still to come. A pipeline hands over
    /// the next batch while this one's acknowledgements are outstanding; the
    /// store must keep the order of events of one source across such calls.
    ///
    /// The default runs [`publish_batch`](Self::publish_batch) to the end,
    /// so a sink that only implements that one still works, without the
    /// overlap.
    async fn enqueue_batch(&self, events: Vec<Event>) -> PendingAcks {
        let results = self.publish_batch(events).await;
        Box::pin(std::future::ready(results))
    }

    /// Whether the store is reachable and ready.
    async fn health_check(&self) -> Result<(), SinkError>;

    /// Wait until everything handed to the sink is acknowledged or failed, up
    /// to `timeout`. The default has nothing to flush.
    async fn flush(&self, _timeout: Duration) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The real-time path (docs/design.md, "The contract"): best effort and bounded in time.
///
/// A notification that reaches no subscriber is a success.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait RealtimeNotifier: Send + Sync + 'static {
    /// Send one notification.
    async fn notify(&self, notification: &Notification) -> Result<(), NotifyError>;

    /// Send many notifications, in order, as one round trip where the
    /// transport allows. The default sends them one by one.
    async fn notify_batch(&self, notifications: &[Notification]) -> Result<(), NotifyError> {
        for n in notifications {
            self.notify(n).await?;
        }
        Ok(())
    }

    /// Whether the server answers.
    async fn health_check(&self) -> Result<(), NotifyError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every write's result has room for its error: with the event held by
    /// value it was 160 bytes; boxed, a result is a few words.
    #[test]
    fn a_write_result_stays_a_few_words() {
        let size = std::mem::size_of::<Result<crate::Position, DeliveryError>>();
        assert!(size <= 56, "Result<Position, DeliveryError> is {size} bytes");
        assert!(std::mem::size_of::<Event>() > 100, "the event itself stays out of the result");
    }

    #[test]
    fn retriability() {
        assert!(SinkError::QueueFull { waited: Duration::from_secs(1) }.is_retriable());
        assert!(SinkError::Broker { message: "x".into(), retriable: true }.is_retriable());
        assert!(!SinkError::Rejected { reason: "too large".into() }.is_retriable());
        let big = SinkError::RecordTooLarge { size: 1_000_001, max: 1_000_000, limit: "message.max.bytes" };
        assert!(!big.is_retriable());
        assert!(big.to_string().contains("exceeds message.max.bytes = 1000000 bytes"), "{big}");
        assert!(!SinkError::Closed.is_retriable());
    }

    #[test]
    fn delivery_error_hands_the_event_back() {
        let e = Event::builder("t", "user", "a").build().expect("valid");
        let err = DeliveryError::new(SinkError::Closed, e.clone());
        assert!(err.to_string().contains(&e.id().to_string()));
        assert_eq!(*err.event, e);
    }

    /// The traits are object safe: the publisher holds them as trait objects.
    #[test]
    fn traits_are_object_safe() {
        fn takes(_: Option<std::sync::Arc<dyn DurableSink>>, _: Option<std::sync::Arc<dyn RealtimeNotifier>>) {}
        takes(None, None);
    }
}
