//! `GET /v1/stream` (SSE) and `GET /v1/ws` (WebSocket).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::Extension;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Verified;
use crate::ingest::error;
use crate::limits::{client_address, CommandRate, LimitError, PeerAddr};
use crate::origin::Check;
use crate::session::{want_channel, want_pattern, Mode, Out, Session, SubError, Want};
use crate::state::{AppState, ClientGuard, Transport};
use crate::token::ResumeToken;

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

fn parse_query(raw: Option<&str>) -> Result<StreamQuery, Response> {
    let mut q = StreamQuery::default();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match &*k {
            "channel" => q.channels.push(v.into_owned()),
            "pattern" => q.patterns.push(v.into_owned()),
            "mode" => {
                q.mode = match &*v {
                    "notify" => Mode::Notify,
                    "full" => Mode::Full,
                    other => {
                        return Err(error(
                            StatusCode::BAD_REQUEST,
                            "invalid_query",
                            format!("mode: {other:?} is not notify or full"),
                            json!({}),
                        ))
                    }
                }
            }
            "ticket" => q.ticket = Some(v.into_owned()),
            "last_event_id" => q.last_event_id = Some(v.into_owned()),
            other => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("unknown parameter {:?}; known: channel, pattern, mode, ticket, last_event_id", other),
                    json!({}),
                ))
            }
        }
    }
    Ok(q)
}

fn sub_error(e: &SubError) -> Response {
    error(e.status(), e.code, &e.message, json!({}))
}

fn resume_of(text: Option<&str>) -> Result<Option<ResumeToken>, Response> {
    match text.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => ResumeToken::decode(t)
            .map(Some)
            .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_resume_token", e, json!({}))),
    }
}

/// The subscriptions of a request, each name once, checked against the
/// token; more distinct names than `max_subscriptions` are refused before
/// any is checked.
pub(crate) fn wants(state: &AppState, auth: &Verified, channels: &[String], patterns: &[String]) -> Result<Vec<Want>, SubError> {
    let mut seen = std::collections::HashSet::new();
    let channels: Vec<&String> = channels.iter().filter(|c| seen.insert(c.as_str())).collect();
    let patterns: Vec<&String> = patterns.iter().filter(|p| seen.insert(p.as_str())).collect();
    let max = state.config.limits.max_subscriptions;
    if seen.len() > max {
        return Err(SubError::too_many(seen.len(), max));
    }
    let mut out = Vec::with_capacity(seen.len());
    for c in channels {
        out.push(want_channel(state, auth, c)?);
    }
    for p in patterns {
        out.push(want_pattern(state, auth, p)?);
    }
    Ok(out)
}

/// Count a new stream against the limits for its token and address.
fn guard(
    state: &Arc<AppState>,
    transport: Transport,
    auth: &Verified,
    headers: &HeaderMap,
    peer: Option<Extension<PeerAddr>>,
) -> Result<ClientGuard, LimitError> {
    let address = client_address(&state.config.limits, headers, peer.map(|Extension(p)| p));
    let subject = auth.claims.sub.as_deref().unwrap_or("");
    ClientGuard::acquire(state, transport, subject, address)
}

/// `GET /v1/stream`.
pub(crate) async fn sse(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = match parse_query(raw.as_deref()) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let auth = match state.auth.for_stream(&headers, q.ticket.as_deref(), Check::Safe) {
        Ok(a) => a,
        Err(e) => return error(e.status(), e.code(), &e, json!({})),
    };
    if q.channels.is_empty() && q.patterns.is_empty() {
        return error(StatusCode::BAD_REQUEST, "invalid_query", "subscribe to at least one channel= or pattern=", json!({}));
    }
    let header_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let resume = match resume_of(header_id.or(q.last_event_id.as_deref())) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let wants = match wants(&state, &auth, &q.channels, &q.patterns) {
        Ok(w) => w,
        Err(e) => return sub_error(&e),
    };
    let guard = match guard(&state, Transport::Sse, &auth, &headers, peer) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let mut session = Session::new(Arc::clone(&state), &auth, guard);
    if let Err(e) = session.subscribe(wants, q.mode, resume.as_ref()).await {
        return sub_error(&e);
    }
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
        Out::Item { kind, json, token } => {
            let e = SseEvent::default().event(kind).data(json);
            match token {
                Some(t) => e.id(t),
                None => e,
            }
        }
        Out::Close(reason) => SseEvent::default()
            .event("close")
            .retry(retry)
            .data(json!({"kind": "close", "reason": reason.code(), "message": reason.message()}).to_string()),
    }
}

