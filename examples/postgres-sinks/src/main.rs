//! The PostgreSQL sinks at work: `cargo run -p dualstream-example-postgres`.
//!
//! Connects to `DATABASE_URL` (default: the local server), keeps its outbox
//! in the schema `dualstream_example`, publishes through the
//! `DualPublisher` and then the `BatchEngine`, receives the notifications
//! with a plain `LISTEN` session and reads the outbox back. Run it again and
//! each source's offsets go on where they stopped.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use dualstream_batch::{BatchConfig, BatchEngine};
use dualstream_core::{Event, Limits, Notification};
use dualstream_example_postgres::{
    ChannelScope, ConnectionConfig, OutboxConfig, OutboxSink, PgNotifier, PgNotifierConfig, DEFAULT_URL,
};
use dualstream_publisher::DualPublisher;
use futures::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    println!("PostgreSQL: {url} (set DATABASE_URL for another)");
    let connection = ConnectionConfig { url: url.clone(), ..Default::default() };
    let outbox_config =
        OutboxConfig { connection: connection.clone(), schema: "dualstream_example".into(), ..Default::default() };
    let outbox = OutboxSink::connect(outbox_config.clone()).await?;
    // Per source and per source type: LISTEN has no patterns, so a listener
    // of every order listens on the type's channel.
    let notifier =
        PgNotifier::new(PgNotifierConfig { connection, channels: ChannelScope::Both, ..Default::default() })?;

    // Any PostgreSQL client can listen; this one is plain tokio-postgres.
    let (listener, mut session) =
        tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(&url, NoTls)).await??;
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| session.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    listener.batch_execute(&PgNotifier::listen_sql("events:order")).await?;

    let publisher = DualPublisher::builder().durable(Arc::new(outbox)).notifier(Arc::new(notifier)).build()?;
    let first = Event::builder("order.placed", "order", "o-1").payload(r#"{"total":42}"#).build()?;
    let receipt = publisher.publish(first).await?;
    let at = receipt.position.map(|p| p.to_string()).unwrap_or_default();
    println!("publish: event {} stored at {at}, notification {:?}", receipt.event_id, receipt.notification);

    let engine = BatchEngine::new(publisher, BatchConfig::default())?;
    let events = (0..100)
        .map(|i| {
            Event::builder("order.updated", "order", format!("o-{}", i % 5))
                .payload(format!(r#"{{"step":{i}}}"#))
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let stored = engine.submit_many(events).await.into_iter().filter(Result::is_ok).count();
    engine.shutdown().await;
    println!("batch engine: {stored} of 100 events stored");

    // Every notification, within a bound; per source the offsets only grow.
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut received = 0;
    while received < 1 + stored {
        let Ok(Some(payload)) = tokio::time::timeout(Duration::from_secs(10), notifications.recv()).await else {
            return Err(format!("only {received} of {} notifications within 10 s", 1 + stored).into());
        };
        let n = Notification::from_json_with_limits(payload.as_bytes(), &Limits::lenient())?;
        let offset = n.position.map(|p| p.offset).unwrap_or_default();
        let previous = last.insert(n.source_id.to_string(), offset);
        if previous.is_some_and(|p| p >= offset) {
            return Err(format!("source {} notified out of order: {previous:?} then {offset}", n.source_id).into());
        }
        received += 1;
    }
    println!("LISTEN \"events:order\": {received} notifications, each source in order; last offsets {last:?}");

    let sql = format!(
        "SELECT source_id, count(*), max(seq) FROM {}.{} GROUP BY source_id ORDER BY source_id",
        outbox_config.schema, outbox_config.table
    );
    for row in listener.query(&sql, &[]).await? {
        let (source, count, max): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        println!("outbox {}: source {source}: {count} rows, seq 1..={max}", outbox_config.log_name());
    }
    Ok(())
}
