//! The topic of each source type, with failed lookups cached: when a topic
//! cannot be created, the broker is asked again only after a back-off
//! (100 ms, doubling up to 30 s), not once per event. Meanwhile events of
//! that source type fail at once with the cached error.
//!
//! A pure state machine: the caller passes the clock, and nothing in here
//! awaits. How `sink.rs` is meant to use it, in place of its
//! `RwLock<HashMap<..>>` (`Inner::topics`):
//!
//! ```text
//! // KafkaSink::new:
//! topics: TopicCache::new(2 * Duration::from_millis(config.health_timeout_ms)),
//!
//! // KafkaSink::topic_for:
//! let st = event.source().source_type();
//! match self.inner.topics.lookup(st, Instant::now()) {
//!     Lookup::Ready(topic) => return Ok(topic),
//!     Lookup::Failing(e) => return Err(e),
//!     Lookup::Resolve => {}
//! }
//! let name: Arc<str> = self.inner.config.topic.topic_for(st).into();
//! if self.inner.config.create_topics.is_some() {
//!     if let Err(e) = self.ensure_topics(&[&name]).await {
//!         self.inner.topics.failed(st, &e, Instant::now());
//!         return Err(e);
//!     }
//! }
//! self.inner.topics.resolved(st, name.clone());
//! Ok(name)
//! ```
//!
//! After a back-off ends, one caller gets `Lookup::Resolve` and the others
//! keep getting the cached failure until it reports, or until the
//! `resolve_timeout` given to [`TopicCache::new`] passes (its caller may have
//! been cancelled), so an outage does not turn into one admin call per
//! concurrent publish.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use dualstream_core::{Backoff, SinkError};

/// The back-off after the first failure of a source type's topic.
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest back-off: it doubles after each failed retry, up to this.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The back-off of a source type's failing topic.
const BACKOFF: Backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);

/// What [`TopicCache::lookup`] says about a source type.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// The topic is known: use it.
    Ready(Arc<str>),
    /// Resolving the topic failed recently and the back-off is not over (or
    /// another caller is retrying): fail with this error, without asking the
    /// broker.
    Failing(SinkError),
    /// Resolve (create) the topic now, then report with
    /// [`TopicCache::resolved`] or [`TopicCache::failed`].
    Resolve,
}

/// The cached failure of one source type's topic.
#[derive(Debug)]
struct Failure {
    /// What the broker or client said.
    message: String,
    /// Whether trying again may succeed.
    retriable: bool,
    /// No retry before this instant.
    until: Instant,
    /// The back-off that set `until`.
    backoff: Duration,
    /// A caller was told to resolve after the back-off, and has not reported.
    retrying: bool,
}

impl Failure {
    fn error(&self, source_type: &str, now: Instant) -> SinkError {
        let when = if self.retrying {
            "a retry is under way".to_owned()
        } else {
            format!("retried in {} ms", self.until.saturating_duration_since(now).as_millis())
        };
        SinkError::Broker {
            message: format!(
                "topic of source type {source_type:?} unavailable (cached failure, {when}): {}",
                self.message
            ),
            retriable: self.retriable,
        }
    }
}

#[derive(Debug)]
enum Entry {
    Ready(Arc<str>),
    Failed(Failure),
}

/// Source type → topic, or the cached failure to resolve it. Cheap on the hot
/// path: a known topic costs one read lock, one map lookup and an `Arc`
/// clone.
#[derive(Debug)]
pub(crate) struct TopicCache {
    entries: RwLock<HashMap<Arc<str>, Entry>>,
    /// How long a caller told to retry after a back-off may take to report
    /// before another caller is told to retry.
    resolve_timeout: Duration,
}

impl TopicCache {
    /// An empty cache. `resolve_timeout` bounds how long a retry after a
    /// back-off holds off other callers when it never reports (its caller
    /// was cancelled); give it at least the time a topic creation may take.
    pub(crate) fn new(resolve_timeout: Duration) -> Self {
        Self { entries: RwLock::new(HashMap::new()), resolve_timeout }
    }

