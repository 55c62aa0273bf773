//! The durable sink: an outbox table with a gapless sequence per source.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use dualstream_core::{DeliveryError, DurableSink, Event, PendingAcks, Position, SinkError, Source};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::conn::{
    answer, check_range, quote_ident, sqlstate_error, Answer, ConfigError, Conn, ConnectionConfig, PgError, Sent, Slot,
};

/// What the append function answers for an event it did not try because an
/// earlier event of the same source in the batch failed.
const EARLIER: &str = "EARLIER";

/// Configuration of an [`OutboxSink`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// How to reach PostgreSQL.
    pub connection: ConnectionConfig,
    /// The schema of the outbox objects. Default: `public`.
    pub schema: String,
    /// The outbox table. The per-source counters live in `{table}_sources`
    /// and the append function is `{table}_append`. Letters, digits and `_`,
    /// at most 55 bytes. Default: `dualstream_outbox`.
    pub table: String,
    /// Create the schema, the tables and the function when the sink
    /// connects (idempotent). Off: run [`OutboxSink::schema_sql`] in your
    /// own migrations. Default: on.
    pub create_schema: bool,
    /// Bound on one batch's append, in milliseconds: the client stops
    /// waiting then, and it is the session's `statement_timeout` too, so the
    /// server gives up as well. Default: 10,000.
    pub timeout_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            connection: ConnectionConfig::default(),
            schema: "public".to_owned(),
            table: "dualstream_outbox".to_owned(),
            create_schema: true,
            timeout_ms: 10_000,
        }
    }
}

fn check_ident(field: &'static str, value: &str, max: usize) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && !value.starts_with(|c: char| c.is_ascii_digit())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        return Ok(());
    }
    let reason = format!("{value:?} must be 1 to {max} ASCII letters, digits or '_', not starting with a digit");
    Err(ConfigError::Invalid { field, reason })
}

impl OutboxConfig {
    /// Check every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_ident("schema", &self.schema, 63)?;
        // Room for the suffix of `{table}_sources` within PostgreSQL's
        // 63-byte identifiers.
        check_ident("table", &self.table, 55)?;
        check_range("timeout_ms", self.timeout_ms, 1..=600_000)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The log name in every [`Position`]: `schema.table`.
    pub fn log_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    fn names(&self) -> Names {
        let s = quote_ident(&self.schema);
        Names {
            table: format!("{s}.{}", quote_ident(&self.table)),
            counters: format!("{s}.{}", quote_ident(&format!("{}_sources", self.table))),
            append: format!("{s}.{}", quote_ident(&format!("{}_append", self.table))),
        }
    }
}

/// The qualified, quoted names of the outbox objects.
struct Names {
    table: String,
    counters: String,
    append: String,
}

/// Why an [`OutboxSink`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// PostgreSQL could not be reached, or refused the schema.
    #[error("outbox setup: {0}")]
    Pg(#[from] PgError),
}

/// A [`DurableSink`] that appends events to an outbox table in PostgreSQL.
///
/// - **Table** (`{schema}.{table}`): `source_type`, `source_id`, `seq`,
///   `id` (the event id, unique), `event_type`, `occurred_at`, `payload`
///   (bytea), `headers` (jsonb), `stored_at`; primary key
///   `(source_type, source_id, seq)`.
/// - **Position**: `topic` is `schema.table`, `partition` is 0 and `offset`
///   is the source's sequence number `seq`: 1, 2, 3… with no gap, in the
///   order the source's events were stored (a counter row per source in
///   `{table}_sources`, taken in the same transaction; its row lock orders
///   concurrent writers of one source, and a failed event takes no
///   number). So `(source, offset)` names one row, and a reader that saw
///   offset 7 of a source and is notified of 9 knows it missed 8.
/// - **Batches**: one statement per batch (the `{table}_append` function):
///   each event in a subtransaction of its own, so a failing event (a
///   constraint, bad data) fails alone, except that the later events of its
///   source in the batch are not tried ([`SinkError::EarlierFailed`]). The
///   batch commits as one transaction: an acknowledged position is
///   committed.
/// - **Order across calls**: every call goes through one connection, and
///   each batch's statement is sent before the next call's (see
///   [`enqueue_batch`](DurableSink::enqueue_batch)), so batches handed over
///   in order are stored in order while their answers are awaited
///   concurrently.
/// - **Retries are safe**: an event whose id is already stored for the same
///   source gets its existing position back, so retrying after a timeout or
///   a lost connection (outcome unknown) stores nothing twice.
///
/// Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct OutboxSink {
    inner: Arc<Inner>,
}

