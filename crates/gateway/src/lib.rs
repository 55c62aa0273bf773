//! **dualstream-gateway**: the HTTP layer of the dual-stream pattern
//! (docs/design.md, "The gateway"). Producers `POST` events, which go through the batching
//! engine to Kafka and Redis; browsers and services read them over SSE or
//! WebSocket, each item with its Kafka position, and resume after a
//! disconnect with no gap and no duplicate across all their channels.
//!
//! ```no_run
//! use dualstream_gateway::{Gateway, GatewayConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = GatewayConfig {
//!     auth: dualstream_gateway::AuthConfig { secret: "a secret of at least 32 bytes....".into(), ..Default::default() },
//!     ..GatewayConfig::default()
//! };
//! let gateway = Gateway::new(config).await?;
//! let listener = tokio::net::TcpListener::bind(gateway.config().listen).await?;
//! gateway.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/events` | ingest: one JSON event, a JSON array, or NDJSON |
//! | `GET /v1/stream` | SSE: `channel=`, `pattern=`, `mode=notify\|full` |
//! | `GET /v1/ws` | WebSocket: JSON `subscribe` / `unsubscribe` commands |
//! | `POST /v1/tickets` | a short-lived, single-use ticket for `EventSource` |
//! | `POST /v1/session` | sets the token cookie (`HttpOnly; Secure; SameSite=Strict`) |
//! | `GET /healthz`, `/readyz`, `/metrics` | operations (`/metrics` and the detail of `/readyz`: admin) |
//! | `GET /`, `/v1/dashboard` | the live dashboard and its SSE feed (admin) |
//!
//! docs/gateway.md documents the HTTP API, the resume token and the claims;
//! docs/security.md the threat model and the settings that answer it.

mod auth;
mod config;
mod dashboard;
mod ingest;
mod limits;
mod origin;
mod session;
mod state;
mod stream;
mod token;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dualstream_batch::BatchEngine;
use dualstream_consumer::{CatchUp, Hub, Replay};
use dualstream_kafka::KafkaSink;
use dualstream_publisher::DualPublisher;
use dualstream_redis::RedisNotifier;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::sync::watch;

pub use auth::{session_cookie, Auth, AuthError, Claims, Verified};
pub use origin::Check;
pub use config::{AuthConfig, ConfigError, GatewayConfig, GatewayLimits};
#[doc(hidden)]
pub use ingest::{parse_ingest_body, IngestBodyError};
pub use session::{CloseReason, Mode};
pub use token::{ResumeToken, TokenError, MAX_TOKEN_LEN};

use state::AppState;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A component could not be built (its error names the field).
    #[error("{component}: {reason}")]
    Component {
        /// `kafka`, `redis`, `publisher`, `batch`, `replay`, `hub` or `join`.
        component: &'static str,
        /// Why.
        reason: String,
    },
    /// Listening or serving failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// A gateway: cheap to clone; clones share everything.
#[derive(Clone, Debug)]
pub struct Gateway {
    state: Arc<AppState>,
}

fn component(component: &'static str) -> impl Fn(String) -> GatewayError {
    move |reason| GatewayError::Component { component, reason }
}

impl Gateway {
    /// Build the publisher, the batching engine, the hub and the catch-up
    /// joins from a configuration (checked first). Must run inside a Tokio
    /// runtime.
    pub async fn new(config: GatewayConfig) -> Result<Self, GatewayError> {
        Self::with_metrics(config, None).await
    }

