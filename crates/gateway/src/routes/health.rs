//! `GET /healthz` (the process answers) and `GET /readyz` (Kafka answers;
//! the whole readiness document for an admin token), and the health check
//! behind them and the dashboard.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;
use crate::state::{AppState, Health};
use crate::wire::{Clients, HubHealth, KafkaHealth, Readiness, Ready, RedisHealth};

/// `GET /healthz`.
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: `{"ready": ...}` for anyone (load balancers); the whole
/// document for an admin token.
pub(crate) async fn readyz(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let detail = match super::admin::admin(&state, &headers, None) {
        Ok(a) => a.is_some(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let doc = readiness(&state).await;
    let status = if doc.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    if detail {
        (status, Json(doc)).into_response()
    } else {
        (status, Json(Ready { ready: doc.ready })).into_response()
    }
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
        .unwrap_or_else(|_| (Err(dualstream_core::SinkError::Timeout { deadline: Duration::from_secs(5) }), None));
    let h = Health { kafka: kafka.map_err(|e| e.to_string()), redis: redis.map(|r| r.map_err(|e| e.to_string())) };
    *last = Some((tokio::time::Instant::now(), h.clone()));
    h
}

/// The readiness document: Kafka decides; Redis is reported with the
/// breaker state (it is best effort, so a Redis outage leaves the gateway
/// ready).
pub(crate) async fn readiness(state: &AppState) -> Readiness {
    let Health { kafka, redis } = health(state).await;
    let stats = state.notifier.stats();
    let hub = state.hub.stats().await.ok();
    let (items_shared, items_rendered) = state.renders.counts();
    Readiness {
        clients: Clients {
            buffered_bytes: state.buffered_bytes.load(Ordering::Relaxed),
            items_rendered,
            items_shared,
            far_items_paced: state.far_items_paced.load(Ordering::Relaxed),
            sse: state.sse_clients.load(Ordering::Relaxed),
            ws: state.ws_clients.load(Ordering::Relaxed),
        },
        health_checks: state.health_checks.load(Ordering::Relaxed),
        history: state.catchup.stats().into(),
        live_checks: state.catchup.live_checks().into(),
        hub: hub.map(|h| HubHealth {
            channels: h.channels,
            connected: h.connected,
            disconnects: h.disconnects,
            missed: h.missed,
            patterns: h.patterns,
            queued: h.queued,
            subscribers: h.subscribers,
        }),
        kafka: KafkaHealth { error: kafka.as_ref().err().cloned(), ok: kafka.is_ok() },
        queue: state.engine.queued(),
        ready: kafka.is_ok(),
        redis: RedisHealth {
            breaker: format!("{:?}", stats.breaker).to_lowercase(),
            error: redis.as_ref().and_then(|r| r.as_ref().err()).cloned(),
            failed: stats.failed,
            ok: matches!(redis, Some(Ok(()))),
            published: stats.published,
            skipped: stats.skipped,
        },
    }
}
