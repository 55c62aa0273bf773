//! The publisher's rules, with mockall mocks of the sink traits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dualstream_core::{
    DeliveryError, Event, MockDurableSink, MockRealtimeNotifier, Notification, NotifyError, Position, RealtimeNotifier,
    SinkError,
};

use crate::{BuildError, DualPublisher, Mode, NotificationOutcome, PublishError, PublisherConfig};

fn event(source: &str) -> Event {
    Event::builder("test.event", "user", source).payload("x").build().expect("valid")
}

fn pos(offset: i64) -> Position {
    Position::new("events", 0, offset)
}

fn publisher(durable: MockDurableSink, notifier: MockRealtimeNotifier, mode: Mode) -> DualPublisher {
    DualPublisher::builder()
        .durable(Arc::new(durable))
        .notifier(Arc::new(notifier))
        .mode(mode)
        .build()
        .expect("valid publisher")
}

/// A notifier that never answers.
struct Hung;
#[async_trait]
impl RealtimeNotifier for Hung {
    async fn notify(&self, _: &Notification) -> Result<(), NotifyError> {
        std::future::pending().await
    }
    async fn health_check(&self) -> Result<(), NotifyError> {
        std::future::pending().await
    }
}

/// A notifier that records what it receives, batch by batch.
#[derive(Default, Clone)]
struct Recording(Arc<Mutex<Vec<Vec<Notification>>>>);
#[async_trait]
impl RealtimeNotifier for Recording {
    async fn notify(&self, n: &Notification) -> Result<(), NotifyError> {
        self.notify_batch(std::slice::from_ref(n)).await
    }
    async fn notify_batch(&self, ns: &[Notification]) -> Result<(), NotifyError> {
        self.0.lock().expect("lock").push(ns.to_vec());
        Ok(())
    }
    async fn health_check(&self) -> Result<(), NotifyError> {
        Ok(())
    }
}

#[tokio::test]
async fn notification_follows_the_ack_and_carries_the_position() {
    let mut durable = MockDurableSink::new();
    durable.expect_publish().times(1).returning(|_| Ok(pos(42)));
    let mut notifier = MockRealtimeNotifier::new();
    let e = event("octocat");
    let id = e.id();
    notifier
        .expect_notify()
        .times(1)
        .withf(move |n| n.id == id && n.position == Some(pos(42)) && &*n.source_id == "octocat")
        .returning(|_| Ok(()));
    let receipt = publisher(durable, notifier, Mode::Dual).publish(e).await.expect("published");
    assert_eq!(receipt.position, Some(pos(42)));
    assert_eq!(receipt.notification, NotificationOutcome::Sent);
}

/// A write the sink acknowledged without a usable offset (Kafka's -1 for a
/// retried batch it had stored; what the Kafka sink reports for an offset a
/// broker cannot have meant): the receipt and the notification carry no
/// position rather than a wrong one, in `publish` and in the batch path.
#[tokio::test]
async fn a_write_stored_at_an_unknown_offset_has_no_position() {
    let mut durable = MockDurableSink::new();
    durable.expect_publish().times(1).returning(|_| Ok(pos(Position::UNKNOWN_OFFSET)));
    durable.expect_enqueue_batch().times(1).returning(|events| {
        let results = events.iter().enumerate().map(|(i, _)| Ok(pos(if i == 0 { 7 } else { -1 }))).collect();
        Box::pin(std::future::ready(results))
    });
    let recording = Recording::default();
    let p = DualPublisher::builder()
        .durable(Arc::new(durable))
        .notifier(Arc::new(recording.clone()))
        .build()
        .expect("valid publisher");
    let receipt = p.publish(event("a")).await.expect("stored");
    assert_eq!(receipt.position, None);
    let receipts: Vec<_> =
        p.publish_batch(vec![event("b"), event("c")]).await.into_iter().map(|r| r.expect("stored")).collect();
    assert_eq!(receipts[0].position, Some(pos(7)));
    assert_eq!(receipts[1].position, None);
    let sent: Vec<Option<Position>> =
        recording.0.lock().expect("lock").iter().flatten().map(|n| n.position.clone()).collect();
    assert_eq!(sent, vec![None, Some(pos(7)), None], "no notification carries a made-up position");
}

