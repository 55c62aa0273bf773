//! Unit tests against librdkafka's in-process `MockCluster`, and the hub's
//! delivery rule without Redis.

use std::time::Duration;

use dualstream_core::{DurableSink, Event, Source};
use dualstream_kafka::{KafkaSink, KafkaSinkConfig, TopicRouting};
use futures::StreamExt;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::*;

fn sink(brokers: &str, topic: &str) -> KafkaSink {
    KafkaSink::new(KafkaSinkConfig {
        bootstrap_servers: brokers.to_owned(),
        topic: TopicRouting::Single { topic: topic.to_owned() },
        linger_ms: 1,
        ..KafkaSinkConfig::default()
    })
    .expect("sink")
}

fn replay(brokers: &str, topic: &str) -> Replay {
    Replay::new(ReplayConfig {
        bootstrap_servers: brokers.to_owned(),
        topic: TopicRouting::Single { topic: topic.to_owned() },
        timeout_ms: 5_000,
        ..ReplayConfig::default()
    })
    .expect("replay")
}

async fn collect(stream: ReplayStream) -> Vec<Result<Replayed, ReplayError>> {
    tokio::time::timeout(Duration::from_secs(30), stream.collect::<Vec<_>>()).await.expect("replay ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_one_source_in_order_and_stops_at_the_watermark() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("t", 3, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    let sink = sink(&brokers, "t");
    let mut mine = Vec::new();
    for i in 0..120 {
        let e = Event::builder("n", "user", format!("u{}", i % 4)).payload(format!("{i}")).build().expect("valid");
        let p = sink.publish(e.clone()).await.expect("stored");
        if i % 4 == 1 {
            mine.push((e, p));
        }
    }
    let r = replay(&brokers, "t");
    let source = Source::new("user", "u1").expect("valid");
    assert_eq!(r.partition_of(&source).await.expect("partition").1, mine[0].1.partition);

    let got = collect(r.stream(ReplayRequest::new(Scope::Source(source.clone()))).await.expect("stream")).await;
    let got: Vec<_> = got.into_iter().map(|r| r.expect("valid")).collect();
    assert_eq!(
        got.iter().map(|r| (&r.event, &r.position)).collect::<Vec<_>>(),
        mine.iter().map(|(e, p)| (e, p)).collect::<Vec<_>>()
    );

    // From an offset (inclusive), and the last N.
    let from = mine[10].1.offset;
    let got = collect(
        r.stream(ReplayRequest::new(Scope::Source(source.clone())).start(StartAt::Offset(from))).await.expect("stream"),
    )
    .await;
    assert_eq!(got.len(), 20);
    assert_eq!(got[0].as_ref().expect("valid").event, mine[10].0);
    let got = collect(
        r.stream(ReplayRequest::new(Scope::Source(source.clone())).start(StartAt::LastN(7))).await.expect("stream"),
    )
    .await;
    let ids: Vec<_> = got.iter().map(|r| r.as_ref().expect("valid").event.id()).collect();
    assert_eq!(ids, mine[23..].iter().map(|(e, _)| e.id()).collect::<Vec<_>>());
    let got = collect(
        r.stream(ReplayRequest::new(Scope::Source(source.clone())).start(StartAt::LastN(1000))).await.expect("stream"),
    )
    .await;
    assert_eq!(got.len(), 30, "fewer than N stored: all of them");

    // All sources: every record once.
    let got = collect(r.stream(ReplayRequest::new(Scope::All)).await.expect("stream")).await;
    assert_eq!(got.len(), 120);
    // From the end: nothing, and the stream ends.
    assert!(collect(r.stream(ReplayRequest::new(Scope::All).start(StartAt::End)).await.expect("stream"))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_are_typed_errors_and_the_stream_goes_on() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("t", 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    let sink = sink(&brokers, "t");
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("producer");
    let a = Event::builder("n", "user", "u").build().expect("valid");
    sink.publish(a.clone()).await.expect("stored");
    producer
        .send(FutureRecord::to("t").key("u").payload("not ours"), Duration::from_secs(5))
        .await
        .expect("foreign record");
    let b = Event::builder("n", "user", "u").build().expect("valid");
    sink.publish(b.clone()).await.expect("stored");

    let r = replay(&brokers, "t");
    let source = Scope::Source(Source::new("user", "u").expect("valid"));
    let got = collect(r.stream(ReplayRequest::new(source.clone())).await.expect("stream")).await;
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].as_ref().expect("first").event, a);
    assert!(matches!(&got[1], Err(ReplayError::Decode { position, .. }) if position.offset == 1), "{:?}", got[1]);
    assert_eq!(got[2].as_ref().expect("third").event, b);

    let got = collect(r.stream(ReplayRequest::new(source).stop_on_decode_error(true)).await.expect("stream")).await;
    assert_eq!(got.len(), 2, "stops after the bad record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_typed_errors() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("t", 1, 1).expect("topic");
    let r = replay(&cluster.bootstrap_servers(), "t");
    let e = r.stream(ReplayRequest::new(Scope::All).start(StartAt::LastN(3))).await.err();
    assert!(matches!(e, Some(ReplayError::Request { field: "start", .. })), "{e:?}");
    let e = r.stream(ReplayRequest::new(Scope::All).start(StartAt::Offset(-1))).await.err();
    assert!(matches!(e, Some(ReplayError::Request { field: "start", .. })), "{e:?}");
    let e = r.stream(ReplayRequest::new(Scope::SourceType("a:b".into()))).await.err();
    assert!(matches!(e, Some(ReplayError::Request { field: "scope", .. })), "{e:?}");
    let per_type = Replay::new(ReplayConfig {
        bootstrap_servers: cluster.bootstrap_servers(),
        topic: TopicRouting::PerSourceType { template: "ev.{source_type}".into() },
        ..ReplayConfig::default()
    })
    .expect("replay");
    let e = per_type.stream(ReplayRequest::new(Scope::All)).await.err();
    assert!(matches!(e, Some(ReplayError::Request { field: "scope", .. })), "{e:?}");
    let e = per_type.stream(ReplayRequest::new(Scope::SourceType("nothere".into()))).await.err();
    assert!(matches!(&e, Some(ReplayError::UnknownTopic { topic }) if topic == "ev.nothere"), "{e:?}");
}

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

mod shared_history {
    use std::sync::Arc;
    use std::time::Duration;

    use dualstream_core::{DurableSink, Event, Source};
    use rdkafka::mocking::MockCluster;

    use super::sink;
    use crate::history::{History, Item, Tp};
    use crate::reader::Marks;
    use crate::*;

    /// Everything one range read delivers, and how far it got.
    async fn read_all(h: &History, tp: &Tp, from: i64, to: i64, key: &str, slow: bool) -> Vec<i64> {
        let mut out = Vec::new();
        let mut next = from;
        while next < to {
            let from_here = next;
            let mut range = h.read(tp, next, to, Arc::from(key.as_bytes())).expect("read");
            while let Some(item) =
                tokio::time::timeout(Duration::from_secs(20), range.rx.recv()).await.expect("no stall")
            {
                match item {
                    Item::Record(rec) => {
                        assert!(rec.position.offset >= next, "in order, no repeat");
                        next = rec.position.offset + 1;
                        out.push(rec.position.offset);
                        if slow {
                            // A busy join: the reader must drop it from the
                            // sweep rather than wait for it.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                    Item::Hole { from, to } => panic!("no hole in a fresh topic: {from}..{to}"),
                }
            }
            assert!(range.ticket.take_error().is_none());
            let progressed = next > from_here;
            next = next.max(range.ticket.checked());
            assert!(progressed || next > from_here, "every range read makes progress");
        }
        out
    }

    const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];

    /// Topic "t" of `partitions` on a mock cluster, with 2,000 events of
    /// sources `KEYS` in turn; each stored event's key, partition and
    /// offset, and a shared history of the topic with a cache of 64 records
    /// (small, so that older ranges are older than the cache).
    async fn stored_topic(
        partitions: i32,
        poll_every: Duration,
    ) -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, Vec<(&'static str, i32, i64)>, History) {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", partitions, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let sink = sink(&brokers, "t");
        let events: Vec<Event> = (0..2_000)
            .map(|i| Event::builder("n", "user", KEYS[i % 5]).payload(format!("{i}")).build().expect("valid"))
            .collect();
        let mut stored = Vec::new();
        for (i, r) in sink.publish_batch(events).await.into_iter().enumerate() {
            let p = r.expect("stored");
            stored.push((KEYS[i % 5], p.partition, p.offset));
        }
        let config = ReplayConfig { bootstrap_servers: brokers, timeout_ms: 10_000, ..ReplayConfig::default() };
        let config = ReplayConfig { topic: dualstream_kafka::TopicRouting::Single { topic: "t".into() }, ..config };
        let h = History::new(Arc::new(config), poll_every, 64, 2).expect("history");
        (cluster, stored, h)
    }

    /// Many concurrent range reads of one partition, from offsets old and
    /// new, some of them slow: one consumer for the records, each read gets
    /// exactly its key's records of its range.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_range_reads_share_one_consumer_and_each_gets_exactly_its_records() {
        let (_cluster, stored, h) = stored_topic(2, Duration::from_millis(100)).await;
        let keys = KEYS;
        let mut tasks = Vec::new();
        for i in 0..60usize {
            let key = keys[i % 5];
            let source = Source::new("user", key).expect("valid");
            let partition = partition_for_key(source.source_id().as_bytes(), 2);
            let tp: Tp = (Arc::from("t"), partition);
            let high = stored.iter().filter(|s| s.1 == partition).map(|s| s.2 + 1).max().expect("records");
            let from = (i as i64 * 97) % high;
            let to = (from + 50 + (i as i64 * 31) % 700).min(high);
            let want: Vec<i64> = stored
                .iter()
                .filter(|s| s.0 == key && s.1 == partition && s.2 >= from && s.2 < to)
                .map(|s| s.2)
                .collect();
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                let got = read_all(&h, &tp, from, to, key, i % 7 == 0).await;
                assert_eq!(got, want, "read {i}: key {key}, {from}..{to}");
            }));
        }
        for t in tasks {
            t.await.expect("read");
        }
        let stats = h.stats();
        assert!(
            stats.consumers <= 4,
            "one for metadata, one for the topic's tail, at most two backfill readers: {stats:?}"
        );
        // Fifty joins asking for the partition count at once: one look-up.
        let counts = futures::future::join_all((0..50).map(|_| h.partition_count("t"))).await;
        assert!(counts.iter().all(|c| *c.as_ref().expect("count") == 2));
        assert_eq!(h.stats().metadata_lookups, 1, "one look-up, then the cache");
        // The watermarks, polled once for every watcher of a partition.
        let tp: Tp = (Arc::from("t"), 0);
        let mut watchers: Vec<_> = (0..100).map(|_| h.watch(&tp)).collect();
        let fresh = h.fresh(&tp).await.expect("fresh");
        let high0 = stored.iter().filter(|s| s.1 == 0).count() as i64;
        assert_eq!(fresh, Marks { low: 0, high: high0 });
        for w in &mut watchers {
            tokio::time::timeout(Duration::from_secs(5), w.wait_for(|m| m.high == high0))
                .await
                .expect("polled")
                .expect("open");
        }
        // Rounds start at least 100 ms apart, one look-up each for the one
        // partition however many watch it: k look-ups take at least
        // (k - 1) × 100 ms. Counted until three more came (a busy machine
        // only makes the window longer, and the bound with it).
        let start = std::time::Instant::now();
        let before = h.stats().watermark_lookups;
        let polls = loop {
            let polls = h.stats().watermark_lookups - before;
            if polls >= 3 {
                break polls;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "the watched partition is polled: {polls} look-ups");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let elapsed = start.elapsed().as_millis() as u64;
        assert!(
            polls <= elapsed / 100 + 1,
            "one look-up per 100 ms for 100 watchers of one partition: {polls} in {elapsed} ms"
        );
    }

    /// A read from far back goes to a backfill reader of its own: the tail
    /// reader is not moved back (it used to seek to offset 0 for it, and
    /// every join at the tail waited while it read forward again), and a
    /// read near the tail is still served from its cache.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_from_far_back_does_not_move_the_tail_reader() {
        let (_cluster, stored, h) = stored_topic(1, Duration::from_secs(3_600)).await;
        let want = |key: &str, from: i64, to: i64| -> Vec<i64> {
            stored.iter().filter(|s| s.0 == key && s.2 >= from && s.2 < to).map(|s| s.2).collect()
        };
        let tp: Tp = (Arc::from("t"), 0);

        assert_eq!(read_all(&h, &tp, 1_900, 2_000, "a", false).await, want("a", 1_900, 2_000), "the tail");
        let tail = h.stats();
        assert_eq!((tail.consumers, tail.backfill_reads, tail.seeks), (2, 0, 0), "{tail:?}");

        assert_eq!(read_all(&h, &tp, 0, 2_000, "b", false).await, want("b", 0, 2_000), "from offset 0");
        let far = h.stats();
        // The read may be asked again from where it got to (a join that
        // does not take its items at once is dropped from the sweep): to
        // the same backfill reader while that is older than the tail's
        // cache, to the tail reader once it is not.
        assert!(far.backfill_reads >= 1, "handed to a backfill reader: {far:?}");
        assert_eq!(far.consumers, 3, "one backfill reader, a consumer of its own: {far:?}");

        assert_eq!(read_all(&h, &tp, 1_950, 2_000, "c", false).await, want("c", 1_950, 2_000), "the tail again");
        let last = h.stats();
        assert_eq!(last.backfill_reads, far.backfill_reads, "served by the tail reader: {last:?}");
        assert_eq!(last.consumers, 3, "{last:?}");
    }

    #[test]
    fn inconsistent_watermarks_do_not_panic() {
        assert_eq!(Marks::sane(10, 5), Marks { low: 10, high: 10 });
        assert_eq!(Marks::sane(-1, -1), Marks { low: 0, high: 0 });
        assert_eq!(Marks::sane(3, 9), Marks { low: 3, high: 9 });
    }
}

