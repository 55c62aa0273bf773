use std::time::Duration;

use dualstream_core::{check_range, FieldError};
use serde::{Deserialize, Serialize};

/// How the publisher uses its two paths (docs/design.md, "Choosing streams").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Durable write, then a notification. The default.
    #[default]
    Dual,
    /// Durable write only: must not lose the event, nobody watches live.
    DurableOnly,
    /// Notification only: must be seen at once, loss acceptable. The receipt
    /// has no position.
    RealtimeOnly,
    /// Durable writes as usual; notifications go to a bounded queue that a
    /// background task drains in pipelined batches. A full queue skips the
    /// notification (counted) rather than slow the durable path.
    HighVolume,
}

/// The high-volume mode's notification queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HighVolumeConfig {
    /// Notifications the queue holds. Default: 65,536.
    pub queue_capacity: usize,
    /// Most notifications in one pipeline. Default: 512. While the queue
    /// is short, pipelines carry at most 64 (or `max_batch`, if smaller);
    /// as it grows, the queue shared by the pipelines in flight, up to this.
    pub max_batch: usize,
    /// Pipelines in flight at once, started in queue order. With one, each
    /// pipeline waits for the last one's answer, so a single slow answer
    /// holds up everything queued behind it. With more than one, a custom
    /// notifier must send concurrent calls in the order they were started,
    /// as the Redis notifier's one multiplexed connection does. Default: 2.
    pub pipelines: usize,
}

impl Default for HighVolumeConfig {
    fn default() -> Self {
        Self { queue_capacity: 65_536, max_batch: 512, pipelines: 2 }
    }
}

/// Configuration of a [`DualPublisher`](crate::DualPublisher).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublisherConfig {
    /// The mode. Default: dual.
    pub mode: Mode,
    /// Bound on each notifier call made by the publisher, in milliseconds,
    /// on top of the notifier's own timeout. Default: 250.
    pub notify_timeout_ms: u64,
    /// Added to the bound of a call per notification it carries, in
    /// microseconds, so that a large pipeline (the batching engine merges
    /// what waits) is not failed for its size alone. Default: 20 (Redis
    /// takes a few microseconds per PUBLISH, more on a loaded machine). Callers of the batching engine
    /// still wait at most `notify_timeout_ms` for the outcome.
    pub notify_timeout_per_notification_us: u64,
    /// Bound on a notification pipeline sent in the background, in
    /// milliseconds, plus `notify_timeout_per_notification_us` per
    /// notification: the batching engine's merged pipelines (whose callers
    /// stop waiting at `notify_timeout_ms`) and the high-volume mode's. It
    /// covers the notifier making a connection first (the Redis notifier's
    /// `connect_timeout_ms`). Default: 2,000.
    pub pipeline_timeout_ms: u64,
    /// Settings of the high-volume mode.
    pub high_volume: HighVolumeConfig,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Dual,
            notify_timeout_ms: 250,
            notify_timeout_per_notification_us: 20,
            pipeline_timeout_ms: 2_000,
            high_volume: HighVolumeConfig::default(),
        }
    }
}

impl PublisherConfig {
    /// The bound of one notifier call a caller waits for, carrying `count`
    /// notifications.
    pub(crate) fn notify_bound(&self, count: usize) -> Duration {
        Duration::from_millis(self.notify_timeout_ms) + self.per_notification(count)
    }

    /// The bound of one background pipeline of `count` notifications.
    pub(crate) fn pipeline_bound(&self, count: usize) -> Duration {
        Duration::from_millis(self.pipeline_timeout_ms) + self.per_notification(count)
    }

    fn per_notification(&self, count: usize) -> Duration {
        Duration::from_micros(self.notify_timeout_per_notification_us.saturating_mul(count as u64))
    }

    /// Check every field.
    pub fn validate(&self) -> Result<(), BuildError> {
        check_range("notify_timeout_ms", self.notify_timeout_ms, 1, 60_000)?;
        check_range("pipeline_timeout_ms", self.pipeline_timeout_ms, 1, 600_000)?;
        check_range("notify_timeout_per_notification_us", self.notify_timeout_per_notification_us, 0, 10_000)?;
        check_range("high_volume.queue_capacity", self.high_volume.queue_capacity as u64, 1, 16_777_216)?;
        check_range("high_volume.max_batch", self.high_volume.max_batch as u64, 1, 100_000)?;
        check_range("high_volume.pipelines", self.high_volume.pipelines as u64, 1, 64)?;
        Ok(())
    }
}

impl From<FieldError> for BuildError {
    fn from(e: FieldError) -> Self {
        Self::Invalid { field: e.field, reason: e.reason }
    }
}

/// Why a publisher could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The mode needs a durable sink and none was given.
    #[error("mode {mode:?} needs a durable sink: call .durable(...)")]
    MissingDurable {
        /// The mode.
        mode: Mode,
    },
    /// The mode needs a notifier and none was given.
    #[error("mode {mode:?} needs a real-time notifier: call .notifier(...)")]
    MissingNotifier {
        /// The mode.
        mode: Mode,
    },
    /// A configuration field has a bad value.
    #[error("publisher config: {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The high-volume mode starts a task and needs a Tokio runtime.
    #[error("mode HighVolume must be built inside a Tokio runtime")]
    NoRuntime,
}
