//! The hub on a private redis-server: subscription changes that Redis has
//! not answered yet do not hold up delivery, they reach Redis in order,
//! 1,000 channels and 5 patterns are all active again before `Gap` after a
//! restart, and memory through a burst to subscribers that never read.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use dualstream::consumer::{Hub, HubConfig, LiveItem, LiveStream, Target};
use dualstream::prelude::*;
use dualstream::Source;
use dualstream_tests::proxy::{DelayProxy, Direction};
use dualstream_tests::*;
use futures::StreamExt;

/// The tests of this file run one at a time, so that the memory figures of
/// the burst are this test's alone.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("redis")
}

/// `PUBSUB NUMSUB` of every channel.
async fn subscribers(url: &str, channels: &[String]) -> HashMap<String, i64> {
    redis::cmd("PUBSUB").arg("NUMSUB").arg(channels).query_async(&mut conn(url).await).await.expect("numsub")
}

async fn patterns(url: &str) -> i64 {
    redis::cmd("PUBSUB").arg("NUMPAT").query_async(&mut conn(url).await).await.expect("numpat")
}

/// How many times Redis ran `command` (`INFO commandstats`).
async fn calls(url: &str, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn(url).await).await.expect("info");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|rest| rest.split(',').next().and_then(|n| n.parse().ok()).expect("a count"))
        .unwrap_or(0)
}

/// The next item, within 15 s.
async fn item(s: &mut LiveStream) -> LiveItem {
    tokio::time::timeout(Duration::from_secs(15), s.next()).await.expect("an item in time").expect("open")
}

