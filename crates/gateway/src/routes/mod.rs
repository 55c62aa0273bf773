//! The request handlers, a module per group of routes; `Gateway::router`
//! (lib.rs) puts them together.
//!
//! | module | routes |
//! |---|---|
//! | [`ingest`] | `POST /v1/events` |
//! | [`stream`] | `GET /v1/stream` (SSE) |
//! | [`ws`] | `GET /v1/ws` (WebSocket) |
//! | [`credentials`] | `POST /v1/tickets`, `POST /v1/session` |
//! | [`health`] | `GET /healthz`, `GET /readyz` |
//! | [`admin`] | `GET /metrics`, `GET /` and `GET /v1/dashboard` (the dashboard) |
//!
//! Every refusal is an [`ApiError`](crate::error::ApiError).

pub(crate) mod admin;
pub(crate) mod credentials;
pub(crate) mod health;
pub(crate) mod ingest;
pub(crate) mod stream;
pub(crate) mod ws;

use axum::http::HeaderMap;
use axum::Extension;

use crate::auth::Verified;
use crate::limits::{client_address, LimitError, PeerAddr};
use crate::state::{AppState, ClientGuard, Transport};

/// The `ticket=` parameter of a query, if any.
fn ticket_param(raw: Option<&str>) -> Option<String> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).find(|(k, _)| k == "ticket").map(|(_, v)| v.into_owned())
}

/// Count a new stream against the limits for its token and address.
fn guard(
    state: &std::sync::Arc<AppState>,
    transport: Transport,
    auth: &Verified,
    headers: &HeaderMap,
    peer: Option<Extension<PeerAddr>>,
) -> Result<ClientGuard, LimitError> {
    let address = client_address(&state.config.limits, headers, peer.map(|Extension(p)| p));
    let subject = auth.claims.sub.as_deref().unwrap_or("");
    ClientGuard::acquire(state, transport, subject, address)
}
