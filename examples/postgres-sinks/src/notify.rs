//! The real-time notifier: PostgreSQL `NOTIFY`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dualstream_channel::{ChannelError, ChannelNamer};
use dualstream_core::{Notification, NotifyError, RealtimeNotifier};
use serde::{Deserialize, Serialize};

use crate::conn::{check_range, quote_ident, ConfigError, Conn, ConnectionConfig, PgError, Slot};

/// The longest `NOTIFY` payload PostgreSQL takes, in bytes: it refuses
/// 8,000 and more (`NOTIFY_PAYLOAD_MAX_LENGTH` with the default 8 kB block
/// size).
pub const MAX_PAYLOAD_BYTES: usize = 7_999;

/// The longest channel name, in bytes: a channel is an identifier, and
/// PostgreSQL's identifiers take at most 63 bytes (`NAMEDATALEN` - 1).
/// `pg_notify` refuses a longer one, while `LISTEN` would cut it short and
/// so listen on another channel.
pub const MAX_CHANNEL_BYTES: usize = 63;

/// Which channels a notification goes to. `LISTEN` has no patterns, so a
/// listener that follows a whole source type needs the per-type channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelScope {
    /// `{prefix}:{source_type}:{source_id}`, as the Redis notifier names
    /// them (the source id %-escaped). The default.
    #[default]
    PerSource,
    /// `{prefix}:{source_type}`, the aggregate channel of the source type.
    PerSourceType,
    /// Both: every notification is sent twice.
    Both,
}

/// Configuration of a [`PgNotifier`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgNotifierConfig {
    /// How to reach PostgreSQL.
    pub connection: ConnectionConfig,
    /// The channel prefix. Default: `events`.
    pub channel_prefix: String,
    /// Which channels each notification goes to. Default: per source.
    pub channels: ChannelScope,
    /// Bound on one call, in milliseconds (the publisher adds its own,
    /// `notify_timeout_ms`). Default: 1,000.
    pub timeout_ms: u64,
}

impl Default for PgNotifierConfig {
    fn default() -> Self {
        Self {
            connection: ConnectionConfig::default(),
            channel_prefix: "events".to_owned(),
            channels: ChannelScope::PerSource,
            timeout_ms: 1_000,
        }
    }
}

/// Why a notification was not sent. The notifier returns it inside
/// [`NotifyError::Other`]; find it with
/// `error.downcast_ref::<PgNotifyError>()`. None of them is retriable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgNotifyError {
    /// The notification's JSON is longer than `NOTIFY` takes.
    #[error("notification of {bytes} bytes for channel {channel:?} exceeds the NOTIFY payload limit of {max} bytes")]
    PayloadTooLarge {
        /// The channel.
        channel: String,
        /// The JSON's length in bytes.
        bytes: usize,
        /// [`MAX_PAYLOAD_BYTES`].
        max: usize,
    },
    /// The channel name is longer than a PostgreSQL identifier (a long
    /// source id): use [`ChannelScope::PerSourceType`], or shorter ids.
    #[error("channel {channel:?} is {bytes} bytes, longer than PostgreSQL's {max}-byte channel names")]
    ChannelTooLong {
        /// The channel name.
        channel: String,
        /// Its length in bytes.
        bytes: usize,
        /// [`MAX_CHANNEL_BYTES`].
        max: usize,
    },
    /// The notification's source type is not an identifier (a notification
    /// built by hand).
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// A [`RealtimeNotifier`] on PostgreSQL's `LISTEN`/`NOTIFY`: each
/// notification's JSON ([`Notification::to_json`]) is the payload of a
/// `NOTIFY` on the channel of its source.
///
/// - **Batches**: one statement (`pg_notify` over the arrays, in order), so
///   one round trip and one transaction: listeners get the whole batch, in
///   order, when it commits.
/// - **Limits**: a payload of more than [`MAX_PAYLOAD_BYTES`] or a channel
///   of more than [`MAX_CHANNEL_BYTES`] is refused before anything is sent,
///   with a [`PgNotifyError`]; the other notifications of the batch are
///   still sent, and the call returns the first such error. With the default
///   event limits a notification is far below 8,000 bytes; only raised
///   limits or a long log name get there.
/// - **Order**: calls go through one connection, each call's statement sent
///   before the next call's, so concurrent calls are delivered in the order
///   they started (which the batching engine's `notify_pipelines` needs).
/// - **Best effort, bounded**: every call within `timeout_ms`; while
///   PostgreSQL is down calls fail at once (`reconnect_backoff_ms`).
///
/// `NOTIFY` reaches only the sessions listening at that moment: a listener
/// that reconnects catches up from the outbox by its source's position.
///
/// Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct PgNotifier {
    inner: Arc<Inner>,
}

struct Inner {
    config: PgNotifierConfig,
    namer: ChannelNamer,
    slot: Slot,
}

