use std::collections::BTreeMap;
use dualstream_core::{check_range, FieldError};
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Where events go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TopicRouting {
    /// Every event to one topic.
    Single {
        /// The topic.
        topic: String,
    },
    /// One topic per source type, named by a template that contains
    /// `{source_type}`, for example `events.{source_type}`.
    PerSourceType {
        /// The template.
        template: String,
    },
}

impl Default for TopicRouting {
    fn default() -> Self {
        Self::Single { topic: "events".to_owned() }
    }
}

impl TopicRouting {
    /// The topic for a source type.
    pub fn topic_for(&self, source_type: &str) -> String {
        match self {
            Self::Single { topic } => topic.clone(),
            Self::PerSourceType { template } => template.replace("{source_type}", source_type),
        }
    }
}

/// Record batch compression (`compression.type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// No compression.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// zstd (needs the `zstd` feature).
    Zstd,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Snappy => "snappy",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

/// Create missing topics with these settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTopics {
    /// Partitions of a new topic.
    pub partitions: i32,
    /// Replication factor of a new topic.
    pub replication_factor: i32,
}

/// Configuration of the [`KafkaSink`](crate::KafkaSink).
///
/// `acks=all` and `enable.idempotence=true` are always set and cannot be
/// changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Comma-separated `host:port` list of bootstrap brokers
    /// (`bootstrap.servers`). Default: `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Topic routing. Default: every event to the topic `events`.
    pub topic: TopicRouting,
    /// Compression (`compression.type`). Default: none.
    pub compression: Compression,
    /// How long the producer waits to fill a batch (`linger.ms`). Default: 5.
    pub linger_ms: u64,
    /// Largest record batch in bytes (`batch.size`). Default: 1,000,000.
    pub batch_size_bytes: u32,
    /// Most records in one batch (`batch.num.messages`). Default: 10,000.
    pub batch_num_messages: u32,
    /// Delivery deadline in milliseconds: a publish not acknowledged by then
    /// fails with a timeout (`message.timeout.ms`). Default: 30,000.
    pub message_timeout_ms: u64,
    /// How long a publish waits for room when the local queue is full, in
    /// milliseconds, before failing with "queue full". Default: 5,000.
    pub enqueue_timeout_ms: u64,
    /// Most records in the local queue (`queue.buffering.max.messages`).
    /// Default: 100,000.
    pub queue_max_messages: u32,
    /// Most kilobytes in the local queue (`queue.buffering.max.kbytes`).
    /// Default: 262,144 (256 MiB).
    pub queue_max_kbytes: u32,
    /// Timeout of a health check, in milliseconds. Default: 5,000.
    pub health_timeout_ms: u64,
    /// Create missing topics with these settings (health check and first
    /// use). Default: off.
    pub create_topics: Option<CreateTopics>,
    /// Extra librdkafka options, for anything not typed above (TLS, SASL,
    /// client id…). Refused (with or without librdkafka's `topic.` prefix):
    /// a key that a typed field sets, `acks`, `request.required.acks` and
    /// `enable.idempotence` (durability), and `partitioner` and
    /// `partitioner_cb` (the consumer locates a source's partition with
    /// librdkafka's default partitioner). `message.max.bytes` (librdkafka's
    /// range, 1,000 to 1,000,000,000) is also the sink's record size limit:
    /// see [`message_max_bytes`](Self::message_max_bytes).
    pub librdkafka_options: BTreeMap<String, String>,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".to_owned(),
            topic: TopicRouting::default(),
            compression: Compression::None,
            linger_ms: 5,
            batch_size_bytes: 1_000_000,
            batch_num_messages: 10_000,
            message_timeout_ms: 30_000,
            enqueue_timeout_ms: 5_000,
            queue_max_messages: 100_000,
            queue_max_kbytes: 262_144,
            health_timeout_ms: 5_000,
            create_topics: None,
            librdkafka_options: BTreeMap::new(),
        }
    }
}

/// librdkafka's default `message.max.bytes`: the largest record (key, value,
/// headers and framing) its producer accepts unless configured otherwise.
pub const LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The raw option the sink reads its record size limit from.
const MESSAGE_MAX_BYTES: &str = "message.max.bytes";

/// librdkafka keys owned by typed fields (aliases included).
const TYPED_KEYS: &[(&str, &str)] = &[
    ("bootstrap.servers", "bootstrap_servers"),
    ("metadata.broker.list", "bootstrap_servers"),
    ("compression.type", "compression"),
    ("compression.codec", "compression"),
    ("linger.ms", "linger_ms"),
    ("queue.buffering.max.ms", "linger_ms"),
    ("batch.size", "batch_size_bytes"),
    ("batch.num.messages", "batch_num_messages"),
    ("message.timeout.ms", "message_timeout_ms"),
    ("delivery.timeout.ms", "message_timeout_ms"),
    ("queue.buffering.max.messages", "queue_max_messages"),
    ("queue.buffering.max.kbytes", "queue_max_kbytes"),
];

/// librdkafka keys that would weaken the durability contract.
const LOCKED_KEYS: &[&str] = &["acks", "request.required.acks", "enable.idempotence"];

/// librdkafka keys that would change which partition a source's events go
/// to. The consumer finds a source's partition with librdkafka's default
/// partitioner ([`partition_for_key`]), so the sink must keep it.
const PARTITIONER_KEYS: &[&str] = &["partitioner", "partitioner_cb"];

/// The partition of a record key under librdkafka's default partitioner
/// (`consistent_random`): CRC-32 of the key modulo the partition count. The
/// Kafka sink keys every record by its source id and refuses any other
/// partitioner (`PARTITIONER_KEYS`), so this is the partition that holds all
/// events of a source.
pub fn partition_for_key(key: &[u8], partition_count: i32) -> i32 {
    if partition_count <= 0 {
        return 0;
    }
    (crc32fast::hash(key) % partition_count as u32) as i32
}