/// librdkafka's mock broker keeps at most 5 MiB per partition and deletes the
/// oldest batches beyond it: a real deleted range at the head of the log.
mod truncation {
    use std::sync::Arc;
    use std::time::Duration;

    use dualstream_core::{DurableSink, Event, Source};
    use futures::StreamExt;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::ClientConfig;

    use super::{collect, replay, sink};
    use crate::history::{History, Item, Tp};
    use crate::*;

    /// A one-partition topic whose first records were deleted; returns the
    /// low and high watermarks.
    async fn truncated_topic<C: rdkafka::ClientContext>(cluster: &MockCluster<'_, C>) -> (i64, i64) {
        cluster.create_topic("t", 1, 1).expect("topic");
        fill(cluster).await
    }

    /// Write about 7 MiB to partition 0 of `t`; the watermarks after.
    async fn fill<C: rdkafka::ClientContext>(cluster: &MockCluster<'_, C>) -> (i64, i64) {
        fill_at(&cluster.bootstrap_servers()).await
    }

    async fn fill_at(brokers: &str) -> (i64, i64) {
        let sink = sink(brokers, "t");
        let body = vec![b'x'; 1_200];
        for chunk in 0..6 {
            let events: Vec<Event> = (0..1_000)
                .map(|i| {
                    Event::builder("n", "user", "u")
                        .payload(
                            format!("{chunk}-{i}")
                                .into_bytes()
                                .into_iter()
                                .chain(body.iter().copied())
                                .collect::<Vec<u8>>(),
                        )
                        .build()
                        .expect("valid")
                })
                .collect();
            for r in sink.publish_batch(events).await {
                r.expect("stored");
            }
        }
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("consumer");
        let (low, high) = c.fetch_watermarks("t", 0, Duration::from_secs(5)).expect("watermarks");
        assert!(low > 0 && low < high, "the mock broker deleted the oldest records: {low}..{high}");
        (low, high)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_from_a_deleted_offset_says_so_first_and_goes_on_from_the_first_stored_record() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let (low, high) = truncated_topic(&cluster).await;
        let r = replay(&cluster.bootstrap_servers(), "t");
        let source = Source::new("user", "u").expect("valid");
        let got = collect(
            r.stream(ReplayRequest::new(Scope::Source(source)).start(StartAt::Offset(3))).await.expect("stream"),
        )
        .await;
        assert!(
            matches!(&got[0], Err(ReplayError::Truncated { partition: 0, requested: 3, first_available, .. }) if *first_available == low),
            "{:?}",
            got[0].as_ref().err()
        );
        let offsets: Vec<i64> = got[1..].iter().map(|r| r.as_ref().expect("valid").position.offset).collect();
        assert_eq!(offsets, (low..high).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_join_from_a_deleted_offset_delivers_truncated_then_the_stored_history() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let (low, high) = truncated_topic(&cluster).await;
        // No Redis: the history comes from Kafka alone.
        let hub = Hub::new(HubConfig { url: "redis://127.0.0.1:1".into(), timeout_ms: 100, ..HubConfig::default() })
            .expect("hub");
        let joiner =
            CatchUp::new(replay(&cluster.bootstrap_servers(), "t"), hub, JoinConfig::default()).expect("joiner");
        let mut stream = joiner.join(Source::new("user", "u").expect("valid"), StartAt::Offset(3)).await.expect("join");
        let first = tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("an item").expect("open");
        assert_eq!(first.expect("no error"), Delivery::Truncated { requested: 3, first_available: low });
        for want in low..high {
            let item =
                tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("an item").expect("open");
            assert_eq!(item.expect("no error").position().map(|p| p.offset), Some(want));
        }
    }

    /// A join that has not read for a while finds that retention deleted
    /// records it had not read yet: it says so, then goes on.
    ///
    /// The join, its watermark poller and its readers are tasks of this
    /// test's runtime, which has one thread; the fill runs on another thread
    /// while this one waits for it, so the join cannot look at the partition
    /// before the deletion. (With the fill on the join's runtime, an idle
    /// check during the fill read offset 0 before it was deleted whenever
    /// the machine was slow enough, and the first item was a record.)
    #[tokio::test]
    async fn a_join_overtaken_by_deletion_reports_it_mid_stream() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let hub = Hub::new(HubConfig { url: "redis://127.0.0.1:1".into(), timeout_ms: 100, ..HubConfig::default() })
            .expect("hub");
        let config = JoinConfig { idle_check_ms: 300, ..JoinConfig::default() };
        let joiner = CatchUp::new(replay(&cluster.bootstrap_servers(), "t"), hub, config).expect("joiner");
        let u = Source::new("user", "u").expect("valid");
        let mut stream = joiner.join(u.clone(), StartAt::End).await.expect("join");
        // Nothing is stored yet: the join waits at offset 0. Wait until the
        // poller is between rounds (a look-up it started before the fill
        // could answer with watermarks from the middle of it): a fresh
        // look-up for us, and none started after it.
        let mut between_rounds = false;
        for _ in 0..100 {
            let before = joiner.stats().watermark_lookups;
            assert_eq!(joiner.position_now(&u).await.expect("position").offset, 0);
            if joiner.stats().watermark_lookups == before + 1 {
                between_rounds = true;
                break;
            }
        }
        assert!(between_rounds, "the watermark poller never rests");
        // Now more than the mock broker keeps is written at once, with this
        // runtime held.
        let brokers = cluster.bootstrap_servers();
        let fill_alone = || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(fill_at(&brokers))
        };
        let (low, high) = std::thread::scope(|s| s.spawn(fill_alone).join()).expect("fill");
        let first = tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("an item").expect("open");
        let Ok(Delivery::Truncated { requested: 0, first_available }) = first else { panic!("{first:?}") };
        assert!(first_available >= low, "{first_available} vs {low}");
        let next = tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("an item").expect("open");
        let offset = next.expect("no error").position().expect("an event").offset;
        assert_eq!(offset, first_available, "the stored history goes on from there");
        assert!(offset < high);
    }

    /// The shared reader asked for a deleted range (the low watermark moved
    /// after the join looked): the broker starts later, and the reader says
    /// which offsets it did not get.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_shared_reader_reports_the_offsets_the_broker_no_longer_has() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let (low, high) = truncated_topic(&cluster).await;
        let config = ReplayConfig {
            bootstrap_servers: cluster.bootstrap_servers(),
            topic: dualstream_kafka::TopicRouting::Single { topic: "t".into() },
            ..ReplayConfig::default()
        };
        let h = History::new(Arc::new(config), Duration::from_millis(100), 64, 2).expect("history");
        let tp: Tp = (Arc::from("t"), 0);
        let mut range = h.read(&tp, 0, high, Arc::from(&b"u"[..])).expect("read");
        let first =
            tokio::time::timeout(Duration::from_secs(20), range.rx.recv()).await.expect("an item").expect("open");
        assert!(matches!(first, Item::Hole { from: 0, to } if to == low), "{first:?}");
        let second =
            tokio::time::timeout(Duration::from_secs(20), range.rx.recv()).await.expect("an item").expect("open");
        assert!(matches!(second, Item::Record(r) if r.position.offset == low));
    }
}

