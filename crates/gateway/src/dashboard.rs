//! The live dashboard: a static page at `/` fed by the SSE endpoint
//! `/v1/dashboard`, which sends the gateway's state once a second.

use std::convert::Infallible;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use crate::state::AppState;

/// `GET /`.
pub(crate) async fn page() -> Html<&'static str> {
    Html(include_str!("../assets/dashboard.html"))
}

/// `GET /v1/dashboard`: one `state` event per second.
pub(crate) async fn feed(State(state): State<Arc<AppState>>) -> Response {
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
