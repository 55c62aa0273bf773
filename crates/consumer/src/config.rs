use std::collections::BTreeMap;
use std::time::Duration;

use dualstream_kafka::TopicRouting;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// A configuration value that cannot work. Each variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field has a bad value.
    #[error("consumer config: {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

pub(crate) fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::Invalid { field, reason: format!("{value} is outside {min}..={max}") });
    }
    Ok(())
}

/// librdkafka keys the reader sets itself; giving them in
/// `librdkafka_options` is an error rather than a silent override.
const READER_KEYS: &[&str] = &[
    "bootstrap.servers",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "group.id",
    "enable.partition.eof",
    "fetch.wait.max.ms",
    "queued.max.messages.kbytes",
    "fetch.max.bytes",
];

/// Configuration of the Kafka [`Replay`](crate::Replay) reader (also used by
/// the [`CatchUp`](crate::CatchUp) join).
///
/// The reader never joins a consumer group and never commits offsets: it
/// assigns partitions itself, so any number of readers can run at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayConfig {
    /// Kafka bootstrap servers. Default: `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Where events were written: the same routing as the Kafka sink's.
    pub topic: TopicRouting,
    /// Longest time the broker holds a fetch open when there is no new
    /// data, in milliseconds (`fetch.wait.max.ms`). Lower means fresher
    /// reads when following the tail. Default: 50.
    pub fetch_wait_max_ms: u64,
    /// Bound on the records librdkafka prefetches per reader, in KiB
    /// (`queued.max.messages.kbytes`): the reader's memory bound. Default:
    /// 8,192.
    pub prefetch_max_kbytes: u32,
    /// Bound on one fetch answer, in bytes (`fetch.max.bytes`; librdkafka
    /// raises it to `message.max.bytes` when lower, so one record of any
    /// size still fits). Small answers keep records flowing while a reader
    /// goes through a long stretch of a partition: a broker that builds the
    /// whole answer before sending it (tansu 0.6 reads it from its storage
    /// record by record, about 10,000 records a second on PostgreSQL, and
    /// bounds it by this value only, not by the per-partition bound) would
    /// otherwise answer a read from far back with tens of thousands of
    /// records after many seconds. Default: 1,048,576.
    pub fetch_max_bytes: u32,
    /// Bound on a metadata, watermark or offset look-up and on the wait for
    /// a record that the watermarks say exists, in milliseconds. Default:
    /// 10,000.
    pub timeout_ms: u64,
    /// Further librdkafka settings (security, for example). Keys the reader
    /// sets itself are rejected.
    pub librdkafka_options: BTreeMap<String, String>,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".to_owned(),
            topic: TopicRouting::default(),
            fetch_wait_max_ms: 50,
            prefetch_max_kbytes: 8_192,
            fetch_max_bytes: 1_048_576,
            timeout_ms: 10_000,
            librdkafka_options: BTreeMap::new(),
        }
    }
}

impl ReplayConfig {
    /// The look-up bound.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Check every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(ConfigError::Invalid { field: "bootstrap_servers", reason: "must not be empty".into() });
        }
        // The sink's validation knows the topic rules; reuse it.
        dualstream_kafka::KafkaSinkConfig {
            bootstrap_servers: self.bootstrap_servers.clone(),
            topic: self.topic.clone(),
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConfigError::Invalid { field: "topic", reason: e.to_string() })?;
        range("fetch_wait_max_ms", self.fetch_wait_max_ms, 0, 300_000)?;
        range("prefetch_max_kbytes", self.prefetch_max_kbytes.into(), 1, 2_097_151)?;
        range("fetch_max_bytes", self.fetch_max_bytes.into(), 1_024, 2_147_483_135)?;
        range("timeout_ms", self.timeout_ms, 1, 3_600_000)?;
        if let Some(k) = self.librdkafka_options.keys().find(|k| READER_KEYS.contains(&k.trim())) {
            return Err(ConfigError::Invalid {
                field: "librdkafka_options",
                reason: format!("{k:?} is set by the reader itself and cannot be overridden"),
            });
        }
        Ok(())
    }

    pub(crate) fn client_config(&self) -> Result<ClientConfig, ConfigError> {
        self.validate()?;
        let mut c = ClientConfig::new();
        for (k, v) in &self.librdkafka_options {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.bootstrap_servers)
            // librdkafka needs a group id for a consumer handle even when it
            // only assigns partitions; nothing is ever committed to it.
            .set("group.id", "dualstream-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", self.fetch_wait_max_ms.to_string())
            .set("queued.max.messages.kbytes", self.prefetch_max_kbytes.to_string())
            .set("fetch.max.bytes", self.fetch_max_bytes.to_string());
        Ok(c)
    }
}

