//! The gateway's errors: [`GatewayError`] when a gateway cannot start, and
//! [`ApiError`], every refusal a request can get, which answers with its
//! status and `{"error": {"code", "message", ...}}` (docs/gateway.md).
//!
//! Codes are an enum, [`ErrorCode`], written on the wire as the snake_case
//! strings clients match on. The same codes name the errors a stream or a
//! WebSocket reply carries (`{"kind": "error", "code", ...}`) and the
//! per-event failures of ingest.

use std::fmt;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::AuthError;
use crate::config::ConfigError;
use crate::ingest::IngestBodyError;
use crate::limits::LimitError;
use crate::resume::ResumeTokenError;
use crate::session::SubError;
use crate::wire::{ErrorBody, ErrorDetail};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A component could not be built (its error names the field).
    #[error("{component}: {reason}")]
    Component {
        /// `kafka`, `redis`, `publisher`, `batch`, `replay`, `hub` or `join`.
        component: &'static str,
        /// Why.
        reason: String,
    },
    /// Listening or serving failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// A stable, machine-readable error code, as the wire spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No token was sent.
    MissingToken,
    /// The token is not valid.
    InvalidToken,
    /// A ticket where a token is needed, or the other way round.
    WrongTokenKind,
    /// The token does not allow this.
    Forbidden,
    /// A browser request from an origin that may not use the credentials.
    OriginNotAllowed,
    /// The token cookie came more than once.
    DuplicateCookie,
    /// The ticket has opened a stream already.
    TicketUsed,
    /// Too many live tickets to remember another.
    Busy,
    /// The query of a stream request is malformed.
    InvalidQuery,
    /// The resume token is malformed.
    InvalidResumeToken,
    /// A channel name is malformed.
    InvalidChannel,
    /// A pattern is not one the gateway takes.
    InvalidPattern,
    /// More subscriptions than `limits.max_subscriptions`.
    TooMany,
    /// Kafka or Redis could not start a subscription.
    Unavailable,
    /// The body of `POST /v1/tickets` is malformed.
    InvalidTicketRequest,
    /// An ingested event is malformed or invalid.
    InvalidEvent,
    /// More events than `limits.max_events_per_request`.
    TooManyEvents,
    /// A cookie-authenticated ingest with a content type a form could send.
    UnsupportedMediaType,
    /// A body over `limits.max_body_bytes`.
    BodyTooLarge,
    /// More WebSocket commands than `limits.commands_per_sec`.
    RateLimited,
    /// More TCP connections than `limits.max_connections`.
    TooManyConnections,
    /// More streams than a `limits.max_streams*` setting.
    TooManyStreams,
    /// A WebSocket command is malformed.
    InvalidCommand,
    /// An item that cannot be delivered (it is skipped).
    Undeliverable,
    /// A subscription that cannot go on.
    SubscriptionFailed,
    /// Ingest: the engine's queue is full (retriable).
    QueueFull,
    /// Ingest: the event is larger than a batch may be.
    TooLarge,
    /// Ingest: the gateway is shutting down.
    ShuttingDown,
    /// Ingest: Kafka may or may not hold the event.
    OutcomeUnknown,
    /// Ingest: the event's lane stopped.
    LaneDead,
    /// Ingest: Kafka did not store the event; sending it again is safe.
    NotStored,
}

