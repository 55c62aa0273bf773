//! The hub without Redis: refused targets, no runtime, Redis unreachable.

use std::time::Duration;

use futures::StreamExt;

use crate::*;

#[tokio::test]
async fn hub_rejects_bad_targets_with_the_field() {
    let hub = Hub::new(HubConfig { url: "redis://127.0.0.1:1".into(), ..HubConfig::default() }).expect("hub");
    let e = hub.subscribe(Target::Channel(String::new())).await.err();
    assert!(matches!(e, Some(HubError::InvalidTarget { field: "channel", .. })), "{e:?}");
    let e = hub.subscribe(Target::Pattern("x".repeat(MAX_TARGET_LEN + 1))).await.err();
    assert!(matches!(e, Some(HubError::InvalidTarget { field: "pattern", .. })), "{e:?}");
    assert!(matches!(hub.subscribe_source_type("a:b").await, Err(HubError::Channel(_))));
}

#[test]
fn hub_outside_a_runtime_is_a_typed_error() {
    assert!(matches!(Hub::new(HubConfig::default()), Err(HubError::NoRuntime)));
}

#[tokio::test]
async fn an_unreachable_redis_is_reported_to_the_subscriber() {
    // Nothing listens on port 1: the subscription starts disconnected.
    let hub = Hub::new(HubConfig { url: "redis://127.0.0.1:1".into(), timeout_ms: 100, ..HubConfig::default() })
        .expect("hub");
    let mut s = hub.subscribe(Target::Channel("events:user:a".into())).await.expect("registered");
    let first = tokio::time::timeout(Duration::from_secs(5), s.next()).await.expect("an item");
    assert_eq!(first, Some(LiveItem::Disconnected));
    let stats = hub.stats().await.expect("stats");
    assert!(!stats.connected);
    assert_eq!((stats.channels, stats.subscribers), (1, 1));
    drop(s);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(hub.stats().await.expect("stats").channels, 0, "released with its last subscriber");
}
