//! `cargo xtask demo`: dualstream end to end on the local stack.
//!
//! Publishes a steady stream from several sources through the batching
//! engine and the dual publisher while a subscriber prints live
//! notifications; stops Redis for a while (a redis-server the demo owns,
//! never yours) and shows publishing go on with zero errors; restarts it and
//! shows notifications resume; then reads the topic back from Kafka and checks
//! every event is there exactly once. Exits 0 only if every check held.
//!
//! `--broker mock` (what `cargo xtask demo` runs unless told otherwise) uses
//! librdkafka's in-process mock cluster as the broker, so nothing needs to be
//! installed; `--broker env` (the default when run by hand) uses
//! `KAFKA_BROKERS` (a real broker).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use dualstream::prelude::*;
use dualstream::redis::NotifierStats;
use dualstream::EventId;
use dualstream_devstack::clients::*;
use dualstream_devstack::OwnedRedis;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio::task::JoinHandle;

/// dualstream end to end: publish through a Redis outage, read everything back from Kafka.
#[derive(Parser)]
#[command(name = "demo")]
struct Args {
    /// Seconds to publish for (at least 6).
    #[arg(long, default_value_t = 12)]
    seconds: u64,
    /// Events per second to offer (at least 10).
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// The Kafka broker: librdkafka's in-process mock cluster, or the one of `KAFKA_BROKERS`.
    #[arg(long, value_enum, default_value_t = Broker::Env)]
    broker: Broker,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Broker {
    /// librdkafka's in-process mock cluster: nothing to install.
    Mock,
    /// The broker of `KAFKA_BROKERS`.
    Env,
}

fn line(t: f64, published: u64, errors: u64, s: &NotifierStats, received: u64) {
    println!(
        "  t={t:5.1}s  published={published:>7}  publish_errors={errors}  notifications: sent={:>7} skipped={:>6} failed={:>3}  breaker={:?}  subscriber_received={received}",
        s.published, s.skipped, s.failed, s.breaker
    );
}

/// The broker's addresses and, when it is the broker, the mock cluster
/// (which lives as long as the value); the topic is created there.
async fn kafka(broker: Broker, topic: &str) -> (Option<MockCluster<'static, DefaultProducerContext>>, String) {
    if broker == Broker::Env {
        let brokers = kafka_brokers();
        println!("  kafka {brokers}");
        create_topic(&brokers, topic, 3).await;
        return (None, brokers);
    }
    let cluster = MockCluster::new(1).expect("librdkafka's mock cluster");
    cluster.create_topic(topic, 3, 1).expect("topic on the mock cluster");
    let brokers = cluster.bootstrap_servers();
    println!(
        "  kafka: librdkafka's in-process mock cluster at {brokers} (run with --broker tansu or KAFKA_BROKERS for a real broker)"
    );
    (Some(cluster), brokers)
}

/// The live subscriber: counts what it receives and prints a sample.
fn subscribe(url: String, received: Arc<AtomicU64>, pattern: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut sub = Subscriber::new(&url, &[pattern], &[]).await;
        while let Some((channel, payload)) = sub.next(Duration::from_secs(3600)).await {
            let n = received.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 2_000 == 1 {
                println!("  live: {channel} {}", String::from_utf8_lossy(&payload));
            }
        }
    })
}

/// Submit one event; a failure is counted and printed.
fn submit(engine: BatchEngine, event: Event, errors: Arc<AtomicU64>) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = engine.submit(event).await {
            errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("  publish error: {e}");
        }
    })
}

/// What the publishing phase did.
struct Published {
    ids: Vec<EventId>,
    errors: u64,
    received: u64,
    received_before_outage: u64,
    secs: f64,
}

