//! Everything the gateway reads or writes as JSON, as serde types
//! (docs/gateway.md documents each).
//!
//! The fields of every written type are declared in the order of their names:
//! that is the order the gateway has always written them in, so the bytes a
//! client sees are the same (and every map on the wire is a `BTreeMap`, for
//! the same reason). An item of a stream carries its `kind`; on a
//! WebSocket the resume token after it is added as a last field, `token`
//! ([`ws_item`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use dualstream_core::{Event, EventId, Notification};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorCode;
use crate::session::Mode;

/// The JSON text of a wire value. Serialising these types cannot fail: every
/// map has string keys and every field a plain serialisation.
pub(crate) fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("wire types always serialise")
}

/// A WebSocket item: the item's JSON with the resume token after it, if
/// any, as its last field, `token`.
pub(crate) fn ws_item(json: &str, resume_token: Option<String>) -> String {
    match resume_token {
        Some(t) if json.ends_with('}') => {
            let token = to_json(&t);
            let mut s = String::with_capacity(json.len() + token.len() + 10);
            s.push_str(&json[..json.len() - 1]);
            s.push_str(",\"token\":");
            s.push_str(&token);
            s.push('}');
            s
        }
        _ => json.to_owned(),
    }
}

/// The body of every refused request.
#[derive(Debug, Serialize)]
pub(crate) struct ErrorBody {
    /// What went wrong.
    pub(crate) error: ErrorDetail,
}

/// What went wrong with a request.
#[derive(Debug, Serialize)]
pub(crate) struct ErrorDetail {
    /// The stable code.
    pub(crate) code: ErrorCode,
    /// The setting a limit is, as a path (`limits.max_streams`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) field: Option<&'static str>,
    /// The index of the event at fault in an ingest request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) index: Option<usize>,
    /// The limit's value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) limit: Option<usize>,
    /// In words.
    pub(crate) message: String,
}

impl ErrorDetail {
    /// A code and a message, with no other field.
    pub(crate) fn new(code: ErrorCode, message: String) -> Self {
        Self { code, field: None, index: None, limit: None, message }
    }
}

/// A Kafka position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Position {
    /// The offset within the partition.
    pub(crate) offset: i64,
    /// The partition.
    pub(crate) partition: i32,
    /// The topic.
    pub(crate) topic: Arc<str>,
}

impl From<&dualstream_core::Position> for Position {
    fn from(p: &dualstream_core::Position) -> Self {
        Self { offset: p.offset, partition: p.partition, topic: Arc::clone(&p.topic) }
    }
}

/// The kind of a stream's item: its `kind` field, and the SSE event's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// An event of a subscription.
    Event,
    /// Events a subscription will not deliver.
    Reset,
    /// An item that cannot be delivered, or a refused command.
    Error,
    /// The subscriptions now.
    Subscribed,
    /// The stream ends.
    Close,
}

impl Kind {
    /// As the wire spells it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Reset => "reset",
            Kind::Error => "error",
            Kind::Subscribed => "subscribed",
            Kind::Close => "close",
        }
    }
}

/// `{"kind": "event", ...}`: a notification, or in `full` mode the whole event.
#[derive(Debug, Serialize)]
pub(crate) struct EventItem<'a> {
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<&'a BTreeMap<String, String>>,
    id: EventId,
    kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    occurred_at_ms: Option<u64>,
    /// A payload that is JSON, as JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<Value>,
    /// Any other payload, base64 (standard alphabet).
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    position: Option<Position>,
    source_id: &'a str,
    source_type: &'a str,
    /// The pattern or aggregate channel a live item came through.
    #[serde(skip_serializing_if = "Option::is_none")]
    subscription: Option<&'a str>,
    #[serde(rename = "type")]
    event_type: &'a str,
}

impl<'a> EventItem<'a> {
    /// A notification of `channel`.
    pub(crate) fn notification(channel: &'a str, n: &'a Notification) -> Self {
        Self {
            channel,
            headers: None,
            id: n.id,
            kind: Kind::Event,
            occurred_at_ms: None,
            payload: None,
            payload_base64: None,
            position: n.position.as_ref().map(Position::from),
            source_id: &n.source_id,
            source_type: &n.source_type,
            subscription: None,
            event_type: &n.event_type,
        }
    }