impl std::fmt::Debug for PgNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgNotifier").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl PgNotifier {
    /// A notifier; it connects at its first call, so it can be made while
    /// PostgreSQL is down.
    pub fn new(config: PgNotifierConfig) -> Result<Self, ConfigError> {
        check_range("timeout_ms", config.timeout_ms, 1..=600_000)?;
        let namer = ChannelNamer::with_prefix(config.channel_prefix.clone())
            .map_err(|e| ConfigError::Invalid { field: "channel_prefix", reason: e.to_string() })?;
        let setup = format!("SET statement_timeout = {}", config.timeout_ms);
        // In array order: a subquery with ORDER BY is never flattened.
        let statements = vec!["SELECT pg_notify(c, p) FROM (SELECT c, p FROM unnest($1::text[], $2::text[]) \
                               WITH ORDINALITY AS t(c, p, i) ORDER BY i) AS ordered"
            .to_owned()];
        let slot = Slot::new(&config.connection, "dualstream-notify", setup, statements)?;
        Ok(Self { inner: Arc::new(Inner { config, namer, slot }) })
    }

    /// The configuration.
    pub fn config(&self) -> &PgNotifierConfig {
        &self.inner.config
    }

    /// The channels a notification goes to, each checked against
    /// [`MAX_CHANNEL_BYTES`]. A listener uses the same names.
    pub fn channels(&self, source_type: &str, source_id: &str) -> Vec<Result<String, PgNotifyError>> {
        let scope = self.inner.config.channels;
        let mut out = Vec::with_capacity(2);
        if scope != ChannelScope::PerSourceType {
            let mut channel = String::new();
            self.inner.namer.write_channel(source_type, source_id, &mut channel);
            out.push(check_channel(channel));
        }
        if scope != ChannelScope::PerSource {
            out.push(self.inner.namer.aggregate(source_type).map_err(PgNotifyError::from).and_then(check_channel));
        }
        out
    }

    /// `LISTEN` for a channel, quoted (channel names are case-sensitive and
    /// hold `:`).
    pub fn listen_sql(channel: &str) -> String {
        format!("LISTEN {}", quote_ident(channel))
    }
}

fn check_channel(channel: String) -> Result<String, PgNotifyError> {
    if channel.len() > MAX_CHANNEL_BYTES {
        return Err(PgNotifyError::ChannelTooLong { bytes: channel.len(), channel, max: MAX_CHANNEL_BYTES });
    }
    Ok(channel)
}

#[async_trait]
impl RealtimeNotifier for PgNotifier {
    async fn notify(&self, notification: &Notification) -> Result<(), NotifyError> {
        self.notify_batch(std::slice::from_ref(notification)).await
    }

    async fn notify_batch(&self, notifications: &[Notification]) -> Result<(), NotifyError> {
        let mut channels = Vec::with_capacity(notifications.len());
        let mut payloads = Vec::with_capacity(notifications.len());
        let mut refused: Option<PgNotifyError> = None;
        for n in notifications {
            let json = String::from_utf8_lossy(&n.to_json()).into_owned();
            for channel in self.channels(&n.source_type, &n.source_id) {
                let checked = channel.and_then(|channel| match json.len() {
                    bytes if bytes > MAX_PAYLOAD_BYTES => {
                        Err(PgNotifyError::PayloadTooLarge { channel, bytes, max: MAX_PAYLOAD_BYTES })
                    }
                    _ => Ok(channel),
                });
                match checked {
                    Ok(channel) => {
                        channels.push(channel);
                        payloads.push(json.clone());
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "notification refused");
                        refused.get_or_insert(e);
                    }
                }
            }
        }
        if !channels.is_empty() {
            let bound = Duration::from_millis(self.inner.config.timeout_ms);
            let statement = move |conn: Arc<Conn>| async move {
                conn.client.execute(&conn.statements[0], &[&channels, &payloads]).await
            };
            self.inner.slot.call(bound, statement).await.map_err(PgError::notify_error)?;
        }
        match refused {
            Some(e) => Err(NotifyError::Other(Box::new(e))),
            None => Ok(()),
        }
    }

    async fn health_check(&self) -> Result<(), NotifyError> {
        let bound = Duration::from_millis(self.inner.config.timeout_ms);
        let ping = |conn: Arc<Conn>| async move { conn.client.simple_query("SELECT 1").await };
        self.inner.slot.call(bound, ping).await.map(drop).map_err(PgError::notify_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier(channels: ChannelScope) -> PgNotifier {
        PgNotifier::new(PgNotifierConfig { channels, ..Default::default() }).expect("valid")
    }

    #[test]
    fn channels_are_named_like_redis_and_checked_for_length() {
        let per_source = notifier(ChannelScope::PerSource);
        let got: Vec<String> = per_source.channels("user", "a:b").into_iter().map(|c| c.expect("fits")).collect();
        assert_eq!(got, ["events:user:a%3Ab"]);
        let both = notifier(ChannelScope::Both);
        let got: Vec<String> = both.channels("user", "a").into_iter().map(|c| c.expect("fits")).collect();
        assert_eq!(got, ["events:user:a", "events:user"]);
        let fits = "x".repeat(MAX_CHANNEL_BYTES - "events:user:".len());
        assert!(per_source.channels("user", &fits)[0].is_ok());
        match &per_source.channels("user", &format!("{fits}x"))[0] {
            Err(PgNotifyError::ChannelTooLong { bytes: 64, max: 63, .. }) => {}
            other => panic!("expected ChannelTooLong, got {other:?}"),
        }
        assert!(matches!(&both.channels("no:pe", "a")[1], Err(PgNotifyError::Channel(_))));
    }

    #[test]
    fn config_is_checked() {
        let bad = PgNotifierConfig { channel_prefix: "a:b".into(), ..Default::default() };
        assert!(matches!(PgNotifier::new(bad), Err(ConfigError::Invalid { field: "channel_prefix", .. })));
        let bad = PgNotifierConfig { timeout_ms: 0, ..Default::default() };
        assert!(matches!(PgNotifier::new(bad), Err(ConfigError::Invalid { field: "timeout_ms", .. })));
        assert_eq!(PgNotifier::listen_sql("events:user:a\"b"), r#"LISTEN "events:user:a""b""#);
    }
}
