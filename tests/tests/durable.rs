//! The durable local broker: tansu keeping its log in PostgreSQL (our schema
//! for its engine, `xtask/assets/tansu-0.6-postgres.sql`) or in a SQLite
//! file, killed and restarted while the batching engine publishes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dualstream::prelude::*;
use dualstream::{EventId, Mode};
use dualstream_tests::*;

/// One test at a time: each publishes about 2,000 events/s on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_postgresql_killed_under_load_keeps_every_acknowledged_event_and_publishing_resumes() {
    killed_under_load(DurableEngine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_sqlite_killed_under_load_keeps_every_acknowledged_event_and_publishing_resumes() {
    killed_under_load(DurableEngine::Sqlite).await;
}

async fn killed_under_load(storage: DurableEngine) {
    init_tracing();
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut broker = OwnedBroker::start_durable(storage);
    let brokers = broker.brokers();
    let topic = unique_topic("durable");
    create_topic(&brokers, &topic, 3).await;
    let publisher = DualPublisher::builder()
        .durable(Arc::new(kafka_sink(&brokers, &topic)))
        .mode(Mode::DurableOnly)
        .build()
        .expect("publisher");
    let engine = BatchEngine::new(publisher, BatchConfig::default()).expect("engine");

    // About 2,000 events/s from 8 sources; each outcome recorded with the
    // time it was submitted.
    let acked: Arc<Mutex<Vec<(Instant, EventId)>>> = Arc::default();
    let failed = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (engine, acked, failed, stop) = (engine.clone(), acked.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..20 {
                    let e = Event::builder("tick", "sensor", format!("s{}", i % 8)).payload(format!("{i}")).build().expect("valid");
                    let (engine, acked, failed) = (engine.clone(), acked.clone(), failed.clone());
                    tasks.push(tokio::spawn(async move {
                        let (at, id) = (Instant::now(), e.id());
                        match engine.submit(e).await {
                            Ok(_) => acked.lock().expect("lock").push((at, id)),
                            Err(_) => *failed.lock().expect("lock") += 1,
                        }
                    }));
                    i += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for t in tasks {
                t.await.expect("submit task");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    broker.kill();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    broker.restart();
    let restarted = Instant::now();
    // Publishing resumes by itself: events submitted after the restart are
    // acknowledged.
    let until = restarted + Duration::from_secs(60);
    loop {
        let after = acked.lock().expect("lock").iter().filter(|(at, _)| *at > restarted).count();
        if after >= 500 {
            break;
        }
        assert!(Instant::now() < until, "publishing did not resume within 60 s of the restart ({after} acknowledged)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(60), load).await.expect("the load finishes").expect("load");
    engine.shutdown().await;

    let acked: Vec<EventId> = acked.lock().expect("lock").iter().map(|(_, id)| *id).collect();
    let records = read_topic(&brokers, &topic, acked.len(), Duration::from_secs(60));
    let mut stored: HashMap<EventId, usize> = HashMap::new();
    for r in &records {
        *stored.entry(r.event().id()).or_default() += 1;
    }
    let missing = acked.iter().filter(|id| !stored.contains_key(id)).count();
    let twice = acked.iter().filter(|id| stored.get(id).is_some_and(|n| *n > 1)).count();
    eprintln!(
        "durable broker ({storage:?}): {} acknowledged, {} failed during the outage, {} records read back, \
         {missing} missing, {twice} stored twice",
        acked.len(),
        failed.lock().expect("lock"),
        records.len()
    );
    assert_eq!(missing, 0, "every acknowledged event survives the broker's restart");
    assert_eq!(twice, 0, "no acknowledged event is stored twice");
}