/// Submit `rate` events a second for `seconds` from 10 sources, each tick's
/// share on schedule, while a live subscriber counts notifications; Redis
/// is killed for the middle third and restarted. Returns once every submit
/// resolved and the engine shut down.
async fn publish(args: &Args, engine: &BatchEngine, notifier: &RedisNotifier, redis: &mut OwnedRedis) -> Published {
    let received = Arc::new(AtomicU64::new(0));
    let pattern = notifier.namer().pattern_all();
    let mut live = subscribe(redis.url(), received.clone(), pattern.clone());
    let (started, total, per_tick) = (Instant::now(), args.rate * args.seconds, (args.rate / 100).max(1));
    let (outage_from, outage_to) = ((args.seconds / 3) as f64, (2 * args.seconds / 3) as f64);
    let errors = Arc::new(AtomicU64::new(0));
    let (mut ids, mut tasks) = (Vec::with_capacity(total as usize), Vec::with_capacity(total as usize));
    let (mut phase, mut received_before_outage, mut next_report) = (0, 0, 1.0);
    while (ids.len() as u64) < total {
        let elapsed = started.elapsed().as_secs_f64();
        if phase == 0 && elapsed >= outage_from {
            received_before_outage = received.load(Ordering::Relaxed);
            println!(">>> stopping redis: publishing must go on with zero errors");
            live.abort();
            redis.kill();
            phase = 1;
        } else if phase == 1 && elapsed >= outage_to {
            println!(">>> restarting redis: notifications must resume");
            redis.restart();
            live = subscribe(redis.url(), received.clone(), pattern.clone());
            phase = 2;
        }
        if elapsed >= next_report {
            let (sent, failed) = (ids.len() as u64, errors.load(Ordering::Relaxed));
            line(elapsed, sent, failed, &notifier.stats(), received.load(Ordering::Relaxed));
            next_report += 1.0;
        }
        // Submit this tick's share, on schedule.
        let due = ((elapsed * args.rate as f64) as u64 + per_tick).min(total);
        while (ids.len() as u64) < due {
            let seq = ids.len();
            let e = Event::builder("demo.tick", "sensor", format!("sensor-{}", seq % 10))
                .payload(format!(r#"{{"seq":{seq}}}"#))
                .build()
                .expect("valid event");
            ids.push(e.id());
            tasks.push(submit(engine.clone(), e, errors.clone()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    engine.shutdown().await;
    let secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    live.abort();
    let (errors, received) = (errors.load(Ordering::Relaxed), received.load(Ordering::Relaxed));
    line(secs, ids.len() as u64, errors, &notifier.stats(), received);
    Published { ids, errors, received, received_before_outage, secs }
}

/// Read the topic back, print the summary and the checks; whether every
/// check held.
fn check(args: &Args, brokers: &str, topic: &str, p: &Published, stats: &NotifierStats) -> bool {
    println!(">>> reading topic {topic} back from Kafka");
    let read_started = Instant::now();
    let records = read_topic(brokers, topic, p.ids.len(), Duration::from_secs(120));
    let read: Vec<_> = records.iter().map(|r| r.event().id()).collect();
    let unique: HashSet<_> = read.iter().collect();
    let missing = p.ids.iter().filter(|id| !unique.contains(id)).count();
    let duplicates = read.len() - unique.len();
    let (sent, received, before) = (p.ids.len(), p.received, p.received_before_outage);
    let checks = [
        ("zero publish errors, Redis outage included", p.errors == 0),
        ("notifications were skipped or failed while Redis was down", stats.skipped + stats.failed > 0),
        ("the subscriber received notifications before the outage", before > 0),
        ("notifications resumed after the restart", received > before),
        ("every published event is in Kafka", missing == 0),
        ("no event is in Kafka twice", duplicates == 0),
    ];
    println!();
    println!("summary");
    println!(
        "  events published       {sent} in {:.1}s ({:.0}/s offered {}/s)",
        p.secs,
        sent as f64 / p.secs,
        args.rate
    );
    println!("  publish errors         {}", p.errors);
    println!("  notifications          sent {} / skipped {} / failed {}", stats.published, stats.skipped, stats.failed);
    println!("  live messages received {received} ({before} before the outage)");
    println!(
        "  read back from Kafka   {} records in {:.1}s: missing {missing}, duplicates {duplicates}",
        read.len(),
        read_started.elapsed().as_secs_f64()
    );
    let mut ok = true;
    for (name, held) in checks {
        println!("  [{}] {name}", if held { "ok" } else { "FAILED" });
        ok &= held;
    }
    ok
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    args.seconds = args.seconds.max(6);
    args.rate = args.rate.max(10);
    let topic = unique_topic("dualstream-demo");
    println!("dualstream demo: {} events/s for {}s from 10 sources", args.rate, args.seconds);
    let (_mock, brokers) = kafka(args.broker, &topic).await;
    println!("  topic {topic}");
    let mut redis = OwnedRedis::start();
    println!("  redis {} (the demo's own redis-server; it will be stopped and restarted)", redis.url());

    let notifier = Arc::new(redis_notifier(&redis.url()));
    let publisher =
        DualPublisher::builder().durable(Arc::new(kafka_sink(&brokers, &topic))).notifier(notifier.clone()).build();
    let engine = BatchEngine::new(publisher.expect("publisher"), BatchConfig::default()).expect("engine");
    let published = publish(&args, &engine, &notifier, &mut redis).await;
    if check(&args, &brokers, &topic, &published, &notifier.stats()) {
        println!("demo passed");
        std::process::ExitCode::SUCCESS
    } else {
        println!("demo FAILED");
        std::process::ExitCode::FAILURE
    }
}