    /// An event read from Kafka: its notification's fields, and with `full`
    /// its time, payload and headers (when it has any).
    pub(crate) fn record(channel: &'a str, e: &'a Event, position: &dualstream_core::Position, full: bool) -> Self {
        let mut item = Self {
            channel,
            headers: None,
            id: e.id(),
            kind: Kind::Event,
            occurred_at_ms: None,
            payload: None,
            payload_base64: None,
            position: Some(position.into()),
            source_id: e.source().source_id(),
            source_type: e.source().source_type(),
            subscription: None,
            event_type: e.event_type(),
        };
        if full {
            item.occurred_at_ms = Some(e.occurred_at_ms());
            match serde_json::from_slice::<Value>(e.payload()) {
                Ok(p) if !e.payload().is_empty() => item.payload = Some(p),
                _ => {
                    use base64::Engine as _;
                    item.payload_base64 = Some(base64::engine::general_purpose::STANDARD.encode(e.payload()));
                }
            }
            item.headers = Some(e.headers()).filter(|h| !h.is_empty());
        }
        item
    }

    /// Name the subscription a live item came through.
    pub(crate) fn through(mut self, subscription: &'a str) -> Self {
        self.subscription = Some(subscription);
        self
    }
}

/// `{"kind": "reset", ...}`: what a subscription will not deliver, and why.
#[derive(Debug, Serialize)]
pub(crate) struct ResetItem<'a> {
    channels: [&'a str; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    first_available: Option<i64>,
    kind: Kind,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    requested: Option<i64>,
}

impl<'a> ResetItem<'a> {
    /// A reset of one channel or pattern.
    pub(crate) fn new(channel: &'a str, reason: &'a str) -> Self {
        Self { channels: [channel], first_available: None, kind: Kind::Reset, reason, requested: None }
    }

    /// History from `requested` on is gone; it starts again at
    /// `first_available`.
    pub(crate) fn truncated(channel: &'a str, requested: i64, first_available: i64) -> Self {
        let reason = "history is gone (retention or deletion): the events in between are lost to this client";
        Self { requested: Some(requested), first_available: Some(first_available), ..Self::new(channel, reason) }
    }
}

/// `{"kind": "error", ...}`: an item that cannot be delivered, or a
/// refused WebSocket command (with the limit it ran into, if any).
#[derive(Debug, Serialize)]
pub(crate) struct ErrorItem<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    code: ErrorCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
    kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl<'a> ErrorItem<'a> {
    /// A code and a message.
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let message = message.into();
        Self { channel: None, code, field: None, kind: Kind::Error, limit: None, message, retry_after_ms: None }
    }

    /// The error of one channel's subscription.
    pub(crate) fn of_channel(channel: &'a str, code: ErrorCode, message: impl Into<String>) -> Self {
        Self { channel: Some(channel), ..Self::new(code, message) }
    }

    /// A limit: its setting, value and when to retry.
    pub(crate) fn limit(mut self, field: &'static str, limit: usize, retry_after_ms: u64) -> Self {
        (self.field, self.limit, self.retry_after_ms) = (Some(field), Some(limit), Some(retry_after_ms));
        self
    }
}

/// `{"kind": "subscribed", "subscriptions": [...]}`: the names now active.
#[derive(Debug, Serialize)]
pub(crate) struct SubscribedItem<'a> {
    kind: Kind,
    subscriptions: Vec<&'a str>,
}

impl<'a> SubscribedItem<'a> {
    /// The names, sorted.
    pub(crate) fn new(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut subscriptions: Vec<&str> = names.into_iter().collect();
        subscriptions.sort_unstable();
        Self { kind: Kind::Subscribed, subscriptions }
    }
}

/// `{"kind": "close", "reason", "message"}`: an SSE stream's last event.
#[derive(Debug, Serialize)]
pub(crate) struct CloseItem {
    kind: Kind,
    message: &'static str,
    reason: &'static str,
}

impl CloseItem {
    /// Why the stream ends.
    pub(crate) fn new(reason: &'static str, message: &'static str) -> Self {
        Self { kind: Kind::Close, message, reason }
    }
}

