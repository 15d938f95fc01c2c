//! [`Breaker`]: the circuit breaker's state machine, with no I/O and no clock of
//! its own (every method takes the instant), so that every transition can be
//! tested in a table and replayed in a simulation.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::window::FailureWindow;
use crate::distinct_clients::DistinctClients;

/// When to open, how long to stay open, what it takes to close.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitSettings {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// Failure-rate rule, when set.
    pub failure_rate: Option<FailureRate>,
    /// First open duration.
    pub open: Duration,
    /// Cap of the doubling open duration and of an upstream's Retry-After.
    pub max_open: Duration,
    /// Probes at the upstream at once while half-open.
    pub half_open_max_probes: u32,
    /// Consecutive probe successes that close the circuit.
    pub success_threshold: u32,
    /// Shortest stay in half-open.
    pub min_half_open: Duration,
    /// A half-open probe not decided within this long gives its probe slot
    /// to another request: a client that holds its probe (a trickled upload,
    /// a slowly read answer) cannot hold the circuit half-open. Its outcome
    /// still counts if it comes.
    pub probe_timeout: Duration,
    /// The circuit opens only on failures from at least this many distinct
    /// clients over the window (`failure_rate`'s, else 10 s), or from every
    /// client that called in it when fewer did: one client sending what the
    /// upstream answers 500 to cannot open it for everyone.
    pub min_failing_clients: u32,
}

/// Open when `threshold` (0..=1) of the calls over `window` failed, once at least
/// `min_calls` calls were seen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureRate {
    /// Share of failed calls, 0..=1.
    pub threshold: f64,
    /// The sliding window.
    pub window: Duration,
    /// Calls needed before the rate counts.
    pub min_calls: u32,
}

impl FailureRate {
    /// The window when only the threshold is given.
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
    /// The minimum calls when only the threshold is given.
    pub const DEFAULT_MIN_CALLS: u32 = 20;
}

impl Default for CircuitSettings {
    /// The defaults (README `[route.circuit]`): 5 failures, 5 s open (up to 60 s), 1 probe, 3
    /// successes, at least 1 s half-open, probes held at most 10 s.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_rate: None,
            open: Duration::from_secs(5),
            max_open: Duration::from_secs(60),
            half_open_max_probes: 1,
            success_threshold: 3,
            min_half_open: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(10),
            min_failing_clients: 3,
        }
    }
}

/// The state as metrics and `/status` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Traffic flows; failures are counted.
    Closed,
    /// Every request is refused at once.
    Open,
    /// A few probes go through; the rest are refused.
    HalfOpen,
}

impl CircuitState {
    /// The label used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// The value of `sluicegate_circuit_state` (README "Admin endpoints": 0 closed, 1 open, 2 half-open).
    pub const fn gauge(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::Open => 1.0,
            CircuitState::HalfOpen => 2.0,
        }
    }

    /// The transitions that exist, for pre-registering their counters.
    pub const TRANSITIONS: [(CircuitState, CircuitState); 4] = [
        (CircuitState::Closed, CircuitState::Open),
        (CircuitState::Open, CircuitState::HalfOpen),
        (CircuitState::HalfOpen, CircuitState::Open),
        (CircuitState::HalfOpen, CircuitState::Closed),
    ];
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cause {
    /// `n` failures in a row.
    ConsecutiveFailures(u32),
    /// `failures` of `calls` over the window.
    FailureRate {
        /// Failed calls in the window.
        failures: u32,
        /// All calls in the window.
        calls: u32,
    },
    /// A half-open probe failed.
    ProbeFailed,
    /// The open duration ran out.
    OpenElapsed,
    /// `n` probes succeeded in a row (and the minimum half-open time passed).
    ProbesSucceeded(u32),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::ConsecutiveFailures(n) => write!(f, "{n} consecutive failures"),
            Cause::FailureRate { failures, calls } => {
                write!(f, "{failures} of {calls} calls failed in the window")
            }
            Cause::ProbeFailed => f.write_str("a half-open probe failed"),
            Cause::OpenElapsed => f.write_str("open duration elapsed"),
            Cause::ProbesSucceeded(n) => write!(f, "{n} consecutive probe successes"),
        }
    }
}