    /// Like [`new`](Self::new), serving `/metrics` from a Prometheus
    /// recorder the caller installed.
    pub async fn with_metrics(config: GatewayConfig, metrics: Option<PrometheusHandle>) -> Result<Self, GatewayError> {
        let config = config.resolve()?;
        let kafka = KafkaSink::new(config.kafka.clone()).map_err(|e| component("kafka")(e.to_string()))?;
        let notifier = RedisNotifier::new(config.redis.clone()).map_err(|e| component("redis")(e.to_string()))?;
        let publisher = DualPublisher::builder()
            .durable(Arc::new(kafka))
            .notifier(Arc::new(notifier.clone()))
            .build()
            .map_err(|e| component("publisher")(e.to_string()))?;
        let engine = BatchEngine::new(publisher, config.batch.clone()).map_err(|e| component("batch")(e.to_string()))?;
        let replay = Replay::new(config.replay.clone()).map_err(|e| component("replay")(e.to_string()))?;
        let hub = Hub::new(config.hub.clone()).map_err(|e| component("hub")(e.to_string()))?;
        let catchup =
            CatchUp::new(replay, hub.clone(), config.join.clone()).map_err(|e| component("join")(e.to_string()))?;
        let namer = hub.namer().clone();
        let log_hash = token::hash(&format!("{}/{}", config.stream_id, config.topic));
        let (shutdown, _) = watch::channel(false);
        let state = AppState {
            namer,
            engine,
            hub_patterns: config.hub.cluster_urls.is_empty(),
            notifier,
            hub,
            catchup,
            auth: Auth::new(&config.auth)
                .map_err(|e| component("auth")(e.to_string()))?
                .with_allowed_origins(&config.allowed_origins),
            log_hash,
            shutdown,
            sse_clients: AtomicUsize::new(0),
            ws_clients: AtomicUsize::new(0),
            metrics,
            dashboard: Mutex::new(Default::default()),
            streams: Mutex::new(Default::default()),
            health: tokio::sync::Mutex::new(None),
            health_checks: AtomicU64::new(0),
            config,
        };
        Ok(Self { state: Arc::new(state) })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &GatewayConfig {
        &self.state.config
    }

    /// Sign and verify tokens of this gateway.
    pub fn auth(&self) -> &Auth {
        &self.state.auth
    }

    /// The routes (see the crate docs).
    pub fn router(&self) -> Router {
        let max_body = self.state.config.limits.max_body_bytes;
        let mut router = Router::new()
            .route("/v1/events", post(ingest::post_events))
            .route("/v1/stream", get(stream::sse))
            .route("/v1/ws", get(stream::ws))
            .route("/v1/tickets", post(tickets).layer(DefaultBodyLimit::max(max_body)))
            .route("/v1/session", post(session_route))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_page));
        if self.state.config.dashboard {
            router = router.route("/", get(dashboard::page)).route("/v1/dashboard", get(dashboard::feed));
        }
        router.with_state(Arc::clone(&self.state))
    }

    /// Serve on `listener` until `signal` completes, then shut down
    /// gracefully: streams are closed with a reconnect hint, ingest in
    /// flight finishes, and the batching engine flushes every accepted
    /// event and reports its outcome to its caller.
    ///
    /// At most `limits.max_connections` TCP connections are served at once
    /// (more are answered 503 and closed), and a connection that has not
    /// sent a complete request's headers within
    /// `limits.header_read_timeout_ms` of opening (or of its last response)
    /// is closed.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let limits = &self.state.config.limits;
        let router = self.router();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms));
        let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        let mut signal = std::pin::pin!(signal);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, mostly: wait for some to close.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut signal => break,
            };
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                tokio::spawn(refuse_connection(stream, limits.max_connections));
                continue;
            };
            let _ = stream.set_nodelay(true);
            let router = router.clone();
            let service = hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(limits::PeerAddr(peer));
                tower_service::Service::call(&mut router.clone(), req)
            });
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).with_upgrades();
            let mut shutdown = self.state.shutdown.subscribe();
            tokio::spawn(async move {
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                        // Finish the request in flight, then close.
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                drop(permit);
            });
        }
        tracing::info!("shutting down: closing streams, draining ingest");
        let _ = self.state.shutdown.send(true);
        drop(listener);
        // Every connection holds a permit until it is done.
        let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        let _ = connections.acquire_many(all).await;
        self.state.engine.shutdown().await;
        Ok(())
    }

    /// Close every stream with the reason `shutdown` (and SSE `retry:`)
    /// without waiting for the server to stop.
    pub fn close_streams(&self) {
        let _ = self.state.shutdown.send(true);
    }
}

/// A 503 with `Retry-After` for a connection over `limits.max_connections`,
/// written without reading the request, then the connection is closed.
async fn refuse_connection(mut stream: tokio::net::TcpStream, limit: usize) {
    use tokio::io::AsyncWriteExt as _;
    let body = json!({"error": {"code": "too_many_connections", "field": "limits.max_connections", "limit": limit,
        "message": format!("limits.max_connections = {limit}: the gateway has as many connections as it takes")}})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

pub(crate) fn auth_error(e: &AuthError) -> Response {
    ingest::error(e.status(), e.code(), e, json!({}))
}

/// What `POST /v1/tickets` takes: the channels and patterns the ticket's
/// stream opens, or the dashboard's feed.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TicketRequest {
    channels: Vec<String>,
    patterns: Vec<String>,
    dashboard: bool,
}

/// `POST /v1/tickets`: a single-use ticket for `GET /v1/stream?ticket=`,
/// `GET /v1/ws?ticket=` or `GET /v1/dashboard?ticket=`, bound to the names
/// in the request (each checked against the token now).
async fn tickets(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = match state.auth.from_headers(&headers, Check::Unsafe) {
        Ok(a) => a,
        Err(e) => return auth_error(&e),
    };
    let bad = |message: String| ingest::error(StatusCode::BAD_REQUEST, "invalid_ticket_request", message, json!({}));
    let req: TicketRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("body: {e}; send {{\"channels\": [..], \"patterns\": [..]}} or {{\"dashboard\": true}}")),
    };
    if req.channels.is_empty() && req.patterns.is_empty() && !req.dashboard {
        return bad("channels, patterns: name what the ticket opens (or dashboard: true)".into());
    }
    let wants = match stream::wants(&state, &auth, &req.channels, &req.patterns) {
        Ok(w) => w,
        Err(e) => return ingest::error(e.status(), e.code, &e.message, json!({})),
    };
    let read = wants.iter().map(|w| w.name().to_owned()).collect();
    match state.auth.ticket(&auth, read, req.dashboard) {
        Ok((ticket, ttl)) => Json(json!({"ticket": ticket, "expires_in": ttl})).into_response(),
        Err(e) => auth_error(&e),
    }
}