struct Inner {
    config: OutboxConfig,
    slot: Slot,
    log: Arc<str>,
}

impl std::fmt::Debug for OutboxSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxSink").field("log", &self.inner.log).finish_non_exhaustive()
    }
}

/// The index of each prepared statement in [`Conn::statements`].
const APPEND: usize = 0;
const HEALTH: usize = 1;

impl OutboxSink {
    /// Connect, create the outbox objects if configured to, and prepare the
    /// statements. Fails if PostgreSQL cannot be reached within
    /// `connect_timeout_ms`; afterwards the sink reconnects by itself.
    pub async fn connect(config: OutboxConfig) -> Result<Self, SetupError> {
        config.validate()?;
        let names = config.names();
        let setup = format!("SET statement_timeout = {}", config.timeout_ms);
        let statements = vec![
            format!(
                "SELECT out_ord, out_seq, out_state, out_message FROM {}($1, $2, $3, $4, $5, $6, $7)",
                names.append
            ),
            format!("SELECT 1 FROM {} LIMIT 0", names.table),
        ];
        let slot = Slot::new(&config.connection, "dualstream-outbox", setup, statements)?;
        if config.create_schema {
            slot.connect_once().await?.batch_execute(&Self::schema_sql(&config)).await.map_err(PgError::Db)?;
        }
        let log = config.log_name().into();
        let sink = Self { inner: Arc::new(Inner { config, slot, log }) };
        // Connect now (and so check that the objects exist): a sink that
        // cannot work says so here rather than at the first event.
        sink.inner.slot.start(|_| std::future::ready(Ok(()))).await?.await.map_err(PgError::Db)?;
        Ok(sink)
    }

    /// The configuration.
    pub fn config(&self) -> &OutboxConfig {
        &self.inner.config
    }

    /// The SQL that creates the outbox objects (idempotent), for running in
    /// your own migrations when `create_schema` is off.
    pub fn schema_sql(config: &OutboxConfig) -> String {
        let Names { table, counters, append } = config.names();
        let schema = quote_ident(&config.schema);
        format!(
            r#"
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {table} (
    source_type text        NOT NULL,
    source_id   text        NOT NULL,
    seq         bigint      NOT NULL,
    id          uuid        NOT NULL UNIQUE,
    event_type  text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    payload     bytea       NOT NULL,
    headers     jsonb       NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_type, source_id, seq)
);
CREATE TABLE IF NOT EXISTS {counters} (
    source_type text   NOT NULL,
    source_id   text   NOT NULL,
    last_seq    bigint NOT NULL,
    PRIMARY KEY (source_type, source_id)
);
-- Appends a batch in order, each event in a subtransaction of its own. An
-- event that fails fails alone, but the later events of its source are not
-- tried (out_state 'EARLIER'), so none overtakes it. An event id already
-- stored for the same source answers its stored seq (an idempotent retry).
CREATE OR REPLACE FUNCTION {append}(
    p_ids text[], p_source_types text[], p_source_ids text[], p_event_types text[],
    p_occurred_at timestamptz[], p_payloads bytea[], p_headers text[])
RETURNS TABLE (out_ord int, out_seq bigint, out_state text, out_message text)
LANGUAGE plpgsql AS $fn$
DECLARE
    failed_sources text[] := '{{}}';
    source_key text;
    stored_seq bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        out_ord := i;
        out_seq := NULL;
        out_state := NULL;
        out_message := NULL;
        -- A source type holds no ':', so the key is unambiguous.
        source_key := p_source_types[i] || ':' || p_source_ids[i];
        IF source_key = ANY (failed_sources) THEN
            out_state := '{EARLIER}';
        ELSE
            BEGIN
                SELECT o.seq INTO stored_seq FROM {table} o
                 WHERE o.id = p_ids[i]::uuid AND o.source_type = p_source_types[i] AND o.source_id = p_source_ids[i];
                IF stored_seq IS NULL THEN
                    INSERT INTO {counters} AS c (source_type, source_id, last_seq)
                    VALUES (p_source_types[i], p_source_ids[i], 1)
                    ON CONFLICT (source_type, source_id) DO UPDATE SET last_seq = c.last_seq + 1
                    RETURNING c.last_seq INTO stored_seq;
                    INSERT INTO {table} (source_type, source_id, seq, id, event_type, occurred_at, payload, headers)
                    VALUES (p_source_types[i], p_source_ids[i], stored_seq, p_ids[i]::uuid, p_event_types[i],
                            p_occurred_at[i], p_payloads[i], p_headers[i]::jsonb);
                END IF;
                out_seq := stored_seq;
            EXCEPTION WHEN OTHERS THEN
                failed_sources := failed_sources || source_key;
                out_state := SQLSTATE;
                out_message := SQLERRM;
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$fn$;
"#
        )
    }

    /// Send one batch's append; its answer is still to come.
    async fn hand_over(&self, events: &Arc<Vec<Event>>) -> Result<Sent<Answer<Vec<Row>>>, PgError> {
        let events = events.clone();
        self.inner.slot.start(move |conn| async move { append(&conn, &events).await }).await
    }
}