impl ErrorCode {
    /// The code as the wire spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MissingToken => "missing_token",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::WrongTokenKind => "wrong_token_kind",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::DuplicateCookie => "duplicate_cookie",
            ErrorCode::TicketUsed => "ticket_used",
            ErrorCode::Busy => "busy",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::InvalidResumeToken => "invalid_resume_token",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::InvalidPattern => "invalid_pattern",
            ErrorCode::TooMany => "too_many",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InvalidTicketRequest => "invalid_ticket_request",
            ErrorCode::InvalidEvent => "invalid_event",
            ErrorCode::TooManyEvents => "too_many_events",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::TooManyStreams => "too_many_streams",
            ErrorCode::InvalidCommand => "invalid_command",
            ErrorCode::Undeliverable => "undeliverable",
            ErrorCode::SubscriptionFailed => "subscription_failed",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
            ErrorCode::LaneDead => "lane_dead",
            ErrorCode::NotStored => "not_stored",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl From<SubError> for ApiError {
    /// A subscription over the token's share is a limit (429 with
    /// `Retry-After`, the field named); any other refusal is the
    /// subscription's.
    fn from(e: SubError) -> Self {
        match e {
            SubError::Limited(l) => ApiError::Limit(l),
            e => ApiError::Subscription(e),
        }
    }
}

/// Every refusal a request can get.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The credentials: missing, invalid, of the wrong kind, not enough, or
    /// from another origin.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A subscription the request names cannot start.
    #[error(transparent)]
    Subscription(SubError),
    /// A limit of one client's share or of the gateway's capacity.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// An ingest body that is malformed, invalid or holds too many events.
    #[error(transparent)]
    IngestBody(#[from] IngestBodyError),
    /// The query of a stream request.
    #[error("{0}")]
    InvalidQuery(String),
    /// The resume token of a stream request.
    #[error(transparent)]
    InvalidResumeToken(#[from] ResumeTokenError),
    /// The body of `POST /v1/tickets`.
    #[error("{0}")]
    InvalidTicketRequest(String),
    /// The token's publish claims do not cover an ingested event (`index`)
    /// or are empty.
    #[error("{message}")]
    PublishForbidden {
        /// What is not allowed.
        message: String,
        /// The event's index in the request.
        index: Option<usize>,
    },
    /// A cookie-authenticated ingest with a content type a form could send.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A body over `limits.max_body_bytes`, or cut short.
    #[error("body: larger than limits.max_body_bytes = {limit}, or cut short ({reason})")]
    BodyTooLarge {
        /// `limits.max_body_bytes`.
        limit: usize,
        /// What reading the body said.
        reason: String,
    },
}

impl ApiError {
    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::Auth(e) => e.status(),
            ApiError::Subscription(e) => e.status(),
            ApiError::Limit(e) => e.limit.status(),
            ApiError::IngestBody(IngestBodyError::TooManyEvents { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::IngestBody(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidQuery(_) | ApiError::InvalidResumeToken(_) | ApiError::InvalidTicketRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::PublishForbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The code.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            ApiError::Auth(e) => e.code(),
            ApiError::Subscription(e) => e.code(),
            ApiError::Limit(e) => e.limit.code(),
            ApiError::IngestBody(IngestBodyError::TooManyEvents { .. }) => ErrorCode::TooManyEvents,
            ApiError::IngestBody(_) => ErrorCode::InvalidEvent,
            ApiError::InvalidQuery(_) => ErrorCode::InvalidQuery,
            ApiError::InvalidResumeToken(_) => ErrorCode::InvalidResumeToken,
            ApiError::InvalidTicketRequest(_) => ErrorCode::InvalidTicketRequest,
            ApiError::PublishForbidden { .. } => ErrorCode::Forbidden,
            ApiError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ApiError::BodyTooLarge { .. } => ErrorCode::BodyTooLarge,
        }
    }

    /// The body: `{"error": {"code", "message"}}`, with the limit's `field`
    /// and `limit`, or the event's `index`, where there is one.
    pub(crate) fn body(&self) -> ErrorBody {
        let mut detail = ErrorDetail::new(self.code(), self.to_string());
        match self {
            ApiError::Limit(e) => (detail.field, detail.limit) = (Some(e.limit.field()), Some(e.value)),
            ApiError::IngestBody(IngestBodyError::TooManyEvents { limit, .. }) => detail.limit = Some(*limit),
            ApiError::IngestBody(IngestBodyError::Invalid { index, .. }) => detail.index = Some(*index),
            ApiError::PublishForbidden { index, .. } => detail.index = *index,
            ApiError::BodyTooLarge { limit, .. } => detail.limit = Some(*limit),
            _ => {}
        }
        ErrorBody { error: detail }
    }

    /// The `Retry-After` a limit answers with, in whole seconds (at least 1).
    pub(crate) fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::Limit(e) => Some(e.retry_after.as_secs().max(1)),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialise_as_their_wire_strings() {
        for code in [ErrorCode::MissingToken, ErrorCode::TooManyConnections, ErrorCode::OutcomeUnknown] {
            assert_eq!(serde_json::to_string(&code).expect("json"), format!("\"{code}\""));
        }
        assert_eq!(ErrorCode::InvalidResumeToken.as_str(), "invalid_resume_token");
    }

    #[test]
    fn error_bodies_keep_their_fields_in_the_order_of_their_names() {
        let e = ApiError::IngestBody(IngestBodyError::Invalid { index: 2, message: "events[2]: bad".into() });
        let body = serde_json::to_string(&e.body()).expect("json");
        assert_eq!(body, r#"{"error":{"code":"invalid_event","index":2,"message":"events[2]: bad"}}"#);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e = ApiError::BodyTooLarge { limit: 10, reason: "length limit exceeded".into() };
        let body = serde_json::to_string(&e.body()).expect("json");
        let message = "body: larger than limits.max_body_bytes = 10, or cut short (length limit exceeded)";
        assert_eq!(body, format!(r#"{{"error":{{"code":"body_too_large","limit":10,"message":"{message}"}}}}"#));
    }
}
