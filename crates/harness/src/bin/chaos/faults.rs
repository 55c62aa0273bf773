//! The faults of a chaos run: the kinds, the services they harm
//! ([`Services`]: the run's broker and Redis, each behind its proxy, and its
//! gateway), how each is applied and healed ([`inject`]), the seeded
//! schedule ([`schedule`]; the soak's: a Redis kill every minute, with
//! resource samples), the throughput timeline around them, and the broker's
//! own record of duplicates ([`attribute_to_broker`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dualstream::batch::BatchEngine;
use dualstream_devstack::proxy::DelayProxy;
use dualstream_devstack::{OwnedBroker, OwnedGateway, OwnedRedis};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::checker::Finding;
use crate::{c_heap_kib, fds_and_connections, rss_kib, rust_heap_kib, threads, Args, TOPIC};

/// The faults a run applied: each kind with when it began and ended, since
/// the start.
pub(crate) type Applied = Vec<(Fault, Duration, Duration)>;

/// A soak sample: seconds since the start, and the values of
/// `soak::RESOURCES` (RSS, the engine's queue, open descriptors, Kafka and
/// Redis connections, the Rust heap's live KiB, glibc's heap in use, threads).
pub(crate) type Sample = (f64, [f64; 8]);

/// Apply faults until the run's time is up: kinds drawn by the seed, each
/// held 1.5 to 5 s, 2 to 6 s of calm between; for the soak a Redis kill
/// every minute, and a resource sample every 5 s.
pub(crate) async fn schedule(
    a: &Args,
    services: &Arc<Services>,
    engine: &BatchEngine,
    started: Instant,
) -> (Applied, Vec<Sample>) {
    let kinds: Vec<Fault> = Fault::ALL.into_iter().filter(|f| !a.without.contains(f)).collect();
    let run = Duration::from_secs_f64(a.minutes * 60.0);
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut faults: Applied = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    let ports = [services.kafka_proxy.addr().port(), services.redis_proxy.addr().port()];
    tokio::time::sleep(Duration::from_secs(3)).await; // warm-up without faults
    let mut next_sample = Instant::now();
    let mut heap_peak = 0;
    while started.elapsed() < run {
        if a.soak {
            // A Redis kill every minute; samples every 5 s.
            let until = (started.elapsed() + Duration::from_secs(60)).min(run);
            while started.elapsed() < until {
                // The Rust heap's peak between samples, looked at every tick: a
                // transient backlog the allocator may keep pages of.
                heap_peak = heap_peak.max(rust_heap_kib());
                if Instant::now() >= next_sample {
                    let (fds, conns) = fds_and_connections(&ports);
                    let t = started.elapsed().as_secs_f64();
                    let values = [
                        rss_kib() as f64,
                        engine.queued() as f64,
                        fds as f64,
                        conns[0] as f64,
                        conns[1] as f64,
                        rust_heap_kib() as f64,
                        c_heap_kib() as f64,
                        threads() as f64,
                    ];
                    if samples.len() % 12 == 0 {
                        // Once a minute, so a run's shape is on record (a steady
                        // leak against a step, and which heap holds it).
                        println!(
                            "soak sample at {t:.0} s: RSS {} KiB, Rust heap {} KiB (peak in the minute {heap_peak}), C heap {} KiB, queue {}, {} fds, {} threads",
                            values[0], values[5], values[6], values[1], values[2], values[7]
                        );
                        heap_peak = 0;
                    }
                    samples.push((t, values));
                    next_sample += Duration::from_secs(5);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if started.elapsed() < run {
                let from = started.elapsed();
                inject(services, Fault::RedisKill, Duration::from_secs(3), &mut rng).await;
                faults.push((Fault::RedisKill, from, started.elapsed()));
            }
            continue;
        }
        let fault = kinds[rng.random_range(0..kinds.len())];
        let hold = Duration::from_millis(rng.random_range(1_500..5_000));
        let from = started.elapsed();
        inject(services, fault, hold, &mut rng).await;
        faults.push((fault, from, started.elapsed()));
        let calm = Duration::from_millis(rng.random_range(2_000..6_000));
        tokio::time::sleep(calm.min(run.saturating_sub(started.elapsed()))).await;
    }
    (faults, samples)
}

/// The fault kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Fault {
    RedisKill,
    RedisHang,
    RedisSlow,
    RedisDebugSleep,
    BrokerHang,
    BrokerKill,
    BrokerCut,
    GatewayKill,
}

impl Fault {
    pub(crate) const ALL: [Fault; 8] = [
        Fault::RedisKill,
        Fault::RedisHang,
        Fault::RedisSlow,
        Fault::RedisDebugSleep,
        Fault::BrokerHang,
        Fault::BrokerKill,
        Fault::BrokerCut,
        Fault::GatewayKill,
    ];

    /// Its name on the command line.
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Fault::RedisKill => "redis-kill",
            Fault::RedisHang => "redis-hang",
            Fault::RedisSlow => "redis-slow",
            Fault::RedisDebugSleep => "redis-debug-sleep",
            Fault::BrokerHang => "broker-hang",
            Fault::BrokerKill => "broker-kill",
            Fault::BrokerCut => "broker-cut",
            Fault::GatewayKill => "gateway-kill",
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::RedisKill => "redis kill -9 + restart",
            Fault::RedisHang => "redis SIGSTOP/SIGCONT",
            Fault::RedisSlow => "redis slowed (proxy delay)",
            Fault::RedisDebugSleep => "redis DEBUG SLEEP",
            Fault::BrokerHang => "broker SIGSTOP/SIGCONT",
            Fault::BrokerKill => "broker kill -9 + restart",
            Fault::BrokerCut => "broker connections cut",
            Fault::GatewayKill => "gateway kill -9 + restart",
        }
    }

    /// A broker outage: joins may fail during it.
    pub(crate) fn is_broker(self) -> bool {
        matches!(self, Fault::BrokerHang | Fault::BrokerKill | Fault::BrokerCut)
    }
}

