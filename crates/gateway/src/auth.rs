//! Signed tokens (JWT, HS256) and what their claims allow: [`Auth`] mints
//! and verifies them, and single-use tickets made from them; [`Verified`]
//! is a verified token. (The resume token, which says where a client is in
//! the event log and grants nothing, is in `resume.rs`.)
//!
//! A token's `read` claim lists channels and patterns a client may read; its
//! `publish` claim lists the source types a producer may publish (`*` for
//! all). Only two claim shapes grant reading: an exact channel
//! (`events:user:octocat`) and a prefix ending in `:*` with no other glob
//! character (`events:user:*`, `events:*`). Any other claim grants nothing,
//! so a claim can never be read wider than it looks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::error::ErrorCode;
use crate::origin::{Check, OriginPolicy};

/// The claims of a gateway token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token is for (free text, logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch. Required.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch: the token is refused until
    /// then (less `auth.leeway_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer; must equal `auth.issuer`.
    pub iss: String,
    /// Audience; must equal `auth.audience`.
    pub aud: String,
    /// Channels and patterns the holder may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read: Vec<String>,
    /// Source types the holder may publish; `*` is every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// Set on tickets only: when the stream a ticket opens must end (the
    /// expiry of the token the ticket was made from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_exp: Option<u64>,
    /// The holder may see the gateway's own state: the dashboard and its
    /// feed, `/metrics` and the detail of `/readyz`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    /// Set on tickets only: the ticket's id, so that it opens one stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// Why a request was not authorised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token in the `Authorization` header, the cookie or the `ticket`
    /// parameter.
    #[error("no token: send `Authorization: Bearer <token>`, the {cookie} cookie, or a ticket")]
    Missing {
        /// The cookie's name.
        cookie: String,
    },
    /// The token is not valid: signature, expiry, audience, issuer or shape.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// A ticket was sent where a token is needed, or the other way round.
    #[error("{0}")]
    WrongKind(&'static str),
    /// The token is valid but does not allow this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A browser request from a page of another origin (see
    /// `allowed_origins`).
    #[error("cross-origin request refused: {0}")]
    CrossOrigin(String),
    /// The token cookie was sent more than once (a sibling domain may have
    /// set one): which to trust is not decidable, so neither is.
    #[error(
        "the {cookie} cookie was sent {count} times; send it once (clear the cookies of this site and sign in again)"
    )]
    DuplicateCookie {
        /// The cookie's name.
        cookie: String,
        /// How many times it came.
        count: usize,
    },
    /// The ticket has already opened a stream.
    #[error("this ticket has already been used: a ticket opens one stream; ask POST /v1/tickets for another")]
    TicketUsed,
    /// Too many tickets are live to remember another one.
    #[error("too many live tickets ({0}); retry in a few seconds")]
    TicketsFull(usize),
}

impl AuthError {
    /// 400, 401, 403 or 503.
    pub fn status(&self) -> axum::http::StatusCode {
        match self {
            AuthError::Forbidden(_) | AuthError::CrossOrigin(_) => axum::http::StatusCode::FORBIDDEN,
            AuthError::DuplicateCookie { .. } => axum::http::StatusCode::BAD_REQUEST,
            AuthError::TicketsFull(_) => axum::http::StatusCode::SERVICE_UNAVAILABLE,
            _ => axum::http::StatusCode::UNAUTHORIZED,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Missing { .. } => ErrorCode::MissingToken,
            AuthError::Invalid(_) => ErrorCode::InvalidToken,
            AuthError::WrongKind(_) => ErrorCode::WrongTokenKind,
            AuthError::Forbidden(_) => ErrorCode::Forbidden,
            AuthError::CrossOrigin(_) => ErrorCode::OriginNotAllowed,
            AuthError::DuplicateCookie { .. } => ErrorCode::DuplicateCookie,
            AuthError::TicketUsed => ErrorCode::TicketUsed,
            AuthError::TicketsFull(_) => ErrorCode::Busy,
        }
    }
}

