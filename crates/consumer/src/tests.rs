//! Unit tests of the joins against librdkafka's in-process `MockCluster`.

/// The history crate's `MockCluster` helpers.
use dualstream_history::testkit;

/// librdkafka's mock broker keeps at most 5 MiB per partition and deletes the
/// oldest batches beyond it: a real deleted range at the head of the log.
mod truncation {
    use std::time::Duration;

    use dualstream_core::Source;
    use futures::StreamExt;
    use rdkafka::mocking::MockCluster;

    use super::testkit::replay;
    use super::testkit::truncation::{fill_at, truncated_topic};
    use crate::*;

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
}

/// Three brokers, the partition replicated on all three: its leader moves
/// from broker to broker while a join follows it (the replay's test is
/// `dualstream-history`'s).
mod leader_moves {
    use std::time::Duration;

    use dualstream_core::{Position, Source};
    use futures::stream::BoxStream;
    use futures::StreamExt;

    use super::testkit::leader_moves::{follows_exactly, publish, take, three_brokers, u, Cluster, Got, BEFORE};
    use crate::*;

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

    /// A join's lag ([`CatchUp::lag`]) counts the records of its partition
    /// it has not delivered or checked: all of them before it is polled, the
    /// part its consumer has not taken (beyond the join's buffer) midway,
    /// none once it has taken everything; a dropped join is not counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_joins_lag_is_what_it_has_not_delivered_or_checked() {
        let (cluster, sink) = three_brokers();
        let of_u = publish(&cluster, &sink, 0, BEFORE, false).await;
        let high = 2 * of_u.len() as i64; // u and v alternate
        let buffer = 4;
        let joiner = kafka_only(&cluster, JoinConfig { idle_check_ms: 200, buffer, ..JoinConfig::default() });
        assert_eq!(joiner.lag(), JoinLag::default());
        let mut stream = from_kafka(joiner.join(u(), StartAt::Beginning).await.expect("join"));
        assert_eq!(joiner.lag(), JoinLag { joins: 1, max: high, sum: high }, "not polled yet");
        let other = joiner.join(Source::new("user", "v").expect("valid"), StartAt::Beginning).await.expect("join");
        assert_eq!(joiner.lag(), JoinLag { joins: 2, max: high, sum: 2 * high });
        drop(other);
        async fn next(stream: &mut BoxStream<'static, Got>) -> Option<Got> {
            tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("an item")
        }
        let taken = 10;
        for want in &of_u[..taken] {
            assert_eq!(next(&mut stream).await, Some(Ok(*want)));
        }
        // The join has handed over at most its buffer (and one waiting
        // send) beyond what was taken: u's events are every other offset.
        let lag = joiner.lag();
        assert_eq!(lag.joins, 1, "the dropped join is not counted");
        let delivered_to = of_u[taken - 1].0 + 1;
        let ahead_at_most = of_u[taken + buffer].0 + 1;
        assert!(lag.max <= high - delivered_to && lag.max >= high - ahead_at_most, "{lag:?}");
        for want in &of_u[taken..] {
            assert_eq!(next(&mut stream).await, Some(Ok(*want)));
        }
        // Polled on, the join checks the last record (v's) too.
        let mut lag = joiner.lag();
        for _ in 0..100 {
            if lag.max == 0 {
                break;
            }
            let more = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
            assert!(more.is_err(), "nothing more of u: {more:?}");
            lag = joiner.lag();
        }
        assert_eq!(lag, JoinLag { joins: 1, max: 0, sum: 0 });
        drop(stream);
        assert_eq!(joiner.lag().joins, 0);
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
            topic: dualstream_kafka::TopicRouting::Single { topic: "t".to_owned() },
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

