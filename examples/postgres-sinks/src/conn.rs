//! One PostgreSQL connection shared by every call of a sink, made on demand,
//! with requests started in call order; and how PostgreSQL's errors map onto
//! the sink contract's.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use dualstream_core::{NotifyError, SinkError};
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls, Statement};

/// The URL used when none is given: the local server with trust
/// authentication that these machines run.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How to reach PostgreSQL; part of both sinks' configurations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionConfig {
    /// A URL (`postgres://user:password@host:port/db?application_name=x`)
    /// or a `key=value` string, as libpq takes. Default: [`DEFAULT_URL`].
    pub url: String,
    /// Bound on making a connection (TCP, authentication, session settings,
    /// statement preparation), in milliseconds. Default: 5,000.
    pub connect_timeout_ms: u64,
    /// After a failed connection attempt, calls fail at once for this long
    /// before the next attempt, in milliseconds, so that a database that is
    /// down costs callers nothing. Default: 500.
    pub reconnect_backoff_ms: u64,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self { url: DEFAULT_URL.to_owned(), connect_timeout_ms: 5_000, reconnect_backoff_ms: 500 }
    }
}

impl ConnectionConfig {
    fn parse(&self, application_name: &str) -> Result<tokio_postgres::Config, ConfigError> {
        let mut pg: tokio_postgres::Config = self.url.parse().map_err(ConfigError::Url)?;
        if pg.get_application_name().is_none() {
            pg.application_name(application_name);
        }
        pg.connect_timeout(Duration::from_millis(self.connect_timeout_ms));
        Ok(pg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_range("connection.connect_timeout_ms", self.connect_timeout_ms, 1..=600_000)?;
        check_range("connection.reconnect_backoff_ms", self.reconnect_backoff_ms, 0..=600_000)
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field has a bad value.
    #[error("config: {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The connection URL does not parse.
    #[error("config: connection.url: {0}")]
    Url(#[source] tokio_postgres::Error),
}

pub(crate) fn check_range(
    field: &'static str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    let reason = format!("{value} is outside {}..={}", range.start(), range.end());
    Err(ConfigError::Invalid { field, reason })
}

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// No connection: the last attempt failed and the next one is not due yet.
    #[error("PostgreSQL unavailable (retrying after the backoff): {0}")]
    Unavailable(String),
    /// No answer within the bound.
    #[error("no answer from PostgreSQL within {0:?}")]
    Timeout(Duration),
    /// The server or the client library reported an error.
    #[error("{}", describe(.0))]
    Db(#[source] tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

/// A server error as its message, detail and SQLSTATE; anything else
/// (connection refused, connection closed) as the client library says it.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
            format!("{}{detail} [SQLSTATE {}]", db.message(), db.code().code())
        }
        None => {
            let cause = std::error::Error::source(e).map(|c| format!(": {c}")).unwrap_or_default();
            format!("{e}{cause}")
        }
    }
}

impl PgError {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Self::Db(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// The sink contract's error for this failure; a new value on every
    /// call, for each event of a failed batch.
    pub(crate) fn sink_error(&self) -> SinkError {
        match (self, self.sqlstate()) {
            (Self::Timeout(deadline), _) => SinkError::Timeout { deadline: *deadline },
            (_, Some(state)) => sqlstate_error(state, self.to_string()),
            // Refused, reset or closed: the outcome of a statement in flight
            // is unknown, and trying again is safe (the append is idempotent
            // by event id).
            _ => SinkError::Broker { message: self.to_string(), retriable: true },
        }
    }

    /// The notifier contract's error for this failure.
    pub(crate) fn notify_error(self) -> NotifyError {
        match self {
            Self::Timeout(after) => NotifyError::Timeout { after },
            Self::Db(e) if e.code().is_some() => NotifyError::Other(Box::new(PgError::Db(e))),
            other => NotifyError::Connection(other.to_string()),
        }
    }
}

/// The sink error for a SQLSTATE: the event's data broke a rule (class 22,
/// data exception; 23, integrity constraint) and can never be stored as it
/// is; the server was busy, shutting down, out of resources or gave up on a
/// lock or a timeout (classes 08, 40, 53, 55, 57) and trying again may
/// succeed; anything else (a missing table, no privilege) needs someone to
/// fix the database.
pub(crate) fn sqlstate_error(state: &str, message: String) -> SinkError {
    match state.get(..2).unwrap_or_default() {
        "22" | "23" => SinkError::Rejected { reason: message },
        "08" | "40" | "53" | "55" | "57" => SinkError::Broker { message, retriable: true },
        _ => SinkError::Broker { message, retriable: false },
    }
}

/// Quote an identifier for SQL text.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A connection and the statements prepared on it.
pub(crate) struct Conn {
    pub(crate) client: Client,
    pub(crate) statements: Vec<Statement>,
    /// A request on it failed in a way that ends the session: the next call
    /// makes a new connection even if the client has not noticed yet.
    lost: AtomicBool,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.lost.load(Ordering::Relaxed) && !self.client.is_closed()
    }
}

/// Whether an error means the session is gone: the connection closed or
/// broke, or the server ended it (SQLSTATE 08xxx, connection exception;
/// 57P01..57P03, shut down by an administrator, a crash or a restart).
fn session_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || match e.as_db_error() {
            Some(db) => db.code().code().starts_with("08") || db.code().code().starts_with("57P0"),
            // Not the server's: I/O, protocol, or the client's own.
            None => true,
        }
}

