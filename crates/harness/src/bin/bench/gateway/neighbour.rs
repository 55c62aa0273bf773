//! The `gateway` group's starvation row (issue #22): the live clients'
//! latency while a neighbour resumes from offset 0 again and again. The same
//! clients and load run twice on one gateway, first quiet, then beside the
//! neighbour: each of its passes reads its channel's whole partition from the
//! beginning (through the backfill readers), then it reconnects and starts
//! over. The gateway runs with the default `limits.far_resumes_per_min`
//! (120 a minute for a token's subject) and `limits.far_items_per_sec`
//! (1,000 items a second a subject), the protections against such a
//! client; a refused resume waits 100 ms and asks again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use dualstream_devstack::clients::*;
use dualstream_gateway::ResumeToken;
use tokio::sync::watch;

use super::{
    channel_sets, collect, load_phase, open, row, specs, start, start_clients, Hist, Kind, Knobs, Probe, Run, Shared, Tweak,
    Spec, PARTITIONS,
};
use crate::measure::Pids;
use crate::Row;

/// The live clients' notify latencies recorded so far, per bucket.
fn snapshot(h: &Hist) -> Vec<u32> {
    h.0.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

/// The `p` quantile in ms of what `h` recorded since `before`.
fn quantile_since(h: &Hist, before: &[u32], p: f64) -> (f64, u64) {
    let delta: Vec<u64> =
        h.0.iter().zip(before).map(|(c, b)| u64::from(c.load(Ordering::Relaxed).saturating_sub(*b))).collect();
    let n: u64 = delta.iter().sum();
    if n == 0 {
        return (f64::NAN, 0);
    }
    let want = ((n as f64 - 1.0) * p).round() as u64 + 1;
    let mut seen = 0;
    for (i, c) in delta.iter().enumerate() {
        seen += c;
        if seen >= want {
            return ((i + 1) as f64 * 0.1, n);
        }
    }
    (f64::NAN, n)
}

/// What the neighbour did.
#[derive(Default)]
struct Passes {
    /// Passes that reached the end they started for.
    done: u64,
    /// Events it read.
    events: u64,
    /// Records of its partition before the live load (its history).
    history: i64,
    /// Resumes refused (429, `far_resumes_per_min`) or failed.
    refused: u64,
}

/// Resume `source`'s channel from offset 0, read up to where the partition
/// ended when the neighbour first subscribed, and start over, until `stop`.
async fn neighbour(shared: Arc<Shared>, source: usize, mut stop: watch::Receiver<bool>) -> Passes {
    let spec = Spec { kind: Kind::Sse, full: false, sources: vec![source] };
    let mut passes = Passes::default();
    // The partition's end now, from a first subscription's token.
    let Ok(mut first) = open(&shared, &spec, None).await else { return passes };
    let token = loop {
        match first.next().await {
            Some(item) if item.kind == "subscribed" => break item.token.map(str::to_owned),
            Some(_) => continue,
            None => return passes,
        }
    };
    drop(first);
    let Some(mut zero) = token.as_deref().and_then(|t| ResumeToken::decode(t).ok()) else { return passes };
    let end = zero.positions.values().map(|p| p.1).max().unwrap_or(0);
    passes.history = end;
    for p in zero.positions.values_mut() {
        p.1 = 0;
    }
    let zero = zero.encode();
    while !*stop.borrow() {
        let Ok(mut conn) = open(&shared, &spec, Some(&zero)).await else {
            passes.refused += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let item = tokio::select! {
                _ = stop.changed() => return passes,
                item = conn.next() => item,
            };
            let Some(item) = item else { break };
            if item.kind != "event" {
                continue;
            }
            passes.events += 1;
            let offset = super::field_num(&item.data, "\"offset\":").unwrap_or(0) as i64;
            if offset + 1 >= end {
                passes.done += 1;
                break;
            }
        }
    }
    passes
}

/// Post `n` events for the group's sources at once, before the clients come:
/// the history the neighbour reads.
async fn fill(shared: &Shared, producer: &str, sources: usize, n: usize) -> u64 {
    let url = format!("{}/v1/events", shared.base);
    let mut stored = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let body: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| {
                serde_json::json!({"type": "bench.history", "source_type": "user",
                    "source_id": format!("s{}", i % sources), "payload": {"t": 0}})
            })
            .collect();
        let r = shared.http.post(&url).bearer_auth(producer).json(&body).send().await;
        if let Ok(r) = r {
            stored += r.json::<serde_json::Value>().await.ok().and_then(|v| v["stored"].as_u64()).unwrap_or(0);
        }
    }
    stored
}

