//! What every crate's configuration check shares: a bad field named with
//! what is allowed ([`FieldError`], [`check_range`]), and the doubling
//! back-off ([`Backoff`]) of every retry loop (the Redis breaker's probes, the
//! hub's reconnects, the cached failures of metadata look-ups).

use std::time::Duration;

/// A configuration field with a value that cannot work: the field, and
/// what is wrong and what is allowed. Each crate's `ConfigError::Invalid`
/// is made from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field.
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub reason: String,
}

impl FieldError {
    /// A bad `field`, and why.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}

/// `value` of `field` lies in `min..=max`, or the error says so with both
/// limits ("70000 is outside 1..=60000").
pub fn check_range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), FieldError> {
    if value < min || value > max {
        return Err(FieldError::new(field, format!("{value} is outside {min}..={max}")));
    }
    Ok(())
}

/// A doubling back-off: the first wait is `min`, each next one twice the
/// last, never more than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// From `min` up to `max` (a `max` below `min` is taken as `min`).
    pub const fn new(min: Duration, max: Duration) -> Self {
        let max = if max.as_nanos() < min.as_nanos() { min } else { max };
        Self { min, max }
    }

    /// The first wait.
    pub const fn first(&self) -> Duration {
        self.min
    }

    /// The wait after one of `last`: twice as long, within the bounds.
    pub fn after(&self, last: Duration) -> Duration {
        last.saturating_mul(2).clamp(self.min, self.max)
    }

    /// The wait after `attempt` failed attempts (0: the first wait).
    pub fn nth(&self, attempt: u32) -> Duration {
        self.min.saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX)).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_outside_the_range_names_the_field_and_both_limits() {
        assert_eq!(check_range("lanes", 4, 1, 64), Ok(()));
        assert_eq!(check_range("lanes", 1, 1, 64), Ok(()));
        assert_eq!(check_range("lanes", 64, 1, 64), Ok(()));
        let e = check_range("lanes", 65, 1, 64).expect_err("above");
        assert_eq!(e, FieldError::new("lanes", "65 is outside 1..=64"));
        assert_eq!(e.to_string(), "lanes: 65 is outside 1..=64");
        assert_eq!(check_range("lanes", 0, 1, 64).expect_err("below").reason, "0 is outside 1..=64");
    }

    #[test]
    fn the_back_off_doubles_from_min_and_stops_at_max() {
        let ms = Duration::from_millis;
        let b = Backoff::new(ms(100), ms(1_000));
        let waits: Vec<Duration> = (0..6).map(|n| b.nth(n)).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(800), ms(1_000), ms(1_000)]);
        assert_eq!(b.nth(u32::MAX), ms(1_000), "no overflow");
        let mut w = b.first();
        let mut chain = vec![w];
        for _ in 0..5 {
            w = b.after(w);
            chain.push(w);
        }
        assert_eq!(chain, waits, "after() walks the same steps as nth()");
        assert_eq!(b.after(Duration::MAX), ms(1_000));
        assert_eq!(b.after(Duration::ZERO), ms(100), "never below min");
        assert_eq!(Backoff::new(ms(5), ms(1)).nth(3), ms(5), "max below min is min");
    }
}
