//! `GET /v1/stream`: a session's items as server-sent events, each with its
//! resume token as the event's id; a `Last-Event-ID` (or `last_event_id=`)
//! resumes from one.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::StreamExt;

use crate::error::ApiError;
use crate::limits::PeerAddr;
use crate::origin::Check;
use crate::resume::ResumeToken;
use crate::session::{wants, Mode, Out, Session};
use crate::state::{AppState, Transport};
use crate::wire::{to_json, CloseItem, Kind};

/// The query of `GET /v1/stream`: repeated `channel=` and `pattern=`,
/// `mode=notify|full`, `ticket=`, `last_event_id=` (for a client that cannot
/// send the `Last-Event-ID` header).
#[derive(Debug, Default)]
struct StreamQuery {
    channels: Vec<String>,
    patterns: Vec<String>,
    mode: Mode,
    ticket: Option<String>,
    last_event_id: Option<String>,
}

fn parse_query(raw: Option<&str>) -> Result<StreamQuery, ApiError> {
    let mut q = StreamQuery::default();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match &*k {
            "channel" => q.channels.push(v.into_owned()),
            "pattern" => q.patterns.push(v.into_owned()),
            "mode" => {
                q.mode = match &*v {
                    "notify" => Mode::Notify,
                    "full" => Mode::Full,
                    other => return Err(ApiError::InvalidQuery(format!("mode: {other:?} is not notify or full"))),
                }
            }
            "ticket" => q.ticket = Some(v.into_owned()),
            "last_event_id" => q.last_event_id = Some(v.into_owned()),
            other => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown parameter {:?}; known: channel, pattern, mode, ticket, last_event_id",
                    other
                )))
            }
        }
    }
    Ok(q)
}

/// `GET /v1/stream`.
pub(crate) async fn sse(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    match open(&state, peer, &headers, raw.as_deref()).await {
        Ok(session) => events(&state, session),
        Err(e) => e.into_response(),
    }
}

/// Check the request, then start its session's subscriptions.
async fn open(
    state: &Arc<AppState>,
    peer: Option<Extension<PeerAddr>>,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<Session, ApiError> {
    let q = parse_query(raw)?;
    let auth = state.auth.for_stream(headers, q.ticket.as_deref(), Check::Safe)?;
    if q.channels.is_empty() && q.patterns.is_empty() {
        return Err(ApiError::InvalidQuery("subscribe to at least one channel= or pattern=".into()));
    }
    let header_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let resume = match header_id.or(q.last_event_id.as_deref()).filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(ResumeToken::decode(t)?),
    };
    let wants = wants(state, &auth, &q.channels, &q.patterns)?;
    let guard = super::guard(state, Transport::Sse, &auth, headers, peer)?;
    let mut session = Session::new(Arc::clone(state), &auth, guard);
    session.subscribe(wants, q.mode, resume.as_ref()).await?;
    Ok(session)
}

/// The session's items as events: `subscribed` first, then what its
/// subscriptions deliver, then `close` with `retry:`.
fn events(state: &AppState, session: Session) -> Response {
    let retry = Duration::from_millis(state.config.limits.sse_retry_ms);
    let first = session.subscribed();
    let stream = futures::stream::once(async move { first })
        .chain(futures::stream::unfold(session, |mut s| async move { s.next().await.map(|o| (o, s)) }))
        .map(move |out| Ok::<_, Infallible>(sse_event(out, retry)));
    let keep_alive = KeepAlive::new().interval(Duration::from_millis(state.config.limits.keep_alive_ms));
    Sse::new(stream).keep_alive(keep_alive).into_response()
}

fn sse_event(out: Out, retry: Duration) -> SseEvent {
    match out {
        Out::Item { kind, json, resume_token } => {
            let e = SseEvent::default().event(kind.as_str()).data(&*json);
            match resume_token {
                Some(t) => e.id(t),
                None => e,
            }
        }
        Out::Close(reason) => SseEvent::default()
            .event(Kind::Close.as_str())
            .retry(retry)
            .data(to_json(&CloseItem::new(reason.code(), reason.message()))),
    }
}
