//! What only an admin token sees (the `admin` claim): `GET /metrics`, and
//! the live dashboard, a static page at `GET /` fed by the SSE endpoint
//! `GET /v1/dashboard`, which sends the gateway's state once a second.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::StreamExt;

use dualstream_redis::BreakerState;

use crate::auth::{AuthError, Verified};
use crate::error::ApiError;
use crate::origin::Check;
use crate::state::AppState;
use crate::wire::{to_json, DashboardState};

/// The admin's token, when the request sends one: `Ok(None)` with no
/// credentials, an error for a bad token or one without `admin`.
pub(crate) fn admin(
    state: &AppState,
    headers: &HeaderMap,
    ticket: Option<&str>,
) -> Result<Option<Verified>, AuthError> {
    let has_cookie = headers.get_all(header::COOKIE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(';').any(|kv| kv.trim().starts_with(&format!("{}=", state.config.auth.cookie))))
    });
    if ticket.is_none() && headers.get(header::AUTHORIZATION).is_none() && !has_cookie {
        return Ok(None);
    }
    match state.auth.for_stream(headers, ticket, Check::Safe)? {
        v if v.is_admin() => Ok(Some(v)),
        _ => Err(AuthError::Forbidden("this needs a token with the admin claim".into())),
    }
}

/// An admin's token, required: no credentials is `missing_token`.
fn require_admin(state: &AppState, headers: &HeaderMap, ticket: Option<&str>) -> Result<Verified, ApiError> {
    let admin = admin(state, headers, ticket)?;
    Ok(admin.ok_or_else(|| AuthError::Missing { cookie: state.config.auth.cookie.clone() })?)
}

/// `GET /metrics`: for an admin token only (Prometheus sends it with
/// `authorization: {credentials: ...}`).
pub(crate) async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = require_admin(&state, &headers, None) {
        return e.into_response();
    }
    match &state.metrics {
        Some(h) => {
            export(&state).await;
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no Prometheus recorder is installed in this process\n").into_response(),
    }
}

/// Set the metrics read from the components' own counters, just before a
/// scrape renders them (docs/observability.md).
pub(crate) async fn export(state: &AppState) {
    use crate::metric_names as m;
    metrics::gauge!(m::BUFFERED_BYTES).set(state.buffered_bytes.load(Ordering::Relaxed) as f64);
    let n = state.notifier.stats();
    let breaker = match n.breaker {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    };
    metrics::gauge!(m::BREAKER).set(breaker);
    for (result, v) in
        [("published", n.published), ("skipped", n.skipped), ("failed", n.failed), ("timed_out", n.timed_out)]
    {
        metrics::counter!(m::REDIS_NOTIFICATIONS, "result" => result).absolute(v);
    }
    if let Ok(h) = state.hub.stats().await {
        metrics::gauge!(m::HUB_SUBSCRIBERS).set(h.subscribers as f64);
        metrics::gauge!(m::HUB_CONNECTED).set(if h.connected { 1.0 } else { 0.0 });
        metrics::counter!(m::HUB_MISSED).absolute(h.missed);
        metrics::counter!(m::HUB_DISCONNECTS).absolute(h.disconnects);
    }
    let s = state.catchup.stats();
    metrics::gauge!(m::HISTORY_CONSUMERS).set(s.consumers as f64);
    metrics::counter!(m::CONSUMED_MESSAGES, "messaging_system" => "kafka", "messaging_operation_name" => "receive")
        .absolute(s.records_read);
    metrics::counter!(m::HISTORY_READS, "served" => "kafka")
        .absolute(s.range_reads.saturating_sub(s.range_reads_cached));
    metrics::counter!(m::HISTORY_READS, "served" => "cache").absolute(s.range_reads_cached);
    metrics::counter!(m::HISTORY_BACKFILL_READS).absolute(s.backfill_reads);
    metrics::counter!(m::HISTORY_PARKED_DROPPED).absolute(s.parked_dropped);
    metrics::gauge!(m::HISTORY_CACHED_BYTES).set(s.cached_bytes as f64);
    let lag = state.catchup.lag();
    metrics::gauge!(m::JOINS).set(lag.joins as f64);
    metrics::gauge!(m::JOIN_LAG_MAX).set(lag.max as f64);
    metrics::gauge!(m::JOIN_LAG).set(lag.sum as f64);
}

/// `GET /`.
pub(crate) async fn page() -> Html<&'static str> {
    Html(include_str!("../../assets/dashboard.html"))
}

/// `GET /v1/dashboard`: one `state` event per second, for an admin token
/// (`Authorization`, the cookie, or `?ticket=` from a dashboard ticket).
pub(crate) async fn feed(State(state): State<Arc<AppState>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let ticket = super::ticket_param(raw.as_deref());
    if let Err(e) = require_admin(&state, &headers, ticket.as_deref()) {
        return e.into_response();
    }
    let mut shutdown = state.shutdown.subscribe();
    let ticks = futures::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let doc = dashboard_state(&state).await;
        Some((Ok::<_, Infallible>(SseEvent::default().event("state").data(to_json(&doc))), (state, false)))
    });
    let stream = ticks.take_until(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// The readiness document, the counts per source type and the latest
/// events stored.
async fn dashboard_state(state: &AppState) -> DashboardState {
    let health = super::health::readiness(state).await;
    let d = state.dashboard.lock().unwrap_or_else(PoisonError::into_inner);
    DashboardState { counts: d.counts.clone(), health, latest: d.latest.iter().cloned().collect() }
}
