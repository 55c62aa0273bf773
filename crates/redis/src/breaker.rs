//! The circuit breaker, as a pure state machine: the caller passes the clock.

use std::time::{Duration, Instant};

use dualstream_core::Backoff;

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

/// The admission of one call, handed back with its outcome
/// ([`Breaker::on_success`], [`Breaker::on_failure`]). It records the
/// breaker episode the call was admitted in, so the outcome of a call that
/// was already in flight when the breaker opened (or when a newer probe
/// started) is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
}

/// What the breaker says about the next call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Make the call, then report its outcome with the ticket.
    Yes(Ticket),
    /// Make the call as the probe: its outcome, reported with the ticket,
    /// closes or re-opens the breaker.
    Probe(Ticket),
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
///
/// Every call is admitted with a [`Ticket`] of the current generation; the
/// generation changes at every state change (and at every new probe). Only
/// outcomes of the current generation count: failures of calls admitted
/// while closed count towards opening; once open, late outcomes of those
/// calls neither close the breaker nor lengthen the backoff; while half-open
/// only the current probe's outcome closes or re-opens it.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    probe_stale_after: Duration,
    state: State,
    generation: u64,
}

impl Breaker {
    /// A closed breaker. A probe that has not reported after
    /// `probe_stale_after` (for example because its caller gave up) is
    /// forgotten and another may start.
    pub fn new(config: BreakerConfig, probe_stale_after: Duration) -> Self {
        Self { config, probe_stale_after, state: State::Closed { failures: 0 }, generation: 0 }
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn enter(&mut self, state: State) {
        self.state = state;
        self.generation = self.generation.wrapping_add(1);
    }

    fn ticket(&self) -> Ticket {
        Ticket { generation: self.generation }
    }

    /// May a call be made at `now`?
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed { .. } => Admit::Yes(self.ticket()),
            State::Open { until, backoff } if now >= until => {
                self.enter(State::HalfOpen { started: now, backoff });
                Admit::Probe(self.ticket())
            }
            State::Open { .. } => Admit::No,
            State::HalfOpen { started, backoff }
                if now.saturating_duration_since(started) >= self.probe_stale_after =>
            {
                // A new probe: the abandoned one's ticket no longer counts.
                self.enter(State::HalfOpen { started: now, backoff });
                Admit::Probe(self.ticket())
            }
            State::HalfOpen { .. } => Admit::No,
        }
    }

    /// The call admitted with `ticket` succeeded. Returns `true` if this
    /// closed an open breaker (only the current probe does that). The
    /// success of a call admitted before the breaker opened changes nothing.
    pub fn on_success(&mut self, ticket: Ticket) -> bool {
        if ticket.generation != self.generation {
            return false;
        }
        match self.state {
            State::Closed { .. } => {
                self.state = State::Closed { failures: 0 };
                false
            }
            State::HalfOpen { .. } => {
                self.enter(State::Closed { failures: 0 });
                true
            }
            // No ticket is handed out while open.
            State::Open { .. } => false,
        }
    }

    /// The call admitted with `ticket` failed at `now`. Returns `true` if
    /// this opened the breaker from closed. The failure of a call admitted
    /// before the breaker opened (or of an abandoned probe) changes nothing.
    pub fn on_failure(&mut self, ticket: Ticket, now: Instant) -> bool {
        if ticket.generation != self.generation {
            return false;
        }
        let backoff =
            Backoff::new(Duration::from_millis(self.config.open_min_ms), Duration::from_millis(self.config.open_max_ms));
        match self.state {
            State::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold {
                    self.enter(State::Open { until: now + backoff.first(), backoff: backoff.first() });
                    true
                } else {
                    self.state = State::Closed { failures };
                    false
                }
            }
            State::HalfOpen { backoff: last, .. } => {
                let next = backoff.after(last);
                self.enter(State::Open { until: now + next, backoff: next });
                false
            }
            // No ticket is handed out while open.
            State::Open { .. } => false,
        }
    }
}
