//! The circuit breaker, as a pure state machine: the caller passes the clock.

use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

/// The breaker's state, as reported in [`NotifierStats`](crate::NotifierStats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are skipped until the backoff ends.
    Open,
    /// One probe call is in flight; others are skipped.
    HalfOpen,
}

/// What the breaker says about the next call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Make the call.
    Yes,
    /// Make the call as the probe: its outcome closes or re-opens the breaker.
    Probe,
    /// Skip the call.
    No,
}

#[derive(Clone, Copy, Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant, backoff: Duration },
    HalfOpen { started: Instant, backoff: Duration },
}

/// Consecutive-failure circuit breaker with exponential backoff between
/// probes.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    probe_stale_after: Duration,
    state: State,
}

impl Breaker {
    /// A closed breaker. A probe that has not reported after
    /// `probe_stale_after` (for example because its caller gave up) is
    /// forgotten and another may start.
    pub fn new(config: BreakerConfig, probe_stale_after: Duration) -> Self {
        Self { config, probe_stale_after, state: State::Closed { failures: 0 } }
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// May a call be made at `now`?
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed { .. } => Admit::Yes,
            State::Open { until, backoff } if now >= until => {
                self.state = State::HalfOpen { started: now, backoff };
                Admit::Probe
            }
            State::Open { .. } => Admit::No,
            State::HalfOpen { started, backoff } if now.saturating_duration_since(started) >= self.probe_stale_after => {
                self.state = State::HalfOpen { started: now, backoff };
                Admit::Probe
            }
            State::HalfOpen { .. } => Admit::No,
        }
    }

    /// The call succeeded. Returns `true` if this closed an open breaker.
    pub fn on_success(&mut self) -> bool {
        let was_open = !matches!(self.state, State::Closed { .. });
        self.state = State::Closed { failures: 0 };
        was_open
    }

    /// The call failed at `now`. Returns `true` if this opened the breaker
    /// from closed.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        let min = Duration::from_millis(self.config.open_min_ms);
        let max = Duration::from_millis(self.config.open_max_ms).max(min);
        match self.state {
            State::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold {
                    self.state = State::Open { until: now + min, backoff: min };
                    true
                } else {
                    self.state = State::Closed { failures };
                    false
                }
            }
            State::HalfOpen { backoff, .. } | State::Open { backoff, .. } => {
                let backoff = (backoff * 2).min(max);
                self.state = State::Open { until: now + backoff, backoff };
                false
            }
        }
    }
}