#[tokio::test]
async fn a_notifier_error_never_fails_a_publish() {
    let mut durable = MockDurableSink::new();
    durable.expect_publish().times(2).returning(|_| Ok(pos(1)));
    let mut notifier = MockRealtimeNotifier::new();
    let mut calls = 0;
    notifier.expect_notify().times(2).returning(move |_| {
        calls += 1;
        if calls == 1 {
            Err(NotifyError::Connection("refused".into()))
        } else {
            Err(NotifyError::CircuitOpen)
        }
    });
    let p = publisher(durable, notifier, Mode::Dual);
    let r = p.publish(event("a")).await.expect("durable write decides");
    assert_eq!(r.notification, NotificationOutcome::Failed);
    let r = p.publish(event("a")).await.expect("durable write decides");
    assert_eq!(r.notification, NotificationOutcome::Skipped);
}

#[tokio::test(start_paused = true)]
async fn a_hung_notifier_delays_a_publish_by_the_bound_only() {
    let mut durable = MockDurableSink::new();
    durable.expect_publish().returning(|_| Ok(pos(1)));
    let p = DualPublisher::builder()
        .durable(Arc::new(durable))
        .notifier(Arc::new(Hung))
        .config(PublisherConfig {
            notify_timeout_ms: 120,
            notify_timeout_per_notification_us: 2_000,
            ..PublisherConfig::default()
        })
        .build()
        .expect("valid");
    let start = tokio::time::Instant::now();
    let r = p.publish(event("a")).await.expect("published");
    assert_eq!(r.notification, NotificationOutcome::TimedOut, "not confirmed: may be delivered, not failed");
    // 120 ms plus 2 ms for the one notification the call carries.
    assert_eq!(start.elapsed(), Duration::from_millis(122), "exactly the bound on the (paused) clock");
}

/// A notifier's timeout, and the publisher's own bound on a call, say the
/// notification was not confirmed in time, not that it failed: Redis may
/// have delivered it. In `publish` and for a background pipeline.
#[tokio::test(start_paused = true)]
async fn a_timeout_is_timed_out_not_failed() {
    let mut durable = MockDurableSink::new();
    durable.expect_publish().returning(|_| Ok(pos(1)));
    let mut notifier = MockRealtimeNotifier::new();
    notifier.expect_notify().returning(|_| Err(NotifyError::Timeout { after: Duration::from_millis(200) }));
    let r = publisher(durable, notifier, Mode::Dual).publish(event("a")).await.expect("published");
    assert_eq!(r.notification, NotificationOutcome::TimedOut);

    let p = DualPublisher::builder().notifier(Arc::new(Hung)).mode(Mode::RealtimeOnly).build().expect("valid");
    let batch = vec![Notification::for_event(&event("a"), None), Notification::for_event(&event("b"), None)];
    assert_eq!(p.notify(batch).await, NotificationOutcome::TimedOut, "the pipeline bound ended first");
}

#[tokio::test]
async fn a_durable_failure_fails_the_publish_hands_the_event_back_and_sends_nothing() {
    let mut durable = MockDurableSink::new();
    durable
        .expect_publish()
        .returning(|e| Err(DeliveryError::new(SinkError::Timeout { deadline: Duration::from_secs(1) }, e)));
    let mut notifier = MockRealtimeNotifier::new();
    notifier.expect_notify().times(0);
    notifier.expect_notify_batch().times(0);
    let e = event("a");
    let err = publisher(durable, notifier, Mode::Dual).publish(e.clone()).await.expect_err("durable failed");
    assert!(err.is_retriable());
    assert_eq!(err.into_event(), Some(e));
}