pub(crate) struct Services {
    pub(crate) broker: Mutex<OwnedBroker>,
    pub(crate) redis: Mutex<OwnedRedis>,
    pub(crate) redis_proxy: DelayProxy,
    pub(crate) kafka_proxy: DelayProxy,
    /// The run's gateway, when it has gateway clients.
    pub(crate) gateway: Mutex<Option<OwnedGateway>>,
}

/// One fault, applied and healed. Returns when it is over.
async fn inject(services: &Arc<Services>, fault: Fault, hold: Duration, rng: &mut StdRng) {
    let s = Arc::clone(services);
    match fault {
        Fault::RedisKill => {
            blocking(move || s.redis.lock().unwrap_or_else(PoisonError::into_inner).kill()).await;
            tokio::time::sleep(hold).await;
            let s = Arc::clone(services);
            blocking(move || s.redis.lock().unwrap_or_else(PoisonError::into_inner).restart()).await;
        }
        Fault::RedisHang => {
            s.redis.lock().unwrap_or_else(PoisonError::into_inner).stop();
            tokio::time::sleep(hold).await;
            s.redis.lock().unwrap_or_else(PoisonError::into_inner).resume();
        }
        Fault::RedisSlow => {
            s.redis_proxy.set_delay(Duration::from_millis(rng.random_range(20..400)));
            tokio::time::sleep(hold).await;
            s.redis_proxy.set_delay(Duration::ZERO);
        }
        Fault::RedisDebugSleep => {
            let url = s.redis.lock().unwrap_or_else(PoisonError::into_inner).url();
            let secs = hold.as_secs_f64();
            let sleeper = tokio::spawn(async move {
                let client = deadpool_redis::redis::Client::open(url).ok()?;
                let mut c = client.get_multiplexed_async_connection().await.ok()?;
                deadpool_redis::redis::cmd("DEBUG").arg("SLEEP").arg(secs).query_async::<()>(&mut c).await.ok()
            });
            tokio::time::sleep(hold).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), sleeper).await;
        }
        Fault::BrokerHang => {
            s.broker.lock().unwrap_or_else(PoisonError::into_inner).stop();
            tokio::time::sleep(hold).await;
            s.broker.lock().unwrap_or_else(PoisonError::into_inner).resume();
        }
        Fault::BrokerKill => {
            blocking(move || s.broker.lock().unwrap_or_else(PoisonError::into_inner).kill()).await;
            tokio::time::sleep(hold.min(Duration::from_secs(2))).await;
            let s = Arc::clone(services);
            blocking(move || s.broker.lock().unwrap_or_else(PoisonError::into_inner).restart()).await;
        }
        Fault::BrokerCut => {
            s.kafka_proxy.cut();
            tokio::time::sleep(hold.min(Duration::from_secs(1))).await;
        }
        Fault::GatewayKill => {
            blocking(move || {
                if let Some(g) = s.gateway.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
                    g.kill();
                }
            })
            .await;
            tokio::time::sleep(hold.min(Duration::from_secs(2))).await;
            let s = Arc::clone(services);
            blocking(move || {
                if let Some(g) = s.gateway.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
                    g.restart();
                }
            })
            .await;
        }
    }
}