/// A change of state, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// The state left.
    pub from: CircuitState,
    /// The state entered.
    pub to: CircuitState,
    /// Why.
    pub cause: Cause,
    /// For `to == Open`: how long it stays open.
    pub open_for: Option<Duration>,
}

/// Permission to call the upstream, to be answered with [`Breaker::record`] or
/// [`Breaker::cancel`]. Results of calls let through under an earlier state (the
/// stragglers of a burst that opened the circuit) are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    /// A half-open probe's number.
    probe: Option<u32>,
    /// Who made the call (the client's address, as clients are counted).
    client: IpAddr,
}

impl Ticket {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

/// A probe slot, held by probe `id` until it is decided or `until` passes.
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: u32,
    until: Instant,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// It worked.
    Success,
    /// It failed; `retry_after` is the upstream's own backpressure hint, if any.
    Failure {
        /// The upstream's `Retry-After`.
        retry_after: Option<Duration>,
    },
}

#[derive(Debug, Clone)]
enum Inner {
    Closed {
        failures: u32,
        /// Boxed: ten buckets, only with a failure-rate rule.
        window: Option<Box<FailureWindow>>,
        /// Clients that called, and clients whose calls failed, lately.
        callers: DistinctClients,
        failing: DistinctClients,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        /// The probe slots taken (at most `half_open_max_probes`).
        leases: Vec<Lease>,
        successes: u32,
    },
}

