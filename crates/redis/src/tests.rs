use std::time::{Duration, Instant};

use crate::{
    check_cluster_urls, Admit, Breaker, BreakerConfig, BreakerState, ConfigError, RedisNotifier, RedisNotifierConfig,
    Ticket,
};

fn breaker() -> Breaker {
    Breaker::new(BreakerConfig { failure_threshold: 3, open_min_ms: 100, open_max_ms: 400 }, Duration::from_secs(1))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The ticket of a call admitted at `now`, which must go through.
#[track_caller]
fn call(b: &mut Breaker, now: Instant) -> Ticket {
    match b.admit(now) {
        Admit::Yes(t) => t,
        other => panic!("expected the call to go through, got {other:?}"),
    }
}

/// The ticket of the probe admitted at `now`.
#[track_caller]
fn probe(b: &mut Breaker, now: Instant) -> Ticket {
    match b.admit(now) {
        Admit::Probe(t) => t,
        other => panic!("expected a probe, got {other:?}"),
    }
}

/// Open `b` at `t` with `failure_threshold` (3) failed calls.
fn open(b: &mut Breaker, t: Instant) {
    for _ in 0..3 {
        let c = call(b, t);
        b.on_failure(c, t);
    }
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn opens_after_consecutive_failures_only() {
    let mut b = breaker();
    let t = Instant::now();
    let c = call(&mut b, t);
    assert!(!b.on_failure(c, t));
    let c = call(&mut b, t);
    assert!(!b.on_failure(c, t));
    let c = call(&mut b, t);
    assert!(!b.on_success(c), "a success while closed closes nothing");
    let c = call(&mut b, t);
    assert!(!b.on_failure(c, t));
    let c = call(&mut b, t);
    assert!(!b.on_failure(c, t));
    assert_eq!(b.state(), BreakerState::Closed, "a success resets the count");
    let c = call(&mut b, t);
    assert!(b.on_failure(c, t), "third consecutive failure opens");
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.admit(t + ms(50)), Admit::No);
}

#[test]
fn concurrent_calls_failing_while_closed_count_together() {
    let mut b = breaker();
    let t = Instant::now();
    let calls: Vec<Ticket> = (0..3).map(|_| call(&mut b, t)).collect();
    assert!(!b.on_failure(calls[0], t));
    assert!(!b.on_failure(calls[1], t));
    assert!(b.on_failure(calls[2], t), "admitted in the same episode: they count");
}

#[test]
fn probes_with_doubling_backoff_and_closes_on_success() {
    let mut b = breaker();
    let t0 = Instant::now();
    open(&mut b, t0);
    assert_eq!(b.admit(t0 + ms(99)), Admit::No);
    let t1 = t0 + ms(100);
    let p = probe(&mut b, t1);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(b.admit(t1), Admit::No, "one probe at a time");
    assert!(!b.on_failure(p, t1));
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.admit(t1 + ms(199)), Admit::No, "backoff doubled to 200ms");
    let t2 = t1 + ms(200);
    let p = probe(&mut b, t2);
    b.on_failure(p, t2);
    let t3 = t2 + ms(400);
    let p = probe(&mut b, t3);
    b.on_failure(p, t3);
    assert_eq!(b.admit(t3 + ms(399)), Admit::No);
    let p = probe(&mut b, t3 + ms(400));
    assert!(b.on_success(p), "a good probe closes the breaker");
    assert_eq!(b.state(), BreakerState::Closed);
    call(&mut b, t3 + ms(401));
}

/// Defect (a): a call that started before the breaker opened and succeeds
/// late says nothing about Redis now; it must not close the breaker.
#[test]
fn a_late_success_from_before_the_breaker_opened_does_not_close_it() {
    let mut b = breaker();
    let t0 = Instant::now();
    let slow = call(&mut b, t0);
    open(&mut b, t0);
    assert!(!b.on_success(slow), "stale success closes nothing");
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.admit(t0 + ms(50)), Admit::No, "still skipping");

    // Nor while half-open: only the probe's outcome decides.
    let t1 = t0 + ms(100);
    let p = probe(&mut b, t1);
    assert!(!b.on_success(slow));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert!(b.on_success(p), "the probe closes it");
    assert_eq!(b.state(), BreakerState::Closed);
}