    /// A resume (a join from an offset at or below its partition's end as
    /// last polled) takes the polled marks and waits for no watermark round.
    /// What was stored after that poll, before the join subscribed, comes
    /// all the same: no notification will tell of it (no Redis here), and
    /// the join's idle check finds it. An offset past the polled end waits
    /// for a round.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resume_below_the_polled_end_waits_for_no_round_and_misses_nothing_stored_since() {
        let (cluster, sink) = three_brokers();
        let before = publish(&cluster, &sink, 0, BEFORE, false).await;
        // Full rounds every 3 s, and the joins' idle checks as often.
        let joiner = kafka_only(&cluster, JoinConfig { idle_check_ms: 3_000, ..JoinConfig::default() });
        let _watching = joiner.join(u(), StartAt::End).await.expect("join");
        // The poller's first full round, if it was not the one that
        // answered, comes at once: let it pass.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rounds = joiner.stats().watermark_lookups;
        let since = publish(&cluster, &sink, BEFORE, 1, false).await;
        let polled = joiner.polled_end(&Position::new(std::sync::Arc::from("t"), 0, 0)).expect("polled");
        assert!(polled <= since[0].0, "the polled end ({polled}) is before what was stored since");
        let resumed = joiner.join(u(), StartAt::Offset(before[0].0)).await.expect("join");
        assert_eq!(joiner.stats().watermark_lookups, rounds, "the resume waited for no watermark round");
        let want: Vec<Got> = before.into_iter().chain(since).map(Ok).collect();
        assert_eq!(take(from_kafka(resumed), want.len()).await, want);
        let _beyond = joiner.join(u(), StartAt::Offset(polled + 1_000)).await.expect("join");
        assert!(joiner.stats().watermark_lookups > rounds, "an offset past the polled end waited for a round");
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
    use dualstream_history::History;
    use dualstream_hub::SeenOffsets;
    use futures::StreamExt;
    use rdkafka::mocking::MockCluster;

    use super::testkit::{replay, sink};
    use crate::catchup::join_for_test;
    use crate::*;

    /// No idle check: an hour away.
    const NO_IDLE_CHECK: Duration = Duration::from_secs(3_600);

