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
//! let listener = dualstream_gateway::listen(gateway.config().listen)?;
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
//!
//! Where things are: this file holds [`Gateway`], its builder and
//! [`Gateway::router`]; `server.rs` its server loop ([`Gateway::serve`]);
//! `routes/` the handlers, a file per group of routes; `error.rs` the
//! errors and their codes; `wire.rs` every JSON type on the wire;
//! `session.rs` one connection's subscriptions; `auth.rs` the signed tokens
//! (JWTs) and tickets, `origin.rs` the origin checks, `limits.rs` the
//! per-client limits; `resume.rs` the resume token; `ingest.rs` what an
//! ingest body means; `config.rs` the settings; `state.rs` what the
//! handlers share.

mod auth;
mod config;
mod error;
mod ingest;
mod limits;
pub mod metric_names;
mod origin;
mod renders;
mod resume;
mod routes;
mod server;
mod session;
mod state;
#[cfg(feature = "otlp")]
pub mod telemetry;
mod wire;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use dualstream_batch::BatchEngine;
use dualstream_consumer::{CatchUp, Hub, Replay};
use dualstream_kafka::KafkaSink;
use dualstream_publisher::DualPublisher;
use dualstream_redis::RedisNotifier;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

pub use auth::{session_cookie, Auth, AuthError, Claims, Verified};
pub use config::{AuthConfig, ConfigError, GatewayConfig, GatewayLimits};
pub use error::{ErrorCode, GatewayError};
#[doc(hidden)]
pub use ingest::{parse_ingest_body, IngestBodyError};
pub use origin::Check;
pub use resume::{ResumeToken, ResumeTokenError, MAX_RESUME_TOKEN_LEN};
pub use server::{listen, HTTP_BUFFER_BYTES, LISTEN_BACKLOG};
pub use session::{CloseReason, Mode};

use routes::{admin, credentials, health, ingest as ingest_route, stream, ws};
use state::AppState;

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
        let engine =
            BatchEngine::new(publisher, config.batch.clone()).map_err(|e| component("batch")(e.to_string()))?;
        let replay = Replay::new(config.replay.clone()).map_err(|e| component("replay")(e.to_string()))?;
        let hub = Hub::new(config.hub.clone()).map_err(|e| component("hub")(e.to_string()))?;
        let catchup =
            CatchUp::new(replay, hub.clone(), config.join.clone()).map_err(|e| component("join")(e.to_string()))?;
        let namer = hub.namer().clone();
        let log_hash = resume::hash(&format!("{}/{}", config.stream_id, config.topic));
        let (shutdown, _) = watch::channel(false);
        metric_names::register();
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
            buffered_bytes: Arc::default(),
            ws_clients: AtomicUsize::new(0),
            metrics,
            dashboard: Mutex::new(Default::default()),
            streams: Mutex::new(Default::default()),
            far_resumes: Mutex::new(Default::default()),
            far_pace: Mutex::new(Default::default()),
            renders: crate::renders::Renders::new(crate::renders::SLOTS, crate::renders::BYTES),
            health: tokio::sync::Mutex::new(None),
            health_checks: AtomicU64::new(0),
            far_items_paced: AtomicU64::new(0),
            config,
        };
        Ok(Self { state: Arc::new(state) })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &GatewayConfig {
        &self.state.config
    }

    /// Sign and verify the signed tokens (JWTs) of this gateway.
    pub fn auth(&self) -> &Auth {
        &self.state.auth
    }

    /// The routes (see the crate docs).
    pub fn router(&self) -> Router {
        let max_body = self.state.config.limits.max_body_bytes;
        let mut router = Router::new()
            .route("/v1/events", post(ingest_route::post_events))
            .route("/v1/stream", get(stream::sse))
            .route("/v1/ws", get(ws::ws))
            .route("/v1/tickets", post(credentials::tickets).layer(DefaultBodyLimit::max(max_body)))
            .route("/v1/session", post(credentials::session))
            .route("/healthz", get(health::healthz))
            .route("/readyz", get(health::readyz))
            .route("/metrics", get(admin::metrics));
        if self.state.config.dashboard {
            router = router.route("/", get(admin::page)).route("/v1/dashboard", get(admin::feed));
        }
        router.with_state(Arc::clone(&self.state))
    }

    /// Set the metrics that are read from the components' own counters (the
    /// notifier's, the hub's, the shared Kafka readers', the joins' lag).
    /// `/metrics` does this before each scrape; a process that exports
    /// metrics otherwise (OTLP) calls it before each export.
    pub async fn export_metrics(&self) {
        admin::export(&self.state).await;
    }

    /// Close every stream with the reason `shutdown` (and SSE `retry:`)
    /// without waiting for the server to stop.
    pub fn close_streams(&self) {
        let _ = self.state.shutdown.send(true);
    }
}