#[tokio::test]
async fn partial_batch_failure_is_reported_per_event_and_only_stored_events_are_notified() {
    let mut durable = MockDurableSink::new();
    // The publisher hands batches over with the two-phase enqueue_batch.
    durable.expect_enqueue_batch().returning(|events| {
        let results = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                if i % 2 == 1 {
                    Err(DeliveryError::new(SinkError::Rejected { reason: "too large".into() }, e))
                } else {
                    Ok(pos(i as i64))
                }
            })
            .collect();
        Box::pin(std::future::ready(results))
    });
    let events: Vec<Event> = (0..6).map(|i| event(&format!("s{i}"))).collect();
    let stored_ids: Vec<_> = events.iter().step_by(2).map(Event::id).collect();
    let mut notifier = MockRealtimeNotifier::new();
    notifier
        .expect_notify_batch()
        .times(1)
        .withf(move |ns| {
            ns.iter().map(|n| n.id).collect::<Vec<_>>() == stored_ids
                && ns.iter().zip([0, 2, 4]).all(|(n, o)| n.position == Some(pos(o)))
        })
        .returning(|_| Ok(()));
    let results = publisher(durable, notifier, Mode::Dual).publish_batch(events.clone()).await;
    assert_eq!(results.len(), 6);
    for (i, (r, e)) in results.into_iter().zip(events).enumerate() {
        if i % 2 == 1 {
            let err = r.expect_err("odd events fail");
            assert!(!err.is_retriable());
            assert_eq!(err.into_event(), Some(e), "failed event {i} handed back");
        } else {
            let receipt = r.expect("even events stored");
            assert_eq!(receipt.event_id, e.id());
            assert_eq!(receipt.position, Some(pos(i as i64)));
            assert_eq!(receipt.notification, NotificationOutcome::Sent);
        }
    }
}

#[tokio::test]
async fn a_sink_that_drops_results_is_reported_not_hidden() {
    let mut durable = MockDurableSink::new();
    durable.expect_enqueue_batch().returning(|_| Box::pin(std::future::ready(vec![Ok(pos(0))])));
    let mut notifier = MockRealtimeNotifier::new();
    notifier.expect_notify().returning(|_| Ok(()));
    let results = publisher(durable, notifier, Mode::Dual).publish_batch(vec![event("a"), event("b")]).await;
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(PublishError::MissingResult)));
}

#[tokio::test]
async fn durable_only_never_notifies() {
    let mut durable = MockDurableSink::new();
    durable.expect_publish().returning(|_| Ok(pos(3)));
    let mut notifier = MockRealtimeNotifier::new();
    notifier.expect_notify().times(0);
    let r = publisher(durable, notifier, Mode::DurableOnly).publish(event("a")).await.expect("ok");
    assert_eq!(r.notification, NotificationOutcome::Disabled);
    assert_eq!(r.position, Some(pos(3)));
}

#[tokio::test]
async fn realtime_only_never_writes_durably_and_has_no_position() {
    let mut durable = MockDurableSink::new();
    durable.expect_publish().times(0);
    durable.expect_publish_batch().times(0);
    durable.expect_enqueue_batch().times(0);
    let mut notifier = MockRealtimeNotifier::new();
    notifier.expect_notify().times(1).withf(|n| n.position.is_none()).returning(|_| Ok(()));
    notifier.expect_notify_batch().times(1).withf(|ns| ns.len() == 3).returning(|_| Ok(()));
    let p = publisher(durable, notifier, Mode::RealtimeOnly);
    let r = p.publish(event("a")).await.expect("ok");
    assert_eq!((r.position, r.notification), (None, NotificationOutcome::Sent));
    let rs = p.publish_batch(vec![event("a"), event("b"), event("c")]).await;
    assert!(rs.iter().all(|r| matches!(r, Ok(r) if r.notification == NotificationOutcome::Sent)));
    // Without a durable sink a real-time-only publisher builds too.
    let mut n = MockRealtimeNotifier::new();
    n.expect_notify().returning(|_| Err(NotifyError::Connection("down".into())));
    let p = DualPublisher::builder().notifier(Arc::new(n)).mode(Mode::RealtimeOnly).build().expect("valid");
    let r = p.publish(event("a")).await.expect("loss acceptable: still Ok");
    assert_eq!(r.notification, NotificationOutcome::Failed);
}

