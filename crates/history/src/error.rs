//! Why a replay, or a read of a join, failed: [`ReplayError`], shared by the
//! replay, the reader and the shared readers.

use dualstream_core::{DecodeError, Position};

use crate::config::ConfigError;

/// Why a replay (or a read of a join) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The request cannot work; names the field.
    #[error("replay request: {field}: {reason}")]
    Request {
        /// The field of the request.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Kafka refused or failed a call.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The topic does not exist (or has no partitions).
    #[error("topic {topic:?} does not exist or has no partitions")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// A record is not a valid dualstream event. The stream goes on after
    /// this item unless the request said to stop.
    #[error("record at {position} is not a valid dualstream event: {error}")]
    Decode {
        /// Where the record is.
        position: Position,
        /// What is wrong with it.
        error: DecodeError,
    },
    /// A look-up or an expected record did not arrive in time.
    #[error("{what} took longer than {timeout_ms} ms")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The bound (`ReplayConfig::timeout_ms`).
        timeout_ms: u64,
    },
    /// A background task of the reader failed.
    #[error("reader task failed: {0}")]
    Task(String),
    /// The requested start is below the first offset still stored: offsets
    /// `requested..first_available` of this partition were deleted
    /// (retention, delete-records). Yielded before the partition's first
    /// record; the stream goes on from `first_available`.
    #[error("{topic}/{partition}: offsets {requested}..{first_available} are no longer stored")]
    Truncated {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset asked for.
        requested: i64,
        /// The first offset still stored.
        first_available: i64,
    },
}

impl ReplayError {
    /// The same error again, for a cached failure (a `Decode` or `Config`
    /// error, which no look-up returns, becomes a `Task` error with its
    /// text).
    pub(crate) fn replica(&self) -> Self {
        match self {
            ReplayError::Kafka(e) => ReplayError::Kafka(e.clone()),
            ReplayError::UnknownTopic { topic } => ReplayError::UnknownTopic { topic: topic.clone() },
            ReplayError::Request { field, reason } => ReplayError::Request { field, reason: reason.clone() },
            ReplayError::Timeout { what, timeout_ms } => ReplayError::Timeout { what, timeout_ms: *timeout_ms },
            ReplayError::Truncated { topic, partition, requested, first_available } => ReplayError::Truncated {
                topic: topic.clone(),
                partition: *partition,
                requested: *requested,
                first_available: *first_available,
            },
            other => ReplayError::Task(other.to_string()),
        }
    }
}