/// What the [`Hub`](crate::Hub) does with a local subscriber whose buffer is
/// full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Drop the notifications that do not fit and tell the subscriber how
    /// many it missed ([`LiveItem::Lagged`](crate::LiveItem::Lagged)) as soon
    /// as it has room again.
    #[default]
    Signal,
    /// Remove the subscriber: its stream yields what was buffered, then
    /// [`LiveItem::Dropped`](crate::LiveItem::Dropped), then ends.
    Disconnect,
}

/// Configuration of the [`Hub`](crate::Hub).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Redis URL. Default: `redis://127.0.0.1:6379`. Not used when
    /// `cluster_urls` is set.
    pub url: String,
    /// Redis Cluster mode: the URLs of some nodes of the cluster (the
    /// others are found from them). When not empty, the hub subscribes
    /// with sharded Pub/Sub (`SSUBSCRIBE`, Redis 7), one connection per
    /// master, and receives what a notifier with `cluster_urls` sends;
    /// patterns are refused (sharded Pub/Sub has none). Default: empty.
    pub cluster_urls: Vec<String>,
    /// Channel prefix, as the notifier's. Default: `events`.
    pub channel_prefix: String,
    /// Items each local subscriber may have waiting. Default: 1,024.
    pub subscriber_buffer: usize,
    /// What happens when a subscriber's buffer is full.
    pub overflow: Overflow,
    /// Bound on connecting, and on Redis's silence while a SUBSCRIBE-like
    /// command or a ping waits for its answer, in milliseconds: when one has
    /// waited this long and nothing else arrived for as long either, the
    /// connection counts as lost. (During a burst the answers queue behind
    /// the messages, which show the connection is alive.) None of them holds
    /// up delivery meanwhile. Default: 2,000.
    pub timeout_ms: u64,
    /// Interval between liveness pings on the subscription connection, in
    /// milliseconds; a failed ping counts as a lost connection. Default:
    /// 5,000.
    pub ping_interval_ms: u64,
    /// Backoff before the first reconnection attempt, in milliseconds; it
    /// doubles after each failed attempt, up to `reconnect_max_ms`, and
    /// starts again from here once a connection was live. Each wait is drawn
    /// uniformly between half the backoff and the backoff (jitter), so a
    /// fleet of gateways that lost Redis together does not reconnect in
    /// step. Default: 100.
    pub reconnect_min_ms: u64,
    /// Largest backoff between reconnection attempts, in milliseconds (the
    /// waits are drawn from half of it up to it). Default: 2,000.
    pub reconnect_max_ms: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            cluster_urls: Vec::new(),
            channel_prefix: "events".to_owned(),
            subscriber_buffer: 1_024,
            overflow: Overflow::Signal,
            timeout_ms: 2_000,
            ping_interval_ms: 5_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 2_000,
        }
    }
}

impl HubConfig {
    /// Check every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use deadpool_redis::redis::IntoConnectionInfo;
        self.url
            .as_str()
            .into_connection_info()
            .map_err(|e| ConfigError::Invalid { field: "url", reason: e.to_string() })?;
        dualstream_channel::check_cluster_urls(&self.cluster_urls, |url| {
            url.into_connection_info().map(|i| i.redis_settings().db()).map_err(|e| e.to_string())
        })
        .map_err(|reason| ConfigError::Invalid { field: "cluster_urls", reason })?;
        dualstream_channel::ChannelNamer::with_prefix(self.channel_prefix.clone())
            .map_err(|e| ConfigError::Invalid { field: "channel_prefix", reason: e.to_string() })?;
        range("subscriber_buffer", self.subscriber_buffer as u64, 1, 16_777_216)?;
        range("timeout_ms", self.timeout_ms, 1, 600_000)?;
        range("ping_interval_ms", self.ping_interval_ms, 10, 3_600_000)?;
        range("reconnect_min_ms", self.reconnect_min_ms, 1, 3_600_000)?;
        range("reconnect_max_ms", self.reconnect_max_ms, self.reconnect_min_ms, 3_600_000)?;
        Ok(())
    }
}