/// A request that was sent; its answer is still to come.
pub(crate) type Sent<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the server answered to a request.
pub(crate) type Answer<T> = Result<T, tokio_postgres::Error>;

#[derive(Default)]
struct State {
    conn: Option<Arc<Conn>>,
    /// The last failed attempt: until when calls fail at once, and why.
    failed: Option<(Instant, String)>,
}

/// The one connection of a sink.
pub(crate) struct Slot {
    pg: tokio_postgres::Config,
    config: ConnectionConfig,
    /// Session settings, run on every new connection.
    setup: String,
    /// Prepared on every new connection, in this order.
    statements: Vec<String>,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("statements", &self.statements).finish_non_exhaustive()
    }
}

impl Slot {
    pub(crate) fn new(
        config: &ConnectionConfig,
        application_name: &str,
        setup: String,
        statements: Vec<String>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let pg = config.parse(application_name)?;
        Ok(Self { pg, config: config.clone(), setup, statements, state: Default::default() })
    }

    /// A new connection of its own, outside the slot (for one-off work such
    /// as creating the schema), with the session settings run.
    pub(crate) async fn connect_once(&self) -> Result<Client, PgError> {
        self.bounded(self.open()).await
    }

    async fn connect(&self) -> Result<Conn, PgError> {
        self.bounded(async {
            let client = self.open().await?;
            let mut statements = Vec::with_capacity(self.statements.len());
            for sql in &self.statements {
                statements.push(client.prepare(sql).await?);
            }
            Ok(Conn { client, statements, lost: AtomicBool::new(false) })
        })
        .await
    }

    async fn open(&self) -> Result<Client, PgError> {
        let (client, connection) = self.pg.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        if !self.setup.is_empty() {
            client.batch_execute(&self.setup).await?;
        }
        Ok(client)
    }

    /// Making a connection, within `connect_timeout_ms`.
    async fn bounded<T>(&self, connecting: impl Future<Output = Result<T, PgError>>) -> Result<T, PgError> {
        let bound = Duration::from_millis(self.config.connect_timeout_ms);
        tokio::time::timeout(bound, connecting).await.map_err(|_| PgError::Timeout(bound))?
    }