/// Poll `ok` every 20 ms until it holds, at most `timeout`.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, timeout: Duration, mut ok: impl FnMut() -> F) {
    let polls = async {
        while !ok().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(timeout, polls).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn local_channels(hub: &Hub) -> usize {
    tokio::time::timeout(Duration::from_secs(5), hub.stats()).await.expect("stats answered").expect("stats").channels
}

fn notification(source: &Source) -> Notification {
    let e = Event::builder("t", source.source_type(), source.source_id()).build().expect("valid");
    Notification::for_event(&e, None)
}

/// While Redis has not seen the hub's SUBSCRIBE and UNSUBSCRIBE commands
/// (held in a proxy, with a 60 s timeout, so the old hub would wait on the
/// first of them for a minute), notifications on an existing subscription
/// keep arriving, `stats` answers, and pings do not get in the way. Once
/// released, the changes reach Redis in order (unsubscribe, subscribe of
/// the same channel ends subscribed), runs of one kind as one command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_subscription_changes_do_not_hold_up_delivery() {
    init_tracing();
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = OwnedRedis::start();
    // The hub's commands wait in the proxy while Redis's messages keep flowing to the hub.
    let upstream = format!("127.0.0.1:{}", redis.port).parse().expect("addr");
    let gate = DelayProxy::start(upstream, Duration::ZERO).await.expect("proxy");
    let hub =
        Hub::new(HubConfig { url: gate.redis_url(), timeout_ms: 60_000, ping_interval_ms: 50, ..HubConfig::default() })
            .expect("hub");
    let namer = hub.namer().clone();
    let a = Source::new("user", "a").expect("valid");
    let mut sa = hub.subscribe_source(&a).await.expect("subscribed");
    let x = Target::Channel(namer.channel("user", "x").expect("valid"));
    let sx = hub.subscribe(x.clone()).await.expect("subscribed");
    let (subscribes, unsubscribes) = (calls(&redis.url(), "subscribe").await, calls(&redis.url(), "unsubscribe").await);

    gate.hold(Direction::ToServer);
    // Unsubscribe x (in flight), then, queued behind it: x again, y, y
    // dropped before Redis confirmed it, y again, and 100 more channels.
    drop(sx);
    eventually("x released locally", Duration::from_secs(5), || async { local_channels(&hub).await == 1 }).await;
    let subscribe = |target: Target| {
        let hub = hub.clone();
        tokio::spawn(async move { hub.subscribe(target).await.expect("subscribed") })
    };
    let x_again = subscribe(x.clone());
    let y = Target::Channel(namer.channel("user", "y").expect("valid"));
    let y_first = subscribe(y.clone());
    eventually("x and y subscribed locally", Duration::from_secs(5), || async { local_channels(&hub).await == 3 })
        .await;
    y_first.abort();
    eventually("y released locally", Duration::from_secs(5), || async { local_channels(&hub).await == 2 }).await;
    let y_again = subscribe(y.clone());
    let more: Vec<String> = (0..100).map(|i| namer.channel("user", &format!("m{i}")).expect("valid")).collect();
    let more_streams = {
        let hub = hub.clone();
        let more = more.clone();
        tokio::spawn(async move {
            futures::future::join_all(more.into_iter().map(|c| hub.subscribe(Target::Channel(c))))
                .await
                .into_iter()
                .map(|s| s.expect("subscribed"))
                .collect::<Vec<_>>()
        })
    };
    eventually("all subscribed locally", Duration::from_secs(5), || async { local_channels(&hub).await == 103 }).await;

    // Redis has seen none of it, and delivery goes on.
    let notifier = redis_notifier(&redis.url());
    let mut want = Vec::new();
    for _ in 0..100 {
        let n = notification(&a);
        notifier.notify(&n).await.expect("published");
        want.push(n.id);
    }
    let mut got = Vec::new();
    while got.len() < want.len() {
        match item(&mut sa).await {
            LiveItem::Notification(n) => got.push(n.id),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, want, "delivered while the subscription changes wait for Redis");
    assert!(!x_again.is_finished() && !y_again.is_finished() && !more_streams.is_finished(), "not confirmed yet");
    assert_eq!(calls(&redis.url(), "subscribe").await, subscribes, "held in the proxy");

    gate.release(Direction::ToServer);
    let done = Duration::from_secs(10);
    let mut sx = tokio::time::timeout(done, x_again).await.expect("confirmed").expect("task");
    let mut sy = tokio::time::timeout(done, y_again).await.expect("confirmed").expect("task");
    let more_streams = tokio::time::timeout(done, more_streams).await.expect("confirmed").expect("task");
    let mut all = more.clone();
    all.extend([namer.channel_for(&a), namer.channel("user", "x").expect("valid")]);
    all.push(namer.channel("user", "y").expect("valid"));
    let counts = subscribers(&redis.url(), &all).await;
    assert!(counts.values().all(|n| *n == 1), "every channel subscribed once: {counts:?}");
    // UNSUBSCRIBE x; SUBSCRIBE x y m0..m99 ... (merged); UNSUBSCRIBE y;
    // SUBSCRIBE y.
    assert_eq!(calls(&redis.url(), "unsubscribe").await - unsubscribes, 2);
    assert_eq!(calls(&redis.url(), "subscribe").await - subscribes, 2);

    // The resubscribed channels deliver.
    for (source_id, stream) in [("x", &mut sx), ("y", &mut sy)] {
        let n = notification(&Source::new("user", source_id).expect("valid"));
        notifier.notify(&n).await.expect("published");
        assert_eq!(item(stream).await, LiveItem::Notification(n.into()));
    }
    drop(more_streams);
    eventually("released in Redis", Duration::from_secs(5), || async {
        subscribers(&redis.url(), &more).await.values().all(|n| *n == 0)
    })
    .await;
}

/// 1,000 channels and 5 patterns; Redis killed and restarted. When `Gap`
/// arrives every subscription is active again: `NUMSUB`/`NUMPAT` say so,
/// and one message published at once to every channel and for every
/// pattern reaches every subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_every_subscription_is_active_before_the_gap() {
    init_tracing();
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut redis = OwnedRedis::start();
    let url = redis.url();
    let hub = Hub::new(HubConfig { url: url.clone(), ping_interval_ms: 200, ..HubConfig::default() }).expect("hub");
    let sources: Vec<Source> = (0..1_000).map(|i| Source::new("user", format!("u{i}")).expect("valid")).collect();
    let channels: Vec<String> = sources.iter().map(|s| hub.namer().channel_for(s)).collect();
    let mut streams = Vec::new();
    for s in &sources {
        streams.push(hub.subscribe_source(s).await.expect("subscribed"));
    }
    let kinds: Vec<String> = (0..5).map(|k| format!("kind{k}")).collect();
    let mut pattern_streams = Vec::new();
    for k in &kinds {
        pattern_streams.push(hub.subscribe_source_type(k).await.expect("subscribed"));
    }
    assert!(subscribers(&url, &channels).await.values().all(|n| *n == 1));
    assert_eq!(patterns(&url).await, 5);

    redis.kill();
    for s in streams.iter_mut().chain(pattern_streams.iter_mut()) {
        assert_eq!(item(s).await, LiveItem::Disconnected);
    }
    redis.restart();
    assert_eq!(item(&mut streams[0]).await, LiveItem::Gap);
    // Right at the gap: every subscription is back ...
    let counts = subscribers(&url, &channels).await;
    assert_eq!(counts.len(), 1_000);
    let missing: Vec<&String> = counts.iter().filter(|(_, n)| **n != 1).map(|(c, _)| c).collect();
    assert!(missing.is_empty(), "not subscribed at the gap: {missing:?}");
    assert_eq!(patterns(&url).await, 5, "every pattern at the gap");
    // ... and a message published now reaches it (PUBLISH counts the
    // receiving connections: the hub's).
    let mut publisher = conn(&url).await;
    let mut pipe = redis::pipe();
    let mut want = Vec::new();
    for (s, channel) in sources.iter().zip(&channels) {
        let n = notification(s);
        pipe.cmd("PUBLISH").arg(channel).arg(n.to_json());
        want.push(n);
    }
    for k in &kinds {
        let s = Source::new(k.as_str(), "any").expect("valid");
        let n = notification(&s);
        pipe.cmd("PUBLISH").arg(hub.namer().channel_for(&s)).arg(n.to_json());
        want.push(n);
    }
    let receivers: Vec<i64> = pipe.query_async(&mut publisher).await.expect("published");
    assert!(receivers.iter().all(|r| *r == 1), "every message had its receiver: {receivers:?}");
    for (i, (s, n)) in streams.iter_mut().chain(pattern_streams.iter_mut()).zip(want).enumerate() {
        if i > 0 {
            assert_eq!(item(s).await, LiveItem::Gap);
        }
        assert_eq!(item(s).await, LiveItem::Notification(n.into()), "subscriber {i}");
    }
    let stats = hub.stats().await.expect("stats");
    assert_eq!((stats.connected, stats.disconnects, stats.channels, stats.patterns), (true, 1, 1_000, 5));
}

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a memory figure")
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A burst of 200,000 notifications of about 200 bytes, published as fast
/// as Redis takes them, to 100 channels with 10 local subscribers each that
/// never read (buffers of 256). The hub keeps draining the connection:
/// what stays is the subscribers' buffers, and the peak does not follow the
/// burst. Figures are printed (`--nocapture`) and recorded in
/// docs/consumer.md; run this test alone for clean figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_subscribers_that_never_read_keeps_memory_bounded() {
    init_tracing();
    let _alone = ONE_AT_A_TIME.lock().await;
    const CHANNELS: usize = 100;
    const TOTAL: usize = 200_000;
    let redis = OwnedRedis::start();
    let url = redis.url();
    // Redis drops a Pub/Sub client whose output buffer passes 32 MiB (8 MiB
    // for a minute), which a debug build under load can reach while the
    // burst lasts: raised here, so that the test measures the hub alone.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 1gb 1gb 60")
        .query_async(&mut conn(&url).await)
        .await
        .expect("config set");
    let hub = Hub::new(HubConfig { url: url.clone(), subscriber_buffer: 256, ..HubConfig::default() }).expect("hub");
    let sources: Vec<Source> =
        (0..CHANNELS).map(|i| Source::new("user", format!("burst-subscriber-{i:04}")).expect("valid")).collect();
    let mut streams = Vec::new();
    for s in &sources {
        for _ in 0..10 {
            streams.push(hub.subscribe_source(s).await.expect("subscribed"));
        }
    }
    // The messages, made before measuring (the publisher's own memory is
    // not the hub's).
    let payloads: Vec<(String, Vec<u8>)> = (0..TOTAL)
        .map(|i| {
            let s = &sources[i % CHANNELS];
            let e = Event::builder("user.profile_updated", s.source_type(), s.source_id()).build().expect("valid");
            let n = Notification::for_event(&e, Some(Position::new("events.user", 3, i as i64)));
            (hub.namer().channel_for(s), n.to_json())
        })
        .collect();
    let mut publisher = conn(&url).await;
    let received = |n: usize| {
        let hub = hub.clone();
        async move {
            eventually("the hub received the burst", Duration::from_secs(120), || async {
                let stats = hub.stats().await.expect("stats");
                assert_eq!(stats.disconnects, 0, "the hub lost its connection: {stats:?}");
                stats.received >= n as u64
            })
            .await;
        }
    };
    let (rss_start, _) = memory_kib();

    // Fill every buffer: what the subscribers hold, by design.
    let fill = CHANNELS * 256;
    publish(&mut publisher, &payloads[..fill]).await;
    received(fill).await;
    let (rss_full, _) = memory_kib();

    // The rest of the burst, to full buffers, as fast as Redis takes it.
    let rest: usize = payloads[fill..].iter().map(|(_, p)| p.len()).sum();
    let started = Instant::now();
    publish(&mut publisher, &payloads[fill..]).await;
    let published = started.elapsed();
    let backlog = output_buffer(&url).await;
    received(TOTAL).await;
    let drained = started.elapsed();
    let (rss_end, hwm_end) = memory_kib();
    let stats = hub.stats().await.expect("stats");
    println!(
        "burst: {CHANNELS} channels x 10 subscribers that never read (buffer 256), notifications of {} bytes on \
         average; VmRSS {rss_start} KiB before, {rss_full} KiB once {fill} filled the buffers; the other {} \
         ({rest} bytes) published in {published:.2?} (Redis's output buffer to the hub then {backlog} bytes), \
         all received by the hub after {drained:.2?}; then VmRSS {rss_end} KiB, VmHWM {hwm_end} KiB; delivered {}, \
         missed {}, disconnects {}",
        payloads.iter().map(|(_, p)| p.len()).sum::<usize>() / TOTAL,
        TOTAL - fill,
        stats.delivered,
        stats.missed,
        stats.disconnects,
    );
    assert_eq!(stats.delivered, (CHANNELS * 10 * 256) as u64, "every buffer full, nothing more");
    // Had the hub stopped taking messages from redis-rs while the buffers
    // were full, its queue would have grown by more than the payloads.
    let grew = hwm_end.saturating_sub(rss_full) * 1024;
    assert!(grew < rest as u64 / 2, "the peak grew by {grew} bytes during a burst of {rest}");
    drop(streams);
}