/// What a WebSocket client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Command {
    Subscribe {
        #[serde(default)]
        channels: Vec<String>,
        #[serde(default)]
        patterns: Vec<String>,
        #[serde(default)]
        mode: Mode,
        #[serde(default)]
        resume: Option<String>,
    },
    Unsubscribe {
        #[serde(default)]
        channels: Vec<String>,
        #[serde(default)]
        patterns: Vec<String>,
    },
}

/// `GET /v1/ws`.
/// The origin is checked on every upgrade, whatever the credentials; frames
/// and messages over `limits.max_body_bytes` close the connection (1009)
/// before they are read in full.
pub(crate) async fn ws(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Response {
    let ticket = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "ticket")
        .map(|(_, v)| v.into_owned());
    let auth = match state.auth.for_stream(&headers, ticket.as_deref(), Check::WebSocket) {
        Ok(a) => a,
        Err(e) => return error(e.status(), e.code(), &e, json!({})),
    };
    let guard = match guard(&state, Transport::Ws, &auth, &headers, peer) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let max = state.config.limits.max_body_bytes;
    upgrade.max_message_size(max).max_frame_size(max).on_upgrade(move |socket| run_ws(state, auth, guard, socket))
}

async fn run_ws(state: Arc<AppState>, auth: Verified, guard: ClientGuard, socket: WebSocket) {
    let send_timeout = Duration::from_millis(state.config.limits.send_timeout_ms);
    let mut rate = CommandRate::new(state.config.limits.commands_per_sec, std::time::Instant::now());
    let mut session = Session::new(Arc::clone(&state), &auth, guard);
    let (mut sink, mut stream) = socket.split();
    loop {
        let msg = tokio::select! {
            out = session.next() => match out {
                Some(Out::Item { json, token, .. }) => Message::Text(ws_text(json, token).into()),
                Some(Out::Close(reason)) => {
                    let frame = CloseFrame { code: reason.ws_code(), reason: Utf8Bytes::from(reason.code()) };
                    let _ = tokio::time::timeout(send_timeout, sink.send(Message::Close(Some(frame)))).await;
                    return;
                }
                None => return,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    let reply = match (rate.take(std::time::Instant::now()), m) {
                        (Err(e), _) => json!({"kind": "error", "code": e.code(), "message": e.to_string(), "field": e.field,
                            "limit": e.limit, "retry_after_ms": e.retry_after.as_millis() as u64}).to_string(),
                        (Ok(()), Message::Text(text)) => command(&state, &auth, &mut session, text.as_str()).await,
                        (Ok(()), _) => json!({"kind": "error", "code": "invalid_command", "message": "send JSON text frames"}).to_string(),
                    };
                    Message::Text(reply.into())
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            },
        };
        match tokio::time::timeout(send_timeout, sink.send(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                // The client stopped reading: its socket is full.
                let reason = crate::session::CloseReason::SlowClient;
                let frame = CloseFrame { code: reason.ws_code(), reason: Utf8Bytes::from(reason.code()) };
                let _ = tokio::time::timeout(Duration::from_millis(100), sink.send(Message::Close(Some(frame)))).await;
                return;
            }
        }
    }
}

/// An item's JSON with its resume token added.
fn ws_text(json: String, token: Option<String>) -> String {
    match token {
        Some(t) if json.ends_with('}') => {
            let mut s = json;
            s.pop();
            s.push_str(&format!(",\"token\":{}}}", serde_json::Value::String(t)));
            s
        }
        _ => json,
    }
}

async fn command(state: &AppState, auth: &Verified, session: &mut Session, text: &str) -> String {
    let err = |code: &str, message: String| json!({"kind": "error", "code": code, "message": message}).to_string();
    let cmd: Command = match serde_json::from_str(text) {
        Ok(c) => c,
        Err(e) => return err("invalid_command", e.to_string()),
    };
    match cmd {
        Command::Subscribe { channels, patterns, mode, resume } => {
            let resume = match resume.as_deref().filter(|t| !t.is_empty()).map(ResumeToken::decode).transpose() {
                Ok(r) => r,
                Err(e) => return err("invalid_resume_token", e.to_string()),
            };
            let wants = match wants(state, auth, &channels, &patterns) {
                Ok(w) => w,
                Err(e) => return err(e.code, e.message),
            };
            match session.subscribe(wants, mode, resume.as_ref()).await {
                Ok(()) => subscribed_text(session),
                Err(e) => err(e.code, e.message),
            }
        }
        Command::Unsubscribe { channels, patterns } => {
            session.unsubscribe(&channels);
            session.unsubscribe(&patterns);
            subscribed_text(session)
        }
    }
}

fn subscribed_text(session: &Session) -> String {
    match session.subscribed() {
        Out::Item { json, token, .. } => ws_text(json, token),
        Out::Close(_) => String::new(),
    }
}