    /// The open connection, or a new one (unless `connect` is false, or the
    /// last attempt failed within the backoff).
    async fn ensure(&self, state: &mut State, connect: bool) -> Result<Option<Arc<Conn>>, PgError> {
        if let Some(conn) = state.conn.as_ref().filter(|c| c.usable()) {
            return Ok(Some(conn.clone()));
        }
        state.conn = None;
        if !connect {
            return Ok(None);
        }
        if let Some((until, why)) = &state.failed {
            if Instant::now() < *until {
                return Err(PgError::Unavailable(why.clone()));
            }
        }
        match self.connect().await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                *state = State { conn: Some(conn.clone()), failed: None };
                Ok(Some(conn))
            }
            Err(e) => {
                let until = Instant::now() + Duration::from_millis(self.config.reconnect_backoff_ms);
                state.failed = Some((until, e.to_string()));
                Err(e)
            }
        }
    }

    /// Start a request on the shared connection, connecting first if need
    /// be, and return its answer still to come.
    ///
    /// The calls before this one have sent theirs (the lock is fair, so this
    /// is call order); `make` builds the request's future, which is polled
    /// once here, under the lock. tokio-postgres sends a request when its
    /// future is first polled (a prepared statement: one message), and the
    /// server runs one connection's requests in the order it got them, so
    /// requests run in call order while their answers are awaited
    /// concurrently (pipelining). A request that fails because the session
    /// is gone marks the connection so that the next call reconnects.
    pub(crate) async fn start<F, T>(&self, make: impl FnOnce(Arc<Conn>) -> F) -> Result<Sent<Answer<T>>, PgError>
    where
        F: Future<Output = Answer<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.start_with(true, make).await?.ok_or_else(|| PgError::Unavailable("not connected".into()))
    }

    /// [`start`](Self::start), then the answer within `bound`.
    pub(crate) async fn call<F, T>(&self, bound: Duration, make: impl FnOnce(Arc<Conn>) -> F) -> Result<T, PgError>
    where
        F: Future<Output = Answer<T>> + Send + 'static,
        T: Send + 'static,
    {
        answer(self.start(make).await?, bound).await
    }

    /// [`start`](Self::start) on the open connection only: `None` if there
    /// is none.
    pub(crate) async fn start_if_connected<F, T>(
        &self,
        make: impl FnOnce(Arc<Conn>) -> F,
    ) -> Result<Option<Sent<Answer<T>>>, PgError>
    where
        F: Future<Output = Answer<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.start_with(false, make).await
    }

    async fn start_with<F, T>(
        &self,
        connect: bool,
        make: impl FnOnce(Arc<Conn>) -> F,
    ) -> Result<Option<Sent<Answer<T>>>, PgError>
    where
        F: Future<Output = Answer<T>> + Send + 'static,
        T: Send + 'static,
    {
        let mut state = self.state.lock().await;
        let Some(conn) = self.ensure(&mut state, connect).await? else {
            return Ok(None);
        };
        let request = make(conn.clone());
        let mut request = Box::pin(async move {
            let answer = request.await;
            if answer.as_ref().is_err_and(session_lost) {
                conn.lost.store(true, Ordering::Relaxed);
            }
            answer
        });
        let sent: Sent<Answer<T>> = match futures::poll!(request.as_mut()) {
            Poll::Ready(answer) => Box::pin(std::future::ready(answer)),
            Poll::Pending => request,
        };
        drop(state);
        Ok(Some(sent))
    }
}

/// Await a request's answer within `bound`.
pub(crate) async fn answer<T>(sent: Sent<Answer<T>>, bound: Duration) -> Result<T, PgError> {
    tokio::time::timeout(bound, sent).await.map_err(|_| PgError::Timeout(bound))?.map_err(PgError::Db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_retriability() {
        let m = || "m".to_owned();
        assert!(matches!(sqlstate_error("23514", m()), SinkError::Rejected { .. }), "check constraint");
        assert!(matches!(sqlstate_error("22P02", m()), SinkError::Rejected { .. }), "bad text representation");
        assert!(sqlstate_error("40001", m()).is_retriable(), "serialization failure");
        assert!(sqlstate_error("57P01", m()).is_retriable(), "admin shutdown");
        assert!(sqlstate_error("57014", m()).is_retriable(), "statement timeout");
        assert!(sqlstate_error("08006", m()).is_retriable(), "connection failure");
        assert!(!sqlstate_error("42P01", m()).is_retriable(), "undefined table");
        assert!(!sqlstate_error("", m()).is_retriable());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("events:user:a\"b"), "\"events:user:a\"\"b\"");
    }

    #[test]
    fn config_is_checked() {
        let bad = ConnectionConfig { connect_timeout_ms: 0, ..Default::default() };
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { field: "connection.connect_timeout_ms", .. })));
        let url = ConnectionConfig { url: "postgres://h:notaport/db".into(), ..Default::default() };
        assert!(matches!(url.parse("x"), Err(ConfigError::Url(_))));
        let named = ConnectionConfig { url: format!("{DEFAULT_URL}?application_name=mine"), ..Default::default() };
        assert_eq!(named.parse("x").expect("parses").get_application_name(), Some("mine"));
        assert_eq!(ConnectionConfig::default().parse("x").expect("parses").get_application_name(), Some("x"));
    }
}
