//! Signed tokens (JWT, HS256) and what their claims allow.
//!
//! A token's `read` claim lists channels and patterns a client may read; its
//! `publish` claim lists the source types a producer may publish (`*` for
//! all). Only two claim shapes grant reading: an exact channel
//! (`events:user:octocat`) and a prefix ending in `:*` with no other glob
//! character (`events:user:*`, `events:*`). Any other claim grants nothing,
//! so a claim can never be read wider than it looks.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;

/// The claims of a gateway token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token is for (free text, logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
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
}

impl AuthError {
    /// 401 or 403.
    pub fn status(&self) -> axum::http::StatusCode {
        match self {
            AuthError::Forbidden(_) => axum::http::StatusCode::FORBIDDEN,
            _ => axum::http::StatusCode::UNAUTHORIZED,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing { .. } => "missing_token",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::WrongKind(_) => "wrong_token_kind",
            AuthError::Forbidden(_) => "forbidden",
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
}

impl Verified {
    /// When a stream opened with this token must end, seconds since the
    /// Unix epoch.
    pub fn stream_expiry(&self) -> u64 {
        self.claims.stream_exp.unwrap_or(self.claims.exp)
    }

    /// Whether the holder may read this exact channel.
    pub fn may_read_channel(&self, channel: &str) -> bool {
        self.grants.iter().any(|g| match g {
            Grant::Channel(c) => c == channel,
            Grant::Prefix(p) => channel.starts_with(p.as_str()),
        })
    }

    /// Whether the holder may subscribe to this pattern, which must have the
    /// shape `<literal>:*` (checked by the caller): only a prefix grant
    /// whose text the pattern's literal part starts with covers it.
    pub fn may_read_pattern(&self, pattern_literal: &str) -> bool {
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
}

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
        validation.leeway = config.leeway_secs;
        let key_error = |e: jsonwebtoken::errors::Error| AuthError::Invalid(format!("auth.secret: {e}"));
        Ok(Self {
            config: config.clone(),
            encoding: EncodingKey::from_secret(config.secret.as_bytes()).map_err(key_error)?,
            decoding: DecodingKey::from_secret(config.secret.as_bytes()).map_err(key_error)?,
            validation,
        })
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
        Ok(Verified { claims: data.claims, grants })
    }

    /// A token (not a ticket) from the `Authorization` header or the cookie.
    pub fn from_headers(&self, headers: &HeaderMap) -> Result<Verified, AuthError> {
        let token = bearer(headers).or_else(|| cookie(headers, &self.config.cookie));
        let token = token.ok_or_else(|| AuthError::Missing { cookie: self.config.cookie.clone() })?;
        let v = self.verify(&token)?;
        if v.claims.stream_exp.is_some() {
            return Err(AuthError::WrongKind("a ticket only opens a stream (?ticket=); send the token itself"));
        }
        Ok(v)
    }

    /// For opening a stream: a ticket in the query, else a token in the
    /// headers.
    pub fn for_stream(&self, headers: &HeaderMap, ticket: Option<&str>) -> Result<Verified, AuthError> {
        match ticket {
            Some(t) => {
                let v = self.verify(t)?;
                if v.claims.stream_exp.is_none() {
                    return Err(AuthError::WrongKind(
                        "the ticket parameter takes a ticket from POST /v1/tickets, never a token: URLs end up in logs",
                    ));
                }
                Ok(v)
            }
            None => self.from_headers(headers),
        }
    }

    /// A short-lived ticket for `EventSource`, which cannot send headers:
    /// it reads what the token reads, publishes nothing, opens a stream for
    /// `ticket_ttl_secs` and the stream ends when the token would have.
    pub fn ticket(&self, token: &Verified) -> Result<(String, u64), AuthError> {
        let ttl = self.config.ticket_ttl_secs;
        let exp = now_secs().saturating_add(ttl).min(token.claims.exp);
        let claims = Claims {
            sub: token.claims.sub.clone(),
            exp,
            iss: token.claims.iss.clone(),
            aud: token.claims.aud.clone(),
            read: token.claims.read.clone(),
            publish: Vec::new(),
            stream_exp: Some(token.claims.exp),
        };
        Ok((self.mint(&claims)?, ttl))
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(axum::http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';').find_map(|kv| {
            let (k, val) = kv.trim().split_once('=')?;
            (k == name).then(|| val.to_owned())
        })
    })
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
        };
        let grants = claims.read.iter().filter_map(|c| Grant::parse(c)).collect();
        Verified { claims, grants }
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
        let other = Auth::new(&AuthConfig { secret: "another-secret-of-32-bytes-or-more!".into(), ..config }).expect("auth");
        let e = other.verify(&token).expect_err("signature");
        assert!(e.to_string().contains("Signature"), "{e}");

        let v = auth.verify(&token).expect("valid");
        let (ticket, _) = auth.ticket(&v).expect("ticket");
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::AUTHORIZATION, format!("Bearer {ticket}").parse().expect("header"));
        assert!(matches!(auth.from_headers(&headers), Err(AuthError::WrongKind(_))), "a ticket is no token");
        assert!(matches!(auth.for_stream(&HeaderMap::new(), Some(&token)), Err(AuthError::WrongKind(_))));
        let t = auth.for_stream(&HeaderMap::new(), Some(&ticket)).expect("ticket opens a stream");
        assert_eq!(t.stream_expiry(), claims.exp);
        assert!(t.claims.publish.is_empty());
    }

    #[test]
    fn cookie_and_bearer_are_found() {
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::COOKIE, "a=1; dualstream_token=xyz; b=2".parse().expect("header"));
        assert_eq!(cookie(&headers, "dualstream_token").as_deref(), Some("xyz"));
        headers.insert(axum::http::header::AUTHORIZATION, "bearer abc".parse().expect("header"));
        assert_eq!(bearer(&headers).as_deref(), Some("abc"));
    }
}
