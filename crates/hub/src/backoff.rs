//! The hub's reconnection backoff, for the single-node hub's connection and
//! for each Redis Cluster master's: doubling, capped, jittered.

use std::time::Duration;

use dualstream_core::Backoff;

/// The backoff after `attempt` attempts since the connection was last live
/// (0 for the first wait): `min_ms` doubled per attempt, at most `max_ms`.
fn backoff_ms(min_ms: u64, max_ms: u64, attempt: u32) -> u64 {
    let backoff = Backoff::new(Duration::from_millis(min_ms), Duration::from_millis(max_ms));
    backoff.nth(attempt).as_millis() as u64
}

/// The wait before the next connection attempt: drawn uniformly from
/// `[backoff / 2, backoff]`, so that a fleet of gateways that lost Redis at
/// the same moment does not reconnect in step.
pub(crate) fn reconnect_delay(min_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let backoff = backoff_ms(min_ms, max_ms, attempt);
    Duration::from_millis(rand::random_range(backoff / 2..=backoff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_min_up_to_max() {
        let got: Vec<u64> = (0..8).map(|a| backoff_ms(100, 2_000, a)).collect();
        assert_eq!(got, [100, 200, 400, 800, 1_600, 2_000, 2_000, 2_000]);
        assert_eq!(backoff_ms(1, 3_600_000, 200), 3_600_000, "no overflow");
        assert_eq!(backoff_ms(3_600_000, 3_600_000, 63), 3_600_000);
    }

    #[test]
    fn each_wait_is_drawn_between_half_the_backoff_and_the_backoff() {
        for attempt in 0..8 {
            let backoff = backoff_ms(100, 2_000, attempt);
            let draws: Vec<u64> = (0..1_000).map(|_| reconnect_delay(100, 2_000, attempt).as_millis() as u64).collect();
            assert!(draws.iter().all(|d| (backoff / 2..=backoff).contains(d)), "attempt {attempt}: {draws:?}");
            let distinct: std::collections::HashSet<u64> = draws.iter().copied().collect();
            assert!(distinct.len() > 10, "attempt {attempt}: jittered, {} distinct waits", distinct.len());
        }
        // The smallest backoff still varies.
        let draws: std::collections::HashSet<Duration> = (0..100).map(|_| reconnect_delay(1, 1, 0)).collect();
        assert_eq!(draws.len(), 2, "0 or 1 ms");
    }
}