/// One event as a producer sends it to `POST /v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IngestEvent {
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    pub(crate) source_type: String,
    pub(crate) source_id: String,
    /// Any JSON value, stored as its JSON text.
    #[serde(default)]
    pub(crate) payload: Option<Value>,
    /// Binary payloads, base64 (standard alphabet).
    #[serde(default)]
    pub(crate) payload_base64: Option<String>,
    /// The event id (UUID); made when absent.
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
    /// When it happened, in milliseconds since the Unix epoch; now when
    /// absent.
    #[serde(default)]
    pub(crate) occurred_at_ms: Option<u64>,
}

/// What `POST /v1/events` answers: how many events were stored and how many
/// failed, and each event's result in the order sent.
#[derive(Debug, Serialize)]
pub(crate) struct IngestResponse {
    /// Events not stored.
    pub(crate) failed: usize,
    /// One per event.
    pub(crate) results: Vec<IngestResult>,
    /// Events stored.
    pub(crate) stored: usize,
}

/// One event's result.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum IngestResult {
    /// Stored, at this position (when the sink says).
    Stored {
        /// The event's id.
        id: EventId,
        /// Where Kafka stored it.
        position: Option<Position>,
    },
    /// Not stored, or not known to be.
    Failed {
        /// Why.
        error: EventFailure,
        /// The event's id.
        id: EventId,
    },
}

/// Why one event of an ingest request failed.
#[derive(Debug, Serialize)]
pub(crate) struct EventFailure {
    /// `queue_full`, `too_large`, `shutting_down`, `outcome_unknown`,
    /// `lane_dead` or `not_stored`.
    pub(crate) code: ErrorCode,
    /// In words.
    pub(crate) message: String,
    /// Whether sending it again may succeed.
    pub(crate) retriable: bool,
}

/// An event stored through this gateway, as the dashboard lists it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Ingested {
    /// The event's id.
    pub(crate) id: EventId,
    /// Where Kafka stored it.
    pub(crate) position: Option<Position>,
    /// Its source id.
    pub(crate) source_id: String,
    /// Its source type.
    pub(crate) source_type: String,
    /// Its type.
    #[serde(rename = "type")]
    pub(crate) event_type: String,
}

impl Ingested {
    /// An event not yet stored (no position yet).
    pub(crate) fn of(e: &Event) -> Self {
        Self {
            id: e.id(),
            position: None,
            source_id: e.source().source_id().to_owned(),
            source_type: e.source().source_type().to_owned(),
            event_type: e.event_type().to_owned(),
        }
    }
}

/// What `POST /v1/tickets` takes: the channels and patterns the ticket's
/// stream opens, or the dashboard's feed.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TicketRequest {
    pub(crate) channels: Vec<String>,
    pub(crate) patterns: Vec<String>,
    pub(crate) dashboard: bool,
}

/// What `POST /v1/tickets` answers.
#[derive(Debug, Serialize)]
pub(crate) struct TicketResponse {
    /// Seconds the ticket may wait before it opens its stream.
    pub(crate) expires_in: u64,
    /// The ticket, for `?ticket=`.
    pub(crate) ticket: String,
}

/// What a WebSocket client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Command {
    /// Start subscriptions.
    Subscribe {
        #[serde(default)]
        channels: Vec<String>,
        #[serde(default)]
        patterns: Vec<String>,
        #[serde(default)]
        mode: Mode,
        #[serde(default)]
        resume: Option<String>,
    },
    /// Stop subscriptions.
    Unsubscribe {
        #[serde(default)]
        channels: Vec<String>,
        #[serde(default)]
        patterns: Vec<String>,
    },
}

/// `GET /readyz` without an admin token.
#[derive(Debug, Serialize)]
pub(crate) struct Ready {
    /// Whether Kafka answers.
    pub(crate) ready: bool,
}

/// The readiness document: `/readyz` for an admin, and the dashboard's
/// `health`.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Readiness {
    /// Open streams.
    pub(crate) clients: Clients,
    /// How many times Kafka and Redis were checked.
    pub(crate) health_checks: u64,
    /// The shared Kafka readers' counters (`CatchUp::stats`).
    pub(crate) history: HistoryHealth,
    /// The hub's state, when it answered.
    pub(crate) hub: Option<HubHealth>,
    /// Kafka's health.
    pub(crate) kafka: KafkaHealth,
    /// How the catch-up joins placed live notifications that jumped past
    /// their checked offset (`CatchUp::live_checks`): a notification read
    /// from Kafka waits for the broker, so their share drives the live
    /// path's tail latency.
    pub(crate) live_checks: LiveChecksHealth,
    /// What the batching engine holds queued (`BatchEngine::queued`).
    pub(crate) queue: usize,
    /// Whether Kafka answers.
    pub(crate) ready: bool,
    /// Redis's health and the notifier's counters.
    pub(crate) redis: RedisHealth,
}

