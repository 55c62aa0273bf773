//! What one client may make the gateway hold: streams per token subject, per
//! client address and in all, and WebSocket commands per second. Each
//! refusal is typed, names the limit, and says when to retry.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};

use crate::config::GatewayLimits;
use crate::error::ErrorCode;

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

/// Which limit a client ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `limits.max_streams`: the gateway's whole capacity.
    Streams,
    /// `limits.max_streams_per_subject`.
    StreamsPerSubject,
    /// `limits.max_streams_per_address`.
    StreamsPerAddress,
    /// `limits.commands_per_sec`, on one WebSocket.
    CommandsPerSec,
    /// `limits.max_connections`: the gateway's whole capacity.
    Connections,
    /// `limits.far_resumes_per_min`, per token subject.
    FarResumesPerMin,
}

impl Limit {
    /// The setting, as a path.
    pub(crate) fn field(self) -> &'static str {
        match self {
            Limit::Streams => "limits.max_streams",
            Limit::StreamsPerSubject => "limits.max_streams_per_subject",
            Limit::StreamsPerAddress => "limits.max_streams_per_address",
            Limit::CommandsPerSec => "limits.commands_per_sec",
            Limit::Connections => "limits.max_connections",
            Limit::FarResumesPerMin => "limits.far_resumes_per_min",
        }
    }

    /// The stable code.
    pub(crate) fn code(self) -> ErrorCode {
        match self {
            Limit::Streams | Limit::StreamsPerSubject | Limit::StreamsPerAddress => ErrorCode::TooManyStreams,
            Limit::CommandsPerSec | Limit::FarResumesPerMin => ErrorCode::RateLimited,
            Limit::Connections => ErrorCode::TooManyConnections,
        }
    }

    /// 429 for one client's share, 503 for the gateway's whole capacity.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Limit::Streams | Limit::Connections => StatusCode::SERVICE_UNAVAILABLE,
            Limit::StreamsPerSubject | Limit::StreamsPerAddress | Limit::CommandsPerSec | Limit::FarResumesPerMin => {
                StatusCode::TOO_MANY_REQUESTS
            }
        }
    }
}

/// A limit a client ran into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} = {value}: {what}", .limit.field())]
pub(crate) struct LimitError {
    /// Which limit.
    pub(crate) limit: Limit,
    /// Its value.
    pub(crate) value: usize,
    /// What was refused.
    pub(crate) what: String,
    /// When to try again.
    pub(crate) retry_after: Duration,
}

