//! `GET /v1/ws`: a session over a WebSocket. The client sends JSON
//! `subscribe` and `unsubscribe` commands ([`Command`]), at most
//! `limits.commands_per_sec`; each item carries its resume token as `token`.
//!
//! The origin is checked on every upgrade, whatever the credentials; frames
//! and messages over `limits.max_body_bytes` close the connection (1009)
//! before they are read in full.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::{FutureExt, SinkExt, StreamExt};

use crate::auth::Verified;
use crate::error::{ApiError, ErrorCode};
use crate::limits::{CommandRate, PeerAddr};
use crate::origin::Check;
use crate::resume::ResumeToken;
use crate::session::{wants, CloseReason, Out, Session};
use crate::state::{AppState, ClientGuard, Transport};
use crate::wire::{to_json, ws_item, Command, ErrorItem};

/// `GET /v1/ws`.
pub(crate) async fn ws(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Response {
    let ticket = super::ticket_param(raw.as_deref());
    let auth = match state.auth.for_stream(&headers, ticket.as_deref(), Check::WebSocket) {
        Ok(a) => a,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let guard = match super::guard(&state, Transport::Ws, &auth, &headers, peer) {
        Ok(g) => g,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let max = state.config.limits.max_body_bytes;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| run(state, auth, guard, socket))
}

/// The bytes a WebSocket reads at once. tungstenite's default, 128 KiB, is
/// zero-filled before every read attempt, and the session's loop tries a
/// read each time it sends an item: at 1,000 items a second that memset was
/// 12–18 % of the gateway's CPU, and the buffer, once touched, 128 KiB of
/// resident memory per connection. Commands are small; a larger frame still
/// grows the buffer as it arrives (up to `limits.max_body_bytes`).
const READ_BUFFER: usize = 4 << 10;

/// The bytes a WebSocket gathers before it writes them to the socket.
/// tungstenite's buffer keeps the largest size it ever reached: with its
/// default, 128 KiB, a batch of `WRITE_BATCH` items went out in one write,
/// and every connection that once sent a full batch kept 32–64 KiB (about
/// 32 MiB for 1,000 connections after a load, docs/benchmark-analysis.md).
/// At 8 KiB a batch takes a few writes, and a connection keeps at most
/// about twice that.
const WRITE_BUFFER: usize = 8 << 10;

/// Send the session's items and answer the client's commands until either
/// side ends; a client that stops reading is closed as `slow_client`.
async fn run(state: Arc<AppState>, auth: Verified, guard: ClientGuard, socket: WebSocket) {
    let send_timeout = Duration::from_millis(state.config.limits.send_timeout_ms);
    let mut rate = CommandRate::new(state.config.limits.commands_per_sec, Instant::now());
    let mut session = Session::new(Arc::clone(&state), &auth, guard);
    let (mut sink, mut stream) = socket.split();
    loop {
        let msg = tokio::select! {
            out = session.next() => match out {
                Some(Out::Item { json, resume_token, .. }) => Message::Text(ws_item(&json, resume_token).into()),
                Some(Out::Close(reason)) => {
                    let _ = tokio::time::timeout(send_timeout, sink.send(close(reason))).await;
                    return;
                }
                None => return,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    let reply = match (rate.take(Instant::now()), m) {
                        (Err(e), _) => to_json(&e.item()),
                        (Ok(()), Message::Text(text)) => command(&state, &auth, &mut session, text.as_str()).await,
                        (Ok(()), _) => to_json(&ErrorItem::new(ErrorCode::InvalidCommand, "send JSON text frames")),
                    };
                    Message::Text(reply.into())
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            },
        };
        // Items the session has ready now go out with this one, in one
        // write: one flush (a syscall) per item was most of a busy
        // connection's cost.
        let mut end = None;
        let sent = tokio::time::timeout(send_timeout, async {
            sink.feed(msg).await?;
            for _ in 1..WRITE_BATCH {
                match session.next().now_or_never() {
                    Some(Some(Out::Item { json, resume_token, .. })) => {
                        sink.feed(Message::Text(ws_item(&json, resume_token).into())).await?
                    }
                    Some(out) => {
                        end = Some(out);
                        break;
                    }
                    None => break,
                }
            }
            sink.flush().await
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                // The client stopped reading: its socket is full.
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), sink.send(close(CloseReason::SlowClient))).await;
                return;
            }
        }
        match end {
            None => {}
            Some(Some(Out::Close(reason))) => {
                let _ = tokio::time::timeout(send_timeout, sink.send(close(reason))).await;
                return;
            }
            Some(_) => return,
        }
    }
}

/// At most this many items in one write.
const WRITE_BATCH: usize = 64;

/// The close frame for a reason: its WebSocket code, and its code as text.
fn close(reason: CloseReason) -> Message {
    Message::Close(Some(CloseFrame { code: reason.ws_code(), reason: Utf8Bytes::from(reason.code()) }))
}

/// Run one command: the reply is `subscribed` with the names now active,
/// or an error item.
async fn command(state: &AppState, auth: &Verified, session: &mut Session, text: &str) -> String {
    let cmd: Command = match serde_json::from_str(text) {
        Ok(c) => c,
        Err(e) => return to_json(&ErrorItem::new(ErrorCode::InvalidCommand, e.to_string())),
    };
    match cmd {
        Command::Subscribe { channels, patterns, mode, resume } => {
            let resume = match resume.as_deref().filter(|t| !t.is_empty()).map(ResumeToken::decode).transpose() {
                Ok(r) => r,
                Err(e) => return to_json(&ErrorItem::new(ErrorCode::InvalidResumeToken, e.to_string())),
            };
            let wants = match wants(state, auth, &channels, &patterns) {
                Ok(w) => w,
                Err(e) => return to_json(&e.item()),
            };
            match session.subscribe(wants, mode, resume.as_ref()).await {
                Ok(()) => subscribed(session),
                Err(e) => to_json(&e.item()),
            }
        }
        Command::Unsubscribe { channels, patterns } => {
            session.unsubscribe(&channels);
            session.unsubscribe(&patterns);
            subscribed(session)
        }
    }
}

/// The `subscribed` item with its resume token, as WebSocket text.
fn subscribed(session: &Session) -> String {
    match session.subscribed() {
        Out::Item { json, resume_token, .. } => ws_item(&json, resume_token),
        Out::Close(_) => String::new(),
    }
}
