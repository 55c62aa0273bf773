//! A late subscriber catching up: publish a few events, then join the
//! source from its first event and keep receiving live ones, in Kafka order
//! with no gap and no duplicate.
//!
//! Needs Kafka and Redis: start the local stack first.
//!
//! ```sh
//! cargo xtask up && eval "$(cat target/dualstream-stack/stack.env)"
//! cargo run -p dualstream --example late_subscriber
//! ```

use std::sync::Arc;
use std::time::Duration;

use dualstream::consumer::{CatchUp, Delivery, Hub, HubConfig, JoinConfig, Replay, ReplayConfig, StartAt};
use dualstream::kafka::CreateTopics;
use dualstream::prelude::*;
use dualstream::Source;
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let topic = TopicRouting::Single { topic: "late-subscriber-example".into() };

    let kafka = KafkaSink::new(KafkaSinkConfig {
        bootstrap_servers: brokers.clone(),
        topic: topic.clone(),
        create_topics: Some(CreateTopics { partitions: 3, replication_factor: 1 }),
        ..KafkaSinkConfig::default()
    })?;
    let notifier = RedisNotifier::new(RedisNotifierConfig { url: redis.clone(), ..RedisNotifierConfig::default() })?;
    let publisher = DualPublisher::builder().durable(Arc::new(kafka)).notifier(Arc::new(notifier)).build()?;

    // History the subscriber was not there for.
    let source = Source::new("order", "A-1001")?;
    let mut first = None;
    for step in ["created", "paid", "packed"] {
        let event = Event::builder(format!("order.{step}"), "order", "A-1001").payload(step).build()?;
        let receipt = publisher.publish(event).await?;
        first.get_or_insert(receipt.position.expect("stored in Kafka"));
    }
    let first = first.expect("three events published");

    // The subscriber arrives and asks for everything since the first event.
    let replay = Replay::new(ReplayConfig { bootstrap_servers: brokers, topic, ..ReplayConfig::default() })?;
    let hub = Hub::new(HubConfig { url: redis, ..HubConfig::default() })?;
    let joiner = CatchUp::new(replay, hub, JoinConfig::default())?;
    let mut stream = joiner.join(source, StartAt::Offset(first.offset)).await?;

    // Meanwhile the order moves on.
    let live_publisher = publisher.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for step in ["shipped", "delivered"] {
            let event =
                Event::builder(format!("order.{step}"), "order", "A-1001").payload(step).build().expect("valid");
            live_publisher.publish(event).await.expect("published");
        }
    });

    for _ in 0..5 {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await? {
            Some(Ok(Delivery::History(r))) => {
                println!("history {} {} at {}", r.event.event_type(), r.event.id(), r.position)
            }
            Some(Ok(Delivery::Live(n))) => {
                println!("live    {} {} at {}", n.event_type, n.id, n.position.as_ref().expect("positioned"))
            }
            Some(Ok(Delivery::Truncated { requested, first_available })) => {
                println!("gone    offsets {requested}..{first_available} are no longer stored")
            }
            Some(Ok(other)) => println!("other   {other:?}"),
            Some(Err(e)) => println!("error   {e}"),
            None => break,
        }
    }
    publisher.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}
