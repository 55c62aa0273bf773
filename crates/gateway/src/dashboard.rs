//! The live dashboard: a static page at `/` fed by the SSE endpoint
//! `/v1/dashboard`, which sends the gateway's state once a second.

use std::convert::Infallible;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use crate::state::AppState;

/// `GET /`.
pub(crate) async fn page() -> Html<&'static str> {
    Html(include_str!("../assets/dashboard.html"))
}

/// `GET /v1/dashboard`: one `state` event per second, for an admin token
/// (`Authorization`, the cookie, or `?ticket=` from a dashboard ticket).
pub(crate) async fn feed(State(state): State<Arc<AppState>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let ticket = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "ticket")
        .map(|(_, v)| v.into_owned());
    if let Err(e) = crate::admin(&state, &headers, ticket.as_deref())
        .and_then(|a| a.ok_or_else(|| crate::AuthError::Missing { cookie: state.config.auth.cookie.clone() }))
    {
        return crate::auth_error(&e);
    }
    let mut shutdown = state.shutdown.subscribe();
    let ticks = futures::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (_, health) = crate::readiness(&state).await;
        let (counts, latest) = {
            let d = state.dashboard.lock().unwrap_or_else(PoisonError::into_inner);
            (d.counts.clone(), d.latest.iter().cloned().collect::<Vec<_>>())
        };
        let doc = json!({"health": health, "counts": counts, "latest": latest});
        Some((Ok::<_, Infallible>(SseEvent::default().event("state").data(doc.to_string())), (state, false)))
    });
    let stream = ticks.take_until(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}
