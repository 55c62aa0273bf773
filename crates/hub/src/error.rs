//! Why a hub call failed.

use crate::config::ConfigError;

/// Why a hub call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The channel or pattern cannot be subscribed to.
    #[error("invalid {field}: {reason}")]
    InvalidTarget {
        /// `channel` or `pattern`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The source's channel could not be named.
    #[error(transparent)]
    Channel(#[from] dualstream_channel::ChannelError),
    /// `Hub::new` was called outside a Tokio runtime.
    #[error("the hub needs a Tokio runtime: call Hub::new inside one")]
    NoRuntime,
    /// The hub's task has stopped.
    #[error("the hub has stopped")]
    Closed,
}