/// What a grant in `read` covers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Grant {
    /// Exactly this channel.
    Channel(String),
    /// Every channel that starts with this text (the claim without its
    /// final `*`).
    Prefix(String),
}

fn is_glob(c: char) -> bool {
    matches!(c, '*' | '?' | '[' | ']' | '\\')
}

impl Grant {
    fn parse(claim: &str) -> Option<Grant> {
        if let Some(prefix) = claim.strip_suffix('*') {
            if prefix.ends_with(':') && !prefix.chars().any(is_glob) {
                return Some(Grant::Prefix(prefix.to_owned()));
            }
            return None;
        }
        (!claim.is_empty() && !claim.chars().any(is_glob)).then(|| Grant::Channel(claim.to_owned()))
    }
}

/// A verified token.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Its claims.
    pub claims: Claims,
    grants: Vec<Grant>,
    /// It came in the cookie (so the request's origin was checked).
    pub via_cookie: bool,
}

impl Verified {
    /// When a stream opened with this token must end, seconds since the
    /// Unix epoch.
    pub fn stream_expiry(&self) -> u64 {
        self.claims.stream_exp.unwrap_or(self.claims.exp)
    }

    /// Whether this is a ticket: it opens exactly the channels and patterns
    /// named when it was made.
    pub fn is_ticket(&self) -> bool {
        self.claims.stream_exp.is_some()
    }

    /// Whether the holder may see the gateway's own state.
    pub fn is_admin(&self) -> bool {
        self.claims.admin
    }

    /// Whether the holder may read this exact channel.
    pub fn may_read_channel(&self, channel: &str) -> bool {
        if self.is_ticket() {
            return self.claims.read.iter().any(|r| r == channel);
        }
        self.grants.iter().any(|g| match g {
            Grant::Channel(c) => c == channel,
            Grant::Prefix(p) => channel.starts_with(p.as_str()),
        })
    }

    /// Whether the holder may subscribe to this pattern, which must have the
    /// shape `<literal>:*` (checked by the caller): only a prefix grant
    /// whose text the pattern's literal part starts with covers it.
    pub fn may_read_pattern(&self, pattern_literal: &str) -> bool {
        if self.is_ticket() {
            return self.claims.read.iter().any(|r| r.strip_suffix('*') == Some(pattern_literal));
        }
        self.grants.iter().any(|g| matches!(g, Grant::Prefix(p) if pattern_literal.starts_with(p.as_str())))
    }

    /// Whether the holder may publish events of this source type.
    pub fn may_publish(&self, source_type: &str) -> bool {
        self.claims.publish.iter().any(|p| p == "*" || p == source_type)
    }
}

/// Verifies and mints tokens.
#[derive(Clone)]
pub struct Auth {
    config: AuthConfig,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    origins: OriginPolicy,
    /// Tickets that have opened a stream → their expiry.
    used: Arc<Mutex<HashMap<String, u64>>>,
}

