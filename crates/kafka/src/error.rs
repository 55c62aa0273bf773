use std::time::Duration;

use dualstream_core::SinkError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// A configuration value that cannot work. Each variant names the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A typed field has a bad value.
    #[error("kafka config: {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// A raw librdkafka option sets what a typed field already sets.
    #[error(
        "kafka config: librdkafka_options.{raw_key:?} conflicts with the typed field `{field}`; set `{field}` instead"
    )]
    Conflict {
        /// The raw key.
        raw_key: String,
        /// The typed field that owns it.
        field: &'static str,
    },
    /// A raw librdkafka option would break the durability contract.
    #[error("kafka config: librdkafka_options.{raw_key:?} cannot be changed: dualstream always uses acks=all and enable.idempotence=true")]
    Unsafe {
        /// The raw key.
        raw_key: String,
    },
    /// A raw librdkafka option would change the partitioner. The consumer
    /// computes a source's partition with librdkafka's default partitioner,
    /// so another one would make replays of a source read the wrong
    /// partition without any error.
    #[error(
        "kafka config: librdkafka_options.{raw_key:?} cannot be set: dualstream always uses librdkafka's default \
         partitioner (CRC-32 of the source id), which the consumer uses to find a source's partition; another \
         partitioner would make replays read the wrong partition"
    )]
    Partitioner {
        /// The raw key.
        raw_key: String,
    },
    /// librdkafka refused the configuration.
    #[error("kafka config: librdkafka refused it: {0}")]
    Client(#[source] KafkaError),
}

/// Map an rdkafka error on the produce path to the contract's error.
pub(crate) fn sink_error(e: &KafkaError, deadline: Duration) -> SinkError {
    let code = e.rdkafka_error_code();
    match code {
        Some(RDKafkaErrorCode::MessageTimedOut) => SinkError::Timeout { deadline },
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::UnknownTopic,
        ) => SinkError::Rejected { reason: e.to_string() },
        // Refused when handed over: the producer is being replaced.
        Some(RDKafkaErrorCode::Fatal) => SinkError::Unavailable {
            reason: format!("{e} (the producer is being replaced; nothing was sent)"),
        },
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownPartition) => {
            SinkError::Rejected { reason: format!("{e} (create the topic first, or set create_topics)") }
        }
        _ => SinkError::Broker { message: e.to_string(), retriable: !matches!(e, KafkaError::Canceled) },
    }
}

/// Map an error in a delivery report to the contract's error. The record
/// was handed to the producer; `possibly_stored` is librdkafka's judgement
/// of whether its request reached the broker. A failure that may have been
/// stored is [`SinkError::OutcomeUnknown`] (a timeout stays
/// [`SinkError::Timeout`], which says the same); a fatal error or a purge
/// for a record that was never sent is [`SinkError::Unavailable`].
pub(crate) fn delivery_error(e: &KafkaError, possibly_stored: bool, deadline: Duration) -> SinkError {
    let code = e.rdkafka_error_code();
    match code {
        Some(RDKafkaErrorCode::MessageTimedOut) => SinkError::Timeout { deadline },
        _ if possibly_stored => {
            SinkError::OutcomeUnknown { reason: format!("{e} (the write may have reached the broker)") }
        }
        Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => {
            SinkError::Unavailable { reason: format!("{e} (never sent)") }
        }
        _ => sink_error(e, deadline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(30);

    fn produce(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    /// librdkafka's fatal error says nothing about the records in flight
    /// when it was raised: those librdkafka marks as possibly persisted may
    /// be stored (outcome unknown), the others were never sent. Neither is
    /// "rejected" (can never be stored).
    #[test]
    fn a_fatal_error_is_outcome_unknown_or_not_sent_never_rejected() {
        for code in [RDKafkaErrorCode::Fatal, RDKafkaErrorCode::OutOfOrderSequenceNumber, RDKafkaErrorCode::ProducerFenced] {
            let in_flight = delivery_error(&produce(code), true, DEADLINE);
            assert!(matches!(in_flight, SinkError::OutcomeUnknown { .. }), "{code:?}, possibly persisted: {in_flight}");
        }
        let unsent = delivery_error(&produce(RDKafkaErrorCode::Fatal), false, DEADLINE);
        assert!(matches!(unsent, SinkError::Unavailable { .. }), "{unsent}");
        // Refused when handed over: the producer is fatally failed.
        let refused = sink_error(&produce(RDKafkaErrorCode::Fatal), DEADLINE);
        assert!(matches!(refused, SinkError::Unavailable { .. }), "{refused}");
        // A purge of what was never sent, and a delivery deadline.
        let purged = delivery_error(&produce(RDKafkaErrorCode::PurgeQueue), false, DEADLINE);
        assert!(matches!(purged, SinkError::Unavailable { .. }), "{purged}");
        let late = delivery_error(&produce(RDKafkaErrorCode::MessageTimedOut), true, DEADLINE);
        assert!(matches!(late, SinkError::Timeout { deadline: DEADLINE }), "{late}");
    }
}
