//! `POST /v1/events`: one JSON event, a JSON array, or NDJSON, through the
//! batching engine, with each event's result.
//!
//! The token, its origin (for the cookie), its publish claims and the
//! content type are checked before the body is read; nothing is stored
//! unless every event of the request is valid and may be published.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dualstream_batch::BatchError;
use dualstream_core::trace::{self, Traced};
use dualstream_core::{Event, SinkError};

use crate::auth::{AuthError, Verified};
use crate::error::{ApiError, ErrorCode};
use crate::ingest::parse_ingest_body;
use crate::origin::Check;
use crate::state::AppState;
use crate::wire::{EventFailure, IngestResponse, IngestResult, Ingested, Position};

/// The media types a cookie-authenticated ingest accepts: none of them may
/// be sent cross-site without a CORS preflight, unlike `text/plain` or a
/// form's types.
const COOKIE_MEDIA_TYPES: [&str; 3] = ["application/json", "application/x-ndjson", "application/ndjson"];

/// `POST /v1/events`.
///
/// With `otel`, the request is a server span, and each event's `send` span
/// is its child. The span continues the request's `traceparent` (and
/// `tracestate`) only for a token that may publish: anyone else's request
/// starts a trace of its own, so a client without rights can neither join
/// another trace nor force sampling through the header's flags.
pub(crate) async fn post_events(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let auth = state.auth.from_headers(&headers, Check::Unsafe);
    let span = if trace::ENABLED {
        let trusted = auth.as_ref().is_ok_and(|a| !a.claims.publish.is_empty());
        let value = |name: &str| headers.get(name).filter(|_| trusted).and_then(|v| v.to_str().ok());
        Traced::server("POST /v1/events", value(trace::TRACEPARENT), value(trace::TRACESTATE))
    } else {
        None
    };
    Traced::within(span, async {
        match events(&state, auth, &headers, body).await {
            Ok(events) => store(&state, events).await,
            Err(e) => e.into_response(),
        }
    })
    .await
}

/// The request's events, each checked against the token's publish claims
/// (`auth`: the request's credentials, checked once by the caller).
async fn events(
    state: &AppState,
    auth: Result<Verified, AuthError>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<Event>, ApiError> {
    let auth = auth?;
    if auth.claims.publish.is_empty() {
        return Err(ApiError::PublishForbidden { message: "the token has no publish claims".into(), index: None });
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    check_media_type(&auth, content_type)?;
    let max = state.config.limits.max_body_bytes;
    let body: Bytes = axum::body::to_bytes(body, max)
        .await
        .map_err(|e| ApiError::BodyTooLarge { limit: max, reason: e.to_string() })?;
    let events = parse_ingest_body(content_type, &body, state.config.limits.max_events_per_request)?;
    // Nothing is stored unless every event is valid and may be published.
    for (i, e) in events.iter().enumerate() {
        let source_type = e.source().source_type();
        if !auth.may_publish(source_type) {
            let message = format!("events[{i}]: the token's publish claims do not include source type {source_type:?}");
            return Err(ApiError::PublishForbidden { message, index: Some(i) });
        }
    }
    Ok(events)
}

/// With the cookie, only a content type no page of another site can send
/// without a CORS preflight.
fn check_media_type(auth: &Verified, content_type: Option<&str>) -> Result<(), ApiError> {
    let media_type = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    if auth.via_cookie && !media_type.as_deref().is_some_and(|m| COOKIE_MEDIA_TYPES.contains(&m)) {
        return Err(ApiError::UnsupportedMediaType(format!(
            "content-type: {:?}; with the cookie, send one of {}",
            content_type.unwrap_or(""),
            COOKIE_MEDIA_TYPES.join(", ")
        )));
    }
    Ok(())
}

/// Submit the events and answer with each one's result: 200 when all were
/// stored, 207 when some, 503 with `Retry-After` when none because the
/// queue was full, 502 when none.
async fn store(state: &AppState, events: Vec<Event>) -> Response {
    let summaries: Vec<Ingested> = events.iter().map(Ingested::of).collect();
    let results = state.engine.submit_many(events).await;
    let mut ok = 0usize;
    let mut retriable = 0usize;
    let mut out = Vec::with_capacity(results.len());
    for (r, mut summary) in results.into_iter().zip(summaries) {
        match r {
            Ok(receipt) => {
                ok += 1;
                let position = receipt.position.as_ref().map(Position::from);
                out.push(IngestResult::Stored { id: summary.id, position: position.clone() });
                summary.position = position;
                state.record_ingested(summary);
            }
            Err(e) => {
                retriable += usize::from(matches!(e, BatchError::QueueFull { .. }));
                out.push(IngestResult::Failed { error: failure(&e), id: summary.id });
            }
        }
    }
    metrics::counter!(crate::metric_names::INGESTED).increment(ok as u64);
    let n = out.len();
    let body = Json(IngestResponse { failed: n - ok, results: out, stored: ok });
    if ok == n {
        (StatusCode::OK, body).into_response()
    } else if ok == 0 && retriable == n {
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response()
    } else if ok == 0 {
        (StatusCode::BAD_GATEWAY, body).into_response()
    } else {
        (StatusCode::MULTI_STATUS, body).into_response()
    }
}

/// Why one event was not stored, or is not known to be.
fn failure(e: &BatchError) -> EventFailure {
    let code = match e {
        BatchError::QueueFull { .. } => ErrorCode::QueueFull,
        BatchError::TooLarge { .. } => ErrorCode::TooLarge,
        BatchError::Closed { .. } => ErrorCode::ShuttingDown,
        BatchError::WorkerGone => ErrorCode::OutcomeUnknown,
        BatchError::LaneDead { .. } => ErrorCode::LaneDead,
        // Handed to Kafka, and its answer does not prove whether it was stored.
        BatchError::Publish(dualstream_publisher::PublishError::Durable(d))
            if matches!(d.error, SinkError::OutcomeUnknown { .. } | SinkError::Timeout { .. }) =>
        {
            ErrorCode::OutcomeUnknown
        }
        _ => ErrorCode::NotStored,
    };
    EventFailure { code, message: e.to_string(), retriable: e.is_retriable() }
}

#[cfg(test)]
mod tests {
    use dualstream_core::{DeliveryError, Event, SinkError};
    use dualstream_publisher::PublishError;

    use super::{failure, BatchError, ErrorCode};

    fn durable(error: SinkError) -> BatchError {
        let event = Event::builder("t", "user", "u").build().expect("valid");
        BatchError::Publish(PublishError::Durable(DeliveryError::new(error, event)))
    }

    /// A client told `not_stored` may safely send again; one whose write
    /// Kafka may hold is told `outcome_unknown`.
    #[test]
    fn a_write_kafka_may_hold_is_outcome_unknown_not_not_stored() {
        let code = |e: BatchError| failure(&e).code;
        let unknown = durable(SinkError::OutcomeUnknown { reason: "offset -1".into() });
        assert_eq!(code(unknown), ErrorCode::OutcomeUnknown);
        let late = durable(SinkError::Timeout { deadline: std::time::Duration::from_secs(1) });
        assert_eq!(code(late), ErrorCode::OutcomeUnknown);
        let unsent = durable(SinkError::Unavailable { reason: "replacing".into() });
        assert_eq!(code(unsent), ErrorCode::NotStored);
        let json = serde_json::to_string(&failure(&durable(SinkError::Unavailable { reason: "r".into() })));
        assert!(json.expect("json").starts_with(r#"{"code":"not_stored","message":"#));
    }
}
