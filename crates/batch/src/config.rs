use std::time::Duration;

use dualstream_core::{check_range, FieldError};
use serde::{Deserialize, Serialize};

/// Configuration of the [`BatchEngine`](crate::BatchEngine).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// The engine's name, the `engine` label of its metrics
    /// (`dualstream_batch_queue_depth`), so that several engines in one
    /// process are told apart. 1 to 64 ASCII letters, digits, `-`, `_` or
    /// `.`. Engines of the same name add up on one gauge. Default:
    /// `default`.
    pub name: String,
    /// Most events in one batch, a hard bound: what would take a batch past
    /// it (one event, or one lane's part of a `submit_many` chunk, which
    /// is never larger than this) starts the next batch. Default: 10,000
    /// (batches only grow this large while the previous batch of the lane
    /// is in flight, that is under load; larger produce requests cost the
    /// broker less per event).
    pub max_batch_events: usize,
    /// Bytes (payload and metadata) at which a lane stops adding to a
    /// batch. Default: 8 MiB. Not a hard bound: the last event, or
    /// `submit_many` part, taken in can take the batch past it.
    pub max_batch_bytes: usize,
    /// How long a lane waits for more events before handing over a batch
    /// that is not full, in milliseconds. Default: 0: a lane hands over what
    /// has queued up while it handed over the previous batch, and the
    /// producer's own linger (`KafkaSinkConfig::linger_ms`) groups records
    /// into requests, so the two waits do not stack.
    pub linger_ms: u64,
    /// Most events accepted and not yet resolved. Default: 100,000.
    pub max_queued_events: usize,
    /// Most bytes accepted and not yet resolved. Default: 128 MiB.
    pub max_queued_bytes: usize,
    /// How long `submit` waits for room in a full queue, in milliseconds.
    /// Default: 5,000.
    pub submit_timeout_ms: u64,
    /// Lanes; a source always uses the same lane, and each lane keeps the
    /// order of each source on both paths. Default: 16. An event waits for
    /// its whole batch's acknowledgements, so fewer lanes (larger batches)
    /// cost latency under load: at 20,000 events/s on two cores, 4 lanes
    /// added about 2 ms to the median against 16, which cost nothing
    /// measurable in the engine's micro benchmark or in CPU per event
    /// (docs/benchmark-analysis.md, "Lanes and latency").
    pub lanes: usize,
    /// Notification pipelines the engine keeps in flight (one notification
    /// stage serves every lane). Everything waiting
    /// when a pipeline starts goes into it, so a slow Redis costs latency,
    /// not throughput. Pipelines start in the order events are released
    /// (each source's in order, ack.rs); with more than one, a
    /// custom notifier must send concurrent calls in the order they were
    /// started, as the Redis notifier's one multiplexed connection does.
    /// Default: 2.
    pub notify_pipelines: usize,
    /// Batches a lane hands to the durable sink before the first of them is
    /// done: acknowledged, with every event released (an event also waits
    /// for the earlier events of its source). While all are out, the lane
    /// keeps collecting, so under load batches grow rather than multiply; at
    /// low load a batch goes at once. Each batch waits for the producer's linger before its
    /// acknowledgement, so too few slots would add that wait to the next
    /// batch. Default: 16.
    pub max_in_flight_batches: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            max_batch_events: 10_000,
            max_batch_bytes: 8 * 1024 * 1024,
            linger_ms: 0,
            max_queued_events: 100_000,
            max_queued_bytes: 128 * 1024 * 1024,
            submit_timeout_ms: 5_000,
            lanes: 16,
            notify_pipelines: 2,
            max_in_flight_batches: 16,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field has a bad value.
    #[error("batch config: {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The engine starts tasks and needs a Tokio runtime.
    #[error("the batch engine must be created inside a Tokio runtime")]
    NoRuntime,
}

impl From<FieldError> for ConfigError {
    fn from(e: FieldError) -> Self {
        Self::Invalid { field: e.field, reason: e.reason }
    }
}

/// Longest engine name, in bytes.
const MAX_NAME: usize = 64;

fn validate_name(name: &str) -> Result<(), ConfigError> {
    let invalid = |reason: String| Err(ConfigError::Invalid { field: "name", reason });
    if name.is_empty() || name.len() > MAX_NAME {
        return invalid(format!("{} bytes long; it must be 1..={MAX_NAME}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return invalid(format!("{c:?} is not an ASCII letter, digit, '-', '_' or '.'"));
    }
    Ok(())
}

impl BatchConfig {
    pub(crate) fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }

    pub(crate) fn submit_timeout(&self) -> Duration {
        Duration::from_millis(self.submit_timeout_ms)
    }

    /// Check every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name)?;
        check_range("max_batch_events", self.max_batch_events as u64, 1, 1_000_000)?;
        check_range("max_batch_bytes", self.max_batch_bytes as u64, 1, 1 << 32)?;
        check_range("linger_ms", self.linger_ms, 0, 60_000)?;
        // The queue bound is two semaphores (budget.rs): both bounds must fit
        // one (a smaller limit on 32-bit targets) and a u32.
        let permits = tokio::sync::Semaphore::MAX_PERMITS as u64;
        check_range("max_queued_events", self.max_queued_events as u64, 1, (1 << 30).min(permits))?;
        check_range("max_queued_bytes", self.max_queued_bytes as u64, 1024, (u32::MAX as u64).min(permits))?;
        check_range("submit_timeout_ms", self.submit_timeout_ms, 0, 3_600_000)?;
        check_range("lanes", self.lanes as u64, 1, 1_024)?;
        check_range("notify_pipelines", self.notify_pipelines as u64, 1, 64)?;
        check_range("max_in_flight_batches", self.max_in_flight_batches as u64, 1, 64)?;
        Ok(())
    }
}