/// The rows: notify p99 beside the neighbour against the quiet run, at
/// `DUALSTREAM_BENCH_GW_NEIGHBOUR_RATE` (200) events/s, with a tenth of the
/// group's clients.
pub(super) async fn neighbour_rows(brokers: &str, redis_url: &str, pids: &Pids, rows: &mut Vec<Row>, k: Knobs) {
    let topic = unique_topic("bench-gw-neighbour");
    create_topic(brokers, &topic, PARTITIONS).await;
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut probe = Probe {
        ports: (super::port_of(redis_url), super::port_of(brokers.split(',').next().unwrap_or_default())),
        redis: client.get_multiplexed_async_connection().await.expect("redis"),
    };
    let setup = start(brokers, redis_url, &topic, Tweak::FarDefaults).await;
    let history = super::knob("NEIGHBOUR_HISTORY", 100_000);
    let filled = fill(&setup.shared, &setup.producer, k.sources, history).await;
    let k = Knobs {
        rate: super::knob("NEIGHBOUR_RATE", 200),
        clients: (k.clients / 10).max(1),
        secs: super::knob("NEIGHBOUR_SECS", 12) as u64,
        storm_at: u64::MAX,
        ..k
    };
    let sets = channel_sets(k.clients * 2, k.sources);
    let (_storm_tx, storm_rx) = watch::channel(0u32);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tasks, _) = start_clients(&setup.shared, specs(&sets, &[Kind::Sse, Kind::Ws]), &storm_rx, &stop_rx).await;
    let notify = &setup.shared.hists[2];
    // A first, shorter load that is not counted: the first seconds of a
    // gateway (its readers' first fetches) are not what either run measures.
    let warm = Knobs { secs: 4, ..k };
    load_phase(&setup.shared, &setup.producer, &warm, pids, &mut probe.redis, probe.ports, None, None, &mut Run::default())
        .await;
    let mut quiet_run = Run::default();
    let before = snapshot(notify);
    load_phase(&setup.shared, &setup.producer, &k, pids, &mut probe.redis, probe.ports, None, None, &mut quiet_run).await;
    let (quiet_p99, quiet_n) = quantile_since(notify, &before, 0.99);
    let (quiet_p50, _) = quantile_since(notify, &before, 0.50);
    let (nb_stop_tx, nb_stop_rx) = watch::channel(false);
    let nb = tokio::spawn(neighbour(Arc::clone(&setup.shared), 0, nb_stop_rx));
    // Its first pass under way before the load.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut busy_run = Run::default();
    let before = snapshot(notify);
    let started = Instant::now();
    load_phase(&setup.shared, &setup.producer, &k, pids, &mut probe.redis, probe.ports, None, None, &mut busy_run).await;
    let (busy_p99, busy_n) = quantile_since(notify, &before, 0.99);
    let (busy_p50, _) = quantile_since(notify, &before, 0.50);
    let _ = nb_stop_tx.send(true);
    let passes = nb.await.unwrap_or_default();
    let secs = started.elapsed().as_secs_f64();
    let readyz = setup.shared.http.get(format!("{}/readyz", setup.shared.base)).bearer_auth(&setup.admin);
    let doc = match readyz.send().await {
        Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    };
    let (history_stats, paced) = (&doc["history"], &doc["clients"]["far_items_paced"]);
    let got = collect(tasks, &stop_tx).await;
    let dups: u64 = got.iter().flat_map(|g| g.chans.iter()).map(|c| c.dups).sum();
    println!(
        "  neighbour: notify p50/p99 quiet {quiet_p50:.1}/{quiet_p99:.1} ms ({quiet_n} items), beside it {busy_p50:.1}/{busy_p99:.1} ms ({busy_n}); {} passes from offset 0, {} refused ({} events, {:.0}/s; {} records before the load); history {history_stats}",
        passes.done,
        passes.refused,
        passes.events,
        passes.events as f64 / secs,
        passes.history
    );
    setup.stop().await;
    let met = busy_n > 0 && quiet_n > 0 && passes.done > 0 && busy_p99 <= 2.0 * quiet_p99;
    row(
        rows,
        k.rate,
        "gateway: notify p99 beside a client resuming from offset 0 in a loop vs the same clients quiet, ms",
        busy_p99,
        quiet_p99,
        "ms",
        "≤ 2× quiet",
        Some(met),
        format!(
            "{} clients ({} SSE, {} WebSocket; every other pair in full mode, the notify clients' items counted) on one gateway, {} events/s for 4 s not counted, then for {} s twice: quiet (p50 {quiet_p50:.1} ms, {quiet_n} items), then beside a neighbour that resumes one channel from offset 0, reads up to where its partition ended ({} of {filled} records posted before the load, over {PARTITIONS} partitions) and starts over, its resumes limited by the default limits.far_resumes_per_min and its far items paced by the default limits.far_items_per_sec ({paced} items waited) (p50 {busy_p50:.1} ms, {busy_n} items); the neighbour finished {} passes ({} resumes refused), {} events ({:.0}/s); {dups} duplicates or disorders among the live clients; the shared Kafka readers afterwards: {history_stats}",
            k.clients * 2,
            k.clients,
            k.clients,
            k.rate,
            k.secs,
            passes.history,
            passes.done,
            passes.refused,
            passes.events,
            passes.events as f64 / secs,
        ),
    );
}