    /// A mock cluster with topic "t" of one partition, a sink to it, and a
    /// shared history of it with no idle check (an hour away).
    fn partition(
    ) -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, dualstream_kafka::KafkaSink, History) {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let sink = sink(&brokers, "t");
        let history =
            History::new(Arc::new(replay(&brokers, "t").config().clone()), Duration::from_secs(3_600), 4_096, 2)
                .expect("history");
        (cluster, sink, history)
    }

    /// The hub's side of a join: a stream the test feeds through the sender.
    fn hub_side() -> (tokio::sync::mpsc::Sender<LiveItem>, futures::stream::BoxStream<'static, LiveItem>) {
        let (slot, rx) = tokio::sync::mpsc::channel(16);
        (slot, futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }).boxed())
    }

    /// Hand the join a live notification, as the hub would.
    async fn feed(slot: &tokio::sync::mpsc::Sender<LiveItem>, n: Notification) {
        slot.send(LiveItem::Notification(Arc::new(n))).await.expect("the join is there");
    }

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

    /// The idle check reads the polled watermarks on each join's own timer
    /// (not woken by every poll), backs off while they stand still, and
    /// comes back: with a hub that never says anything, the events of u
    /// written after a quiet spell of 40 polls are still delivered, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_idle_check_finds_events_written_after_a_quiet_spell() {
        let (cluster, sink, _) = partition();
        const POLL: Duration = Duration::from_millis(50);
        let brokers = cluster.bootstrap_servers();
        let history = History::new(Arc::new(replay(&brokers, "t").config().clone()), POLL, 4_096, 2).expect("history");
        let (_slot, live) = hub_side();
        let u = Source::new("user", "u").expect("valid");
        let mut join = join_for_test(history, (Arc::from("t"), 0), u, live, 0, None, POLL, None);
        let first = store(&sink, 4).await;
        assert_eq!(take(&mut join, &first).await, history_of(&first), "found by the idle check alone");
        tokio::time::sleep(POLL * 40).await;
        let later = store(&sink, 4).await;
        assert_eq!(take(&mut join, &later).await, history_of(&later), "found after the quiet spell");
        let extra = tokio::time::timeout(POLL * 20, join.next()).await;
        assert!(extra.is_err(), "nothing more: {extra:?}");
    }

    /// A notification without a position (an unknown-outcome write, or
    /// real-time-only mode) or with an unknown offset makes the join read
    /// Kafka up to the high watermark: the events it had not delivered come
    /// as history, with no error item. (It used to be an `Unmergeable`
    /// error item, and the events waited for the next idle check.) The idle
    /// check is an hour away here: only the notification can have done it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_notification_without_a_position_makes_the_join_catch_up_from_kafka() {
        let (_cluster, sink, history) = partition();
        let (slot, live) = hub_side();
        let u = Source::new("user", "u").expect("valid");
        let mut join = join_for_test(history, (Arc::from("t"), 0), u, live, 0, None, NO_IDLE_CHECK, None);

        let first = store(&sink, 6).await;
        feed(&slot, Notification::for_event(&first[4].0, None)).await;
        assert_eq!(take(&mut join, &first).await, history_of(&first), "no position: u's events read from Kafka");

        let second = store(&sink, 3).await;
        let unknown = Position::new("t", 0, Position::UNKNOWN_OFFSET);
        let n = Notification::for_event(&second[2].0, Some(unknown));
        feed(&slot, n).await;
        assert_eq!(take(&mut join, &second).await, history_of(&second), "unknown offset: u's events read from Kafka");

        // A positioned notification comes next, live: nothing came between.
        let third = store(&sink, 1).await;
        let n = Notification::for_event(&third[0].0, Some(third[0].1.clone()));
        feed(&slot, n.clone()).await;
        assert_eq!(next_item(&mut join).await, Delivery::Live(Arc::new(n)));
    }
    /// Hand the join `n` and expect it delivered live, next.
    async fn delivered_live(join: &mut JoinStream, slot: &tokio::sync::mpsc::Sender<LiveItem>, n: Notification) {
        feed(slot, n.clone()).await;
        assert_eq!(next_item(join).await, Delivery::Live(Arc::new(n)));
    }

    /// A live notification past offsets the hub saw notifications of other
    /// sources for is delivered without reading Kafka; one past an offset of
    /// its own source, or past one not seen within the reorder window,
    /// after reading Kafka up to it; one whose missing offset is seen within
    /// the window (another publisher's notification, out of order) without.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_jump_over_offsets_seen_as_others_is_delivered_without_reading_kafka() {
        let (_cluster, sink, history) = partition();
        let seen = Arc::new(SeenOffsets::default());
        let (slot, live) = hub_side();
        let u = Source::new("user", "u").expect("valid");
        let window = Duration::from_millis(500);
        let mut join = join_for_test(
            history.clone(),
            (Arc::from("t"), 0),
            u,
            live,
            0,
            Some((Arc::clone(&seen), window)),
            NO_IDLE_CHECK,
            None,
        );
        let notification = |(e, p): &(Event, Position)| Notification::for_event(e, Some(p.clone()));
        let reads = || history.stats().range_reads;

        // u at 0, 2, 4; v at 1, 3, 5. The hub saw them all; the join gets u's.
        let first = store(&sink, 6).await;
        for stored in &first {
            seen.record(&notification(stored));
        }
        for i in [0, 2, 4] {
            delivered_live(&mut join, &slot, notification(&first[i])).await;
        }
        assert_eq!(reads(), 0, "v's offsets between were seen: no Kafka read");

        // u at 6, 8: the hub saw both, the join gets 8 only (its 6 was lost
        // on the way): Kafka is read, and 6 comes from it.
        let second = store(&sink, 3).await;
        for stored in &second {
            seen.record(&notification(stored));
        }
        feed(&slot, notification(&second[2])).await;
        assert_eq!(take(&mut join, &second[..1]).await, history_of(&second[..1]), "u's 6 from Kafka");
        assert_eq!(next_item(&mut join).await, Delivery::Live(Arc::new(notification(&second[2]))));
        assert!(reads() >= 1, "read Kafka for an offset of its own source");

        // u at 9 (next: no check), v at 10 seen, u at 11: no Kafka read.
        let third = store(&sink, 2).await;
        let fourth = store(&sink, 1).await;
        let before = reads();
        seen.record(&notification(&third[1]));
        seen.record(&notification(&fourth[0]));
        delivered_live(&mut join, &slot, notification(&third[0])).await;
        delivered_live(&mut join, &slot, notification(&fourth[0])).await;
        assert_eq!(reads(), before, "10 was seen as v's: no Kafka read");

        // u at 12, v at 13 seen only 50 ms after u's 14 came: within the
        // window, no Kafka read.
        let fifth = store(&sink, 2).await;
        let sixth = store(&sink, 1).await;
        delivered_live(&mut join, &slot, notification(&fifth[0])).await;
        seen.record(&notification(&sixth[0]));
        let late = notification(&fifth[1]);
        let s = Arc::clone(&seen);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.record(&late);
        });
        delivered_live(&mut join, &slot, notification(&sixth[0])).await;
        assert_eq!(reads(), before, "13 was seen within the window");

        // u at 15, v at 16 never seen, u at 17: Kafka is read after the
        // window.
        let seventh = store(&sink, 2).await;
        let eighth = store(&sink, 1).await;
        delivered_live(&mut join, &slot, notification(&seventh[0])).await;
        seen.record(&notification(&eighth[0]));
        delivered_live(&mut join, &slot, notification(&eighth[0])).await;
        assert!(reads() > before, "16 never seen: Kafka read");
    }

    /// A join with a [`ReadyBudget`] reads ahead of its consumer only as far
    /// as the budget allows: with 40 events of 3 KB stored and a budget of
    /// 10 KB, a consumer that takes one event finds at most 10 KB held, and
    /// everything comes in order, and is given back, as it takes the rest.
    /// (Without the budget the join would hold all 20 of u's events.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_budgeted_join_holds_at_most_its_bytes_ready() {
        let (_cluster, sink, history) = partition();
        let pad = "x".repeat(3_000);
        let events: Vec<Event> = (0..40)
            .map(|i| {
                let source = if i % 2 == 0 { "u" } else { "v" };
                Event::builder("n", "user", source).payload(format!("{{\"n\":{i},\"pad\":\"{pad}\"}}")).build().expect("valid")
            })
            .collect();
        let results = sink.publish_batch(events.clone()).await;
        let stored: Vec<(Event, Position)> = events.into_iter().zip(results).map(|(e, r)| (e, r.expect("stored"))).collect();
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let budget = ReadyBudget::new(1_024, 10_000, Arc::clone(&held));
        let (slot, live) = hub_side();
        let u = Source::new("user", "u").expect("valid");
        let mut join = join_for_test(history, (Arc::from("t"), 0), u, live, 0, None, NO_IDLE_CHECK, Some(budget));
        // No position: the join reads Kafka up to the high watermark.
        feed(&slot, Notification::for_event(&stored[38].0, None)).await;
        let want = history_of(&stored);
        let mut got = Vec::new();
        let mut most = 0;
        for _ in 0..want.len() {
            got.push(match next_item(&mut join).await {
                Delivery::History(r) => Delivery::History(Replayed { timestamp_ms: None, ..r }),
                other => other,
            });
            // Let the join read ahead as far as it may.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = held.load(std::sync::atomic::Ordering::Relaxed);
            most = most.max(now);
            assert!(now <= 10_000, "{now} bytes ready, past the budget of 10,000");
        }
        assert_eq!(got, want, "u's events, in order, each once");
        assert!(most >= 3_000, "the join read ahead within its budget ({most} bytes at most)");
        drop(join);
        assert_eq!(held.load(std::sync::atomic::Ordering::Relaxed), 0, "a dropped join gives everything back");
    }
}
