//! The `fanout` group: local subscribers through the hub against as many
//! Redis connections.

use std::time::{Duration, Instant};

use deadpool_redis::redis;
use dualstream::prelude::*;
use dualstream_devstack::clients::*;

use crate::{events, Profile, Row};

/// Subscribers of one channel in the fan-out group.
pub(super) const FANOUT_SUBSCRIBERS: usize = 1_000;

/// Count what each of `streams` receives until it accounted for `n`
/// notifications (received or reported missed); returns (received, missed).
pub(super) async fn count_all<S, F>(streams: Vec<S>, n: usize, classify: F) -> (usize, usize)
where
    S: futures::Stream + Unpin + Send + 'static,
    F: Fn(&S::Item) -> (usize, usize) + Copy + Send + 'static,
{
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let (mut got, mut missed) = (0, 0);
                while got + missed < n {
                    match tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut s)).await {
                        Ok(Some(item)) => {
                            let (g, m) = classify(&item);
                            got += g;
                            missed += m;
                        }
                        _ => break,
                    }
                }
                (got, missed)
            })
        })
        .collect();
    let mut total = (0, 0);
    for t in tasks {
        let (g, m) = t.await.expect("counter");
        total = (total.0 + g, total.1 + m);
    }
    total
}

pub(super) async fn fanout(redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    use dualstream::consumer::{Hub, HubConfig, LiveItem, Target};
    let n = p.fanout_events;
    let notifier = redis_notifier(redis_url);
    let run = |channel: String| {
        let notifier = notifier.clone();
        async move {
            let notes: Vec<Notification> = events(n, 10)
                .iter()
                .enumerate()
                .map(|(i, e)| Notification::for_event(e, Some(Position::new("events", 0, i as i64))))
                .collect();
            // Every notification goes to `channel`: publish raw, so the
            // notifier's own channel naming does not get in the way.
            let mut conn = notifier.pool().get().await.expect("redis");
            for chunk in notes.chunks(64) {
                let mut pipe = redis::pipe();
                for note in chunk {
                    pipe.cmd("PUBLISH").arg(&channel).arg(note.to_json()).ignore();
                }
                pipe.query_async::<()>(&mut *conn).await.expect("publish");
            }
        }
    };

    // Ours: one hub connection, FANOUT_SUBSCRIBERS local subscribers.
    let channel = format!("bench:fanout:{}", dualstream::EventId::new());
    let hub = Hub::new(HubConfig { url: redis_url.to_owned(), subscriber_buffer: 4_096, ..HubConfig::default() })
        .expect("hub");
    let mut streams = Vec::with_capacity(FANOUT_SUBSCRIBERS);
    for _ in 0..FANOUT_SUBSCRIBERS {
        streams.push(hub.subscribe(Target::Channel(channel.clone())).await.expect("subscribe"));
    }
    let started = Instant::now();
    let counting = tokio::spawn(count_all(streams, n, |item: &LiveItem| match item {
        LiveItem::Notification(_) => (1, 0),
        LiveItem::Lagged { missed } => (0, *missed as usize),
        _ => (0, 0),
    }));
    run(channel).await;
    let (got, missed) = counting.await.expect("count");
    let ours = got as f64 / started.elapsed().as_secs_f64();

    // Baseline: FANOUT_SUBSCRIBERS Redis connections, one subscriber each.
    let channel = format!("bench:fanout:{}", dualstream::EventId::new());
    let client = redis::Client::open(redis_url).expect("url");
    let mut raw_streams = Vec::with_capacity(FANOUT_SUBSCRIBERS);
    for _ in 0..FANOUT_SUBSCRIBERS {
        let mut ps = client.get_async_pubsub().await.expect("pubsub");
        ps.subscribe(&channel).await.expect("subscribe");
        raw_streams.push(ps.into_on_message());
    }
    let started = Instant::now();
    let counting = tokio::spawn(count_all(raw_streams, n, |_msg: &redis::Msg| (1, 0)));
    run(channel).await;
    let (raw_got, _) = counting.await.expect("count");
    let baseline = raw_got as f64 / started.elapsed().as_secs_f64();
    rows.push(Row {
        group: "fanout",
        name: format!("fan-out to {FANOUT_SUBSCRIBERS} subscribers of one channel, deliveries/s"),
        ours,
        baseline,
        unit: "deliveries/s",
        goal: "-".into(),
        cpu: None,
        met: None,
        note: format!(
            "{n} notifications; ours = one Hub connection and {FANOUT_SUBSCRIBERS} local subscribers ({got} delivered, {missed} reported as lagged); baseline = {FANOUT_SUBSCRIBERS} redis-rs Pub/Sub connections ({raw_got} delivered), Redis on the same cores"
        ),
    });
    println!("  fan-out: ours {ours:.0}/s ({missed} lagged), {FANOUT_SUBSCRIBERS} connections {baseline:.0}/s");
}