/// Most tickets remembered as used at once (each until it expires).
const MAX_USED_TICKETS: usize = 100_000;

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Auth {
    /// From a checked configuration.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[config.audience.as_str()]);
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway_secs;
        let key_error = |e: jsonwebtoken::errors::Error| AuthError::Invalid(format!("auth.secret: {e}"));
        Ok(Self {
            config: config.clone(),
            encoding: EncodingKey::from_secret(config.secret.as_bytes()).map_err(key_error)?,
            decoding: DecodingKey::from_secret(config.secret.as_bytes()).map_err(key_error)?,
            validation,
            origins: OriginPolicy::default(),
            used: Arc::default(),
        })
    }

    /// Allow these origins besides the gateway's own.
    pub(crate) fn with_allowed_origins(mut self, origins: &[String]) -> Self {
        self.origins = OriginPolicy::new(origins);
        self
    }

    /// Sign these claims.
    pub fn mint(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Claims for a token of this gateway, valid for `ttl_secs`.
    pub fn claims(&self, sub: Option<String>, read: Vec<String>, publish: Vec<String>, ttl_secs: u64) -> Claims {
        Claims {
            sub,
            exp: now_secs().saturating_add(ttl_secs),
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
            read,
            publish,
            stream_exp: None,
            nbf: None,
            admin: false,
            jti: None,
        }
    }

    /// Check a token's signature, expiry, audience and issuer.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        if token.len() > 16 * 1024 {
            return Err(AuthError::Invalid(format!("{} bytes is longer than the limit of 16384", token.len())));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let grants = data.claims.read.iter().filter_map(|c| Grant::parse(c)).collect();
        Ok(Verified { claims: data.claims, grants, via_cookie: false })
    }

    /// A token (not a ticket) from the `Authorization` header or, failing
    /// that, the cookie. A request authenticated by the cookie must come
    /// from an allowed origin (see `allowed_origins`); `kind` says what the
    /// request does. The cookie sent more than once is refused.
    pub fn from_headers(&self, headers: &HeaderMap, kind: Check) -> Result<Verified, AuthError> {
        let (token, via_cookie) = match bearer(headers) {
            Some(t) => (t, false),
            None => match cookie(headers, &self.config.cookie)? {
                Some(t) => (t, true),
                None => return Err(AuthError::Missing { cookie: self.config.cookie.clone() }),
            },
        };
        if via_cookie || kind == Check::WebSocket {
            self.origins.check(headers, kind, via_cookie)?;
        }
        let mut v = self.verify(&token)?;
        if v.is_ticket() {
            return Err(AuthError::WrongKind("a ticket only opens a stream (?ticket=); send the token itself"));
        }
        v.via_cookie = via_cookie;
        Ok(v)
    }

    /// For opening a stream: a ticket in the query (used up by this), else
    /// a token in the headers. A WebSocket upgrade's origin is always
    /// checked.
    pub fn for_stream(&self, headers: &HeaderMap, ticket: Option<&str>, kind: Check) -> Result<Verified, AuthError> {
        let Some(t) = ticket else { return self.from_headers(headers, kind) };
        if kind == Check::WebSocket {
            self.origins.check(headers, kind, false)?;
        }
        let v = self.verify(t)?;
        let Some(jti) = v.claims.jti.as_deref().filter(|_| v.is_ticket()) else {
            return Err(AuthError::WrongKind(
                "the ticket parameter takes a ticket from POST /v1/tickets, never a token: URLs end up in logs",
            ));
        };
        self.use_ticket(jti, v.claims.exp)?;
        Ok(v)
    }

    /// Remember a ticket as used until it expires; refuse it if it was.
    fn use_ticket(&self, jti: &str, exp: u64) -> Result<(), AuthError> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        if used.contains_key(jti) {
            return Err(AuthError::TicketUsed);
        }
        if used.len() >= MAX_USED_TICKETS {
            let now = now_secs().saturating_sub(self.config.leeway_secs);
            used.retain(|_, exp| *exp >= now);
            if used.len() >= MAX_USED_TICKETS {
                return Err(AuthError::TicketsFull(used.len()));
            }
        }
        used.insert(jti.to_owned(), exp);
        Ok(())
    }

    /// A short-lived, single-use ticket for `EventSource`, which cannot send
    /// headers: it opens one stream of exactly the channels and patterns in
    /// `read` (which the caller checked against the token), or the
    /// dashboard's feed when `admin` is asked for and the token has it;
    /// it publishes nothing; it must be used within `ticket_ttl_secs`, and
    /// the stream ends when the token would have.
    pub fn ticket(&self, token: &Verified, read: Vec<String>, admin: bool) -> Result<(String, u64), AuthError> {
        if admin && !token.is_admin() {
            return Err(AuthError::Forbidden("a dashboard ticket needs a token with the admin claim".into()));
        }
        let ttl = self.config.ticket_ttl_secs;
        let exp = now_secs().saturating_add(ttl).min(token.claims.exp);
        let claims = Claims {
            sub: token.claims.sub.clone(),
            exp,
            nbf: None,
            iss: token.claims.iss.clone(),
            aud: token.claims.aud.clone(),
            read,
            publish: Vec::new(),
            stream_exp: Some(token.claims.exp),
            admin,
            jti: Some(dualstream_core::EventId::new().to_string()),
        };
        Ok((self.mint(&claims)?, ttl))
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

/// The cookie's value; an error when it was sent more than once (browsers
/// send every cookie whose domain and path match: one set by a sibling
/// subdomain comes along with the gateway's own, in an order the server
/// cannot rely on).
fn cookie(headers: &HeaderMap, name: &str) -> Result<Option<String>, AuthError> {
    let values: Vec<&str> = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
        .collect();
    match values.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some((*one).to_owned())),
        many => Err(AuthError::DuplicateCookie { cookie: name.to_owned(), count: many.len() }),
    }
}