/// Publish every `(channel, payload)`, pipelined by 1,000.
async fn publish(publisher: &mut redis::aio::MultiplexedConnection, messages: &[(String, Vec<u8>)]) {
    for chunk in messages.chunks(1_000) {
        let mut pipe = redis::pipe();
        for (channel, payload) in chunk {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        let () = pipe.query_async(publisher).await.expect("published");
    }
}

/// What Redis holds for its Pub/Sub clients (`omem` in `CLIENT LIST`), in
/// bytes.
async fn output_buffer(url: &str) -> u64 {
    let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut conn(url).await).await.expect("clients");
    clients
        .lines()
        .filter(|l| l.split(' ').any(|f| f == "flags=P"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("omem=")).and_then(|n| n.parse::<u64>().ok()))
        .sum()
}

/// A hub that follows the partitions (`Hub::follow_partitions`, what a
/// catch-up join proves a jump with) records the position of every
/// notification published on a source channel, through a Redis restart, with
/// one pattern subscription that a local subscriber of the same pattern does
/// not take away when it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_hub_records_every_position_through_a_restart() {
    use dualstream::consumer::{key_of, Seen};
    init_tracing();
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut redis = OwnedRedis::start();
    let url = redis.url();
    let hub = Hub::new(HubConfig { url: url.clone(), ping_interval_ms: 200, ..HubConfig::default() }).expect("hub");
    let seen = hub.follow_partitions().expect("a single Redis: followed");
    let same = hub.subscribe(Target::Pattern(hub.namer().pattern_all_sources())).await.expect("subscribed");
    drop(same);
    eventually("the followed pattern alone", Duration::from_secs(5), || async { patterns(&url).await == 1 }).await;
    let (a, b) = (Source::new("user", "a").expect("valid"), Source::new("user", "b").expect("valid"));
    let publish_range = |from: i64, to: i64| {
        let mut pipe = redis::pipe();
        for o in from..to {
            let s = if o % 2 == 0 { &a } else { &b };
            let e = Event::builder("t", s.source_type(), s.source_id()).build().expect("valid");
            let n = Notification::for_event(&e, Some(Position::new("events", 0, o)));
            pipe.cmd("PUBLISH").arg(hub.namer().channel_for(s)).arg(n.to_json());
        }
        pipe
    };
    let mut publisher = conn(&url).await;
    let () = publish_range(0, 100).query_async(&mut publisher).await.expect("published");
    let c = key_of(&Source::new("user", "c").expect("valid"));
    eventually("0..100 seen", Duration::from_secs(10), || async { seen.check("events", 0, 0, 100, c) == Seen::Clear })
        .await;
    assert_eq!(seen.check("events", 0, 0, 100, key_of(&a)), Seen::Mine { offset: 0 });
    assert_eq!(seen.check("events", 0, 1, 100, key_of(&b)), Seen::Mine { offset: 1 });

    redis.kill();
    redis.restart();
    eventually("followed again", Duration::from_secs(15), || async { patterns(&url).await == 1 }).await;
    let mut publisher = conn(&url).await;
    let () = publish_range(100, 200).query_async(&mut publisher).await.expect("published");
    eventually("100..200 seen", Duration::from_secs(10), || async {
        seen.check("events", 0, 100, 200, c) == Seen::Clear
    })
    .await;
    assert_eq!(seen.check("events", 0, 0, 200, c), Seen::Clear, "what was seen before the restart is kept");
    assert_eq!(seen.check("events", 0, 200, 201, c), Seen::Missing { offset: 200 });
}

