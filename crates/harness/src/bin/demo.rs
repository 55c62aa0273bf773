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
//! installed; `--broker env` uses `KAFKA_BROKERS` (a real broker).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualstream::prelude::*;
use dualstream::redis::NotifierStats;
use dualstream_devstack::clients::*;
use dualstream_devstack::OwnedRedis;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn line(t: f64, published: u64, errors: u64, s: &NotifierStats, received: u64) {
    println!(
        "  t={t:5.1}s  published={published:>7}  publish_errors={errors}  notifications: sent={:>7} skipped={:>6} failed={:>3}  breaker={:?}  subscriber_received={received}",
        s.published, s.skipped, s.failed, s.breaker
    );
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let seconds = arg("--seconds", 12).max(6);
    let rate = arg("--rate", 2_000).max(10);
    let args: Vec<String> = std::env::args().collect();
    let mock_broker = args.windows(2).any(|w| w[0] == "--broker" && w[1] == "mock");
    let topic = unique_topic("dualstream-demo");
    println!("dualstream demo: {rate} events/s for {seconds}s from 10 sources");
    // The mock cluster lives as long as the demo.
    let mock = mock_broker.then(|| rdkafka::mocking::MockCluster::new(1).expect("librdkafka's mock cluster"));
    let brokers = match &mock {
        Some(cluster) => {
            cluster.create_topic(&topic, 3, 1).expect("topic on the mock cluster");
            println!("  kafka: librdkafka's in-process mock cluster at {} (run with --broker tansu or KAFKA_BROKERS for a real broker)", cluster.bootstrap_servers());
            cluster.bootstrap_servers()
        }
        None => {
            let brokers = kafka_brokers();
            println!("  kafka {brokers}");
            create_topic(&brokers, &topic, 3).await;
            brokers
        }
    };
    println!("  topic {topic}");
    let mut redis = OwnedRedis::start();
    println!("  redis {} (the demo's own redis-server; it will be stopped and restarted)", redis.url());

    let kafka = kafka_sink(&brokers, &topic);
    let notifier = Arc::new(redis_notifier(&redis.url()));
    let publisher =
        DualPublisher::builder().durable(Arc::new(kafka)).notifier(notifier.clone()).build().expect("publisher");
    let engine = BatchEngine::new(publisher, BatchConfig::default()).expect("engine");

    // Live subscriber: prints a sample of what it receives.
    let received = Arc::new(AtomicU64::new(0));
    let pattern = notifier.namer().pattern_all();
    let subscribe = |url: String, received: Arc<AtomicU64>, pattern: String| {
        tokio::spawn(async move {
            let mut sub = Subscriber::new(&url, &[pattern], &[]).await;
            while let Some((channel, payload)) = sub.next(Duration::from_secs(3600)).await {
                let n = received.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 2_000 == 1 {
                    println!("  live: {channel} {}", String::from_utf8_lossy(&payload));
                }
            }
        })
    };
    let mut live = subscribe(redis.url(), received.clone(), pattern.clone());

    let started = Instant::now();
    let total = rate * seconds;
    let (outage_from, outage_to) = (seconds / 3, 2 * seconds / 3);
    let errors = Arc::new(AtomicU64::new(0));
    let mut ids = Vec::with_capacity(total as usize);
    let mut tasks = Vec::with_capacity(total as usize);
    let mut phase = 0;
    let mut received_before_outage = 0;
    let mut next_report = 1.0;
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut sent = 0u64;
    while sent < total {
        let elapsed = started.elapsed().as_secs_f64();
        if phase == 0 && elapsed >= outage_from as f64 {
            received_before_outage = received.load(Ordering::Relaxed);
            println!(">>> stopping redis: publishing must go on with zero errors");
            live.abort();
            redis.kill();
            phase = 1;
        } else if phase == 1 && elapsed >= outage_to as f64 {
            println!(">>> restarting redis: notifications must resume");
            redis.restart();
            live = subscribe(redis.url(), received.clone(), pattern.clone());
            phase = 2;
        }
        if elapsed >= next_report {
            line(elapsed, sent, errors.load(Ordering::Relaxed), &notifier.stats(), received.load(Ordering::Relaxed));
            next_report += 1.0;
        }
        // Submit this tick's share, on schedule.
        let due = ((elapsed * rate as f64) as u64 + per_tick).min(total);
        while sent < due {
            let e = Event::builder("demo.tick", "sensor", format!("sensor-{}", sent % 10))
                .payload(format!(r#"{{"seq":{sent}}}"#))
                .build()
                .expect("valid event");
            ids.push(e.id());
            let (engine, errors) = (engine.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let r = engine.submit(e).await;
                if let Err(e) = &r {
                    errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("  publish error: {e}");
                }
                r.is_ok()
            }));
            sent += 1;
        }
        tokio::time::sleep(tick).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    engine.shutdown().await;
    let publish_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    live.abort();
    let stats = notifier.stats();
    let errors = errors.load(Ordering::Relaxed);
    let received = received.load(Ordering::Relaxed);
    line(publish_secs, sent, errors, &stats, received);

    println!(">>> reading topic {topic} back from Kafka");
    let read_started = Instant::now();
    let records = read_topic(&brokers, &topic, ids.len(), Duration::from_secs(120));
    let read: Vec<_> = records.iter().map(|r| r.event().id()).collect();
    let unique: HashSet<_> = read.iter().collect();
    let missing = ids.iter().filter(|id| !unique.contains(id)).count();
    let duplicates = read.len() - unique.len();

    let checks = [
        ("zero publish errors, Redis outage included", errors == 0),
        ("notifications were skipped or failed while Redis was down", stats.skipped + stats.failed > 0),
        ("the subscriber received notifications before the outage", received_before_outage > 0),
        ("notifications resumed after the restart", received > received_before_outage),
        ("every published event is in Kafka", missing == 0),
        ("no event is in Kafka twice", duplicates == 0),
    ];
    println!();
    println!("summary");
    println!(
        "  events published       {sent} in {publish_secs:.1}s ({:.0}/s offered {rate}/s)",
        sent as f64 / publish_secs
    );
    println!("  publish errors         {errors}");
    println!("  notifications          sent {} / skipped {} / failed {}", stats.published, stats.skipped, stats.failed);
    println!("  live messages received {received} ({received_before_outage} before the outage)");
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
    if ok {
        println!("demo passed");
        std::process::ExitCode::SUCCESS
    } else {
        println!("demo FAILED");
        std::process::ExitCode::FAILURE
    }
}
