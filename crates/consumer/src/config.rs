use dualstream_core::check_range;
use dualstream_history::ConfigError;
use serde::{Deserialize, Serialize};

/// Configuration of a [`CatchUp`](crate::CatchUp) join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinConfig {
    /// Items a join may have ready before its reader waits for the caller.
    /// Default: 256.
    pub buffer: usize,
    /// How often the shared watermark poller reads the watermarks of every
    /// partition a join watches, and how long a join waits without a live
    /// item before it compares with the high watermark and delivers anything
    /// missed, in milliseconds. Bounds how late an event whose notification
    /// was lost can be. Default: 1,000.
    pub idle_check_ms: u64,
    /// Records of each partition the shared reader keeps in memory, so that
    /// the checks after a notification jump or an idle period read memory
    /// rather than Kafka. Default: 4,096. (The backfill readers keep at
    /// least 32,768; every cache holds at most 32 MiB per partition.)
    pub cache_records: usize,
    /// Kafka consumers per topic that serve reads older than the cache (a
    /// resume from minutes ago, from offset 0), so that such a read never
    /// moves the shared tail reader back for every join. Each far read goes
    /// to the one that serves it soonest: one whose cache covers it or that
    /// gets there within a few thousand records, else an idle or new one,
    /// else one that does not follow its partition; a reader moves back
    /// only when all of them follow the partition from above. Started as
    /// needed. Default: 4.
    pub backfill_readers: usize,
    /// Records a second the backfill readers may read together, so that
    /// resumes from far back cannot take the broker's whole read capacity
    /// from the reads at the tail. 0: unbounded. Kafka brokers serve reads
    /// from the page cache, far faster than one consumer takes them; on
    /// tansu 0.6 with PostgreSQL, which reads about 10,000 records a second
    /// in all, set about 3,000 per process (docs/operations.md). Default: 0.
    pub backfill_records_per_sec: u32,
    /// How long a join waits, in milliseconds, for the notifications of the
    /// offsets between its last delivered event and a live notification
    /// (another publisher's, still on its way) before it reads Kafka to
    /// prove nothing of its source lies in between. The hub follows every
    /// source channel for this (`Hub::follow_partitions`): when it has seen
    /// a notification of another source for each offset in between, the
    /// notification is delivered without reading Kafka. 0: don't follow;
    /// read Kafka at every jump (the behaviour on a Redis Cluster, where the
    /// hub cannot follow patterns). Default: 10.
    pub reorder_window_ms: u64,
}

impl Default for JoinConfig {
    fn default() -> Self {
        Self {
            buffer: 256,
            idle_check_ms: 1_000,
            cache_records: 4_096,
            backfill_readers: 4,
            backfill_records_per_sec: 0,
            reorder_window_ms: 10,
        }
    }
}

impl JoinConfig {
    /// Check every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("buffer", self.buffer as u64, 1, 16_777_216)?;
        check_range("idle_check_ms", self.idle_check_ms, 10, 3_600_000)?;
        check_range("cache_records", self.cache_records as u64, 0, 16_777_216)?;
        check_range("backfill_readers", self.backfill_readers as u64, 1, 64)?;
        check_range("reorder_window_ms", self.reorder_window_ms, 0, 60_000)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        JoinConfig::default().validate().expect("join");
    }

    #[test]
    fn errors_name_the_field_and_the_limit() {
        let c = JoinConfig { buffer: 0, ..JoinConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "buffer", .. })));
        let c = JoinConfig { backfill_readers: 0, ..JoinConfig::default() };
        assert_eq!(
            c.validate(),
            Err(ConfigError::Invalid { field: "backfill_readers", reason: "0 is outside 1..=64".into() })
        );
    }
}