/// Three brokers, the partition replicated on all three: its leader moves
/// from broker to broker while a replay and a join follow it.
mod leader_moves {
    use std::time::Duration;

    use dualstream_core::{DurableSink, Event, EventId, Source};
    use dualstream_kafka::KafkaSink;
    use futures::stream::BoxStream;
    use futures::StreamExt;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    use super::{replay, sink};
    use crate::*;

    type Cluster = MockCluster<'static, DefaultProducerContext>;
    /// What a reader delivered: offset and event id, or the error's text.
    type Got = Result<(i64, EventId), String>;

    /// Rounds published before the reader starts, and while it follows.
    const BEFORE: usize = 10;
    const DURING: usize = 60;
    /// Events per round, alternating between sources u and v.
    const ROUND: usize = 10;
    /// Events of u in all.
    const OF_U: usize = (BEFORE + DURING) * ROUND / 2;

    fn three_brokers() -> (Cluster, KafkaSink) {
        let cluster = MockCluster::new(3).expect("mock cluster");
        cluster.create_topic("t", 1, 3).expect("topic");
        cluster.partition_leader("t", 0, Some(1)).expect("leader");
        let sink = sink(&cluster.bootstrap_servers(), "t");
        (cluster, sink)
    }

    fn u() -> Source {
        Source::new("user", "u").expect("valid")
    }