/// Defect (b): calls already in flight when the breaker opened fail one
/// after the other; they must not each double the backoff.
#[test]
fn in_flight_failures_after_opening_do_not_lengthen_the_backoff() {
    let mut b = breaker();
    let t0 = Instant::now();
    let in_flight: Vec<Ticket> = (0..10).map(|_| call(&mut b, t0)).collect();
    for (i, c) in in_flight.iter().enumerate() {
        let opened = b.on_failure(*c, t0 + ms(i as u64));
        assert_eq!(opened, i == 2, "failure {i}");
    }
    // Opened at t0 + 2ms with the minimum backoff (100ms), not the maximum.
    assert_eq!(b.admit(t0 + ms(101)), Admit::No);
    let t1 = t0 + ms(102);
    let p = probe(&mut b, t1);
    // A straggler failing while the probe is out does not re-open it.
    assert!(!b.on_failure(in_flight[0], t1));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    b.on_failure(p, t1);
    assert_eq!(b.admit(t1 + ms(199)), Admit::No);
    probe(&mut b, t1 + ms(200)); // 200ms: doubled once, by the probe only
}

#[test]
fn an_abandoned_probe_does_not_wedge_the_breaker() {
    let mut b = breaker();
    let t0 = Instant::now();
    open(&mut b, t0);
    let t1 = t0 + ms(100);
    let abandoned = probe(&mut b, t1);
    // The probe's caller went away without reporting.
    assert_eq!(b.admit(t1 + ms(999)), Admit::No);
    let t2 = t1 + Duration::from_secs(1);
    let p = probe(&mut b, t2);
    // The abandoned probe reports after all: the new probe decides.
    assert!(!b.on_success(abandoned));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert!(!b.on_failure(abandoned, t2));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert!(b.on_success(p));
}

#[test]
fn outcomes_from_an_earlier_closed_episode_are_ignored() {
    let mut b = breaker();
    let t0 = Instant::now();
    let ancient = call(&mut b, t0);
    open(&mut b, t0);
    let p = probe(&mut b, t0 + ms(100));
    assert!(b.on_success(p));
    let t1 = t0 + ms(101);
    let c = call(&mut b, t1);
    b.on_failure(c, t1);
    let c = call(&mut b, t1);
    b.on_failure(c, t1);
    assert!(!b.on_failure(ancient, t1), "a failure from before the last episode does not count");
    assert_eq!(b.state(), BreakerState::Closed);
}

/// The notifier's and the hub's `cluster_urls`: Redis URLs of database 0,
/// the error naming the entry.
#[test]
fn cluster_urls_are_checked_entry_by_entry() {
    assert_eq!(check_cluster_urls(&["redis://h:1".into(), "redis://h:2/0".into()]), Ok(()));
    let e = check_cluster_urls(&["redis://h:1".into(), "redis://h:2/3".into()]).expect_err("database 3");
    assert_eq!(e, r#"entry 1 ("redis://h:2/3") selects database 3: a cluster has database 0 only"#);
    let e = check_cluster_urls(&["nope://".into()]).expect_err("not a Redis URL");
    assert!(e.starts_with(r#"entry 0 ("nope://"): "#), "{e}");
}

#[test]
fn config_errors_name_the_field() {
    let bad = [
        (RedisNotifierConfig { url: "not a url".into(), ..Default::default() }, "url"),
        (RedisNotifierConfig { timeout_ms: 0, ..Default::default() }, "timeout_ms"),
        (RedisNotifierConfig { channel_prefix: "a:b".into(), ..Default::default() }, "channel_prefix"),
        (
            RedisNotifierConfig { cluster_urls: vec!["redis://h:1".into(), "not a url".into()], ..Default::default() },
            "cluster_urls",
        ),
        (RedisNotifierConfig { cluster_urls: vec!["redis://h:1/3".into()], ..Default::default() }, "cluster_urls"),
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
    assert!(!c.is_cluster());
}

#[test]
fn cluster_mode_reads_from_json() {
    let c: RedisNotifierConfig =
        serde_json::from_str(r#"{"cluster_urls":["redis://10.0.0.1:7001","redis://10.0.0.2:7002"]}"#).expect("valid");
    assert!(c.is_cluster());
    assert_eq!(c.cluster_urls.len(), 2);
    RedisNotifier::new(c).expect("a valid cluster config");
}

/// The notifier uses one multiplexed connection, so there is no pool size:
/// a config that still sets `pool_max_size` is refused, naming the field,
/// instead of being silently ignored.
#[test]
fn pool_max_size_is_refused_by_name() {
    let err = serde_json::from_str::<RedisNotifierConfig>(r#"{"url":"redis://h:1","pool_max_size":8}"#)
        .expect_err("pool_max_size is no longer a field");
    assert!(err.to_string().contains("unknown field `pool_max_size`"), "{err}");
}