/// `dualstream_consumer::LiveChecks`.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct LiveChecksHealth {
    pub(crate) proven_by_notifications: u64,
    pub(crate) read_from_kafka: u64,
}

impl From<dualstream_consumer::LiveChecks> for LiveChecksHealth {
    fn from(c: dualstream_consumer::LiveChecks) -> Self {
        Self { proven_by_notifications: c.proven_by_notifications, read_from_kafka: c.read_from_kafka }
    }
}

/// Open streams per transport.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Clients {
    /// Bytes of items waiting in the clients' buffers.
    pub(crate) buffered_bytes: usize,
    /// Items of far resumes that waited for their subject's
    /// `limits.far_items_per_sec`.
    pub(crate) far_items_paced: u64,
    /// Event items rendered for a client, and those taken as rendered
    /// already for another subscriber of the channel.
    pub(crate) items_rendered: u64,
    pub(crate) items_shared: u64,
    pub(crate) sse: usize,
    pub(crate) ws: usize,
}

/// The hub's state.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct HubHealth {
    pub(crate) channels: usize,
    pub(crate) connected: bool,
    pub(crate) disconnects: u64,
    /// Live notifications dropped for subscribers whose buffer was full
    /// (slow clients: their joins read those from Kafka).
    pub(crate) missed: u64,
    pub(crate) patterns: usize,
    /// Live notifications waiting now in the subscribers' buffers.
    pub(crate) queued: usize,
    pub(crate) subscribers: usize,
}

/// The shared Kafka readers' counters: how joins were served (see
/// `dualstream_consumer::HistoryStats`).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct HistoryHealth {
    pub(crate) backfill_reads: u64,
    /// Stored bytes (key, payload, headers) the readers' caches hold now.
    pub(crate) cached_bytes: u64,
    /// Records the readers' caches hold now.
    pub(crate) cached_records: u64,
    pub(crate) consumers: u64,
    pub(crate) parked: u64,
    pub(crate) parked_dropped: u64,
    pub(crate) range_reads: u64,
    pub(crate) range_reads_cached: u64,
    pub(crate) records_read: u64,
    pub(crate) seeks: u64,
}

impl From<dualstream_consumer::HistoryStats> for HistoryHealth {
    fn from(s: dualstream_consumer::HistoryStats) -> Self {
        Self {
            consumers: s.consumers,
            range_reads: s.range_reads,
            range_reads_cached: s.range_reads_cached,
            backfill_reads: s.backfill_reads,
            seeks: s.seeks,
            records_read: s.records_read,
            parked: s.parked,
            parked_dropped: s.parked_dropped,
            cached_records: s.cached_records,
            cached_bytes: s.cached_bytes,
        }
    }
}

/// Kafka's health.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct KafkaHealth {
    pub(crate) error: Option<String>,
    pub(crate) ok: bool,
}

/// Redis's health, the breaker's state and the notifier's counters.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RedisHealth {
    pub(crate) breaker: String,
    pub(crate) error: Option<String>,
    pub(crate) failed: u64,
    pub(crate) ok: bool,
    pub(crate) published: u64,
    pub(crate) skipped: u64,
}

/// The dashboard feed's `state` event.
#[derive(Debug, Serialize)]
pub(crate) struct DashboardState {
    /// Events stored through this gateway, per source type.
    pub(crate) counts: BTreeMap<String, u64>,
    /// The readiness document.
    pub(crate) health: Readiness,
    /// The latest events stored, newest first.
    pub(crate) latest: Vec<Ingested>,
}

#[cfg(test)]
mod tests {
    //! Each type against the `json!` value the gateway wrote before it had
    //! these types: the same bytes.

    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::*;