/// The name librdkafka resolves a raw key to: it ignores surrounding
/// whitespace here, and it accepts topic properties with a `topic.` prefix
/// (`topic.acks` sets `acks`). No global property named `topic.X` has an `X`
/// that is refused below, so stripping the prefix never refuses a legal key.
fn raw_name(key: &str) -> &str {
    let k = key.trim();
    k.strip_prefix("topic.").unwrap_or(k)
}

fn topic_name_ok(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!("{name:?} must be 1 to 249 characters"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a legal topic name"));
    }
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => Err(format!("{name:?} contains {c:?}; allowed: ASCII letters, digits, '.', '_' and '-'")),
        None => Ok(()),
    }
}

impl From<FieldError> for ConfigError {
    fn from(e: FieldError) -> Self {
        Self::Invalid { field: e.field, reason: e.reason }
    }
}

impl KafkaSinkConfig {
    /// The delivery deadline.
    pub fn message_timeout(&self) -> Duration {
        Duration::from_millis(self.message_timeout_ms)
    }

    /// The producer's effective `message.max.bytes`: the raw option when set
    /// in `librdkafka_options`, else librdkafka's default (1,000,000). The
    /// sink refuses a record larger than this before handing it to
    /// librdkafka ([`SinkError::RecordTooLarge`](dualstream_core::SinkError::RecordTooLarge)).
    pub fn message_max_bytes(&self) -> usize {
        self.raw_message_max_bytes().and_then(Result::ok).unwrap_or(LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES)
    }

    fn raw_message_max_bytes(&self) -> Option<Result<usize, std::num::ParseIntError>> {
        let (_, v) = self.librdkafka_options.iter().find(|(k, _)| k.trim() == MESSAGE_MAX_BYTES)?;
        Some(v.trim().parse())
    }

    /// Check every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(ConfigError::Invalid { field: "bootstrap_servers", reason: "must not be empty".into() });
        }
        match &self.topic {
            TopicRouting::Single { topic } => {
                topic_name_ok(topic).map_err(|reason| ConfigError::Invalid { field: "topic.topic", reason })?
            }
            TopicRouting::PerSourceType { template } => {
                if !template.contains("{source_type}") {
                    return Err(ConfigError::Invalid {
                        field: "topic.template",
                        reason: format!("{template:?} must contain {{source_type}}"),
                    });
                }
                // Source types are at most 64 characters of the topic charset.
                topic_name_ok(&template.replace("{source_type}", "x"))
                    .map_err(|reason| ConfigError::Invalid { field: "topic.template", reason })?;
                if template.replace("{source_type}", "").len() + 64 > 249 {
                    return Err(ConfigError::Invalid {
                        field: "topic.template",
                        reason: "too long: with a 64-character source type the topic would exceed 249 characters"
                            .into(),
                    });
                }
            }
        }
        check_range("linger_ms", self.linger_ms, 0, 900_000)?;
        check_range("batch_size_bytes", self.batch_size_bytes.into(), 1, 2_147_483_647)?;
        check_range("batch_num_messages", self.batch_num_messages.into(), 1, 1_000_000)?;
        check_range("message_timeout_ms", self.message_timeout_ms, 1, 2_147_483_647)?;
        check_range("enqueue_timeout_ms", self.enqueue_timeout_ms, 0, 3_600_000)?;
        check_range("queue_max_messages", self.queue_max_messages.into(), 1, 2_147_483_647)?;
        check_range("queue_max_kbytes", self.queue_max_kbytes.into(), 1, 2_147_483_647)?;
        check_range("health_timeout_ms", self.health_timeout_ms, 1, 3_600_000)?;
        if let Some(c) = &self.create_topics {
            check_range("create_topics.partitions", c.partitions.max(0) as u64, 1, 1_000_000)?;
            check_range("create_topics.replication_factor", c.replication_factor.max(0) as u64, 1, 32_767)?;
        }
        if let Some(v) = self.raw_message_max_bytes() {
            let field = "librdkafka_options.message.max.bytes";
            let v = v.map_err(|e| ConfigError::Invalid { field, reason: e.to_string() })?;
            // librdkafka's own range for the option.
            check_range(field, v as u64, 1_000, 1_000_000_000)?;
        }
        for key in self.librdkafka_options.keys() {
            let k = raw_name(key);
            if LOCKED_KEYS.contains(&k) {
                return Err(ConfigError::Unsafe { raw_key: key.clone() });
            }
            if PARTITIONER_KEYS.contains(&k) {
                return Err(ConfigError::Partitioner { raw_key: key.clone() });
            }
            if let Some((_, field)) = TYPED_KEYS.iter().find(|(raw, _)| *raw == k) {
                return Err(ConfigError::Conflict { raw_key: key.clone(), field });
            }
        }
        Ok(())
    }

    /// The librdkafka configuration this sink uses (validated). Build a raw
    /// producer from it to compare like with like.
    pub fn client_config(&self) -> Result<ClientConfig, ConfigError> {
        self.validate()?;
        let mut c = ClientConfig::new();
        for (k, v) in &self.librdkafka_options {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", self.compression.as_str())
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.size", self.batch_size_bytes.to_string())
            .set("batch.num.messages", self.batch_num_messages.to_string())
            .set("message.timeout.ms", self.message_timeout_ms.to_string())
            .set("queue.buffering.max.messages", self.queue_max_messages.to_string())
            .set("queue.buffering.max.kbytes", self.queue_max_kbytes.to_string());
        Ok(c)
    }
}