    /// Publish `rounds` rounds of `ROUND` events from round `first` on, one
    /// round every 30 ms; with `moving`, the partition's leader moves to the
    /// next broker after each round. The offsets and ids of u's events.
    async fn publish(
        cluster: &Cluster,
        sink: &KafkaSink,
        first: usize,
        rounds: usize,
        moving: bool,
    ) -> Vec<(i64, EventId)> {
        let mut of_u = Vec::new();
        for round in first..first + rounds {
            let events: Vec<Event> = (0..ROUND)
                .map(|i| {
                    let source = if i % 2 == 0 { "u" } else { "v" };
                    Event::builder("n", "user", source).payload(format!("{round}-{i}")).build().expect("valid")
                })
                .collect();
            let results = tokio::time::timeout(Duration::from_secs(60), sink.publish_batch(events.clone()))
                .await
                .expect("acknowledged within the bound");
            for (e, r) in events.iter().zip(results) {
                let p = r.expect("stored");
                if e.source() == &u() {
                    of_u.push((p.offset, e.id()));
                }
            }
            if moving {
                let next = (round % 3) as i32 + 1;
                cluster.partition_leader("t", 0, Some(next)).expect("leader moved");
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        of_u
    }

    /// The first `n` items, each within a bound, then checks that nothing
    /// more comes for a second (a duplicate would).
    async fn take(mut stream: BoxStream<'static, Got>, n: usize) -> Vec<Got> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(item)) => out.push(item),
                Ok(None) => {
                    out.push(Err("the stream ended".into()));
                    return out;
                }
                Err(_) => {
                    out.push(Err(format!("no item within 30 s after {}", out.len())));
                    return out;
                }
            }
        }
        if let Ok(extra) = tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
            out.push(Err(format!("an item past the last stored event: {extra:?}")));
        }
        out
    }

    /// Store `BEFORE` rounds, start the reader, publish `DURING` rounds
    /// moving the leader after each: the reader delivers exactly u's stored
    /// events, in offset order, with no error, gap or duplicate.
    async fn follows_exactly(
        cluster: &Cluster,
        sink: &KafkaSink,
        reader: BoxStream<'static, Got>,
        before: Vec<(i64, EventId)>,
    ) {
        let reading = tokio::spawn(take(reader, OF_U));
        let mut want = before;
        want.extend(publish(cluster, sink, BEFORE, DURING, true).await);
        assert_eq!(want.len(), OF_U);
        let got = tokio::time::timeout(Duration::from_secs(120), reading).await.expect("bounded").expect("reader task");
        let want: Vec<Got> = want.into_iter().map(Ok).collect();
        if let Some(i) = (0..got.len().max(want.len())).find(|i| got.get(*i) != want.get(*i)) {
            panic!("item {i} of {}: got {:?}, want {:?}", want.len(), got.get(i), want.get(i));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_following_replay_delivers_exactly_the_stored_sequence_while_the_leader_moves() {
        let (cluster, sink) = three_brokers();
        let before = publish(&cluster, &sink, 0, BEFORE, false).await;
        let r = replay(&cluster.bootstrap_servers(), "t");
        let request = ReplayRequest::new(Scope::Source(u())).until(Until::Follow);
        let stream = r.stream(request).await.expect("stream");
        let stream = stream.map(|r| r.map(|r| (r.position.offset, r.event.id())).map_err(|e| e.to_string()));
        follows_exactly(&cluster, &sink, stream.boxed(), before).await;
    }

    /// No Redis: after the history, the join finds each new event through
    /// its idle check of the polled watermarks, and reads it through the
    /// shared reader, which follows the partition across every move.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_join_delivers_exactly_the_stored_sequence_while_the_leader_moves() {
        let (cluster, sink) = three_brokers();
        let before = publish(&cluster, &sink, 0, BEFORE, false).await;
        let joiner = kafka_only(&cluster, JoinConfig { idle_check_ms: 200, ..JoinConfig::default() });
        let stream = joiner.join(u(), StartAt::Beginning).await.expect("join");
        follows_exactly(&cluster, &sink, from_kafka(stream), before).await;
    }

    /// A joiner without Redis (nothing listens on port 1): its joins work from
    /// Kafka alone, finding new events through the idle check.
    fn kafka_only(cluster: &Cluster, config: JoinConfig) -> CatchUp {
        let hub = Hub::new(HubConfig { url: "redis://127.0.0.1:1".into(), timeout_ms: 100, ..HubConfig::default() })
            .expect("hub");
        // The look-ups are asked again after a leader move within
        // `timeout_ms`; 20 s only bounds a hang, so a busy machine's slow
        // metadata refresh does not decide the outcome.
        let replay = Replay::new(ReplayConfig {
            bootstrap_servers: cluster.bootstrap_servers(),
            topic: super::TopicRouting::Single { topic: "t".to_owned() },
            timeout_ms: 20_000,
            ..ReplayConfig::default()
        })
        .expect("replay");
        CatchUp::new(replay, hub, config).expect("joiner")
    }

    /// A join's items, each expected from Kafka (there is no Redis).
    fn from_kafka(stream: JoinStream) -> BoxStream<'static, Got> {
        let item = |d| match d {
            Ok(Delivery::History(r)) => Ok((r.position.offset, r.event.id())),
            other => Err(format!("{other:?}")),
        };
        stream.map(item).boxed()
    }

    /// `BEFORE` rounds stored, and a joiner (without Redis) whose first join
    /// delivered u's events: its shared readers know the partition's leader.
    async fn joined_once() -> (Cluster, CatchUp, Vec<Got>) {
        let (cluster, sink) = three_brokers();
        let stored: Vec<Got> = publish(&cluster, &sink, 0, BEFORE, false).await.into_iter().map(Ok).collect();
        let joiner = kafka_only(&cluster, JoinConfig::default());
        let first = joiner.join(u(), StartAt::Beginning).await.expect("join");
        assert_eq!(take(from_kafka(first), stored.len()).await, stored);
        (cluster, joiner, stored)
    }

    /// The shared readers ask for watermarks at the leader librdkafka last
    /// learned of. Right after a move that broker answers "not leader for
    /// partition", and a join starting then failed with that error: the
    /// look-up is now asked again once librdkafka has refreshed its metadata.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_join_started_right_after_a_leader_move_gets_the_stored_history() {
        let (cluster, joiner, stored) = joined_once().await;
        for broker in [2, 3, 1] {
            cluster.partition_leader("t", 0, Some(broker)).expect("leader moved");
            let join = joiner.join(u(), StartAt::Beginning).await;
            let stream = join.unwrap_or_else(|e| panic!("a join right after the move to broker {broker}: {e}"));
            assert_eq!(take(from_kafka(stream), stored.len()).await, stored, "after the move to broker {broker}");
        }
    }

    /// Broker 1, the partition's leader, goes down and the partition fails
    /// over to broker 2: the shared readers' look-up at broker 1 cannot be
    /// answered, and a join starting then failed; the readers now learn the
    /// new leader and the join gets the stored history.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_join_started_after_a_failover_from_a_down_broker_gets_the_stored_history() {
        let (cluster, joiner, stored) = joined_once().await;
        cluster.broker_down(1).expect("down");
        cluster.partition_leader("t", 0, Some(2)).expect("failed over");
        let join = joiner.join(u(), StartAt::Beginning).await;
        let stream = join.unwrap_or_else(|e| panic!("a join after the failover: {e}"));
        assert_eq!(take(from_kafka(stream), stored.len()).await, stored);
        cluster.broker_up(1).expect("up");
    }
}