/// The `Set-Cookie` value that hands a browser its token: `HttpOnly` (no
/// script reads it), `Secure` (HTTPS only), `SameSite=Strict` (no other
/// site's request carries it), `Path=/`, and `Max-Age` up to the token's
/// `exp`. Set it from the application's own login response, or through
/// `POST /v1/session`.
pub fn session_cookie(name: &str, token: &str, exp: u64) -> String {
    let max_age = exp.saturating_sub(now_secs());
    format!("{name}={token}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={max_age}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(read: &[&str]) -> Verified {
        let claims = Claims {
            sub: None,
            exp: 0,
            iss: String::new(),
            aud: String::new(),
            read: read.iter().map(|s| s.to_string()).collect(),
            publish: vec!["user".into()],
            stream_exp: None,
            nbf: None,
            admin: false,
            jti: None,
        };
        let grants = claims.read.iter().filter_map(|c| Grant::parse(c)).collect();
        Verified { claims, grants, via_cookie: false }
    }

    fn test_auth() -> Auth {
        Auth::new(&AuthConfig { secret: "0123456789abcdef0123456789abcdef".into(), ..AuthConfig::default() })
            .expect("auth")
    }

    fn b64(v: &serde_json::Value) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn grants_cover_exactly_what_they_say() {
        let v = verified(&["events:user:*", "events:repo:a%3Ab"]);
        assert!(v.may_read_channel("events:user:octocat"));
        assert!(!v.may_read_channel("events:users:octocat"));
        assert!(!v.may_read_channel("events:user"));
        assert!(v.may_read_channel("events:repo:a%3Ab"));
        assert!(!v.may_read_channel("events:repo:a%3Abc"));
        assert!(v.may_read_pattern("events:user:"));
        assert!(!v.may_read_pattern("events:"), "a wider pattern than the claim");
        assert!(v.may_publish("user") && !v.may_publish("repo"));
    }

    #[test]
    fn glob_claims_other_than_a_final_star_grant_nothing() {
        let v = verified(&["events:us?r:*", "events:*:octocat", "events:[a-z]*", "*", "events:user*"]);
        for c in ["events:user:octocat", "events:usar:x", "events:a"] {
            assert!(!v.may_read_channel(c), "{c}");
        }
        assert!(!v.may_read_pattern("events:"));
    }

    #[test]
    fn tokens_round_trip_and_are_checked() {
        let config = AuthConfig { secret: "0123456789abcdef0123456789abcdef".into(), ..AuthConfig::default() };
        let auth = Auth::new(&config).expect("auth");
        let claims = auth.claims(Some("t".into()), vec!["events:*".into()], vec![], 60);
        let token = auth.mint(&claims).expect("mint");
        assert_eq!(auth.verify(&token).expect("valid").claims, claims);

        let expired = Claims { exp: now_secs() - 600, ..claims.clone() };
        let e = auth.verify(&auth.mint(&expired).expect("mint")).expect_err("expired");
        assert!(e.to_string().contains("Expired"), "{e}");
        let wrong_aud = Claims { aud: "other".into(), ..claims.clone() };
        let e = auth.verify(&auth.mint(&wrong_aud).expect("mint")).expect_err("audience");
        assert!(e.to_string().contains("Audience"), "{e}");
        let wrong_iss = Claims { iss: "other".into(), ..claims.clone() };
        let e = auth.verify(&auth.mint(&wrong_iss).expect("mint")).expect_err("issuer");
        assert!(e.to_string().contains("Issuer"), "{e}");
        let other =
            Auth::new(&AuthConfig { secret: "another-secret-of-32-bytes-or-more!".into(), ..config }).expect("auth");
        let e = other.verify(&token).expect_err("signature");
        assert!(e.to_string().contains("Signature"), "{e}");

        let v = auth.verify(&token).expect("valid");
        let (ticket, _) = auth.ticket(&v, vec!["events:user:a".into(), "events:repo:*".into()], false).expect("ticket");
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::AUTHORIZATION, format!("Bearer {ticket}").parse().expect("header"));
        assert!(
            matches!(auth.from_headers(&headers, Check::Safe), Err(AuthError::WrongKind(_))),
            "a ticket is no token"
        );
        assert!(matches!(auth.for_stream(&HeaderMap::new(), Some(&token), Check::Safe), Err(AuthError::WrongKind(_))));
        let t = auth.for_stream(&HeaderMap::new(), Some(&ticket), Check::Safe).expect("ticket opens a stream");
        assert_eq!(t.stream_expiry(), claims.exp);
        assert!(t.claims.publish.is_empty());
        // Bound to what it was made for, exactly.
        assert!(t.may_read_channel("events:user:a") && !t.may_read_channel("events:user:b"));
        assert!(t.may_read_pattern("events:repo:") && !t.may_read_channel("events:repo:x"));
        assert!(!t.may_read_pattern("events:user:"));
        // Once.
        let again = auth.for_stream(&HeaderMap::new(), Some(&ticket), Check::Safe);
        assert_eq!(again.map(|_| ()), Err(AuthError::TicketUsed));
        assert!(matches!(auth.ticket(&v, vec![], true), Err(AuthError::Forbidden(_))), "admin only from admin");
    }

    #[test]
    fn alg_none_no_exp_and_nbf_in_the_future_are_refused() {
        let auth = test_auth();
        let claims = auth.claims(None, vec!["events:*".into()], vec![], 60);
        let body = b64(&serde_json::to_value(&claims).expect("json"));
        let none = format!("{}.{body}.", b64(&serde_json::json!({"alg": "none", "typ": "JWT"})));
        assert!(matches!(auth.verify(&none), Err(AuthError::Invalid(_))), "alg none");
        let mut no_exp = serde_json::to_value(&claims).expect("json");
        no_exp.as_object_mut().expect("object").remove("exp");
        let no_exp = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &no_exp, &auth.encoding).expect("encode");
        let e = auth.verify(&no_exp).expect_err("no exp");
        assert!(e.to_string().contains("exp"), "{e}");
        let later = Claims { nbf: Some(now_secs() + 600), ..claims.clone() };
        let e = auth.verify(&auth.mint(&later).expect("mint")).expect_err("nbf");
        assert!(e.to_string().contains("ImmatureSignature"), "{e}");
        let now = Claims { nbf: Some(now_secs()), ..claims };
        assert!(auth.verify(&auth.mint(&now).expect("mint")).is_ok());
    }

    #[test]
    fn cookie_and_bearer_are_found_and_a_repeated_cookie_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::COOKIE, "a=1; dualstream_token=xyz; b=2".parse().expect("header"));
        assert_eq!(cookie(&headers, "dualstream_token"), Ok(Some("xyz".into())));
        headers.append(axum::http::header::COOKIE, "dualstream_token=tossed".parse().expect("header"));
        assert!(matches!(cookie(&headers, "dualstream_token"), Err(AuthError::DuplicateCookie { count: 2, .. })));
        let refused = test_auth().from_headers(&headers, Check::Safe).map(|_| ()).map_err(|e| e.code());
        assert_eq!(refused, Err(ErrorCode::DuplicateCookie));
        headers.insert(axum::http::header::AUTHORIZATION, "bearer abc".parse().expect("header"));
        assert_eq!(bearer(&headers).as_deref(), Some("abc"));
        let set = session_cookie("dualstream_token", "t", now_secs() + 60);
        assert!(set.contains("; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age="), "{set}");
    }
}