/// The append statement for a batch, as arrays (one round trip).
async fn append(conn: &Conn, events: &[Event]) -> Answer<Vec<Row>> {
    let ids: Vec<String> = events.iter().map(|e| e.id().to_string()).collect();
    let source_types: Vec<&str> = events.iter().map(|e| e.source().source_type()).collect();
    let source_ids: Vec<&str> = events.iter().map(|e| e.source().source_id()).collect();
    let event_types: Vec<&str> = events.iter().map(Event::event_type).collect();
    let occurred_at: Vec<SystemTime> = events.iter().map(Event::occurred_at).collect();
    let payloads: Vec<&[u8]> = events.iter().map(|e| &e.payload()[..]).collect();
    let headers: Vec<String> =
        events.iter().map(|e| serde_json::to_string(e.headers()).unwrap_or_else(|_| "{}".to_owned())).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
        [&ids, &source_types, &source_ids, &event_types, &occurred_at, &payloads, &headers];
    conn.client.query(&conn.statements[APPEND], &params).await
}

/// The sources of a batch that failed: their later events fail with
/// [`SinkError::EarlierFailed`].
#[derive(Default)]
struct FailedSources(HashMap<Source, (String, bool)>);

impl FailedSources {
    fn earlier(&self, source: &Source) -> Option<SinkError> {
        let (earlier, retriable) = self.0.get(source)?;
        Some(SinkError::EarlierFailed { earlier: earlier.clone(), retriable: *retriable })
    }

    fn fail(&mut self, event: Event, error: SinkError) -> DeliveryError {
        self.0.entry(event.source().clone()).or_insert_with(|| (error.to_string(), error.is_retriable()));
        DeliveryError::new(error, event)
    }
}

/// What the append function answered for one event.
enum Outcome {
    Stored(i64),
    /// Not tried: an earlier event of its source failed.
    Earlier,
    Failed {
        state: String,
        message: String,
    },
    /// No row, or not the row's expected shape.
    Missing,
}

impl Outcome {
    fn of(row: Option<&Row>) -> Self {
        let Some(row) = row else {
            return Self::Missing;
        };
        match (row.try_get::<_, Option<i64>>(1), row.try_get::<_, Option<String>>(2)) {
            (Ok(Some(seq)), Ok(None)) => Self::Stored(seq),
            (_, Ok(Some(state))) if state == EARLIER => Self::Earlier,
            (_, Ok(Some(state))) => {
                let message = row.try_get::<_, Option<String>>(3).ok().flatten().unwrap_or_default();
                Self::Failed { state, message }
            }
            _ => Self::Missing,
        }
    }
}

/// One result per event from the append function's rows.
fn from_rows(events: Vec<Event>, rows: Vec<Row>, log: &Arc<str>) -> Vec<Result<Position, DeliveryError>> {
    let mut failed = FailedSources::default();
    let mut rows = rows.iter();
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let error = match Outcome::of(rows.next()) {
            Outcome::Stored(seq) => {
                out.push(Ok(Position::new(log.clone(), 0, seq)));
                continue;
            }
            Outcome::Earlier => failed.earlier(event.source()).unwrap_or_else(|| {
                SinkError::other("not tried: an earlier event of the same source in this batch failed")
            }),
            Outcome::Failed { state, message } => sqlstate_error(&state, format!("{message} [SQLSTATE {state}]")),
            Outcome::Missing => SinkError::other("the outbox append function returned no result for this event"),
        };
        out.push(Err(failed.fail(event, error)));
    }
    out
}