mod positionless {
    use std::sync::Arc;
    use std::time::Duration;

    use dualstream_core::{DurableSink, Event, Notification, Position, Source};
    use futures::StreamExt;
    use rdkafka::mocking::MockCluster;

    use super::{replay, sink};
    use crate::catchup::join_for_test;
    use crate::history::History;
    use crate::hub::{LiveItem, LiveStream};
    use crate::*;

    /// Store `n` events alternating between sources u and v (u first).
    async fn store(sink: &dualstream_kafka::KafkaSink, n: usize) -> Vec<(Event, Position)> {
        let events: Vec<Event> = (0..n)
            .map(|i| {
                let source = if i % 2 == 0 { "u" } else { "v" };
                Event::builder("n", "user", source).payload(format!("{i}")).build().expect("valid")
            })
            .collect();
        let results = sink.publish_batch(events.clone()).await;
        events.into_iter().zip(results).map(|(e, r)| (e, r.expect("stored"))).collect()
    }

    async fn next_item(join: &mut JoinStream) -> Delivery {
        let item = tokio::time::timeout(Duration::from_secs(30), join.next()).await.expect("an item in time");
        item.expect("the join goes on").expect("no error item")
    }

    fn history_of(stored: &[(Event, Position)]) -> Vec<Delivery> {
        let u = Source::new("user", "u").expect("valid");
        stored
            .iter()
            .filter(|(e, _)| e.source() == &u)
            .map(|(e, p)| Delivery::History(Replayed { event: e.clone(), position: p.clone(), timestamp_ms: None }))
            .collect()
    }

