//! **dualstream-gateway**: the HTTP layer of the dual-stream pattern
//! (PATTERN §9). Producers `POST` events, which go through the batching
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
//! | `POST /v1/tickets` | a short-lived ticket for `EventSource` |
//! | `GET /healthz`, `/readyz`, `/metrics` | operations |
//! | `GET /`, `/v1/dashboard` | the live dashboard and its SSE feed |
//!
//! docs/gateway.md documents the HTTP API, the resume token and the claims.

mod auth;
mod config;
mod dashboard;
mod ingest;
mod session;
mod state;
mod stream;
mod token;

use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
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

pub use auth::{Auth, AuthError, Claims, Verified};
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
            auth: Auth::new(&config.auth).map_err(|e| component("auth")(e.to_string()))?,
            log_hash,
            shutdown,
            sse_clients: AtomicUsize::new(0),
            ws_clients: AtomicUsize::new(0),
            metrics,
            dashboard: Mutex::new(Default::default()),
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
            .route("/v1/events", post(ingest::post_events).layer(DefaultBodyLimit::max(max_body)))
            .route("/v1/stream", get(stream::sse))
            .route("/v1/ws", get(stream::ws))
            .route("/v1/tickets", post(tickets))
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
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let state = Arc::clone(&self.state);
        let shutdown = async move {
            signal.await;
            tracing::info!("shutting down: closing streams, draining ingest");
            let _ = state.shutdown.send(true);
        };
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await?;
        self.state.engine.shutdown().await;
        Ok(())
    }

    /// Close every stream with the reason `shutdown` (and SSE `retry:`)
    /// without waiting for the server to stop.
    pub fn close_streams(&self) {
        let _ = self.state.shutdown.send(true);
    }
}

/// `POST /v1/tickets`: a ticket for `GET /v1/stream?ticket=` or
/// `GET /v1/ws?ticket=`.
async fn tickets(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let result = state.auth.from_headers(&headers).and_then(|v| state.auth.ticket(&v));
    match result {
        Ok((ticket, ttl)) => Json(json!({"ticket": ticket, "expires_in": ttl})).into_response(),
        Err(e) => ingest::error(e.status(), e.code(), &e, json!({})),
    }
}

/// The readiness document: Kafka decides; Redis is reported with the
/// breaker state (it is best effort, so a Redis outage leaves the gateway
/// ready).
pub(crate) async fn readiness(state: &AppState) -> (bool, serde_json::Value) {
    let (kafka, redis) = tokio::time::timeout(Duration::from_secs(5), state.engine.publisher().health_check())
        .await
        .unwrap_or_else(|_| {
            (Err(dualstream_core::SinkError::Timeout { deadline: Duration::from_secs(5) }), None)
        });
    let stats = state.notifier.stats();
    let hub = state.hub.stats().await.ok();
    let breaker = format!("{:?}", stats.breaker).to_lowercase();
    let doc = json!({
        "ready": kafka.is_ok(),
        "kafka": {"ok": kafka.is_ok(), "error": kafka.as_ref().err().map(|e| e.to_string())},
        "redis": {
            "ok": matches!(redis, Some(Ok(()))),
            "error": redis.as_ref().and_then(|r| r.as_ref().err()).map(|e| e.to_string()),
            "breaker": breaker,
            "published": stats.published, "skipped": stats.skipped, "failed": stats.failed,
        },
        "hub": hub.map(|h| json!({"connected": h.connected, "channels": h.channels, "patterns": h.patterns,
            "subscribers": h.subscribers, "disconnects": h.disconnects})),
        "queue": state.engine.queued(),
        "clients": {"sse": state.sse_clients.load(std::sync::atomic::Ordering::Relaxed),
            "ws": state.ws_clients.load(std::sync::atomic::Ordering::Relaxed)},
    });
    (kafka.is_ok(), doc)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (ready, doc) = readiness(&state).await;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(doc)).into_response()
}

async fn metrics_page(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(h) => {
            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no Prometheus recorder is installed in this process\n").into_response(),
    }
}