/// Publish `count` events in high-volume mode, without yielding (a test's
/// runtime has one thread, so the background task finds all of them
/// queued), then shut down: their ids, and the notifier's calls.
async fn high_volume_run(count: usize) -> (Vec<dualstream_core::EventId>, Vec<Vec<Notification>>) {
    let mut durable = MockDurableSink::new();
    let mut next = 0;
    durable.expect_publish().returning(move |_| {
        next += 1;
        Ok(pos(next))
    });
    durable.expect_flush().times(1).returning(|_| Ok(()));
    let recording = Recording::default();
    let p = DualPublisher::builder()
        .durable(Arc::new(durable))
        .notifier(Arc::new(recording.clone()))
        .mode(Mode::HighVolume)
        .build()
        .expect("valid");
    let mut ids = Vec::new();
    for i in 0..count {
        let e = event(&format!("s{}", i % 7));
        ids.push(e.id());
        let r = p.publish(e).await.expect("ok");
        assert_eq!(r.notification, NotificationOutcome::Queued);
    }
    p.shutdown(Duration::from_secs(5)).await.expect("flushed");
    let batches = recording.0.lock().expect("lock").clone();
    (ids, batches)
}

#[tokio::test]
async fn high_volume_queues_and_the_background_task_pipelines_everything() {
    let (ids, batches) = high_volume_run(300).await;
    let got: Vec<_> = batches.iter().flatten().map(|n| n.id).collect();
    assert_eq!(got, ids, "every notification, in publish order");
    assert!(batches.iter().flatten().all(|n| n.position.is_some()));
}

/// The high-volume mode's pipelines follow its queue: a short queue goes in
/// pipelines of at most 64, a long one in pipelines that share it, up to
/// `max_batch`; every notification is still sent once, in publish order.
#[tokio::test]
async fn high_volume_pipelines_are_small_while_the_queue_is_short_and_grow_with_it() {
    for (published, first) in [(100, 64), (1_000, 500), (3_000, 512)] {
        let (ids, batches) = high_volume_run(published).await;
        assert_eq!(batches[0].len(), first, "the first pipeline of a queue of {published}");
        assert!(batches.iter().all(|b| b.len() <= 512), "max_batch holds");
        let got: Vec<_> = batches.iter().flatten().map(|n| n.id).collect();
        assert_eq!(got, ids, "every notification once, in publish order");
    }
    // The rule itself, at its edges.
    use crate::publisher::pipeline_size;
    assert_eq!(pipeline_size(0, 2, 512), 64);
    assert_eq!(pipeline_size(129, 2, 512), 64);
    assert_eq!(pipeline_size(400, 2, 512), 200);
    assert_eq!(pipeline_size(100_000, 2, 512), 512);
    assert_eq!(pipeline_size(1_000, 1, 16), 16, "a max_batch under 64 bounds a short queue's pipelines too");
}