    /// As many items as `stored` has events of u, without the timestamps
    /// (which the test does not know in advance).
    async fn take(join: &mut JoinStream, stored: &[(Event, Position)]) -> Vec<Delivery> {
        let mut got = Vec::new();
        for _ in 0..history_of(stored).len() {
            got.push(match next_item(join).await {
                Delivery::History(r) => Delivery::History(Replayed { timestamp_ms: None, ..r }),
                other => other,
            });
        }
        got
    }

    /// A notification without a position (an unknown-outcome write, or
    /// real-time-only mode) or with an unknown offset makes the join read
    /// Kafka up to the high watermark: the events it had not delivered come
    /// as history, with no error item. (It used to be an `Unmergeable`
    /// error item, and the events waited for the next idle check.) The idle
    /// check is an hour away here: only the notification can have done it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_notification_without_a_position_makes_the_join_catch_up_from_kafka() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let sink = sink(&brokers, "t");
        let history =
            History::new(Arc::new(replay(&brokers, "t").config().clone()), Duration::from_secs(3_600), 4_096, 2)
                .expect("history");
        let (slot, live) = LiveStream::for_test(16);
        let u = Source::new("user", "u").expect("valid");
        let mut join = join_for_test(history, (Arc::from("t"), 0), u, live, 0);

