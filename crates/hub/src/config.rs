use dualstream_core::{check_range, FieldError};
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
        dualstream_redis::check_cluster_urls(&self.cluster_urls)
            .map_err(|reason| ConfigError::Invalid { field: "cluster_urls", reason })?;
        dualstream_channel::ChannelNamer::with_prefix(self.channel_prefix.clone())
            .map_err(|e| ConfigError::Invalid { field: "channel_prefix", reason: e.to_string() })?;
        check_range("subscriber_buffer", self.subscriber_buffer as u64, 1, 16_777_216)?;
        check_range("timeout_ms", self.timeout_ms, 1, 600_000)?;
        check_range("ping_interval_ms", self.ping_interval_ms, 10, 3_600_000)?;
        check_range("reconnect_min_ms", self.reconnect_min_ms, 1, 3_600_000)?;
        check_range("reconnect_max_ms", self.reconnect_max_ms, self.reconnect_min_ms, 3_600_000)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        HubConfig::default().validate().expect("hub");
    }

    #[test]
    fn errors_name_the_field_and_the_limit() {
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
    }
}
