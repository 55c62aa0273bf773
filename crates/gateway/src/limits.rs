//! What one client may make the gateway hold: streams per token subject, per
//! client address and in all, and WebSocket commands per second. Each
//! refusal is typed, names the limit, and says when to retry.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::config::GatewayLimits;

/// The TCP peer of a request, put in its extensions by `Gateway::serve`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

/// The address a client's streams are counted under: the proxy's header
/// when one is configured and present, else the TCP peer.
pub(crate) fn client_address(limits: &GatewayLimits, headers: &HeaderMap, peer: Option<PeerAddr>) -> Option<IpAddr> {
    let forwarded = limits.client_address_header.as_deref().and_then(|h| {
        let last = headers.get_all(h).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).last()?;
        last.trim().parse::<IpAddr>().ok()
    });
    forwarded.or(peer.map(|p| p.0.ip()))
}

/// A limit a client ran into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {limit}: {what}")]
pub(crate) struct LimitError {
    /// The setting, as a path (`limits.max_streams_per_subject`).
    pub(crate) field: &'static str,
    /// Its value.
    pub(crate) limit: usize,
    /// What was refused.
    pub(crate) what: String,
    /// 429 for one client's share, 503 for the gateway's whole capacity.
    pub(crate) status: StatusCode,
    /// When to try again.
    pub(crate) retry_after: Duration,
}

impl LimitError {
    /// The stable code.
    pub(crate) fn code(&self) -> &'static str {
        match self.field {
            "limits.commands_per_sec" => "rate_limited",
            "limits.max_connections" => "too_many_connections",
            _ => "too_many_streams",
        }
    }
}

impl IntoResponse for LimitError {
    fn into_response(self) -> Response {
        let secs = self.retry_after.as_secs().max(1).to_string();
        let mut r = crate::ingest::error(self.status, self.code(), &self, json!({"field": self.field, "limit": self.limit}));
        if let Ok(v) = secs.parse() {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// How long a refused stream should wait: streams are long-lived, so a
/// slot frees up when one of the client's own closes.
const STREAM_RETRY: Duration = Duration::from_secs(5);

/// Open streams per subject and per address.
#[derive(Debug, Default)]
pub(crate) struct StreamCounts {
    total: usize,
    by_subject: HashMap<String, usize>,
    by_address: HashMap<IpAddr, usize>,
}

impl StreamCounts {
    /// Count one more stream, or say which limit it would break.
    pub(crate) fn acquire(&mut self, l: &GatewayLimits, subject: &str, address: Option<IpAddr>) -> Result<(), LimitError> {
        let refuse = |field, limit, what: String, status| LimitError { field, limit, what, status, retry_after: STREAM_RETRY };
        if self.total >= l.max_streams {
            let what = "the gateway has as many open streams as it takes".to_owned();
            return Err(refuse("limits.max_streams", l.max_streams, what, StatusCode::SERVICE_UNAVAILABLE));
        }
        if self.by_subject.get(subject).copied().unwrap_or(0) >= l.max_streams_per_subject {
            let what = format!("the token's subject {:?} has as many open streams as it may", short(subject));
            return Err(refuse("limits.max_streams_per_subject", l.max_streams_per_subject, what, StatusCode::TOO_MANY_REQUESTS));
        }
        if let Some(a) = address {
            if self.by_address.get(&a).copied().unwrap_or(0) >= l.max_streams_per_address {
                let what = format!("the client address {a} has as many open streams as it may");
                return Err(refuse("limits.max_streams_per_address", l.max_streams_per_address, what, StatusCode::TOO_MANY_REQUESTS));
            }
            *self.by_address.entry(a).or_default() += 1;
        }
        *self.by_subject.entry(subject.to_owned()).or_default() += 1;
        self.total += 1;
        Ok(())
    }

    /// A stream counted by `acquire` ended.
    pub(crate) fn release(&mut self, subject: &str, address: Option<IpAddr>) {
        fn down<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
            if let Some(n) = m.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
        down(&mut self.by_subject, &subject.to_owned());
        if let Some(a) = address {
            down(&mut self.by_address, &a);
        }
        self.total -= 1;
    }
}

fn short(s: &str) -> String {
    s.chars().take(100).collect()
}

/// A token bucket: `per_sec` commands a second, bursts of as many. A pure
/// state machine; the clock is passed in.
#[derive(Debug)]
pub(crate) struct CommandRate {
    per_sec: u32,
    tokens: f64,
    at: Instant,
}

impl CommandRate {
    /// Full at `now`.
    pub(crate) fn new(per_sec: u32, now: Instant) -> Self {
        Self { per_sec, tokens: f64::from(per_sec), at: now }
    }

    /// Take one command's token, or say how long until one is there.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), LimitError> {
        let rate = f64::from(self.per_sec);
        self.tokens = (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate).min(rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(LimitError {
            field: "limits.commands_per_sec",
            limit: self.per_sec as usize,
            what: "too many commands on this connection; this one was not run".into(),
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Duration::from_secs_f64((1.0 - self.tokens) / rate),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_counted_per_subject_address_and_in_all_and_released() {
        let l = GatewayLimits { max_streams: 3, max_streams_per_subject: 2, max_streams_per_address: 2, ..Default::default() };
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let mut c = StreamCounts::default();
        c.acquire(&l, "alice", Some(a)).expect("1");
        c.acquire(&l, "alice", Some(b)).expect("2");
        let e = c.acquire(&l, "alice", Some(b)).expect_err("subject");
        assert_eq!((e.field, e.status, e.code()), ("limits.max_streams_per_subject", StatusCode::TOO_MANY_REQUESTS, "too_many_streams"));
        c.acquire(&l, "bob", Some(a)).expect("3");
        let e = c.acquire(&l, "carol", Some(b)).expect_err("total");
        assert_eq!((e.field, e.status), ("limits.max_streams", StatusCode::SERVICE_UNAVAILABLE));
        c.release("alice", Some(b));
        let e = c.acquire(&l, "carol", Some(a)).expect_err("address");
        assert_eq!(e.field, "limits.max_streams_per_address");
        c.acquire(&l, "carol", Some(b)).expect("a released slot is reused");
        for (s, ad) in [("alice", a), ("bob", a), ("carol", b)] {
            c.release(s, Some(ad));
        }
        assert_eq!((c.total, c.by_subject.len(), c.by_address.len()), (0, 0, 0), "nothing is kept for gone clients");
    }

    #[test]
    fn commands_are_limited_to_a_rate_with_a_burst() {
        let t0 = Instant::now();
        let mut r = CommandRate::new(4, t0);
        for _ in 0..4 {
            r.take(t0).expect("the burst");
        }
        let e = r.take(t0).expect_err("over the rate");
        assert_eq!((e.code(), e.retry_after), ("rate_limited", Duration::from_millis(250)));
        r.take(t0 + Duration::from_millis(250)).expect("a token a quarter second later");
        assert!(r.take(t0 + Duration::from_millis(300)).is_err());
    }

    #[test]
    fn the_forwarded_address_is_used_only_when_configured() {
        let peer = Some(PeerAddr("127.0.0.1:9".parse().expect("addr")));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 5.6.7.8".parse().expect("header"));
        let mut l = GatewayLimits::default();
        assert_eq!(client_address(&l, &h, peer), Some("127.0.0.1".parse().expect("ip")));
        l.client_address_header = Some("x-forwarded-for".into());
        assert_eq!(client_address(&l, &h, peer), Some("5.6.7.8".parse().expect("ip")), "the proxy's own entry");
    }
}
