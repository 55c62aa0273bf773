use std::collections::BTreeMap;
use std::time::Duration;

use dualstream_core::{check_range, FieldError};
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

impl From<FieldError> for ConfigError {
    fn from(e: FieldError) -> Self {
        Self::Invalid { field: e.field, reason: e.reason }
    }
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
/// the shared readers, [`History`](crate::History), of `dualstream-consumer`'s
/// `CatchUp` join).
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
        check_range("fetch_wait_max_ms", self.fetch_wait_max_ms, 0, 300_000)?;
        check_range("prefetch_max_kbytes", self.prefetch_max_kbytes.into(), 1, 2_097_151)?;
        check_range("fetch_max_bytes", self.fetch_max_bytes.into(), 1_024, 2_147_483_135)?;
        check_range("timeout_ms", self.timeout_ms, 1, 3_600_000)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ReplayConfig::default().validate().expect("replay");
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
    }
}