/// Configuration of a [`CatchUp`](crate::CatchUp) join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinConfig {
    /// Items a join may have ready before its reader waits for the caller.
    /// Default: 256.
    pub buffer: usize,
    /// How often the shared watermark poller reads the watermarks of every
    /// partition a join watches, and how long a join waits without a live
    /// item before it compares with the high watermark and delivers anything
    /// missed, in milliseconds. Bounds how late an event whose notification
    /// was lost can be. Default: 1,000.
    pub idle_check_ms: u64,
    /// Records of each partition the shared reader keeps in memory, so that
    /// the checks after a notification jump or an idle period read memory
    /// rather than Kafka. Default: 4,096.
    pub cache_records: usize,
    /// Kafka consumers per topic that serve reads older than the cache (a
    /// resume from minutes ago, from offset 0), so that such a read never
    /// moves the shared tail reader back for every join. A partition always
    /// goes to the same one. Default: 2.
    pub backfill_readers: usize,
}

impl Default for JoinConfig {
    fn default() -> Self {
        Self { buffer: 256, idle_check_ms: 1_000, cache_records: 4_096, backfill_readers: 2 }
    }
}

impl JoinConfig {
    /// Check every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        range("buffer", self.buffer as u64, 1, 16_777_216)?;
        range("idle_check_ms", self.idle_check_ms, 10, 3_600_000)?;
        range("cache_records", self.cache_records as u64, 0, 16_777_216)?;
        range("backfill_readers", self.backfill_readers as u64, 1, 64)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ReplayConfig::default().validate().expect("replay");
        HubConfig::default().validate().expect("hub");
        JoinConfig::default().validate().expect("join");
    }

    #[test]
    fn errors_name_the_field_and_the_limit() {
        let c = ReplayConfig { fetch_wait_max_ms: 400_000, ..ReplayConfig::default() };
        assert_eq!(
            c.validate(),
            Err(ConfigError::Invalid { field: "fetch_wait_max_ms", reason: "400000 is outside 0..=300000".into() })
        );
        let c = ReplayConfig {
            librdkafka_options: [("group.id".to_owned(), "x".to_owned())].into(),
            ..ReplayConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "librdkafka_options", .. })));
        // The reader's own fetch bounds are fields, never silently overridden.
        let c = ReplayConfig {
            librdkafka_options: [("fetch.max.bytes".to_owned(), "52428800".to_owned())].into(),
            ..ReplayConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "librdkafka_options", .. })));
        let c = ReplayConfig { fetch_max_bytes: 100, ..ReplayConfig::default() };
        assert_eq!(
            c.validate(),
            Err(ConfigError::Invalid { field: "fetch_max_bytes", reason: "100 is outside 1024..=2147483135".into() })
        );
        let c = ReplayConfig { topic: TopicRouting::Single { topic: "bad topic".into() }, ..ReplayConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "topic", .. })));
        let c = HubConfig { subscriber_buffer: 0, ..HubConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "subscriber_buffer", .. })));
        let c = HubConfig { reconnect_min_ms: 10, reconnect_max_ms: 5, ..HubConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "reconnect_max_ms", .. })));
        let c = HubConfig { url: "nope://".into(), ..HubConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "url", .. })));
        for bad in ["nope://", "redis://h:1/2"] {
            let c = HubConfig { cluster_urls: vec!["redis://h:1".into(), bad.into()], ..HubConfig::default() };
            assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "cluster_urls", .. })), "{bad}");
        }
        let c = JoinConfig { buffer: 0, ..JoinConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "buffer", .. })));
        let c = JoinConfig { backfill_readers: 0, ..JoinConfig::default() };
        assert_eq!(
            c.validate(),
            Err(ConfigError::Invalid { field: "backfill_readers", reason: "0 is outside 1..=64".into() })
        );
    }
}