/// `POST /v1/session`: the token in `Authorization: Bearer` comes back as
/// the cookie, with the attributes it must have (see [`session_cookie`]).
/// Only a bearer token is taken: a page of another site cannot send one.
async fn session_route(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.split_once(' '));
    let Some(("Bearer" | "bearer", token)) = token else {
        return auth_error(&AuthError::Missing { cookie: state.config.auth.cookie.clone() });
    };
    let token = token.trim();
    let v = match state.auth.verify(token) {
        Ok(v) if !v.is_ticket() => v,
        Ok(_) => return auth_error(&AuthError::WrongKind("a ticket is not a session: send the token itself")),
        Err(e) => return auth_error(&e),
    };
    let cookie = session_cookie(&state.config.auth.cookie, token, v.claims.exp);
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response()
}

/// The admin's token, when the request sends one: `Ok(None)` with no
/// credentials, an error for a bad token or one without `admin`.
pub(crate) fn admin(state: &AppState, headers: &HeaderMap, ticket: Option<&str>) -> Result<Option<Verified>, AuthError> {
    let has_cookie = headers.get_all(header::COOKIE).iter().any(|v| {
        v.to_str().is_ok_and(|v| v.split(';').any(|kv| kv.trim().starts_with(&format!("{}=", state.config.auth.cookie))))
    });
    if ticket.is_none() && headers.get(header::AUTHORIZATION).is_none() && !has_cookie {
        return Ok(None);
    }
    match state.auth.for_stream(headers, ticket, Check::Safe)? {
        v if v.is_admin() => Ok(Some(v)),
        _ => Err(AuthError::Forbidden("this needs a token with the admin claim".into())),
    }
}

/// Kafka's and Redis's health, as last checked.
#[derive(Clone, Debug)]
pub(crate) struct Health {
    kafka: Result<(), String>,
    redis: Option<Result<(), String>>,
}

/// Check Kafka and Redis at most once a second, whoever asks: viewers of
/// the dashboard and callers of `/readyz` share the last result.
async fn health(state: &AppState) -> Health {
    let mut last = state.health.lock().await;
    if let Some((at, h)) = &*last {
        if at.elapsed() < Duration::from_secs(1) {
            return h.clone();
        }
    }
    state.health_checks.fetch_add(1, Ordering::Relaxed);
    let (kafka, redis) = tokio::time::timeout(Duration::from_secs(5), state.engine.publisher().health_check())
        .await
        .unwrap_or_else(|_| {
            (Err(dualstream_core::SinkError::Timeout { deadline: Duration::from_secs(5) }), None)
        });
    let h = Health { kafka: kafka.map_err(|e| e.to_string()), redis: redis.map(|r| r.map_err(|e| e.to_string())) };
    *last = Some((tokio::time::Instant::now(), h.clone()));
    h
}

/// The readiness document: Kafka decides; Redis is reported with the
/// breaker state (it is best effort, so a Redis outage leaves the gateway
/// ready).
pub(crate) async fn readiness(state: &AppState) -> (bool, serde_json::Value) {
    let Health { kafka, redis } = health(state).await;
    let stats = state.notifier.stats();
    let hub = state.hub.stats().await.ok();
    let breaker = format!("{:?}", stats.breaker).to_lowercase();
    let doc = json!({
        "ready": kafka.is_ok(),
        "kafka": {"ok": kafka.is_ok(), "error": kafka.as_ref().err()},
        "redis": {
            "ok": matches!(redis, Some(Ok(()))),
            "error": redis.as_ref().and_then(|r| r.as_ref().err()),
            "breaker": breaker,
            "published": stats.published, "skipped": stats.skipped, "failed": stats.failed,
        },
        "hub": hub.map(|h| json!({"connected": h.connected, "channels": h.channels, "patterns": h.patterns,
            "subscribers": h.subscribers, "disconnects": h.disconnects})),
        "queue": state.engine.queued(),
        "clients": {"sse": state.sse_clients.load(Ordering::Relaxed), "ws": state.ws_clients.load(Ordering::Relaxed)},
        "health_checks": state.health_checks.load(Ordering::Relaxed),
    });
    (kafka.is_ok(), doc)
}

/// `GET /readyz`: `{"ready": ...}` for anyone (load balancers); the whole
/// document for an admin token.
async fn readyz(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let detail = match admin(&state, &headers, None) {
        Ok(a) => a.is_some(),
        Err(e) => return auth_error(&e),
    };
    let (ready, doc) = readiness(&state).await;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let doc = if detail { doc } else { json!({"ready": ready}) };
    (status, Json(doc)).into_response()
}

/// `GET /metrics`: for an admin token only (Prometheus sends it with
/// `authorization: {credentials: ...}`).
async fn metrics_page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = admin(&state, &headers, None)
        .and_then(|a| a.ok_or_else(|| AuthError::Missing { cookie: state.config.auth.cookie.clone() }))
    {
        return auth_error(&e);
    }
    match &state.metrics {
        Some(h) => {
            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no Prometheus recorder is installed in this process\n").into_response(),
    }
}
