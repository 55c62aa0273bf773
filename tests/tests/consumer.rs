//! The consuming side on the real services: replay from tansu, the fan-out
//! hub on redis-server, and the catch-up join while a publisher writes, with
//! and without Redis being killed mid-run.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis;
use dualstream::consumer::{
    CatchUp, Delivery, Hub, HubConfig, JoinConfig, LiveItem, Replay, ReplayConfig, ReplayRequest, Scope, StartAt,
    Target, Until,
};
use dualstream::prelude::*;
use dualstream::redis::{RedisNotifier, RedisNotifierConfig};
use dualstream::{EventId, Source};
use dualstream_tests::*;
use futures::StreamExt;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64
}

fn replay_for(brokers: &str, topic: &str) -> Replay {
    Replay::new(ReplayConfig {
        bootstrap_servers: brokers.to_owned(),
        topic: TopicRouting::Single { topic: topic.to_owned() },
        ..ReplayConfig::default()
    })
    .expect("replay")
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("redis")
}

async fn numsub(url: &str, channel: &str) -> i64 {
    let (_, n): (String, i64) =
        redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut redis_conn(url).await).await.expect("numsub");
    n
}

async fn numpat(url: &str) -> i64 {
    redis::cmd("PUBSUB").arg("NUMPAT").query_async(&mut redis_conn(url).await).await.expect("numpat")
}