/// The state machine: closed → open on failures; open → half-open when the open
/// duration has passed; half-open → closed after `success_threshold` consecutive
/// probe successes and `min_half_open`, → open again on any probe failure, with
/// the open duration doubled (up to `max_open`).
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: CircuitSettings,
    inner: Inner,
    /// Bumped on every transition; tickets of earlier generations are stale.
    generation: u64,
    /// The next open duration after a failed probe doubles it.
    open_for: Duration,
    /// The next probe's number.
    next_probe: u32,
    since: Instant,
    cause: Option<Cause>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: CircuitSettings, now: Instant) -> Self {
        let open_for = settings.open;
        Self {
            inner: Self::closed(&settings, now),
            settings,
            generation: 0,
            open_for,
            next_probe: 0,
            since: now,
            cause: None,
        }
    }

    fn closed(settings: &CircuitSettings, now: Instant) -> Inner {
        let window = settings
            .failure_rate
            .map_or(FailureRate::DEFAULT_WINDOW, |r| r.window);
        let cap = settings.min_failing_clients as usize;
        Inner::Closed {
            failures: 0,
            window: settings
                .failure_rate
                .map(|r| Box::new(FailureWindow::new(r.window, now))),
            callers: DistinctClients::new(cap, window),
            failing: DistinctClients::new(cap, window),
        }
    }

    /// Its settings.
    pub fn settings(&self) -> &CircuitSettings {
        &self.settings
    }

    /// Takes `settings` (a reload) and keeps the state: a changed
    /// threshold applies to the failures counted so far, an open duration
    /// already running keeps its end.
    pub fn reconfigure(&mut self, settings: CircuitSettings) {
        self.open_for = self.open_for.clamp(settings.open, settings.max_open);
        let clients_window = |s: &CircuitSettings| {
            s.failure_rate
                .map_or(FailureRate::DEFAULT_WINDOW, |r| r.window)
        };
        if let Inner::Closed {
            callers, failing, ..
        } = &mut self.inner
            && (settings.min_failing_clients != self.settings.min_failing_clients
                || clients_window(&settings) != clients_window(&self.settings))
        {
            // Counted afresh under the new rule.
            let cap = settings.min_failing_clients as usize;
            *callers = DistinctClients::new(cap, clients_window(&settings));
            *failing = DistinctClients::new(cap, clients_window(&settings));
        }
        if let Inner::Closed { window, .. } = &mut self.inner {
            match (window.as_ref(), settings.failure_rate) {
                (_, None) => *window = None,
                (Some(_), Some(r))
                    if self.settings.failure_rate.map(|o| o.window) == Some(r.window) => {}
                (_, Some(r)) => {
                    *window = Some(Box::new(FailureWindow::new(r.window, Instant::now())))
                }
            }
        }
        self.settings = settings;
    }

    /// The state as of the last transition ([`Breaker::tick`] makes the ones
    /// time alone makes).
    pub fn state(&self) -> CircuitState {
        match self.inner {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::Open { .. } => CircuitState::Open,
            Inner::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Why the last transition happened.
    pub fn cause(&self) -> Option<Cause> {
        self.cause
    }

    /// Consecutive failures while closed.
    pub fn consecutive_failures(&self) -> u32 {
        match self.inner {
            Inner::Closed { failures, .. } => failures,
            _ => 0,
        }
    }

    /// Time left until an open circuit lets a probe through.
    pub fn open_remaining(&self, now: Instant) -> Option<Duration> {
        match self.inner {
            Inner::Open { until } => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }

    fn enter(&mut self, to: Inner, cause: Cause, now: Instant) -> Transition {
        let from = self.state();
        self.inner = to;
        self.generation += 1;
        self.since = now;
        self.cause = Some(cause);
        Transition {
            from,
            to: self.state(),
            cause,
            open_for: self.open_remaining(now),
        }
    }

    fn open(&mut self, cause: Cause, hint: Option<Duration>, now: Instant) -> Transition {
        // An upstream that asked for a pause gets at least that, within the cap.
        let hint = hint.unwrap_or_default().min(self.settings.max_open);
        let until = now + self.open_for.max(hint);
        self.enter(Inner::Open { until }, cause, now)
    }

    /// Makes the transitions time alone makes: an open circuit whose open
    /// duration has passed becomes half-open, a half-open one whose probes
    /// all succeeded closes once `min_half_open` is up. Requests make them
    /// too; this is for those who only look (metrics, `/status`, the spool's
    /// replayer), so that the state they see is the one the breaker is in.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        match self.inner {
            Inner::Open { until } if now >= until => {
                let half_open = Inner::HalfOpen {
                    leases: Vec::new(),
                    successes: 0,
                };
                Some(self.enter(half_open, Cause::OpenElapsed, now))
            }
            Inner::Open { .. } => None,
            _ => self.close_if_due(now),
        }
    }

    /// Asks to call the upstream. `Err` holds the time the client should wait:
    /// until the half-open window while open, the rest of `min_half_open` when
    /// every probe slot is taken.
    pub fn try_acquire(&mut self, now: Instant) -> (Result<Ticket, Duration>, Option<Transition>) {
        self.try_acquire_as(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), now)
    }

    /// The same for a call by `client` (its address), so that its failures
    /// count as one client's ([`CircuitSettings::min_failing_clients`]).
    pub fn try_acquire_as(
        &mut self,
        client: IpAddr,
        now: Instant,
    ) -> (Result<Ticket, Duration>, Option<Transition>) {
        // Probes that succeeded before `min_half_open` was up close it now;
        // an open duration that passed makes it half-open.
        let transition = self.tick(now);
        if let Some(wait) = self.open_remaining(now) {
            return (Err(wait), transition);
        }
        let generation = self.generation;
        if let Inner::HalfOpen { leases, .. } = &mut self.inner {
            // Leases that ran out give their slots back (their probes, if
            // they end, still count).
            leases.retain(|lease| lease.until > now);
        }
        let result = match &mut self.inner {
            Inner::Closed { .. } => Ok(Ticket {
                generation,
                probe: None,
                client,
            }),
            Inner::HalfOpen { leases, .. }
                if leases.len() < self.settings.half_open_max_probes as usize =>
            {
                let id = self.next_probe;
                self.next_probe = id.wrapping_add(1);
                leases.push(Lease {
                    id,
                    until: now + self.settings.probe_timeout,
                });
                Ok(Ticket {
                    generation,
                    probe: Some(id),
                    client,
                })
            }
            Inner::HalfOpen { .. } => {
                let left = self.settings.min_half_open.saturating_sub(now - self.since);
                Err(left)
            }
            Inner::Open { .. } => unreachable!("left above"),
        };
        (result, transition)
    }

    /// Records how a call ended.
    pub fn record(
        &mut self,
        ticket: Ticket,
        outcome: CallOutcome,
        now: Instant,
    ) -> Option<Transition> {
        if ticket.generation != self.generation {
            return None;
        }
        match (&mut self.inner, outcome) {
            (
                Inner::Closed {
                    failures,
                    window,
                    callers,
                    failing,
                },
                outcome,
            ) => {
                let failed = matches!(outcome, CallOutcome::Failure { .. });
                *failures = if failed { *failures + 1 } else { 0 };
                callers.note(ticket.client, now);
                if failed {
                    failing.note(ticket.client, now);
                }
                // Enough clients fail: the configured number, or every one
                // that called lately when fewer did.
                let widely = failing.count(now) >= callers.count(now);
                let consecutive = *failures;
                let rate = window.as_mut().and_then(|w| {
                    w.record(failed, now);
                    let rule = self.settings.failure_rate?;
                    let (f, c) = w.counts(now);
                    (failed && c >= rule.min_calls && f64::from(f) >= rule.threshold * f64::from(c))
                        .then_some(Cause::FailureRate {
                            failures: f,
                            calls: c,
                        })
                });
                let CallOutcome::Failure { retry_after } = outcome else {
                    return None;
                };
                if !widely {
                    return None;
                }
                if consecutive >= self.settings.failure_threshold {
                    Some(self.open(Cause::ConsecutiveFailures(consecutive), retry_after, now))
                } else {
                    rate.map(|cause| self.open(cause, retry_after, now))
                }
            }
            (Inner::HalfOpen { leases, successes }, CallOutcome::Success) => {
                Self::release(leases, ticket);
                *successes += 1;
                self.close_if_due(now)
            }
            (Inner::HalfOpen { .. }, CallOutcome::Failure { retry_after }) => {
                self.open_for = (self.open_for * 2).min(self.settings.max_open);
                Some(self.open(Cause::ProbeFailed, retry_after, now))
            }
            (Inner::Open { .. }, _) => None,
        }
    }

    /// Closes a half-open circuit whose probes have all succeeded once it has
    /// been half-open long enough.
    fn close_if_due(&mut self, now: Instant) -> Option<Transition> {
        let Inner::HalfOpen { successes, .. } = self.inner else {
            return None;
        };
        if successes < self.settings.success_threshold
            || now - self.since < self.settings.min_half_open
        {
            return None;
        }
        self.open_for = self.settings.open;
        let closed = Self::closed(&self.settings, now);
        Some(self.enter(closed, Cause::ProbesSucceeded(successes), now))
    }

    /// A call that ended neither in success nor failure (the client went away,
    /// or the proxy itself refused it further down): frees its probe slot.
    pub fn cancel(&mut self, ticket: Ticket) {
        if ticket.generation != self.generation {
            return;
        }
        if let Inner::HalfOpen { leases, .. } = &mut self.inner {
            Self::release(leases, ticket);
        }
    }

    /// Gives back `ticket`'s probe slot, unless its lease already ran out.
    fn release(leases: &mut Vec<Lease>, ticket: Ticket) {
        if let Some(id) = ticket.probe {
            leases.retain(|lease| lease.id != id);
        }
    }
}
