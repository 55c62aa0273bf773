//! The `cluster` group: the notifier on a 3-master Redis Cluster of its own
//! (SPUBLISH) against one Redis (PUBLISH).

use std::time::Instant;

use dualstream::prelude::*;
use dualstream_devstack::clients::*;

use crate::{notifications, Profile, Row};

/// The notifier's throughput on a 3-master Redis Cluster on loopback
/// (sharded Pub/Sub: pipelines grouped by slot, SPUBLISH) against the same
/// notifier on one Redis (PUBLISH). All the Redis processes share this
/// machine's cores.
pub(super) async fn cluster_throughput(redis_url: &str, p: &Profile, rows: &mut Vec<Row>) {
    let cluster = dualstream_devstack::cluster::RedisCluster::start();
    let on_cluster =
        RedisNotifier::new(RedisNotifierConfig { cluster_urls: cluster.urls(), ..RedisNotifierConfig::default() })
            .expect("cluster notifier");
    let single = redis_notifier(redis_url);
    let notes = notifications(p.notify_events);
    let run = |n: RedisNotifier| {
        let notes = &notes;
        async move {
            n.notify_batch(&notes[..10]).await.expect("warm-up");
            let started = Instant::now();
            for chunk in notes.chunks(512) {
                n.notify_batch(chunk).await.expect("pipeline");
            }
            notes.len() as f64 / started.elapsed().as_secs_f64()
        }
    };
    let ours = run(on_cluster).await;
    let baseline = run(single).await;
    let sources: std::collections::HashSet<_> = notes.iter().map(|n| n.source_id.clone()).collect();
    rows.push(Row {
        group: "cluster",
        name: "notifications/s on a 3-master Redis Cluster vs one Redis".into(),
        ours,
        baseline,
        unit: "n/s",
        goal: "-".into(),
        cpu: None,
        met: None,
        note: format!(
            "{} notifications of {} sources, notify_batch of 512; ours = SPUBLISH, one pipeline per slot, 3 masters on loopback; baseline = PUBLISH to one redis-server; every Redis on the same 2 cores",
            notes.len(),
            sources.len()
        ),
    });
    println!("  cluster: {ours:.0}/s on 3 masters, {baseline:.0}/s on one Redis");
}