/// A followed hub takes the messages of the source channels its pattern
/// covers from the pattern's: subscribing one makes no Redis subscription of
/// its own, and each message reaches the subscriber once. A channel that
/// was subscribed on its own before the hub followed keeps its subscription
/// (its messages still once each) until its last subscriber leaves; the
/// next subscriber of it is served from the pattern. An aggregate channel
/// (`events:user`, which the pattern does not match) is subscribed on its
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_hub_serves_covered_channels_from_its_pattern_once_each() {
    init_tracing();
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = OwnedRedis::start();
    let url = redis.url();
    let hub = Hub::new(HubConfig { url: url.clone(), ..HubConfig::default() }).expect("hub");
    let (early, late) = (Source::new("user", "early").expect("valid"), Source::new("user", "late").expect("valid"));
    let early_channel = hub.namer().channel_for(&early);
    let late_channel = hub.namer().channel_for(&late);
    let mut before = hub.subscribe_source(&early).await.expect("subscribed");
    let _seen = hub.follow_partitions().expect("a single Redis: followed");
    let mut after = hub.subscribe_source(&late).await.expect("subscribed");
    eventually("the pattern followed", Duration::from_secs(5), || async { patterns(&url).await == 1 }).await;
    let numsub = subscribers(&url, &[early_channel.clone(), late_channel.clone()]).await;
    assert_eq!(numsub[&early_channel], 1, "subscribed on its own before the hub followed");
    assert_eq!(numsub[&late_channel], 0, "covered by the pattern: no subscription of its own");

    let mut publisher = conn(&url).await;
    let publish = |s: &Source, n: usize| {
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("PUBLISH").arg(hub.namer().channel_for(s)).arg(notification(s).to_json());
        }
        pipe
    };
    let () = publish(&early, 20).query_async(&mut publisher).await.expect("published");
    let () = publish(&late, 20).query_async(&mut publisher).await.expect("published");
    for (stream, what) in [(&mut before, "early"), (&mut after, "late")] {
        for _ in 0..20 {
            assert!(matches!(item(stream).await, LiveItem::Notification(_)), "{what}");
        }
        let extra = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
        assert!(extra.is_err(), "{what}: a message came twice: {extra:?}");
    }

    // The early channel's last subscriber leaves: its own subscription goes,
    // and its next subscriber is served from the pattern, once each.
    drop(before);
    eventually("the early channel unsubscribed", Duration::from_secs(5), || async {
        subscribers(&url, std::slice::from_ref(&early_channel)).await[&early_channel] == 0
    })
    .await;
    let mut again = hub.subscribe_source(&early).await.expect("subscribed");
    let () = publish(&early, 20).query_async(&mut publisher).await.expect("published");
    for _ in 0..20 {
        assert!(matches!(item(&mut again).await, LiveItem::Notification(_)));
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), again.next()).await;
    assert!(extra.is_err(), "a message came twice: {extra:?}");

    // An aggregate channel is not covered: subscribed on its own.
    let aggregate = format!("{}:user", hub.namer().prefix());
    let mut agg = hub.subscribe(Target::Channel(aggregate.clone())).await.expect("subscribed");
    assert_eq!(subscribers(&url, std::slice::from_ref(&aggregate)).await[&aggregate], 1);
    let () = redis::cmd("PUBLISH").arg(&aggregate).arg(notification(&early).to_json()).query_async(&mut publisher).await.expect("published");
    assert!(matches!(item(&mut agg).await, LiveItem::Notification(_)));
}
