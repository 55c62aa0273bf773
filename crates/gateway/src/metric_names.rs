//! The names of the metrics the gateway exports on `/metrics`, beside the
//! publisher's (`dualstream_publisher::metric_names`) and the batch engine's
//! `dualstream_batch_queue_depth`. docs/observability.md gives each one's
//! meaning and the alert worth setting on it; the Grafana dashboard in
//! `docs/grafana/dualstream.json` queries them.
//!
//! Counted as they happen: clients, ingest, deliveries, closes and
//! truncations. Read at each scrape from the components' own counters:
//! the Redis notifier and its breaker, the hub, the shared Kafka readers
//! and the clients' buffers.

/// Gauge, label `transport` (`sse`, `ws`): open streams.
pub const CLIENTS: &str = "dualstream_gateway_clients";
/// Counter: events stored through `POST /v1/events`.
pub const INGESTED: &str = "dualstream_gateway_ingested_total";
/// Gauge, labels `transport` and `mode` (`notify`, `full`; `live` for
/// patterns and aggregate channels): the clients' subscriptions.
pub const SUBSCRIPTIONS: &str = "dualstream_gateway_subscriptions";
/// Counter, labels `transport` and `mode` (`notify`, `full`): events
/// handed to clients' connections.
pub const DELIVERIES: &str = "dualstream_gateway_deliveries_total";
/// Counter, labels `transport` and `reason` (`slow_client`,
/// `token_expired`, `shutdown`): streams the gateway closed.
pub const CLOSED: &str = "dualstream_gateway_closed_total";
/// Counter: channel joins told that Kafka no longer holds where they
/// resumed (a `reset` item; the retention deleted it).
pub const TRUNCATED: &str = "dualstream_gateway_truncated_total";
/// Gauge: bytes of items waiting in all clients' buffers.
pub const BUFFERED_BYTES: &str = "dualstream_gateway_buffered_bytes";
/// Gauge: the Redis notifier's breaker: 0 closed, 1 half-open, 2 open.
pub const BREAKER: &str = "dualstream_redis_breaker_state";
/// Counter, label `result` (`published`, `skipped`, `failed`,
/// `timed_out`): notifications by the Redis notifier's own count.
pub const REDIS_NOTIFICATIONS: &str = "dualstream_redis_notifications_total";
/// Gauge: local subscribers of the live hub (one per channel or pattern
/// subscription of a client).
pub const HUB_SUBSCRIBERS: &str = "dualstream_hub_subscribers";
/// Gauge: 1 while the hub's Redis subscription connection is up.
pub const HUB_CONNECTED: &str = "dualstream_hub_connected";
/// Counter: live notifications dropped for subscribers whose buffer was
/// full (they get a `reset`).
pub const HUB_MISSED: &str = "dualstream_hub_missed_total";
/// Counter: times the hub's Redis connection was lost.
pub const HUB_DISCONNECTS: &str = "dualstream_hub_disconnects_total";
/// Gauge: Kafka consumers the shared readers have open.
pub const HISTORY_CONSUMERS: &str = "dualstream_history_consumers";
/// Counter, OpenTelemetry's `messaging.client.consumed.messages`, labels
/// `messaging_system` = `kafka` and `messaging_operation_name` =
/// `receive`: records the shared Kafka readers read.
pub const CONSUMED_MESSAGES: &str = "messaging_client_consumed_messages_total";
/// Counter, label `served` (`kafka`, `cache`): joins' reads of history.
pub const HISTORY_READS: &str = "dualstream_history_reads_total";
/// Counter: reads that went to a backfill reader (further back than the
/// tail cache).
pub const HISTORY_BACKFILL_READS: &str = "dualstream_history_backfill_reads_total";
/// Counter: parked reads dropped because their join stopped taking items.
pub const HISTORY_PARKED_DROPPED: &str = "dualstream_history_parked_dropped_total";
/// Gauge: stored bytes (key, payload, headers) the shared readers' caches
/// hold now.
pub const HISTORY_CACHED_BYTES: &str = "dualstream_history_cached_bytes";

/// Gauge: the catch-up joins open (`CatchUp::lag`).
pub const JOINS: &str = "dualstream_joins";
/// Gauge: the largest consumer lag of one join, in records: its partition's
/// records from the first it has not delivered or checked to the polled
/// high watermark.
pub const JOIN_LAG_MAX: &str = "dualstream_join_lag_max_records";
/// Gauge: the consumer lags of all joins added up, in records.
pub const JOIN_LAG: &str = "dualstream_join_lag_records";

/// Every name above, for the dashboard's check.
pub const ALL: [&str; 22] = [
    CLIENTS,
    SUBSCRIPTIONS,
    INGESTED,
    DELIVERIES,
    CLOSED,
    TRUNCATED,
    BUFFERED_BYTES,
    BREAKER,
    REDIS_NOTIFICATIONS,
    HUB_SUBSCRIBERS,
    HUB_CONNECTED,
    HUB_MISSED,
    HUB_DISCONNECTS,
    HISTORY_CONSUMERS,
    CONSUMED_MESSAGES,
    HISTORY_READS,
    HISTORY_BACKFILL_READS,
    HISTORY_PARKED_DROPPED,
    HISTORY_CACHED_BYTES,
    JOINS,
    JOIN_LAG_MAX,
    JOIN_LAG,
];

/// Register the counted series at zero, so a dashboard's `rate` and
/// `increase` have a start before the first delivery, close or truncation.
pub(crate) fn register() {
    metrics::counter!(INGESTED).increment(0);
    metrics::counter!(TRUNCATED).increment(0);
    for transport in ["sse", "ws"] {
        metrics::gauge!(CLIENTS, "transport" => transport).increment(0.0);
        for mode in ["notify", "full", "live"] {
            metrics::gauge!(SUBSCRIPTIONS, "transport" => transport, "mode" => mode).increment(0.0);
        }
        for mode in ["notify", "full"] {
            metrics::counter!(DELIVERIES, "transport" => transport, "mode" => mode).increment(0);
        }
        for reason in ["slow_client", "token_expired", "shutdown"] {
            metrics::counter!(CLOSED, "transport" => transport, "reason" => reason).increment(0);
        }
    }
}