    /// The topic of `source_type` at `now`, its cached failure, or
    /// [`Lookup::Resolve`] when the caller should resolve it now.
    pub(crate) fn lookup(&self, source_type: &str, now: Instant) -> Lookup {
        {
            let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
            match entries.get(source_type) {
                None => return Lookup::Resolve,
                Some(Entry::Ready(topic)) => return Lookup::Ready(topic.clone()),
                Some(Entry::Failed(f)) if now < f.until => return Lookup::Failing(f.error(source_type, now)),
                Some(Entry::Failed(_)) => {}
            }
        }
        // The back-off is over: one caller retries, the others keep failing
        // fast until it reports.
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        match entries.get_mut(source_type) {
            None => Lookup::Resolve,
            Some(Entry::Ready(topic)) => Lookup::Ready(topic.clone()),
            Some(Entry::Failed(f)) if now < f.until => Lookup::Failing(f.error(source_type, now)),
            Some(Entry::Failed(f)) => {
                f.until = now + self.resolve_timeout;
                f.retrying = true;
                Lookup::Resolve
            }
        }
    }

    /// The topic of `source_type` is `topic`: later lookups return it, and
    /// any cached failure and back-off are gone.
    pub(crate) fn resolved(&self, source_type: &str, topic: Arc<str>) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        match entries.get_mut(source_type) {
            Some(entry) => *entry = Entry::Ready(topic),
            None => {
                entries.insert(source_type.into(), Entry::Ready(topic));
            }
        }
    }

    /// Resolving the topic of `source_type` failed at `now` with `error`.
    ///
    /// The first failure backs off [`MIN_BACKOFF`]; a failed retry after a
    /// back-off doubles it, up to [`MAX_BACKOFF`]. A failure from a call that
    /// started before the failure was cached (concurrent first uses) keeps
    /// the back-off as it is, and a failure after another call resolved the
    /// topic changes nothing: the topic is there.
    pub(crate) fn failed(&self, source_type: &str, error: &SinkError, now: Instant) {
        let message = match error {
            SinkError::Broker { message, .. } => message.clone(),
            other => other.to_string(),
        };
        let retriable = error.is_retriable();
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        match entries.get_mut(source_type) {
            Some(Entry::Ready(_)) => {}
            Some(Entry::Failed(f)) => {
                if f.retrying {
                    f.backoff = BACKOFF.after(f.backoff);
                    f.until = now + f.backoff;
                    f.retrying = false;
                }
                f.message = message;
                f.retriable = retriable;
            }
            None => {
                let failure =
                    Failure { message, retriable, until: now + BACKOFF.first(), backoff: BACKOFF.first(), retrying: false };
                entries.insert(source_type.into(), Entry::Failed(failure));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn broker_error() -> SinkError {
        SinkError::Broker { message: "create topic events.user: timed out".into(), retriable: true }
    }

    #[track_caller]
    fn assert_failing(cache: &TopicCache, now: Instant) -> SinkError {
        match cache.lookup("user", now) {
            Lookup::Failing(e) => e,
            other => panic!("expected the cached failure, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_resolve(cache: &TopicCache, now: Instant) {
        let got = cache.lookup("user", now);
        assert!(matches!(got, Lookup::Resolve), "expected Resolve, got {got:?}");
    }

    #[test]
    fn unknown_then_ready_shares_the_topic() {
        let cache = TopicCache::new(RESOLVE_TIMEOUT);
        let t0 = Instant::now();
        assert_resolve(&cache, t0);
        let topic: Arc<str> = "events.user".into();
        cache.resolved("user", topic.clone());
        match cache.lookup("user", t0) {
            Lookup::Ready(t) => assert!(Arc::ptr_eq(&t, &topic), "the same Arc is handed out"),
            other => panic!("expected Ready, got {other:?}"),
        }
        assert!(matches!(cache.lookup("order", t0), Lookup::Resolve), "source types are independent");
    }

    #[test]
    fn a_failure_is_cached_for_the_back_off_then_retried_once() {
        let cache = TopicCache::new(RESOLVE_TIMEOUT);
        let t0 = Instant::now();
        assert_resolve(&cache, t0);
        cache.failed("user", &broker_error(), t0);
        for after in [0, 1, 50, 99] {
            let e = assert_failing(&cache, t0 + ms(after));
            assert!(e.is_retriable());
            let msg = e.to_string();
            assert!(msg.contains("cached failure") && msg.contains("timed out"), "{msg}");
            assert!(msg.contains(&format!("retried in {} ms", 100 - after)), "{msg}");
        }
        assert!(matches!(cache.lookup("order", t0), Lookup::Resolve), "other source types are not held back");
        // The back-off is over: one caller retries; the others still fail fast.
        assert_resolve(&cache, t0 + ms(100));
        let e = assert_failing(&cache, t0 + ms(101));
        assert!(e.to_string().contains("a retry is under way"), "{e}");
    }

    #[test]
    fn the_back_off_doubles_and_caps() {
        let cache = TopicCache::new(RESOLVE_TIMEOUT);
        let mut now = Instant::now();
        assert_resolve(&cache, now);
        cache.failed("user", &broker_error(), now);
        let mut expected = MIN_BACKOFF;
        let mut seen = Vec::new();
        for _ in 0..12 {
            assert_failing(&cache, now + expected - ms(1));
            now += expected;
            assert_resolve(&cache, now);
            cache.failed("user", &broker_error(), now);
            seen.push(expected.as_millis());
            expected = (expected * 2).min(MAX_BACKOFF);
        }
        assert_eq!(
            seen,
            [100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 30_000, 30_000, 30_000],
            "doubles from 100 ms, capped at 30 s"
        );
        assert_failing(&cache, now + MAX_BACKOFF - ms(1));
        assert_resolve(&cache, now + MAX_BACKOFF);
    }

    #[test]
    fn success_clears_the_failure() {
        let cache = TopicCache::new(RESOLVE_TIMEOUT);
        let t0 = Instant::now();
        cache.failed("user", &broker_error(), t0);
        let t1 = t0 + MIN_BACKOFF;
        assert_resolve(&cache, t1);
        cache.failed("user", &broker_error(), t1);
        let t2 = t1 + 2 * MIN_BACKOFF;
        assert_resolve(&cache, t2);
        cache.resolved("user", "events.user".into());
        assert!(matches!(cache.lookup("user", t2), Lookup::Ready(t) if &*t == "events.user"));
        // A late failure from a concurrent attempt does not undo it.
        cache.failed("user", &broker_error(), t2);
        assert!(matches!(cache.lookup("user", t2), Lookup::Ready(_)));
    }

    #[test]
    fn concurrent_first_failures_do_not_double_the_back_off() {
        let cache = TopicCache::new(RESOLVE_TIMEOUT);
        let t0 = Instant::now();
        // Two publishes both miss and both try to create the topic.
        assert_resolve(&cache, t0);
        assert_resolve(&cache, t0);
        cache.failed("user", &broker_error(), t0);
        cache.failed("user", &broker_error(), t0 + ms(10));
        assert_failing(&cache, t0 + ms(99));
        assert_resolve(&cache, t0 + ms(100));
    }

    #[test]
    fn a_retry_that_never_reports_is_handed_to_another_caller() {
        let cache = TopicCache::new(RESOLVE_TIMEOUT);
        let t0 = Instant::now();
        cache.failed("user", &broker_error(), t0);
        let t1 = t0 + MIN_BACKOFF;
        assert_resolve(&cache, t1);
        // Its caller was cancelled.
        assert_failing(&cache, t1 + RESOLVE_TIMEOUT - ms(1));
        assert_resolve(&cache, t1 + RESOLVE_TIMEOUT);
    }

    #[test]
    fn the_cached_error_keeps_retriability() {
        let cache = TopicCache::new(RESOLVE_TIMEOUT);
        let t0 = Instant::now();
        let refused = SinkError::Broker { message: "admin client: bad config".into(), retriable: false };
        cache.failed("user", &refused, t0);
        let e = assert_failing(&cache, t0);
        assert_eq!(e.to_string().matches("broker error").count(), 1, "the prefix is not repeated: {e}");
        match e {
            SinkError::Broker { message, retriable } => {
                assert!(!retriable);
                assert!(message.contains("admin client: bad config") && message.contains("\"user\""), "{message}");
            }
            other => panic!("expected a broker error, got {other:?}"),
        }
        cache.failed("order", &SinkError::Rejected { reason: "no such topic".into() }, t0);
        match cache.lookup("order", t0) {
            Lookup::Failing(e) => assert!(!e.is_retriable() && e.to_string().contains("no such topic"), "{e}"),
            other => panic!("expected the cached failure, got {other:?}"),
        }
    }
}