/// Every event of a batch failed as a whole: the first of each source with
/// the error, the later ones with [`SinkError::EarlierFailed`].
fn fail_all(events: Vec<Event>, error: &PgError) -> Vec<Result<Position, DeliveryError>> {
    let mut failed = FailedSources::default();
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let e = failed.earlier(event.source()).unwrap_or_else(|| error.sink_error());
        out.push(Err(failed.fail(event, e)));
    }
    out
}

#[async_trait]
impl DurableSink for OutboxSink {
    async fn publish(&self, event: Event) -> Result<Position, DeliveryError> {
        let again = event.clone();
        match self.enqueue_batch(vec![event]).await.await.pop() {
            Some(result) => result,
            None => Err(DeliveryError::new(SinkError::other("no result"), again)),
        }
    }

    async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<Position, DeliveryError>> {
        self.enqueue_batch(events).await.await
    }

    /// Sends the batch's statement before returning (so the next call's goes
    /// after it), and awaits its answer in the returned future, within
    /// `timeout_ms`.
    async fn enqueue_batch(&self, events: Vec<Event>) -> PendingAcks {
        if events.is_empty() {
            return Box::pin(std::future::ready(Vec::new()));
        }
        let events = Arc::new(events);
        let sent = self.hand_over(&events).await;
        let (log, bound) = (self.inner.log.clone(), self.inner.config.timeout());
        Box::pin(async move {
            let answer = match sent {
                Ok(sent) => answer(sent, bound).await,
                Err(e) => Err(e),
            };
            // The request (and its share of the events) is done or dropped.
            let events = Arc::try_unwrap(events).unwrap_or_else(|shared| shared.as_ref().clone());
            match answer {
                Ok(rows) => from_rows(events, rows, &log),
                Err(e) => {
                    tracing::debug!(error = %e, count = events.len(), "outbox append failed");
                    fail_all(events, &e)
                }
            }
        })
    }

    /// The outbox table answers a query on the sink's connection.
    async fn health_check(&self) -> Result<(), SinkError> {
        let query = |conn: Arc<Conn>| async move { conn.client.query(&conn.statements[HEALTH], &[]).await };
        self.inner.slot.call(self.inner.config.timeout(), query).await.map(drop).map_err(|e| e.sink_error())
    }

    /// A query sent behind everything handed over so far: the server answers
    /// it once those are done. Nothing to wait for without a connection.
    async fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        let barrier = async {
            let sent = self
                .inner
                .slot
                .start_if_connected(|conn| async move { conn.client.simple_query("SELECT 1").await.map(drop) })
                .await?;
            match sent {
                Some(answer) => answer.await.map_err(PgError::Db),
                None => Ok(()),
            }
        };
        match tokio::time::timeout(timeout, barrier).await {
            Ok(result) => result.map_err(|e| e.sink_error()),
            Err(_) => Err(SinkError::Timeout { deadline: timeout }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_quoted() {
        let bad = OutboxConfig { table: "x".repeat(56), ..Default::default() };
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { field: "table", .. })));
        let bad = OutboxConfig { schema: "a;drop".into(), ..Default::default() };
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { field: "schema", .. })));
        let config = OutboxConfig { schema: "App".into(), table: "outbox".into(), ..Default::default() };
        config.validate().expect("valid");
        assert_eq!(config.log_name(), "App.outbox");
        let names = config.names();
        assert_eq!(names.table, r#""App"."outbox""#);
        assert_eq!(names.counters, r#""App"."outbox_sources""#);
        assert!(OutboxSink::schema_sql(&config).contains(r#"FUNCTION "App"."outbox_append"("#));
    }

    #[test]
    fn a_failed_batch_fails_later_events_of_a_source_as_earlier_failed() {
        let e = |s: &str| Event::builder("t", "user", s).build().expect("valid");
        let results = fail_all(vec![e("a"), e("b"), e("a")], &PgError::Unavailable("down".into()));
        let errors: Vec<SinkError> = results.into_iter().map(|r| r.expect_err("failed").error).collect();
        assert!(matches!(&errors[0], SinkError::Broker { retriable: true, .. }), "{:?}", errors[0]);
        assert!(matches!(&errors[1], SinkError::Broker { retriable: true, .. }));
        assert!(matches!(&errors[2], SinkError::EarlierFailed { retriable: true, .. }), "{:?}", errors[2]);
    }
}