        let first = store(&sink, 6).await;
        slot.send_for_test(LiveItem::Notification(Arc::new(Notification::for_event(&first[4].0, None)))).await;
        assert_eq!(take(&mut join, &first).await, history_of(&first), "no position: u's events read from Kafka");

        let second = store(&sink, 3).await;
        let unknown = Position::new("t", 0, Position::UNKNOWN_OFFSET);
        let n = Notification::for_event(&second[2].0, Some(unknown));
        slot.send_for_test(LiveItem::Notification(Arc::new(n))).await;
        assert_eq!(take(&mut join, &second).await, history_of(&second), "unknown offset: u's events read from Kafka");

        // A positioned notification comes next, live: nothing came between.
        let third = store(&sink, 1).await;
        let n = Notification::for_event(&third[0].0, Some(third[0].1.clone()));
        slot.send_for_test(LiveItem::Notification(Arc::new(n.clone()))).await;
        assert_eq!(next_item(&mut join).await, Delivery::Live(n));
    }
}

mod partition_counts {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::history::History;
    use crate::*;

    /// Shared readers for a broker that does not answer (nothing listens
    /// on port 1): every metadata look-up fails after `timeout_ms`.
    fn unreachable() -> History {
        let config =
            ReplayConfig { bootstrap_servers: "127.0.0.1:1".into(), timeout_ms: 300, ..ReplayConfig::default() };
        History::new(Arc::new(config), Duration::from_secs(3_600), 16, 2).expect("history")
    }

    /// Joins waiting together for a topic's partition count share one
    /// look-up, and its failure is kept for the back-off: they all get the
    /// error of that one look-up, and so does a join that asks right after.
    /// (Each waiter used to make its own look-up in turn, each taking the
    /// whole timeout, and no failure was kept.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_look_ups_are_shared_and_kept_for_the_back_off() {
        let h = unreachable();
        let counts = futures::future::join_all((0..5).map(|_| h.partition_count("a"))).await;
        assert!(counts.iter().all(Result::is_err), "{counts:?}");
        assert_eq!(h.stats().metadata_lookups, 1, "one look-up for the five waiters");
        assert!(h.partition_count("a").await.is_err());
        assert_eq!(h.stats().metadata_lookups, 1, "the failure is kept for the back-off");
    }
}