/// A notifier whose first call does not answer until the test opens the
/// gate; it records every call as it starts.
#[derive(Default, Clone)]
struct Gated {
    started: Arc<Mutex<Vec<Vec<Notification>>>>,
    gate: Arc<tokio::sync::Notify>,
}
#[async_trait]
impl RealtimeNotifier for Gated {
    async fn notify(&self, n: &Notification) -> Result<(), NotifyError> {
        self.notify_batch(std::slice::from_ref(n)).await
    }
    async fn notify_batch(&self, ns: &[Notification]) -> Result<(), NotifyError> {
        let first = {
            let mut started = self.started.lock().expect("lock");
            started.push(ns.to_vec());
            started.len() == 1
        };
        if first {
            self.gate.notified().await;
        }
        Ok(())
    }
    async fn health_check(&self) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// With one pipeline in flight, everything queued waited for a slow
/// answer; the second pipeline starts while the first is unanswered, and
/// each notification is still sent once, in publish order.
#[tokio::test]
async fn high_volume_starts_the_next_pipeline_while_one_waits_for_its_answer() {
    let mut durable = MockDurableSink::new();
    let mut next = 0;
    durable.expect_publish().returning(move |_| {
        next += 1;
        Ok(pos(next))
    });
    durable.expect_flush().returning(|_| Ok(()));
    let notifier = Gated::default();
    // The first call's bound is far beyond the test's wait: a second
    // pipeline that waits for the first cannot start in time.
    let config = PublisherConfig { mode: Mode::HighVolume, pipeline_timeout_ms: 60_000, ..PublisherConfig::default() };
    let p = DualPublisher::builder()
        .durable(Arc::new(durable))
        .notifier(Arc::new(notifier.clone()))
        .config(config)
        .build()
        .expect("valid");
    let wait_for_calls = |calls: usize| {
        let started = notifier.started.clone();
        tokio::time::timeout(Duration::from_secs(5), async move {
            while started.lock().expect("lock").len() < calls {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let first = event("s0");
    let mut ids = vec![first.id()];
    p.publish(first).await.expect("ok");
    wait_for_calls(1).await.expect("the first pipeline starts");
    // The first call is unanswered; what is published now goes in a later pipeline.
    for i in 1..3 {
        let e = event(&format!("s{i}"));
        ids.push(e.id());
        p.publish(e).await.expect("ok");
    }
    let second_started = wait_for_calls(2).await;
    assert!(second_started.is_ok(), "the second pipeline waited for the first one's answer");
    notifier.gate.notify_one();
    p.shutdown(Duration::from_secs(5)).await.expect("flushed");
    let got: Vec<_> = notifier.started.lock().expect("lock").iter().flatten().map(|n| n.id).collect();
    assert_eq!(got, ids, "every notification once, in publish order");
}

#[tokio::test]
async fn high_volume_skips_rather_than_blocks_when_its_queue_is_full() {
    let mut durable = MockDurableSink::new();
    durable.expect_publish().returning(|_| Ok(pos(1)));
    let p = DualPublisher::builder()
        .durable(Arc::new(durable))
        .notifier(Arc::new(Hung))
        .config(PublisherConfig {
            mode: Mode::HighVolume,
            high_volume: crate::HighVolumeConfig { queue_capacity: 4, max_batch: 2, ..Default::default() },
            ..PublisherConfig::default()
        })
        .build()
        .expect("valid");
    let mut outcomes = Vec::new();
    for _ in 0..20 {
        outcomes.push(p.publish(event("a")).await.expect("durable path unaffected").notification);
    }
    assert!(outcomes.contains(&NotificationOutcome::Skipped), "{outcomes:?}");
}

#[test]
fn building_checks_the_mode_and_config() {
    let err = DualPublisher::builder().notifier(Arc::new(MockRealtimeNotifier::new())).build().expect_err("refused");
    assert!(matches!(err, BuildError::MissingDurable { mode: Mode::Dual }));
    let err = DualPublisher::builder().durable(Arc::new(MockDurableSink::new())).build().expect_err("refused");
    assert!(matches!(err, BuildError::MissingNotifier { mode: Mode::Dual }));
    assert!(DualPublisher::builder().durable(Arc::new(MockDurableSink::new())).mode(Mode::DurableOnly).build().is_ok());
    let err = DualPublisher::builder()
        .durable(Arc::new(MockDurableSink::new()))
        .notifier(Arc::new(MockRealtimeNotifier::new()))
        .mode(Mode::HighVolume)
        .build()
        .expect_err("refused");
    assert!(matches!(err, BuildError::NoRuntime), "{err}");
    let err = DualPublisher::builder()
        .durable(Arc::new(MockDurableSink::new()))
        .config(PublisherConfig { notify_timeout_ms: 0, mode: Mode::DurableOnly, ..PublisherConfig::default() })
        .build()
        .expect_err("refused");
    assert!(matches!(err, BuildError::Invalid { field: "notify_timeout_ms", .. }));
}
