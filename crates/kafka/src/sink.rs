use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dualstream_core::record::{self, HeaderScratch};
use dualstream_core::{DeliveryError, DurableSink, Event, Position, SinkError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

use crate::config::{KafkaSinkConfig, TopicRouting};
use crate::error::{sink_error, ConfigError};

/// The Kafka durable sink. Cheap to clone; clones share one producer.
#[derive(Clone)]
pub struct KafkaSink {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced by a fresh producer after a fatal error (see `recover`).
    producer: RwLock<FutureProducer>,
    config: KafkaSinkConfig,
    /// Topic name per source type, shared with every position handed out.
    topics: RwLock<HashMap<Arc<str>, Arc<str>>>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Validate the configuration and create the producer. Connecting happens
    /// in the background; call [`DurableSink::health_check`] to wait for the
    /// broker.
    pub fn new(config: KafkaSinkConfig) -> Result<Self, ConfigError> {
        let producer: FutureProducer = config.client_config()?.create().map_err(ConfigError::Client)?;
        Ok(Self { inner: Arc::new(Inner { producer: RwLock::new(producer), config, topics: RwLock::new(HashMap::new()) }) })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaSinkConfig {
        &self.inner.config
    }

    /// The current producer (a cheap handle), for statistics or advanced use.
    pub fn producer(&self) -> FutureProducer {
        self.inner.producer.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Records handed to the producer whose delivery reports librdkafka has
    /// not finished handing back. A report event can hold many records and
    /// is released after the last of them resolves its caller, so right after
    /// a batch fails the count may still be above zero for a moment.
    pub fn in_flight(&self) -> i32 {
        self.producer().in_flight_count()
    }

    /// After a failed delivery: if the producer hit a fatal error (for
    /// example the broker fenced its producer id after an outage), it can
    /// never deliver again, so replace it with a fresh one. Later publishes
    /// go to the new producer; nothing acknowledged is affected.
    fn recover(&self, failed: &FutureProducer, error: &rdkafka::error::KafkaError) {
        let fenced = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
        );
        let Some((code, reason)) = failed
            .client()
            .fatal_error()
            .or_else(|| fenced.then(|| (RDKafkaErrorCode::ProducerFenced, error.to_string())))
        else {
            return;
        };
        let mut current = self.inner.producer.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !std::ptr::eq(current.client().native_ptr(), failed.client().native_ptr()) {
            return; // another call replaced it already
        }
        match self.inner.config.client_config().and_then(|c| c.create().map_err(ConfigError::Client)) {
            Ok(fresh) => {
                tracing::warn!(?code, %reason, "kafka producer hit a fatal error; replaced it with a new producer");
                *current = fresh;
            }
            Err(e) => tracing::error!(error = %e, "kafka producer hit a fatal error and could not be replaced"),
        }
    }

    /// Create these topics if they do not exist, with the configured
    /// [`CreateTopics`](crate::CreateTopics) settings (or one partition,
    /// replication factor one, when none are configured).
    pub async fn ensure_topics(&self, names: &[&str]) -> Result<(), SinkError> {
        let cfg = &self.inner.config;
        let (partitions, rf) = cfg.create_topics.as_ref().map_or((1, 1), |c| (c.partitions, c.replication_factor));
        let mut admin_config = ClientConfig::new();
        for (k, v) in &cfg.librdkafka_options {
            admin_config.set(k, v);
        }
        admin_config.set("bootstrap.servers", &cfg.bootstrap_servers);
        let admin: AdminClient<DefaultClientContext> =
            admin_config.create().map_err(|e| SinkError::Broker { message: e.to_string(), retriable: false })?;
        let topics: Vec<NewTopic<'_>> =
            names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(rf))).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_millis(cfg.health_timeout_ms)));
        let results = admin
            .create_topics(&topics, &opts)
            .await
            .map_err(|e| SinkError::Broker { message: format!("create topics: {e}"), retriable: true })?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(SinkError::Broker { message: format!("create topic {topic}: {code}"), retriable: true })
                }
            }
        }
        Ok(())
    }

    /// The topic of a source type, created first when so configured.
    async fn topic_for(&self, event: &Event) -> Result<Arc<str>, SinkError> {
        let st = event.source().source_type();
        if let Some(t) = self.inner.topics.read().ok().and_then(|m| m.get(st).cloned()) {
            return Ok(t);
        }
        let name: Arc<str> = self.inner.config.topic.topic_for(st).into();
        if self.inner.config.create_topics.is_some() {
            self.ensure_topics(&[&name]).await?;
        }
        if let Ok(mut m) = self.inner.topics.write() {
            m.insert(st.into(), name.clone());
        }
        Ok(name)
    }

    /// Hand one record to the producer, waiting for room while the local
    /// queue is full, up to `until`.
    async fn enqueue(
        &self,
        producer: &FutureProducer,
        topic: &str,
        event: &Event,
        until: Instant,
    ) -> Result<DeliveryFuture, SinkError> {
        let mut scratch = HeaderScratch::default();
        let mut headers = OwnedHeaders::new_with_capacity(5 + event.headers().len());
        for (key, value) in record::headers(event, &mut scratch) {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        let mut rec = FutureRecord::to(topic)
            .key(record::key(event))
            .payload(event.payload().as_ref())
            .headers(headers);
        let mut pause = Duration::from_millis(1);
        loop {
            match producer.send_result(rec) {
                Ok(delivery) => return Ok(delivery),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    let now = Instant::now();
                    if now >= until {
                        let waited = Duration::from_millis(self.inner.config.enqueue_timeout_ms);
                        return Err(SinkError::QueueFull { waited });
                    }
                    tokio::time::sleep(pause.min(until - now)).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                    rec = back;
                }
                Err((e, _)) => return Err(sink_error(&e, self.inner.config.message_timeout())),
            }
        }
    }

    fn enqueue_deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.inner.config.enqueue_timeout_ms)
    }

    async fn settle(
        &self,
        producer: &FutureProducer,
        topic: Arc<str>,
        event: Event,
        delivery: DeliveryFuture,
    ) -> Result<Position, DeliveryError> {
        match delivery.await {
            Ok(Ok(d)) => Ok(Position { topic, partition: d.partition, offset: d.offset }),
            Ok(Err((e, _))) => {
                self.recover(producer, &e);
                Err(DeliveryError::new(sink_error(&e, self.inner.config.message_timeout()), event))
            }
            Err(_canceled) => Err(DeliveryError::new(SinkError::Closed, event)),
        }
    }
}