    fn core_position() -> dualstream_core::Position {
        dualstream_core::Position { topic: "events".into(), partition: 2, offset: 41 }
    }

    fn position_json(p: &dualstream_core::Position) -> Value {
        json!({"topic": &*p.topic, "partition": p.partition, "offset": p.offset})
    }

    fn event(payload: &[u8], headers: bool) -> Event {
        let mut b = Event::builder("created", "user", "octo\"cat").payload(payload.to_vec());
        b = b.occurred_at(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        if headers {
            b = b.header("trace", "abc").header("a", "1");
        }
        b.build().expect("valid")
    }

    #[test]
    fn events_are_written_as_before() {
        let n = Notification {
            id: EventId::new(),
            event_type: "created".into(),
            source_type: "user".into(),
            source_id: "octocat".into(),
            position: Some(core_position()),
            trace: None,
        };
        let old = |n: &Notification| {
            json!({"kind": "event", "channel": "events:user:octocat", "id": n.id.to_string(), "type": &*n.event_type,
                "source_type": &*n.source_type, "source_id": &*n.source_id,
                "position": n.position.as_ref().map(position_json)})
        };
        assert_eq!(to_json(&EventItem::notification("events:user:octocat", &n)), old(&n).to_string());
        let mut live = old(&n);
        live["subscription"] = json!("events:user:*");
        let item = EventItem::notification("events:user:octocat", &n).through("events:user:*");
        assert_eq!(to_json(&item), live.to_string());
        let unplaced = Notification { position: None, ..n };
        assert_eq!(to_json(&EventItem::notification("events:user:octocat", &unplaced)), old(&unplaced).to_string());

        for (payload, headers) in [(&br#"{"z": 1, "a": [true, null]}"#[..], true), (b"\xff\x00", false), (b"", true)] {
            let e = event(payload, headers);
            for full in [false, true] {
                let mut v = json!({"kind": "event", "channel": "c", "id": e.id().to_string(), "type": e.event_type(),
                    "source_type": e.source().source_type(), "source_id": e.source().source_id(),
                    "position": position_json(&core_position())});
                if full {
                    v["occurred_at_ms"] = json!(e.occurred_at_ms());
                    match serde_json::from_slice::<Value>(e.payload()) {
                        Ok(p) if !e.payload().is_empty() => v["payload"] = p,
                        _ => {
                            use base64::Engine as _;
                            v["payload_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(e.payload()));
                        }
                    }
                    if !e.headers().is_empty() {
                        v["headers"] = json!(e.headers());
                    }
                }
                assert_eq!(to_json(&EventItem::record("c", &e, &core_position(), full)), v.to_string());
            }
        }
    }

    #[test]
    fn other_items_are_written_as_before() {
        let reset = json!({"kind": "reset", "channels": ["events:user:*"], "reason": "gone \"now\""});
        assert_eq!(to_json(&ResetItem::new("events:user:*", "gone \"now\"")), reset.to_string());
        let truncated = json!({"kind": "reset", "channels": ["c"],
            "reason": "history is gone (retention or deletion): the events in between are lost to this client",
            "requested": 3, "first_available": 10});
        assert_eq!(to_json(&ResetItem::truncated("c", 3, 10)), truncated.to_string());
        let error = json!({"kind": "error", "channel": "c", "code": "undeliverable", "message": "bad"});
        assert_eq!(to_json(&ErrorItem::of_channel("c", ErrorCode::Undeliverable, "bad")), error.to_string());
        let command = json!({"kind": "error", "code": "invalid_command", "message": "send JSON text frames"});
        assert_eq!(to_json(&ErrorItem::new(ErrorCode::InvalidCommand, "send JSON text frames")), command.to_string());
        let limited = json!({"kind": "error", "code": "rate_limited", "message": "m", "field": "limits.commands_per_sec",
            "limit": 4, "retry_after_ms": 250});
        let item = ErrorItem::new(ErrorCode::RateLimited, "m").limit("limits.commands_per_sec", 4, 250);
        assert_eq!(to_json(&item), limited.to_string());
        let subscribed = json!({"kind": "subscribed", "subscriptions": ["a", "b:*", "c"]});
        assert_eq!(to_json(&SubscribedItem::new(["c", "a", "b:*"])), subscribed.to_string());
        let close = json!({"kind": "close", "reason": "shutdown", "message": "bye"});
        assert_eq!(to_json(&CloseItem::new("shutdown", "bye")), close.to_string());
        let token = "r1.0000abcd.-";
        let ws =
            format!("{},\"token\":{}}}", &subscribed.to_string()[..subscribed.to_string().len() - 1], json!(token));
        assert_eq!(ws_item(&subscribed.to_string(), Some(token.into())), ws);
        assert_eq!(ws_item(&error.to_string(), None), error.to_string());
    }

    #[test]
    fn responses_are_written_as_before() {
        let id = EventId::new();
        let p = Position::from(&core_position());
        let failure = EventFailure { code: ErrorCode::QueueFull, message: "full".into(), retriable: true };
        let results = vec![
            IngestResult::Stored { id, position: Some(p) },
            IngestResult::Stored { id, position: None },
            IngestResult::Failed { error: failure, id },
        ];
        let response = IngestResponse { failed: 1, results, stored: 2 };
        let old = json!({"stored": 2, "failed": 1, "results": [
            {"id": id.to_string(), "position": position_json(&core_position())},
            {"id": id.to_string(), "position": null},
            {"id": id.to_string(), "error": {"code": "queue_full", "message": "full", "retriable": true}}]});
        assert_eq!(to_json(&response), old.to_string());
        let ticket = TicketResponse { expires_in: 30, ticket: "t".into() };
        assert_eq!(to_json(&ticket), json!({"ticket": "t", "expires_in": 30}).to_string());
    }

    #[test]
    fn the_readiness_and_dashboard_documents_are_written_as_before() {
        let readiness = Readiness {
            clients: Clients {
                buffered_bytes: 64,
                items_rendered: 3,
                items_shared: 8,
                far_items_paced: 5,
                sse: 1,
                ws: 2,
            },
            health_checks: 7,
            hub: Some(HubHealth {
                channels: 3,
                connected: true,
                disconnects: 1,
                missed: 7,
                patterns: 0,
                queued: 2,
                subscribers: 4,
            }),
            history: HistoryHealth { consumers: 2, range_reads: 10, seeks: 1, ..HistoryHealth::default() },
            kafka: KafkaHealth { error: None, ok: true },
            live_checks: LiveChecksHealth { proven_by_notifications: 11, read_from_kafka: 2 },
            queue: 5,
            ready: true,
            redis: RedisHealth {
                breaker: "closed".into(),
                error: Some("down".into()),
                failed: 1,
                ok: false,
                published: 9,
                skipped: 2,
            },
        };
        let old = json!({
            "ready": true,
            "kafka": {"ok": true, "error": null},
            "redis": {"ok": false, "error": "down", "breaker": "closed", "published": 9, "skipped": 2, "failed": 1},
            "hub": {"connected": true, "channels": 3, "patterns": 0, "subscribers": 4, "disconnects": 1, "missed": 7,
                "queued": 2},
            "history": {"consumers": 2, "range_reads": 10, "range_reads_cached": 0, "backfill_reads": 0, "seeks": 1,
                "records_read": 0, "parked": 0, "parked_dropped": 0, "cached_records": 0, "cached_bytes": 0},
            "live_checks": {"proven_by_notifications": 11, "read_from_kafka": 2},
            "queue": 5,
            "clients": {"buffered_bytes": 64, "items_rendered": 3, "items_shared": 8, "far_items_paced": 5, "sse": 1, "ws": 2},
            "health_checks": 7,
        });
        assert_eq!(to_json(&readiness), old.to_string());
        let e = event(b"{}", false);
        let stored = Ingested { position: Some(Position::from(&core_position())), ..Ingested::of(&e) };
        let latest = json!({"id": e.id().to_string(), "type": "created", "source_type": "user",
            "source_id": "octo\"cat", "position": position_json(&core_position())});
        let counts = BTreeMap::from([("user".to_owned(), 3u64), ("repo".to_owned(), 1)]);
        let doc = DashboardState { counts: counts.clone(), health: readiness, latest: vec![stored] };
        let old = json!({"health": old, "counts": counts, "latest": [latest]});
        assert_eq!(to_json(&doc), old.to_string());
        assert_eq!(to_json(&Ready { ready: false }), json!({"ready": false}).to_string());
    }
}
