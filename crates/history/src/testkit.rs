//! What the `MockCluster` tests of this crate and of `dualstream-consumer`
//! (through the `testkit` feature, for its joins) share: a sink and
//! a replay on a mock cluster, a topic whose first records the mock broker
//! deleted, and a partition whose leader moves.

use dualstream_kafka::{KafkaSink, KafkaSinkConfig, TopicRouting};

use crate::{Replay, ReplayConfig};

pub fn sink(brokers: &str, topic: &str) -> KafkaSink {
    KafkaSink::new(KafkaSinkConfig {
        bootstrap_servers: brokers.to_owned(),
        topic: TopicRouting::Single { topic: topic.to_owned() },
        linger_ms: 1,
        ..KafkaSinkConfig::default()
    })
    .expect("sink")
}

pub fn replay(brokers: &str, topic: &str) -> Replay {
    Replay::new(ReplayConfig {
        bootstrap_servers: brokers.to_owned(),
        topic: TopicRouting::Single { topic: topic.to_owned() },
        timeout_ms: 5_000,
        ..ReplayConfig::default()
    })
    .expect("replay")
}

/// librdkafka's mock broker keeps at most 5 MiB per partition and deletes the
/// oldest batches beyond it: a real deleted range at the head of the log.
pub mod truncation {
    use std::time::Duration;

    use dualstream_core::{DurableSink, Event};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::ClientConfig;

    use super::sink;

    /// A one-partition topic whose first records were deleted; returns the
    /// low and high watermarks.
    pub async fn truncated_topic<C: rdkafka::ClientContext>(cluster: &MockCluster<'_, C>) -> (i64, i64) {
        cluster.create_topic("t", 1, 1).expect("topic");
        fill(cluster).await
    }

    /// Write about 7 MiB to partition 0 of `t`; the watermarks after.
    pub async fn fill<C: rdkafka::ClientContext>(cluster: &MockCluster<'_, C>) -> (i64, i64) {
        fill_at(&cluster.bootstrap_servers()).await
    }

    pub async fn fill_at(brokers: &str) -> (i64, i64) {
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
}

/// Three brokers, the partition replicated on all three: its leader moves
/// from broker to broker while a replay or a join follows it.
pub mod leader_moves {
    use std::time::Duration;

    use dualstream_core::{DurableSink, Event, EventId, Source};
    use dualstream_kafka::KafkaSink;
    use futures::stream::BoxStream;
    use futures::StreamExt;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    use super::sink;

    pub type Cluster = MockCluster<'static, DefaultProducerContext>;
    /// What a reader delivered: offset and event id, or the error's text.
    pub type Got = Result<(i64, EventId), String>;

    /// Rounds published before the reader starts, and while it follows.
    pub const BEFORE: usize = 10;
    const DURING: usize = 60;
    /// Events per round, alternating between sources u and v.
    const ROUND: usize = 10;
    /// Events of u in all.
    const OF_U: usize = (BEFORE + DURING) * ROUND / 2;

    pub fn three_brokers() -> (Cluster, KafkaSink) {
        let cluster = MockCluster::new(3).expect("mock cluster");
        cluster.create_topic("t", 1, 3).expect("topic");
        cluster.partition_leader("t", 0, Some(1)).expect("leader");
        let sink = sink(&cluster.bootstrap_servers(), "t");
        (cluster, sink)
    }

    pub fn u() -> Source {
        Source::new("user", "u").expect("valid")
    }

    /// Publish `rounds` rounds of `ROUND` events from round `first` on, one
    /// round every 30 ms; with `moving`, the partition's leader moves to the
    /// next broker after each round. The offsets and ids of u's events.
    pub async fn publish(
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
    pub async fn take(mut stream: BoxStream<'static, Got>, n: usize) -> Vec<Got> {
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
    pub async fn follows_exactly(
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
}
