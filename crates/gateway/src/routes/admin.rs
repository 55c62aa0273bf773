//! What only an admin token sees (the `admin` claim): `GET /metrics`, and
//! the live dashboard, a static page at `GET /` fed by the SSE endpoint
//! `GET /v1/dashboard`, which sends the gateway's state once a second.

use std::convert::Infallible;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::StreamExt;

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
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "no Prometheus recorder is installed in this process\n").into_response(),
    }
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