#[async_trait]
impl DurableSink for KafkaSink {
    async fn publish(&self, event: Event) -> Result<Position, DeliveryError> {
        let topic = match self.topic_for(&event).await {
            Ok(t) => t,
            Err(e) => return Err(DeliveryError::new(e, event)),
        };
        let producer = self.producer();
        match self.enqueue(&producer, &topic, &event, self.enqueue_deadline()).await {
            Ok(delivery) => self.settle(&producer, topic, event, delivery).await,
            Err(e) => Err(DeliveryError::new(e, event)),
        }
    }

    /// Every record is handed to the producer first, then all acks are
    /// awaited. If the local queue stays full past the enqueue timeout, that
    /// event and every later one of the batch fail with "queue full" at once,
    /// so the order of each source is never broken by a later event
    /// overtaking a failed one.
    async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<Position, DeliveryError>> {
        let until = self.enqueue_deadline();
        let producer = self.producer();
        let mut pending = Vec::with_capacity(events.len());
        let mut full: Option<Duration> = None;
        for event in events {
            if let Some(waited) = full {
                pending.push(Err(DeliveryError::new(SinkError::QueueFull { waited }, event)));
                continue;
            }
            let topic = match self.topic_for(&event).await {
                Ok(t) => t,
                Err(e) => {
                    pending.push(Err(DeliveryError::new(e, event)));
                    continue;
                }
            };
            match self.enqueue(&producer, &topic, &event, until).await {
                Ok(delivery) => pending.push(Ok((topic, event, delivery))),
                Err(e) => {
                    if let SinkError::QueueFull { waited } = e {
                        full = Some(waited);
                    }
                    pending.push(Err(DeliveryError::new(e, event)));
                }
            }
        }
        // Every record is enqueued already, so awaiting the acks one after
        // the other takes as long as awaiting them together, without a task
        // node per record.
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Ok((topic, event, delivery)) => self.settle(&producer, topic, event, delivery).await,
                Err(e) => Err(e),
            });
        }
        out
    }

    async fn health_check(&self) -> Result<(), SinkError> {
        let cfg = &self.inner.config;
        let topic = match &cfg.topic {
            TopicRouting::Single { topic } => Some(topic.clone()),
            TopicRouting::PerSourceType { .. } => None,
        };
        if let (Some(t), Some(_)) = (&topic, &cfg.create_topics) {
            self.ensure_topics(&[t]).await?;
        }
        let producer = self.producer();
        let timeout = Duration::from_millis(cfg.health_timeout_ms);
        let t = topic.clone();
        let metadata = tokio::task::spawn_blocking(move || producer.client().fetch_metadata(t.as_deref(), timeout))
            .await
            .map_err(|e| SinkError::other(e.to_string()))?
            .map_err(|e| SinkError::Broker { message: format!("metadata: {e}"), retriable: true })?;
        if let Some(t) = topic {
            let found = metadata.topics().iter().find(|m| m.name() == t);
            match found {
                Some(m) if m.error().is_none() && !m.partitions().is_empty() => {}
                _ => {
                    return Err(SinkError::Rejected {
                        reason: format!("topic {t:?} does not exist (create it, or set create_topics)"),
                    })
                }
            }
        }
        Ok(())
    }

    async fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| SinkError::other(e.to_string()))?
            .map_err(|e| sink_error(&e, timeout))
    }
}
