//! Which sites may use a browser's credentials here.
//!
//! A browser attaches the gateway's cookie to requests that another site's
//! page makes (a form post, a WebSocket), but it also sends that page's
//! `Origin`, which the page cannot change. So a WebSocket upgrade, and any
//! request authenticated by the cookie, is refused unless its `Origin` is
//! the gateway's own (the request's `Host`) or listed in `allowed_origins`.
//! Requests with `Authorization: Bearer` need no such check: a page cannot
//! make a browser add a header it does not know.

use axum::http::{header, HeaderMap};

use crate::auth::AuthError;

/// `scheme://host[:port]`, lowercase, the scheme's default port left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    /// `host[:port]`.
    authority: String,
}

fn default_port(scheme: &str) -> &'static str {
    if scheme == "https" {
        ":443"
    } else {
        ":80"
    }
}

/// Parse an origin as browsers send it.
pub(crate) fn parse_origin(text: &str) -> Result<Origin, String> {
    let lower = text.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://").ok_or("no scheme")?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("scheme {scheme:?} is not http or https"));
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err("an origin is scheme://host[:port], with no path, query or user".into());
    }
    let authority = rest.strip_suffix(default_port(scheme)).unwrap_or(rest).to_owned();
    Ok(Origin { scheme: scheme.to_owned(), authority })
}

/// The allowed origins of a gateway.
#[derive(Clone, Debug, Default)]
pub(crate) struct OriginPolicy {
    allowed: Vec<Origin>,
}

/// What kind of request is checked for its origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Check {
    /// A WebSocket upgrade.
    WebSocket,
    /// `GET` or `HEAD`: reads only.
    Safe,
    /// Anything that changes state (`POST`).
    Unsafe,
}

impl OriginPolicy {
    /// From `allowed_origins` (checked by the configuration).
    pub(crate) fn new(allowed: &[String]) -> Self {
        Self { allowed: allowed.iter().filter_map(|o| parse_origin(o).ok()).collect() }
    }

    fn allows(&self, origin: &Origin, host: Option<&str>) -> bool {
        let same = host.is_some_and(|h| {
            let h = h.to_ascii_lowercase();
            h.strip_suffix(default_port(&origin.scheme)).unwrap_or(&h) == origin.authority
        });
        same || self.allowed.contains(origin)
    }

    /// Check a request: its `Origin`, when it has one, must be allowed; a
    /// cookie-authenticated WebSocket or `POST` must have one (browsers always
    /// send it there); a cookie-authenticated `GET` that the browser marks
    /// `Sec-Fetch-Site: cross-site` is refused.
    pub(crate) fn check(&self, headers: &HeaderMap, kind: Check, cookie: bool) -> Result<(), AuthError> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        match headers.get(header::ORIGIN) {
            Some(v) => {
                let text = String::from_utf8_lossy(v.as_bytes());
                match parse_origin(&text) {
                    Ok(o) if self.allows(&o, host) => Ok(()),
                    _ => Err(AuthError::CrossOrigin(format!(
                        "Origin {:?} is neither this gateway's origin (Host {:?}) nor in allowed_origins",
                        text.chars().take(200).collect::<String>(),
                        host.unwrap_or("")
                    ))),
                }
            }
            None if cookie && kind != Check::Safe => Err(AuthError::CrossOrigin(
                "a request authenticated by the cookie must carry an Origin header (browsers send one); \
                 other clients send Authorization: Bearer"
                    .into(),
            )),
            None if cookie && headers.get("sec-fetch-site").is_some_and(|v| v == "cross-site") => {
                Err(AuthError::CrossOrigin("a cross-site request cannot use the cookie".into()))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn origins_parse_as_browsers_send_them() {
        assert_eq!(parse_origin("HTTPS://App.Example.com:443"), parse_origin("https://app.example.com"));
        assert_ne!(parse_origin("http://a.example:8080"), parse_origin("http://a.example"));
        for bad in ["null", "app.example.com", "ftp://a", "https://a/", "https://a/path", "https://u@a", "https://"] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn same_origin_and_listed_origins_pass_others_do_not() {
        let p = OriginPolicy::new(&["https://app.example.com".into()]);
        let ok = |h: &[(&'static str, &'static str)], kind, cookie| p.check(&headers(h), kind, cookie).is_ok();
        let host = ("host", "gw.example.com");
        assert!(ok(&[host, ("origin", "https://gw.example.com")], Check::WebSocket, true));
        assert!(ok(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080")], Check::Unsafe, true));
        assert!(ok(&[host, ("origin", "https://app.example.com")], Check::Unsafe, true));
        assert!(!ok(&[host, ("origin", "https://evil.example")], Check::WebSocket, false), "every upgrade");
        assert!(!ok(&[host, ("origin", "https://gw.example.com.evil.example")], Check::Safe, true));
        assert!(!ok(&[host, ("origin", "null")], Check::Unsafe, true));
        assert!(!ok(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8081")], Check::Unsafe, true));
        // No Origin: a bearer client, or a same-origin GET (browsers leave it out).
        assert!(ok(&[host], Check::WebSocket, false));
        assert!(ok(&[host], Check::Safe, true));
        assert!(!ok(&[host], Check::Unsafe, true));
        assert!(!ok(&[host], Check::WebSocket, true));
        assert!(!ok(&[host, ("sec-fetch-site", "cross-site")], Check::Safe, true));
    }
}