async fn next(s: &mut dualstream::consumer::LiveStream) -> LiveItem {
    tokio::time::timeout(Duration::from_secs(15), s.next()).await.expect("an item").expect("open")
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, timeout: Duration, mut ok: impl FnMut() -> F) {
    let until = Instant::now() + timeout;
    while !ok().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A notifier whose bounds only guard against a hang, for tests of delivery:
/// the default 200 ms per PUBLISH was missed on a busy machine while the hub
/// fanned out to 2,000 subscribers.
fn patient_notifier(url: &str) -> RedisNotifier {
    RedisNotifier::new(RedisNotifierConfig {
        url: url.to_owned(),
        timeout_ms: 10_000,
        connect_timeout_ms: 10_000,
        ..RedisNotifierConfig::default()
    })
    .expect("redis notifier")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_timestamp_returns_the_events_from_that_time_on() {
    init_tracing();
    let brokers = kafka_brokers();
    let topic = unique_topic("replay");
    create_topic(&brokers, &topic, 3).await;
    let sink = kafka_sink(&brokers, &topic);
    let event = |i: usize| Event::builder("reading", "sensor", format!("s{}", i % 5)).payload(format!("{i}")).build();
    for i in 0..60 {
        sink.publish(event(i).expect("valid")).await.expect("stored");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // One batch, so records share produce batches and the offset picked
    // below lies inside one.
    let mut later: Vec<Event> = (60..120).map(|i| event(i).expect("valid")).collect();
    for r in sink.publish_batch(later.clone()).await {
        r.expect("stored");
    }
    // tansu 0.6 answers a fetch from inside a batch with the next batch (see
    // docs/consumer.md): give the batch a successor in s2's partition.
    let tail = event(122).expect("valid");
    sink.publish(tail.clone()).await.expect("stored");
    later.push(tail);

    // Read with `Until::Follow` and take exactly as many as expected: tansu
    // 0.6 reports the high watermark of a partition as the base offset of
    // its last record batch + 1, so a replay that stops at the watermark
    // (`Until::Now`) would end inside the last batch there. Anything extra or
    // duplicated within the count still fails the comparison.
    let replay = replay_for(&brokers, &topic);
    let take = |req: ReplayRequest, n: usize| {
        let replay = replay.clone();
        async move {
            let stream = replay.stream(req.until(Until::Follow)).await.expect("stream");
            tokio::time::timeout(Duration::from_secs(30), stream.take(n).map(|r| r.expect("valid event")).collect::<Vec<_>>())
                .await
                .expect("the expected events arrive")
        }
    };
    let all = take(ReplayRequest::new(Scope::All).start(StartAt::Timestamp(t)), later.len()).await;
    let mut got: Vec<EventId> = all.iter().map(|r| r.event.id()).collect();
    let mut want: Vec<EventId> = later.iter().map(Event::id).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "exactly the events written after the timestamp");
    assert!(all.iter().all(|r| r.timestamp_ms.is_some_and(|ts| ts >= t)));

    // One source: its events after the timestamp, in the order written.
    let s2 = Source::new("sensor", "s2").expect("valid");
    let want: Vec<EventId> = later.iter().filter(|e| e.source() == &s2).map(Event::id).collect();
    let one = take(ReplayRequest::new(Scope::Source(s2.clone())).start(StartAt::Timestamp(t)), want.len()).await;
    assert_eq!(one.iter().map(|r| r.event.id()).collect::<Vec<_>>(), want);

    // From an offset inside a produce batch: exactly the events from there.
    let all_s2 = take(ReplayRequest::new(Scope::Source(s2.clone())), 25).await;
    let mid = &all_s2[18];
    let from_mid = take(ReplayRequest::new(Scope::Source(s2.clone())).start(StartAt::Offset(mid.position.offset)), all_s2.len() - 18).await;
    assert_eq!(from_mid, all_s2[18..]);
    // A time after everything: nothing, and the stream ends.
    let none = replay.stream(ReplayRequest::new(Scope::All).start(StartAt::Timestamp(now_ms() + 60_000))).await;
    assert_eq!(none.expect("stream").count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_local_subscribers_share_one_redis_subscription() {
    // An own Redis, so PUBSUB NUMPAT counts only this test's patterns.
    let redis = OwnedRedis::start();
    let url = redis.url();
    let hub = Hub::new(HubConfig { url: url.clone(), ..HubConfig::default() }).expect("hub");
    let channel = hub.namer().channel("user", "octocat").expect("valid");
    let mut streams = Vec::new();
    for _ in 0..1_000 {
        streams.push(hub.subscribe(Target::Channel(channel.clone())).await.expect("subscribed"));
    }
    let mut pattern_streams = Vec::new();
    for _ in 0..1_000 {
        pattern_streams.push(hub.subscribe_source_type("user").await.expect("subscribed"));
    }
    assert_eq!(numsub(&url, &channel).await, 1, "one Redis subscription for 1,000 local subscribers");
    assert_eq!(numpat(&url).await, 1, "one pattern subscription for 1,000 local subscribers");
    let stats = hub.stats().await.expect("stats");
    assert_eq!((stats.channels, stats.patterns, stats.subscribers), (1, 1, 2_000));

    // Every local subscriber receives every notification, in order.
    let notifier = patient_notifier(&url);
    let events: Vec<Event> =
        (0..100).map(|i| Event::builder("user.seen", "user", "octocat").payload(format!("{i}")).build().expect("valid")).collect();
    for (i, e) in events.iter().enumerate() {
        let n = Notification::for_event(e, Some(Position::new("events", 0, i as i64)));
        notifier.notify(&n).await.expect("published");
    }
    let want: Vec<EventId> = events.iter().map(Event::id).collect();
    for s in streams.iter_mut().chain(pattern_streams.iter_mut()) {
        let mut got = Vec::with_capacity(100);
        while got.len() < 100 {
            match tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("notification arrives") {
                Some(LiveItem::Notification(n)) => got.push(n.id),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, want);
    }

    // Released with the last local subscriber.
    streams.truncate(1);
    pattern_streams.truncate(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(numsub(&url, &channel).await, 1, "still held by the last subscriber");
    drop(streams);
    drop(pattern_streams);
    wait_for("unsubscribe", Duration::from_secs(5), || async { numsub(&url, &channel).await == 0 && numpat(&url).await == 0 }).await;
    assert_eq!(hub.stats().await.expect("stats").subscribers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_does_not_delay_the_others_and_is_told_it_lagged() {
    let url = redis_url();
    let hub = Hub::new(HubConfig { url: url.clone(), subscriber_buffer: 32, ..HubConfig::default() }).expect("hub");
    let source = Source::new("user", format!("slow-{}", EventId::new())).expect("valid");
    let mut slow = hub.subscribe_source(&source).await.expect("subscribed");
    let total = 500usize;
    // Each fast subscriber reports how far it got; the publisher stays at
    // most two chunks (20 < 32) ahead of the slowest fast one, so a fast
    // subscriber never overflows however the test machine schedules it,
    // while the slow one, which reads nothing, overflows for sure.
    let progress: Arc<Vec<std::sync::atomic::AtomicUsize>> =
        Arc::new((0..10).map(|_| std::sync::atomic::AtomicUsize::new(0)).collect());
    let mut fast = Vec::new();
    for k in 0..10 {
        let mut s = hub.subscribe_source(&source).await.expect("subscribed");
        let progress = progress.clone();
        fast.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < total {
                match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
                    Ok(Some(LiveItem::Notification(n))) => got.push(n.id),
                    other => panic!("a fast subscriber got {other:?} after {}", got.len()),
                }
                progress[k].store(got.len(), Ordering::Release);
            }
            got
        }));
    }
    let notifier = patient_notifier(&url);
    let mut want = Vec::new();
    for chunk in 0..(total / 10) {
        let batch: Vec<Notification> = (0..10)
            .map(|i| {
                let e = Event::builder("t", "user", source.source_id()).build().expect("valid");
                want.push(e.id());
                Notification::for_event(&e, Some(Position::new("events", 0, (chunk * 10 + i) as i64)))
            })
            .collect();
        let behind = (chunk * 10).saturating_sub(10);
        wait_for("the fast subscribers", Duration::from_secs(10), || {
            let progress = progress.clone();
            async move { progress.iter().all(|p| p.load(Ordering::Acquire) >= behind) }
        })
        .await;
        notifier.notify_batch(&batch).await.expect("published");
    }
    // The slow one has not read anything yet, and the others are done.
    for f in fast {
        assert_eq!(f.await.expect("fast subscriber"), want, "every notification, in order");
    }
    let mut got = Vec::new();
    let lag = loop {
        match tokio::time::timeout(Duration::from_secs(5), slow.next()).await.expect("an item") {
            Some(LiveItem::Notification(n)) => got.push(n.id),
            Some(LiveItem::Lagged { missed }) => break missed,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(got, want[..32], "its buffer held the first 32");
    assert_eq!(lag as usize, total - 32, "and it is told how many it missed");
    assert!(hub.stats().await.expect("stats").missed >= lag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_reconnects_after_redis_restarts_and_signals_the_gap() {
    let mut redis = OwnedRedis::start();
    let url = redis.url();
    let hub = Hub::new(HubConfig { url: url.clone(), ping_interval_ms: 200, ..HubConfig::default() }).expect("hub");
    let source = Source::new("user", "a").expect("valid");
    let mut s = hub.subscribe_source(&source).await.expect("subscribed");
    let notifier = redis_notifier(&url);
    let note = || {
        let e = Event::builder("t", "user", "a").build().expect("valid");
        Notification::for_event(&e, None)
    };
    let n1 = note();
    notifier.notify(&n1).await.expect("published");
    assert_eq!(next(&mut s).await, LiveItem::Notification(Arc::new(n1)));

    redis.kill();
    assert_eq!(next(&mut s).await, LiveItem::Disconnected);
    redis.restart();
    assert_eq!(next(&mut s).await, LiveItem::Gap, "resubscribed: the gap is announced");
    assert_eq!(numsub(&url, &hub.namer().channel_for(&source)).await, 1);
    let n2 = note();
    wait_for("notifier recovers", Duration::from_secs(10), || {
        let (notifier, n2) = (notifier.clone(), n2.clone());
        async move { notifier.notify(&n2).await.is_ok() }
    })
    .await;
    assert_eq!(next(&mut s).await, LiveItem::Notification(Arc::new(n2)));
    let stats = hub.stats().await.expect("stats");
    assert!(stats.connected);
    assert_eq!(stats.disconnects, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_noticed_by_the_ping_and_the_gap_signalled_when_it_answers() {
    let redis = OwnedRedis::start();
    let url = redis.url();
    let hub =
        Hub::new(HubConfig { url: url.clone(), ping_interval_ms: 200, timeout_ms: 300, ..HubConfig::default() })
            .expect("hub");
    let mut s = hub.subscribe_source(&Source::new("user", "a").expect("valid")).await.expect("subscribed");
    redis.stop();
    // The connection stays open; only the unanswered ping tells.
    assert_eq!(next(&mut s).await, LiveItem::Disconnected);
    redis.resume();
    assert_eq!(next(&mut s).await, LiveItem::Gap);
    let e = Event::builder("t", "user", "a").build().expect("valid");
    let n = Notification::for_event(&e, None);
    patient_notifier(&url).notify(&n).await.expect("published");
    assert_eq!(next(&mut s).await, LiveItem::Notification(Arc::new(n)));
    assert!(hub.stats().await.expect("stats").disconnects >= 1);
}

/// A publisher writes ~3,000 events/s for eight sources; a subscriber of
/// one source joins mid-stream from a past position. What it receives must
/// be exactly Kafka's sequence for that source from that position on.
async fn join_mid_stream(redis_url: String, mut redis: Option<&mut OwnedRedis>) {
    let brokers = kafka_brokers();
    let topic = unique_topic("join");
    create_topic(&brokers, &topic, 3).await;
    let (engine, _) = dual_engine(&brokers, &topic, &redis_url);
    let run = EventId::new().as_uuid().simple().to_string();
    let sources: Vec<Source> = (0..8).map(|i| Source::new("sensor", format!("{run}-{i}")).expect("valid")).collect();
    // Watch a source whose partition other sources write to as well (one
    // exists: eight sources, three partitions), so the join must skip them.
    let partition_of = |s: &Source| dualstream::consumer::partition_for_key(s.source_id().as_bytes(), 3);
    let watched = sources
        .iter()
        .find(|s| sources.iter().filter(|o| partition_of(o) == partition_of(s)).count() > 1)
        .expect("a shared partition")
        .clone();

    let (stop, producer) = start_load(&engine, &sources, 30);

    // Let history build up, then pick a past position of the watched source.
    // Waited for, not slept for: a busy machine stores fewer events a second.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let replay = replay_for(&brokers, &topic);
    let until = Instant::now() + Duration::from_secs(60);
    let history = loop {
        let history: Vec<_> = replay
            .stream(ReplayRequest::new(Scope::Source(watched.clone())))
            .await
            .expect("stream")
            .map(|r| r.expect("valid"))
            .collect()
            .await;
        if history.len() > 50 {
            break history;
        }
        assert!(Instant::now() < until, "history exists: {}", history.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let from = history[history.len() / 2].position.clone();

    let hub = Hub::new(HubConfig { url: redis_url.clone(), ping_interval_ms: 500, ..HubConfig::default() }).expect("hub");
    let joiner = CatchUp::new(replay.clone(), hub.clone(), JoinConfig::default()).expect("joiner");
    let mut stream = joiner.join(watched.clone(), StartAt::Offset(from.offset)).await.expect("join");
    let received = Arc::new(Mutex::new(Vec::<Delivery>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let (received, errors) = (received.clone(), errors.clone());
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(d) => received.lock().expect("lock").push(d),
                    Err(e) => errors.lock().expect("lock").push(e.to_string()),
                }
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(1_000)).await;
    if let Some(r) = redis.as_deref_mut() {
        r.kill();
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        r.restart();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    let published = producer.await.expect("producer");

    // The independent witness: a plain rdkafka consumer reading the topic.
    let records = read_topic(&brokers, &topic, published, Duration::from_secs(60));
    assert_eq!(records.len(), published, "every published event is in Kafka once");
    let mut want: Vec<(i64, EventId)> = records
        .iter()
        .filter(|r| r.partition == from.partition && r.offset >= from.offset)
        .map(|r| (r.offset, r.event()))
        .filter(|(_, e)| e.source() == &watched)
        .map(|(o, e)| (o, e.id()))
        .collect();
    want.sort();
    let last = want.last().expect("the watched source has events").1;
    wait_for("the join delivers the last event", Duration::from_secs(30), || {
        let (received, errors) = (received.clone(), errors.clone());
        async move {
            let errors = errors.lock().expect("lock");
            assert!(errors.is_empty(), "the join reported errors: {errors:?}");
            received.lock().expect("lock").iter().any(|d| d.id() == Some(last))
        }
    })
    .await;
    // Anything after the last event would be a duplicate: give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.abort();
    let got = received.lock().expect("lock").clone();
    let got_seq: Vec<(i64, EventId)> =
        got.iter().map(|d| (d.position().expect("positioned").offset, d.id().expect("an event"))).collect();
    if got_seq != want {
        let got_set: std::collections::HashSet<_> = got_seq.iter().collect();
        let missing: Vec<_> = want.iter().filter(|w| !got_set.contains(w)).map(|w| w.0).collect();
        let kinds: Vec<String> = got
            .iter()
            .map(|d| format!("{}{}", if matches!(d, Delivery::Live(_)) { "L" } else { "H" }, d.position().map_or(-1, |p| p.offset)))
            .collect();
        eprintln!("from {from}; missing offsets {missing:?}\ngot {kinds:?}");
    }
    assert_eq!(got_seq.len(), want.len(), "no gap, no duplicate");
    assert_eq!(got_seq, want, "same ids, same order");
    let live = got.iter().filter(|d| matches!(d, Delivery::Live(_))).count();
    let from_kafka = got.len() - live;
    eprintln!("join: {} delivered, {from_kafka} from Kafka, {live} live; {published} published in all", got.len());
    assert!(from_kafka > 0 && live > 0, "both history ({from_kafka}) and live ({live}) were exercised");
    if redis.is_some() {
        assert!(hub.stats().await.expect("stats").disconnects >= 1, "the outage was seen");
    }
    let others = records.iter().filter(|r| r.partition == from.partition && r.event().source() != &watched).count();
    assert!(others > 0, "the watched source's partition holds other sources' events too");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_joining_mid_stream_gets_exactly_the_kafka_sequence() {
    init_tracing();
    join_mid_stream(redis_url(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_join_stays_exact_when_redis_is_killed_and_restarted() {
    init_tracing();
    let mut redis = OwnedRedis::start();
    let url = redis.url();
    join_mid_stream(url, Some(&mut redis)).await;
}

/// A hundred joins of eight sources, each from a random past position, all
/// through one `CatchUp` while the publisher writes: at most four Kafka
/// consumers in all (metadata, the topic's tail reader, two backfill readers
/// for the reads from far back), and every join receives exactly its
/// source's Kafka sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_joins_share_the_kafka_readers_and_each_gets_its_exact_sequence() {
    init_tracing();
    let brokers = kafka_brokers();
    let topic = unique_topic("joins");
    create_topic(&brokers, &topic, 3).await;
    let (engine, _) = dual_engine(&brokers, &topic, &redis_url());
    let run = EventId::new().as_uuid().simple().to_string();
    let sources: Vec<Source> = (0..8).map(|i| Source::new("sensor", format!("{run}-{i}")).expect("valid")).collect();
    let (stop, producer) = start_load(&engine, &sources, 30);
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let replay = replay_for(&brokers, &topic);
    let hub = Hub::new(HubConfig { url: redis_url(), ..HubConfig::default() }).expect("hub");
    let joiner = CatchUp::new(replay.clone(), hub, JoinConfig::default()).expect("joiner");
    // Starting points: offsets of each source's stored events so far.
    let mut starts = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let history: Vec<_> = tokio::time::timeout(
            Duration::from_secs(30),
            replay.stream(ReplayRequest::new(Scope::Source(s.clone()))).await.expect("stream").collect::<Vec<_>>(),
        )
        .await
        .expect("replay ends");
        assert!(history.len() > 10, "source {i} has history");
        starts.push(history.iter().map(|r| r.as_ref().expect("valid").position.clone()).collect::<Vec<_>>());
    }
    let received: Arc<Mutex<Vec<Vec<Delivery>>>> = Arc::new(Mutex::new(vec![Vec::new(); 100]));
    let mut joins = Vec::new();
    for j in 0..100usize {
        let s = j % sources.len();
        let from = starts[s][(j * 7919) % starts[s].len()].clone();
        let mut stream = joiner.join(sources[s].clone(), StartAt::Offset(from.offset)).await.expect("join");
        let received = received.clone();
        joins.push((
            s,
            from,
            tokio::spawn(async move {
                while let Some(item) = stream.next().await {
                    received.lock().expect("lock")[j].push(item.expect("no error item"));
                }
            }),
        ));
    }
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    stop.store(true, Ordering::Relaxed);
    let published = producer.await.expect("producer");
    let records = read_topic(&brokers, &topic, published, Duration::from_secs(60));
    assert_eq!(records.len(), published, "every published event is in Kafka once");

    for (j, (s, from, task)) in joins.into_iter().enumerate() {
        let want: Vec<(i64, EventId)> = {
            let mut w: Vec<_> = records
                .iter()
                .filter(|r| r.partition == from.partition && r.offset >= from.offset)
                .map(|r| (r.offset, r.event()))
                .filter(|(_, e)| e.source() == &sources[s])
                .map(|(o, e)| (o, e.id()))
                .collect();
            w.sort();
            w
        };
        let last = want.last().expect("events").1;
        wait_for("the join delivers its source's last event", Duration::from_secs(30), || {
            let received = received.clone();
            async move { received.lock().expect("lock")[j].iter().any(|d| d.id() == Some(last)) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        task.abort();
        let got: Vec<(i64, EventId)> = received.lock().expect("lock")[j]
            .iter()
            .map(|d| (d.position().expect("positioned").offset, d.id().expect("an event")))
            .collect();
        assert_eq!(got.len(), want.len(), "join {j}: no gap, no duplicate");
        assert_eq!(got, want, "join {j}: same ids, same order");
    }
    let stats = joiner.stats();
    eprintln!("shared readers: {stats:?}");
    let most = 2 + JoinConfig::default().backfill_readers as u64;
    assert!(stats.consumers <= most, "metadata, the tail reader and the backfill readers: {stats:?}");
    assert!(stats.range_reads >= 100, "every join read history: {stats:?}");
    engine.shutdown().await;
}