async fn blocking(f: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(f).await.expect("fixture task");
}

/// Acknowledgements per 100 ms slot since the start, for throughput during
/// each fault.
#[derive(Default)]
pub(crate) struct Timeline {
    slots: Mutex<Vec<u64>>,
}

impl Timeline {
    pub(crate) fn add(&self, at: Duration, n: u64) {
        let i = (at.as_millis() / 100) as usize;
        let mut s = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if s.len() <= i {
            s.resize(i + 1, 0);
        }
        s[i] += n;
    }

    pub(crate) fn rate(&self, from: Duration, to: Duration) -> f64 {
        let s = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let (a, b) = ((from.as_millis() / 100) as usize, (to.as_millis() / 100) as usize);
        let n: u64 = s.iter().skip(a).take(b.saturating_sub(a).max(1)).sum();
        n as f64 / (to.saturating_sub(from)).as_secs_f64().max(0.1)
    }
}

/// The broker's own record of the copies of duplicated events, read from
/// its PostgreSQL tables: (partition, offset) → (writing transaction, when
/// written). (tansu 0.6 keeps no producer id for a non-transactional
/// producer's records.)
fn broker_rows(broker: &OwnedBroker, at: &[(i32, i64)]) -> Result<HashMap<(i32, i64), (String, String)>, String> {
    let mut rows = HashMap::new();
    for chunk in at.chunks(500) {
        let list: Vec<String> = chunk.iter().map(|(p, o)| format!("({p},{o})")).collect();
        let sql = format!(
            "select t.partition, r.offset_id, r.transaction_id::text, to_char(r.created_at, 'HH24:MI:SS.US') \
             from record r join topition t on t.id = r.topition join topic k on k.id = t.topic \
             where k.name = '{TOPIC}' and (t.partition, r.offset_id) in ({});",
            list.join(",")
        );
        for line in broker.query_own_database(&sql)?.lines().filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split('|').collect();
            let [p, o, txn, when] = f[..] else {
                return Err(format!("unexpected row {line:?}"));
            };
            let num = |v: &str| v.parse::<i64>().map_err(|e| format!("{v:?}: {e}"));
            rows.insert((num(p)? as i32, num(o)?), (txn.to_owned(), when.to_owned()));
        }
    }
    Ok(rows)
}

