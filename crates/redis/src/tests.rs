use std::time::{Duration, Instant};

use crate::{Admit, Breaker, BreakerConfig, BreakerState, ConfigError, RedisNotifier, RedisNotifierConfig};

fn breaker() -> Breaker {
    Breaker::new(BreakerConfig { failure_threshold: 3, open_min_ms: 100, open_max_ms: 400 }, Duration::from_secs(1))
}

#[test]
fn opens_after_consecutive_failures_only() {
    let mut b = breaker();
    let t = Instant::now();
    assert!(!b.on_failure(t));
    assert!(!b.on_failure(t));
    b.on_success();
    assert!(!b.on_failure(t));
    assert!(!b.on_failure(t));
    assert_eq!(b.state(), BreakerState::Closed, "a success resets the count");
    assert!(b.on_failure(t), "third consecutive failure opens");
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.admit(t + Duration::from_millis(50)), Admit::No);
}

#[test]
fn probes_with_doubling_backoff_and_closes_on_success() {
    let mut b = breaker();
    let t0 = Instant::now();
    for _ in 0..3 {
        b.on_failure(t0);
    }
    assert_eq!(b.admit(t0 + Duration::from_millis(99)), Admit::No);
    let t1 = t0 + Duration::from_millis(100);
    assert_eq!(b.admit(t1), Admit::Probe);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(b.admit(t1), Admit::No, "one probe at a time");
    b.on_failure(t1);
    assert_eq!(b.admit(t1 + Duration::from_millis(199)), Admit::No, "backoff doubled to 200ms");
    let t2 = t1 + Duration::from_millis(200);
    assert_eq!(b.admit(t2), Admit::Probe);
    b.on_failure(t2);
    let t3 = t2 + Duration::from_millis(400);
    assert_eq!(b.admit(t3), Admit::Probe);
    b.on_failure(t3);
    assert_eq!(b.admit(t3 + Duration::from_millis(399)), Admit::No);
    assert_eq!(b.admit(t3 + Duration::from_millis(400)), Admit::Probe, "backoff capped at open_max_ms");
    assert!(b.on_success(), "a good probe closes the breaker");
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.admit(t3 + Duration::from_millis(401)), Admit::Yes);
}

#[test]
fn an_abandoned_probe_does_not_wedge_the_breaker() {
    let mut b = breaker();
    let t0 = Instant::now();
    for _ in 0..3 {
        b.on_failure(t0);
    }
    let t1 = t0 + Duration::from_millis(100);
    assert_eq!(b.admit(t1), Admit::Probe);
    // The probe's caller went away without reporting.
    assert_eq!(b.admit(t1 + Duration::from_millis(999)), Admit::No);
    assert_eq!(b.admit(t1 + Duration::from_secs(1)), Admit::Probe);
}

#[test]
fn config_errors_name_the_field() {
    let bad = [
        (RedisNotifierConfig { url: "not a url".into(), ..Default::default() }, "url"),
        (RedisNotifierConfig { timeout_ms: 0, ..Default::default() }, "timeout_ms"),
        (RedisNotifierConfig { pool_max_size: 0, ..Default::default() }, "pool_max_size"),
        (RedisNotifierConfig { channel_prefix: "a:b".into(), ..Default::default() }, "channel_prefix"),
        (
            RedisNotifierConfig {
                breaker: BreakerConfig { open_min_ms: 500, open_max_ms: 100, ..Default::default() },
                ..Default::default()
            },
            "breaker.open_max_ms",
        ),
    ];
    for (config, field) in bad {
        match RedisNotifier::new(config) {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected an error, got {other:?}"),
        }
    }
    RedisNotifier::new(RedisNotifierConfig::default()).expect("defaults are valid");
}

#[test]
fn config_reads_from_json() {
    let c: RedisNotifierConfig =
        serde_json::from_str(r#"{"url":"redis://h:1","aggregate_channels":true,"breaker":{"failure_threshold":5}}"#)
            .expect("valid");
    assert!(c.aggregate_channels);
    assert_eq!(c.breaker.failure_threshold, 5);
    assert_eq!(c.breaker.open_min_ms, 250);
    assert_eq!(c.timeout_ms, 200);
}
