use std::time::Duration;

use dualstream_core::{check_range, FieldError};
use serde::{Deserialize, Serialize};

/// Circuit breaker settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default: 3.
    pub failure_threshold: u32,
    /// First wait before probing, in milliseconds. Default: 250.
    pub open_min_ms: u64,
    /// Longest wait between probes, in milliseconds (the wait doubles after
    /// each failed probe). Default: 2,000.
    pub open_max_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 3, open_min_ms: 250, open_max_ms: 2_000 }
    }
}

/// Configuration of the [`RedisNotifier`](crate::RedisNotifier).
///
/// Unknown fields are refused. There is no pool size: the notifier sends
/// everything over one multiplexed connection (Redis pipelines the calls on
/// it), so a `pool_max_size` of older versions is refused as an unknown
/// field rather than silently ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisNotifierConfig {
    /// Redis URL. Default: `redis://127.0.0.1:6379`. Not used when
    /// `cluster_urls` is set.
    pub url: String,
    /// Redis Cluster mode: the URLs of some nodes of the cluster (the
    /// others are found from them). When not empty, notifications are sent
    /// with `SPUBLISH` (sharded Pub/Sub, Redis 7) to the master that serves
    /// each channel's slot, and `url` is not used. Default: empty (one
    /// Redis, `PUBLISH`).
    pub cluster_urls: Vec<String>,
    /// Bound on every call (sending a pipeline or a PUBLISH and its answer),
    /// in milliseconds; waiting for a connection being made is bounded by
    /// `connect_timeout_ms` instead. Default: 200.
    pub timeout_ms: u64,
    /// Added to a pipeline's bound per notification it carries, in
    /// microseconds: Redis takes a few microseconds per PUBLISH (more on a
    /// loaded machine, and with pattern subscribers), so a large
    /// pipeline is not failed (and the breaker not opened) for its size
    /// alone. Default: 20.
    pub timeout_per_notification_us: u64,
    /// Bound on making a connection (TCP and the Redis handshake, a few
    /// round trips), in milliseconds. A connection is made in a task of its
    /// own, so a call that gives up does not cancel it. Default: 1,000.
    pub connect_timeout_ms: u64,
    /// Channel prefix. Default: `events`.
    pub channel_prefix: String,
    /// Also publish every notification to the aggregate channel of its
    /// source type (`events:user`). Default: off.
    pub aggregate_channels: bool,
    /// Shortest interval between two warnings about skipped or failed
    /// notifications, in milliseconds. Default: 5,000.
    pub warn_interval_ms: u64,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
}

impl Default for RedisNotifierConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            cluster_urls: Vec::new(),
            timeout_ms: 200,
            timeout_per_notification_us: 20,
            connect_timeout_ms: 1_000,
            channel_prefix: "events".to_owned(),
            aggregate_channels: false,
            warn_interval_ms: 5_000,
            breaker: BreakerConfig::default(),
        }
    }
}

/// A configuration value that cannot work. Each variant names the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field has a bad value.
    #[error("redis config: {field}: {reason}")]
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

impl RedisNotifierConfig {
    /// The call bound.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Whether the notifier runs in Redis Cluster mode (`cluster_urls` set).
    pub fn is_cluster(&self) -> bool {
        !self.cluster_urls.is_empty()
    }

    /// Check every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use deadpool_redis::redis::IntoConnectionInfo;
        self.url
            .as_str()
            .into_connection_info()
            .map_err(|e| ConfigError::Invalid { field: "url", reason: e.to_string() })?;
        check_cluster_urls(&self.cluster_urls)
            .map_err(|reason| ConfigError::Invalid { field: "cluster_urls", reason })?;
        check_range("timeout_ms", self.timeout_ms, 1, 60_000)?;
        check_range("timeout_per_notification_us", self.timeout_per_notification_us, 0, 10_000)?;
        check_range("connect_timeout_ms", self.connect_timeout_ms, 1, 60_000)?;
        check_range("warn_interval_ms", self.warn_interval_ms, 0, 3_600_000)?;
        check_range("breaker.failure_threshold", self.breaker.failure_threshold.into(), 1, 1_000_000)?;
        check_range("breaker.open_min_ms", self.breaker.open_min_ms, 1, 3_600_000)?;
        check_range("breaker.open_max_ms", self.breaker.open_max_ms, self.breaker.open_min_ms, 3_600_000)?;
        dualstream_channel::ChannelNamer::with_prefix(self.channel_prefix.clone())
            .map_err(|e| ConfigError::Invalid { field: "channel_prefix", reason: e.to_string() })?;
        Ok(())
    }
}

/// Check the node URLs of a Redis Cluster configuration (`cluster_urls` of
/// the notifier, and of `dualstream-hub`'s hub): each must be a Redis URL,
/// and select database 0, the only one a cluster has. The error names the
/// entry.
pub fn check_cluster_urls(urls: &[String]) -> Result<(), String> {
    use deadpool_redis::redis::IntoConnectionInfo;
    for (i, url) in urls.iter().enumerate() {
        let db = url
            .as_str()
            .into_connection_info()
            .map(|info| info.redis_settings().db())
            .map_err(|e| format!("entry {i} ({url:?}): {e}"))?;
        if db != 0 {
            return Err(format!("entry {i} ({url:?}) selects database {db}: a cluster has database 0 only"));
        }
    }
    Ok(())
}
