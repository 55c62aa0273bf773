//! Unit tests against librdkafka's in-process `MockCluster`: the replay and
//! the shared readers.

use std::time::Duration;

use dualstream_core::{DurableSink, Event, Source};
use dualstream_kafka::TopicRouting;
use futures::StreamExt;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::testkit::{replay, sink};
use crate::*;

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

mod shared_history {
    use std::sync::Arc;
    use std::time::Duration;

    use dualstream_core::{DurableSink, Event, Source};
    use rdkafka::mocking::MockCluster;

    use crate::testkit::sink;
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

    /// A backfill budget bounds the far reads' pace: 2,000 records at 500 a
    /// second (one second's worth at the start) take at least 3 s, and the
    /// read still gets exactly its records. (A lower bound only: a busy
    /// machine makes it slower, never faster.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backfill_budget_bounds_reads_from_far_back() {
        let (_cluster, stored, h) = stored_topic(1, Duration::from_secs(3_600)).await;
        h.set_backfill_rate(500);
        let tp: Tp = (Arc::from("t"), 0);
        let want: Vec<i64> = stored.iter().filter(|s| s.0 == "a").map(|s| s.2).collect();
        // The tail reader follows the partition first: the read from 0 is then
        // older than its cache and goes to a backfill reader.
        let tail: Vec<i64> = want.iter().copied().filter(|o| *o >= 1_900).collect();
        assert_eq!(read_all(&h, &tp, 1_900, 2_000, "a", false).await, tail);
        let started = std::time::Instant::now();
        assert_eq!(read_all(&h, &tp, 0, 2_000, "a", false).await, want);
        let took = started.elapsed();
        let stats = h.stats();
        assert!(stats.backfill_reads >= 1, "read by a backfill reader: {stats:?}");
        assert!(took >= Duration::from_millis(2_900), "2,000 records at 500/s took {took:?}");
    }

    #[test]
    fn inconsistent_watermarks_do_not_panic() {
        assert_eq!(Marks::sane(10, 5), Marks { low: 10, high: 10 });
        assert_eq!(Marks::sane(-1, -1), Marks { low: 0, high: 0 });
        assert_eq!(Marks::sane(3, 9), Marks { low: 3, high: 9 });
    }

    /// Fresh watermarks of several partitions come from one poll round, a
    /// batched look-up: each partition's marks are its own. A partition
    /// the batch cannot answer (it does not exist) is looked up on its own
    /// and fails alone; the others still get their marks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fresh_watermarks_of_many_partitions_are_each_their_own() {
        let (cluster, stored, h) = stored_topic(4, Duration::from_secs(3_600)).await;
        let high = |p: i32| stored.iter().filter(|s| s.1 == p).map(|s| s.2 + 1).max().unwrap_or(0);
        let tps: Vec<Tp> = (0..4).map(|p| (Arc::from("t"), p)).collect();
        let marks = futures::future::join_all(tps.iter().map(|tp| h.fresh(tp))).await;
        for (p, m) in (0..4).zip(&marks) {
            let m = m.as_ref().expect("marks");
            assert_eq!((m.low, m.high), (0, high(p)), "partition {p}");
        }
        assert!(marks.iter().map(|m| m.as_ref().expect("marks").high).collect::<std::collections::HashSet<_>>().len() > 1);

        let config = ReplayConfig {
            bootstrap_servers: cluster.bootstrap_servers(),
            timeout_ms: 3_000,
            topic: dualstream_kafka::TopicRouting::Single { topic: "t".into() },
            ..ReplayConfig::default()
        };
        let h = History::new(Arc::new(config), Duration::from_secs(3_600), 64, 2).expect("history");
        let tps: Vec<Tp> = [0, 9, 2].into_iter().map(|p| (Arc::from("t"), p)).collect();
        let marks = futures::future::join_all(tps.iter().map(|tp| h.fresh(tp))).await;
        assert_eq!(marks[0].as_ref().map(|m| m.high).ok(), Some(high(0)));
        assert!(marks[1].is_err(), "partition 9 does not exist: {:?}", marks[1]);
        assert_eq!(marks[2].as_ref().map(|m| m.high).ok(), Some(high(2)));
    }
}

/// librdkafka's mock broker keeps at most 5 MiB per partition and deletes the
/// oldest batches beyond it: a real deleted range at the head of the log.
mod truncation {
    use std::sync::Arc;
    use std::time::Duration;

    use dualstream_core::Source;
    use rdkafka::mocking::MockCluster;

    use super::collect;
    use crate::testkit::replay;
    use crate::testkit::truncation::truncated_topic;
    use crate::*;

    /// Shared readers of topic "t" on `cluster`, polling every `poll_every`.
    fn shared(cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>, poll_every: Duration) -> History {
        let config = ReplayConfig {
            bootstrap_servers: cluster.bootstrap_servers(),
            topic: dualstream_kafka::TopicRouting::Single { topic: "t".into() },
            ..ReplayConfig::default()
        };
        History::new(Arc::new(config), poll_every, 64, 2).expect("history")
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

    /// `fresh` reads the high mark in its round and gives the low one last
    /// read (tansu sorts a whole partition to answer it), so that low may
    /// be older, never above the true one; `fresh_low` reads it in its
    /// round.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fresh_low_reads_the_low_mark_that_fresh_may_leave_old() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let h = shared(&cluster, Duration::from_secs(3_600));
        let tp: Tp = (Arc::from("t"), 0);
        let _watching = h.watch(&tp);
        assert_eq!(h.fresh(&tp).await.expect("marks"), Marks { low: 0, high: 0 });
        let (low, high) = crate::testkit::truncation::fill(&cluster).await;
        assert!(low > 0);
        let stale = h.fresh(&tp).await.expect("marks");
        assert_eq!(stale, Marks { low: 0, high }, "the high mark is fresh, the low one is kept");
        assert_eq!(h.fresh_low(&tp).await.expect("marks"), Marks { low, high });
        assert_eq!(h.fresh(&tp).await.expect("marks"), Marks { low, high }, "and kept from then on");
    }

    /// The shared reader asked for a deleted range (the low watermark moved
    /// after the join looked): the broker starts later, and the reader says
    /// which offsets it did not get.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_shared_reader_reports_the_offsets_the_broker_no_longer_has() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let (low, high) = truncated_topic(&cluster).await;
        let h = shared(&cluster, Duration::from_millis(100));
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
/// from broker to broker while a replay follows it (the joins' tests are
/// `dualstream-consumer`'s).
mod leader_moves {
    use futures::StreamExt;

    use crate::testkit::leader_moves::{follows_exactly, publish, three_brokers, u, BEFORE};
    use crate::testkit::replay;
    use crate::*;

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
}

mod partition_counts {
    use std::sync::Arc;
    use std::time::Duration;

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
