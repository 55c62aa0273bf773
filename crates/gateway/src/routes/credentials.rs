//! What a browser is handed to authenticate with: `POST /v1/tickets`, a
//! short-lived, single-use ticket bound to names (for `EventSource`, which
//! cannot send headers), and `POST /v1/session`, the token as the cookie.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::{session_cookie, AuthError};
use crate::error::ApiError;
use crate::origin::Check;
use crate::session::wants;
use crate::state::AppState;
use crate::wire::{TicketRequest, TicketResponse};

/// `POST /v1/tickets`: a single-use ticket for `GET /v1/stream?ticket=`,
/// `GET /v1/ws?ticket=` or `GET /v1/dashboard?ticket=`, bound to the names
/// in the request (each checked against the token now).
pub(crate) async fn tickets(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    match ticket(&state, &headers, &body) {
        Ok(t) => Json(t).into_response(),
        Err(e) => e.into_response(),
    }
}

fn ticket(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<TicketResponse, ApiError> {
    let auth = state.auth.from_headers(headers, Check::Unsafe)?;
    let req: TicketRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidTicketRequest(format!(
            "body: {e}; send {{\"channels\": [..], \"patterns\": [..]}} or {{\"dashboard\": true}}"
        ))
    })?;
    if req.channels.is_empty() && req.patterns.is_empty() && !req.dashboard {
        return Err(ApiError::InvalidTicketRequest(
            "channels, patterns: name what the ticket opens (or dashboard: true)".into(),
        ));
    }
    let wants = wants(state, &auth, &req.channels, &req.patterns)?;
    let read = wants.iter().map(|w| w.name().to_owned()).collect();
    let (ticket, expires_in) = state.auth.ticket(&auth, read, req.dashboard)?;
    Ok(TicketResponse { expires_in, ticket })
}

/// `POST /v1/session`: the token in `Authorization: Bearer` comes back as
/// the cookie, with the attributes it must have (see [`session_cookie`]).
/// Only a bearer token is taken: a page of another site cannot send one.
pub(crate) async fn session(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.split_once(' '));
    let Some(("Bearer" | "bearer", token)) = token else {
        return ApiError::from(AuthError::Missing { cookie: state.config.auth.cookie.clone() }).into_response();
    };
    let token = token.trim();
    let verified = match state.auth.verify(token) {
        Ok(v) if !v.is_ticket() => v,
        Ok(_) => {
            let e = AuthError::WrongKind("a ticket is not a session: send the token itself");
            return ApiError::from(e).into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let cookie = session_cookie(&state.config.auth.cookie, token, verified.claims.exp);
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response()
}