impl LimitError {
    /// The error item (WebSocket), with the limit and when to retry.
    pub(crate) fn item(&self) -> crate::wire::ErrorItem<'static> {
        let retry_after_ms = u64::try_from(self.retry_after.as_millis()).unwrap_or(u64::MAX);
        crate::wire::ErrorItem::new(self.limit.code(), self.to_string()).limit(
            self.limit.field(),
            self.value,
            retry_after_ms,
        )
    }

    /// `limits.max_connections` is reached: the refusal of a connection.
    pub(crate) fn connections(max: usize) -> Self {
        let what = "the gateway has as many connections as it takes".to_owned();
        Self { limit: Limit::Connections, value: max, what, retry_after: Duration::from_secs(1) }
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
    pub(crate) fn acquire(
        &mut self,
        l: &GatewayLimits,
        subject: &str,
        address: Option<IpAddr>,
    ) -> Result<(), LimitError> {
        let refuse = |limit, value, what: String| LimitError { limit, value, what, retry_after: STREAM_RETRY };
        if self.total >= l.max_streams {
            let what = "the gateway has as many open streams as it takes".to_owned();
            return Err(refuse(Limit::Streams, l.max_streams, what));
        }
        if self.by_subject.get(subject).copied().unwrap_or(0) >= l.max_streams_per_subject {
            let what = format!("the token's subject {:?} has as many open streams as it may", short(subject));
            return Err(refuse(Limit::StreamsPerSubject, l.max_streams_per_subject, what));
        }
        if let Some(a) = address {
            if self.by_address.get(&a).copied().unwrap_or(0) >= l.max_streams_per_address {
                let what = format!("the client address {a} has as many open streams as it may");
                return Err(refuse(Limit::StreamsPerAddress, l.max_streams_per_address, what));
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

/// The tokens of a bucket as of `at`: it refills at a rate up to a cap.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// The tokens at `now`, refilled at `per_sec` up to `cap`.
    fn level(self, now: Instant, per_sec: f64, cap: f64) -> f64 {
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * per_sec).min(cap)
    }
}

/// A bucket per token subject, each of `cap` tokens refilled at `per_sec`.
/// Subjects whose bucket is full again are forgotten once the map is large,
/// so it holds only those that took tokens lately.
#[derive(Debug, Default)]
struct SubjectBuckets(HashMap<String, Bucket>);

impl SubjectBuckets {
    /// Take `want` tokens from `subject`'s bucket, or take none and return
    /// the tokens there are.
    fn take(&mut self, subject: &str, want: f64, cap: f64, per_sec: f64, now: Instant) -> Result<(), f64> {
        if self.0.len() >= 4_096 {
            self.0.retain(|_, b| b.level(now, per_sec, cap) < cap);
        }
        let tokens = self.0.get(subject).map_or(cap, |b| b.level(now, per_sec, cap));
        if tokens < want {
            return Err(tokens);
        }
        self.0.insert(subject.to_owned(), Bucket { tokens: tokens - want, at: now });
        Ok(())
    }
}

/// A token bucket: `per_sec` commands a second, bursts of as many. A pure
/// state machine; the clock is passed in.
#[derive(Debug)]
pub(crate) struct CommandRate {
    per_sec: u32,
    bucket: Bucket,
}

impl CommandRate {
    /// Full at `now`.
    pub(crate) fn new(per_sec: u32, now: Instant) -> Self {
        Self { per_sec, bucket: Bucket { tokens: f64::from(per_sec), at: now } }
    }

    /// Take one command's token, or say how long until one is there.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), LimitError> {
        let rate = f64::from(self.per_sec);
        let tokens = self.bucket.level(now, rate, rate);
        self.bucket = Bucket { tokens, at: now };
        if tokens >= 1.0 {
            self.bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(LimitError {
            limit: Limit::CommandsPerSec,
            value: self.per_sec as usize,
            what: "too many commands on this connection; this one was not run".into(),
            retry_after: Duration::from_secs_f64((1.0 - tokens) / rate),
        })
    }
}

/// Far resumes per token subject: a bucket of `per_min` each, refilled
/// evenly over a minute. A far resume starts a channel's join further behind
/// its partition's end than the tail cache holds, so it sends the backfill
/// readers to Kafka and makes the gateway send the client everything in
/// between: one token holder resuming from offset 0 in a loop would
/// otherwise take the shared backfill budget and the gateway's CPU from
/// everyone else. A pure state machine; the clock is passed in. Subjects
/// whose bucket is full again are forgotten, so the map holds only those
/// that resumed far within the last minute.
#[derive(Debug, Default)]
pub(crate) struct FarResumes {
    by_subject: SubjectBuckets,
}

impl FarResumes {
    /// Take `n` far resumes for `subject`, or refuse all of them and say
    /// when that many are there.
    pub(crate) fn take(&mut self, subject: &str, n: usize, per_min: u32, now: Instant) -> Result<(), LimitError> {
        if n == 0 {
            return Ok(());
        }
        let cap = f64::from(per_min);
        let per_sec = cap / 60.0;
        let want = n as f64;
        let Err(tokens) = self.by_subject.take(subject, want, cap, per_sec, now) else { return Ok(()) };
        let what = if want > cap {
            format!("this subscription resumes {n} channels from further back than the gateway keeps, more than a minute's share")
        } else {
            format!(
                "the token's subject {:?} resumed too many channels from further back than the gateway keeps; \
                 these {n} were not started",
                short(subject)
            )
        };
        Err(LimitError {
            limit: Limit::FarResumesPerMin,
            value: per_min as usize,
            what,
            retry_after: Duration::from_secs_f64(((want.min(cap) - tokens) / per_sec).max(1.0)),
        })
    }
}

/// The pace of far history per token subject: items of channels that
/// resumed further back than the tail cache holds, up to where their
/// partition ended when they subscribed. A bucket of `per_sec` items per
/// subject (a second's worth at once), refilled evenly. A client resuming
/// from far back in a loop, within its `far_resumes_per_min`, otherwise had
/// the gateway send it its whole history as fast as its connection took
/// it, and the other clients' live items waited behind those deliveries
/// (docs/benchmark-analysis.md). Per subject, not per connection: a client
/// that reconnects for each pass gets no fresh bucket. Subjects whose
/// bucket is full again are forgotten. A pure state machine; the clock is
/// passed in.
#[derive(Debug, Default)]
pub(crate) struct FarPace {
    by_subject: SubjectBuckets,
}

impl FarPace {
    /// Take one item's token for `subject`, or say how long until one is
    /// there.
    pub(crate) fn take(&mut self, subject: &str, per_sec: u32, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(per_sec);
        self.by_subject
            .take(subject, 1.0, rate, rate, now)
            .map_err(|tokens| Duration::from_secs_f64((1.0 - tokens) / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_counted_per_subject_address_and_in_all_and_released() {
        let l = GatewayLimits {
            max_streams: 3,
            max_streams_per_subject: 2,
            max_streams_per_address: 2,
            ..Default::default()
        };
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let mut c = StreamCounts::default();
        c.acquire(&l, "alice", Some(a)).expect("1");
        c.acquire(&l, "alice", Some(b)).expect("2");
        let e = c.acquire(&l, "alice", Some(b)).expect_err("subject");
        let (field, status, code) = (e.limit.field(), e.limit.status(), e.limit.code());
        assert_eq!(
            (field, status, code),
            ("limits.max_streams_per_subject", StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyStreams)
        );
        c.acquire(&l, "bob", Some(a)).expect("3");
        let e = c.acquire(&l, "carol", Some(b)).expect_err("total");
        assert_eq!((e.limit.field(), e.limit.status()), ("limits.max_streams", StatusCode::SERVICE_UNAVAILABLE));
        c.release("alice", Some(b));
        let e = c.acquire(&l, "carol", Some(a)).expect_err("address");
        assert_eq!(e.limit.field(), "limits.max_streams_per_address");
        c.acquire(&l, "carol", Some(b)).expect("a released slot is reused");
        for (s, ad) in [("alice", a), ("bob", a), ("carol", b)] {
            c.release(s, Some(ad));
        }
        assert_eq!((c.total, c.by_subject.len(), c.by_address.len()), (0, 0, 0), "nothing is kept for gone clients");
    }

    #[test]
    fn far_resumes_are_limited_per_subject_and_refill_over_a_minute() {
        let t0 = Instant::now();
        let mut r = FarResumes::default();
        r.take("mallory", 64, 120, t0).expect("a whole connection's resume fits");
        r.take("mallory", 56, 120, t0).expect("up to the minute's share");
        let e = r.take("mallory", 1, 120, t0).expect_err("the share is spent");
        let (field, status, code) = (e.limit.field(), e.limit.status(), e.limit.code());
        assert_eq!(
            (field, status, code),
            ("limits.far_resumes_per_min", StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited)
        );
        assert_eq!(e.retry_after, Duration::from_secs(1), "one comes back every half second; at least 1 s");
        r.take("alice", 10, 120, t0).expect("another subject has its own share");
        r.take("mallory", 2, 120, t0 + Duration::from_secs(1)).expect("two a second come back");
        let e = r.take("mallory", 10, 120, t0 + Duration::from_secs(1)).expect_err("not ten");
        assert_eq!(e.retry_after, Duration::from_secs(5), "ten take five seconds to come back");
        r.take("mallory", 0, 120, t0).expect("nothing far: nothing taken");
        let e = r.take("bob", 121, 120, t0).expect_err("more than a minute's share at once");
        assert!(e.to_string().contains("more than a minute's share"), "{e}");
    }

    #[test]
    fn far_resume_buckets_of_gone_subjects_are_forgotten() {
        let t0 = Instant::now();
        let mut r = FarResumes::default();
        for i in 0..4_096 {
            r.take(&format!("s{i}"), 1, 60, t0).expect("fits");
        }
        // A minute later every bucket is full again: the next subject's
        // take forgets them all.
        r.take("late", 1, 60, t0 + Duration::from_secs(61)).expect("fits");
        assert_eq!(r.by_subject.0.len(), 1);
    }

    #[test]
    fn far_history_is_paced_per_subject_after_a_seconds_burst() {
        let t0 = Instant::now();
        let mut p = FarPace::default();
        for _ in 0..100 {
            p.take("mallory", 100, t0).expect("the burst");
        }
        assert_eq!(p.take("mallory", 100, t0), Err(Duration::from_millis(10)), "one item every 10 ms after it");
        assert!(p.take("mallory", 100, t0 + Duration::from_millis(5)).is_err());
        p.take("mallory", 100, t0 + Duration::from_millis(10)).expect("the next item 10 ms later");
        p.take("alice", 100, t0).expect("another subject has its own bucket");
        // An idle second fills it again, never past a second's worth.
        let later = t0 + Duration::from_secs(5);
        for _ in 0..100 {
            p.take("mallory", 100, later).expect("a second's worth");
        }
        assert!(p.take("mallory", 100, later).is_err());
    }

    #[test]
    fn far_pace_buckets_of_gone_subjects_are_forgotten() {
        let t0 = Instant::now();
        let mut p = FarPace::default();
        for i in 0..4_096 {
            p.take(&format!("s{i}"), 10, t0).expect("fits");
        }
        p.take("late", 10, t0 + Duration::from_secs(2)).expect("fits");
        assert_eq!(p.by_subject.0.len(), 1, "full buckets are dropped once the map is large");
    }

    #[test]
    fn commands_are_limited_to_a_rate_with_a_burst() {
        let t0 = Instant::now();
        let mut r = CommandRate::new(4, t0);
        for _ in 0..4 {
            r.take(t0).expect("the burst");
        }
        let e = r.take(t0).expect_err("over the rate");
        assert_eq!((e.limit.code(), e.retry_after), (ErrorCode::RateLimited, Duration::from_millis(250)));
        assert_eq!(
            e.to_string(),
            "limits.commands_per_sec = 4: too many commands on this connection; this one was not run"
        );
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