/// Duplicates (and the order violations they make) that the broker's own
/// tables prove are the broker's. The proof: the event's two copies were
/// committed by two different broker transactions, and every event of the
/// first transaction's block that is stored twice is stored again by the
/// second, record for record at one fixed distance. That is one produce
/// batch stored twice. librdkafka sends a batch again only with its
/// original producer id, epoch and sequence, and neither dualstream nor
/// this harness sends an event twice, so an idempotent broker must have
/// refused the second copy. Prints the proof; returns (duplicates, order
/// violations) so attributed. The run still fails on them.
pub(crate) fn attribute_to_broker(broker: &OwnedBroker, findings: &[Finding]) -> (u64, u64) {
    let at: Vec<(i32, i64)> =
        findings.iter().filter(|f| f.stored_at.len() > 1).flat_map(|f| f.stored_at.iter().copied()).collect();
    if at.is_empty() {
        return (0, 0);
    }
    let rows = match broker_rows(broker, &at) {
        Ok(r) => r,
        Err(e) => {
            println!("\nbroker witness: could not read the broker's tables ({e}): nothing is attributed to the broker");
            return (0, 0);
        }
    };
    // Pairs of copies, grouped by their two transactions: (distances, partition, first offsets).
    let mut blocks: BTreeMap<(String, String), (HashSet<i64>, i32, Vec<i64>)> = BTreeMap::new();
    let pair = |f: &Finding| -> Option<(String, String, i32, i64, i64)> {
        let [a, b] = f.stored_at[..] else { return None };
        let ((ta, _), (tb, _)) = (rows.get(&a)?, rows.get(&b)?);
        (a.0 == b.0 && ta != tb).then(|| (ta.clone(), tb.clone(), a.0, a.1, b.1))
    };
    for f in findings.iter().filter(|f| f.kind == "duplicate") {
        if let Some((ta, tb, partition, first, second)) = pair(f) {
            let block = blocks.entry((ta, tb)).or_insert_with(|| (HashSet::new(), partition, Vec::new()));
            block.0.insert(second - first);
            block.2.push(first);
        }
    }
    let proven_block = |key: &(String, String)| blocks.get(key).is_some_and(|b| b.0.len() == 1);
    let (mut duplicates, mut order) = (0, 0);
    for f in findings.iter().filter(|f| f.stored_at.len() > 1) {
        let Some((ta, tb, ..)) = pair(f) else {
            continue;
        };
        if proven_block(&(ta, tb)) {
            if f.kind == "duplicate" {
                duplicates += 1;
            } else {
                order += 1;
            }
        }
    }
    println!("\nbroker witness (the broker's PostgreSQL tables): duplicated blocks, by the transactions that wrote the two copies");
    println!("\n| partition | first copy: transaction, offsets | second copy: transaction | distance | records | one batch stored twice |\n|---|---|---|---|---|---|");
    for ((ta, tb), (distances, partition, firsts)) in &blocks {
        let (lo, hi) = (firsts.iter().min().copied().unwrap_or(0), firsts.iter().max().copied().unwrap_or(0));
        let distance: Vec<String> = distances.iter().map(i64::to_string).collect();
        println!(
            "| {partition} | {ta}, {lo}..={hi} | {tb} | {} | {} | {} |",
            distance.join(", "),
            firsts.len(),
            if distances.len() == 1 { "yes" } else { "not proven" }
        );
    }
    (duplicates, order)
}

pub(crate) fn print_faults(faults: &[(Fault, Duration, Duration)], timeline: &Timeline, elapsed: Duration) {
    println!("\n| fault | injected | acknowledged events/s during it |");
    println!("|---|---|---|");
    let mut by_kind: BTreeMap<Fault, (u64, f64, f64)> = BTreeMap::new();
    for (f, from, to) in faults {
        let e = by_kind.entry(*f).or_default();
        e.0 += 1;
        e.1 += timeline.rate(*from, *to) * (*to - *from).as_secs_f64();
        e.2 += (*to - *from).as_secs_f64();
    }
    for (f, (n, weighted, secs)) in &by_kind {
        println!("| {} | {n} | {:.0} |", f.name(), weighted / secs.max(0.001));
    }
    println!("| (whole run) | {} | {:.0} |", faults.len(), timeline.rate(Duration::ZERO, elapsed));
    let list: Vec<String> =
        faults.iter().map(|(f, a, b)| format!("{} {}..{}", f.flag(), a.as_millis(), b.as_millis())).collect();
    println!("\nfaults (ms since the start): {}", list.join(", "));
}
