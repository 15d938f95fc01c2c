//! [`Circuit`]: one route's breaker with its metrics, log, fallback and slow start.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge};
use serde::Serialize;
use tokio::time::Instant;

use super::breaker::{Breaker, CallOutcome, CircuitSettings, CircuitState, Ticket, Transition};
use super::policy::FailurePolicy;
use crate::client_key::{KeyExtractor, KeySource};
use crate::error::{Reason, Rejection, StaticAnswer};
use crate::jitter::retry_factor;
use crate::limit::Throttle;
use crate::metrics::{CIRCUIT_STATE, CIRCUIT_TRANSITIONS, Registry};

/// Prometheus handles of one route's circuit.
#[derive(Debug, Clone)]
pub struct CircuitMetrics {
    state: Gauge,
    transitions: Vec<((CircuitState, CircuitState), Counter)>,
}

impl CircuitMetrics {
    /// Registers the route's circuit metrics.
    pub fn new(route: &str, registry: &Registry) -> Self {
        let transitions = CircuitState::TRANSITIONS
            .iter()
            .map(|&(from, to)| {
                let labels = [
                    ("route", route),
                    ("from", from.as_str()),
                    ("to", to.as_str()),
                ];
                ((from, to), registry.counter(CIRCUIT_TRANSITIONS, &labels))
            })
            .collect();
        Self {
            state: registry.gauge(CIRCUIT_STATE, &[("route", route)]),
            transitions,
        }
    }

    fn noop() -> Self {
        Self {
            state: Gauge::noop(),
            transitions: Vec::new(),
        }
    }
}

/// After the circuit closes, the admission limit ramps linearly from the probe
/// count to its full value (HAProxy's `slowstart`), so that a just-recovered
/// upstream does not get the full load at once.
#[derive(Debug, Clone)]
pub struct SlowStart {
    throttle: Arc<dyn Throttle>,
    full: usize,
    from: usize,
    over: Duration,
}

impl SlowStart {
    /// Ramps `throttle` (admission's limit) from `from` to its configured
    /// limit over `over`.
    pub fn new(throttle: Arc<dyn Throttle>, from: usize, over: Duration) -> Self {
        let full = throttle.full_limit();
        Self {
            throttle,
            full,
            from: from.clamp(1, full),
            over,
        }
    }

    fn limit_at(&self, elapsed: Duration) -> usize {
        if elapsed >= self.over {
            return self.full;
        }
        let share = elapsed.as_secs_f64() / self.over.as_secs_f64();
        self.from + ((self.full - self.from) as f64 * share) as usize
    }
}

/// The live state, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CircuitSnapshot {
    /// `closed`, `open` or `half_open`.
    pub state: CircuitState,
    /// Seconds in this state.
    pub since_s: f64,
    /// Why the last transition happened.
    pub cause: Option<String>,
    /// Consecutive failures while closed.
    pub consecutive_failures: u32,
    /// Milliseconds until an open circuit lets a probe through.
    pub open_remaining_ms: Option<u64>,
    /// The admission limit while a slow start ramps it up.
    pub slow_start_limit: Option<usize>,
    /// State changes since the route was built (the dashboard marks them).
    pub transitions: u64,
}

struct State {
    breaker: Breaker,
    /// When the slow start began, while it runs.
    ramp_since: Option<Instant>,
    /// State changes so far.
    transitions: u64,
}

/// One route's circuit breaker, shared by its services.
pub struct Circuit {
    route: Arc<str>,
    state: Mutex<State>,
    policy: FailurePolicy,
    metrics: CircuitMetrics,
    fallback: Option<Arc<StaticAnswer>>,
    slow_start: Option<SlowStart>,
    /// Who a call's client is, so that failures count per client.
    clients: KeyExtractor,
    /// The circuit a reload built for the route's new settings: it carries
    /// on from this one's state and takes every call made here since.
    successor: OnceLock<Arc<Circuit>>,
}

impl std::fmt::Debug for Circuit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Circuit")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl Circuit {
    /// A closed circuit with no metrics (embedders can read [`Circuit::snapshot`]).
    pub fn new(settings: CircuitSettings, policy: FailurePolicy) -> Self {
        Self {
            route: Arc::from(""),
            state: Mutex::new(State {
                breaker: Breaker::new(settings, Instant::now()),
                ramp_since: None,
                transitions: 0,
            }),
            policy,
            metrics: CircuitMetrics::noop(),
            fallback: None,
            slow_start: None,
            clients: KeyExtractor::new(&KeySource::Ip, Vec::new()),
            successor: OnceLock::new(),
        }
    }

    /// Hands this circuit's state to `next`, built by a reload for the
    /// route's new settings: an open circuit stays open (for what is left
    /// of its open time), a half-open one keeps its probes, a closed one its
    /// count of failures, and every call on this circuit from now on is
    /// `next`'s (the answers of calls let through here count there). A
    /// reload must not close a breaker the upstream opened.
    pub fn hand_over(&self, next: &Arc<Circuit>) {
        if std::ptr::eq(self, Arc::as_ptr(next)) || self.successor.get().is_some() {
            return;
        }
        let state = self.lock();
        let _ = self.successor.set(next.clone());
        let mut carried = next.lock();
        let settings = carried.breaker.settings().clone();
        carried.breaker = state.breaker.clone();
        carried.breaker.reconfigure(settings);
        carried.ramp_since = state.ramp_since;
        carried.transitions = state.transitions;
        next.metrics.state.set(carried.breaker.state().gauge());
    }

    /// The circuit in force: this one, or the one a reload handed it to.
    fn live(&self) -> &Circuit {
        let mut circuit = self;
        while let Some(next) = circuit.successor.get() {
            circuit = next;
        }
        circuit
    }

    /// Tells clients apart with `clients` (the route's trusted proxies and
    /// IPv6 prefix) instead of by socket peer.
    pub fn with_clients(mut self, clients: KeyExtractor) -> Self {
        self.clients = clients;
        self
    }

    /// Who makes a call with these headers and extensions, for
    /// [`Circuit::acquire_as`].
    pub fn client_of(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> std::net::IpAddr {
        self.clients.address(headers, extensions)
    }

    /// Names the route in logs and exports to `metrics`.
    pub fn with_metrics(mut self, route: impl Into<Arc<str>>, metrics: CircuitMetrics) -> Self {
        self.route = route.into();
        metrics.state.set(CircuitState::Closed.gauge());
        self.metrics = metrics;
        self
    }

    /// Serves `answer` instead of the 503 while open.
    pub fn with_fallback(mut self, answer: StaticAnswer) -> Self {
        self.fallback = Some(Arc::new(answer));
        self
    }

    /// Ramps an admission limit up after closing.
    pub fn with_slow_start(mut self, slow_start: SlowStart) -> Self {
        self.slow_start = Some(slow_start);
        self
    }

    /// The classification rules.
    pub fn policy(&self) -> &FailurePolicy {
        &self.policy
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain values only: a panic elsewhere leaves them consistent enough.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state at `now`, with the transitions time alone makes (an open
    /// duration passed: half-open) made, logged and exported: the state a
    /// metric or `/status` shows is the state the breaker is in, whether or
    /// not a request has asked since.
    fn lock_at(&self, now: Instant) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        if let Some(t) = state.breaker.tick(now) {
            self.on_transition(&mut state, t, now);
        }
        state
    }

    /// Makes the transitions time alone makes (the proxy calls this once a
    /// second for each route, so that the gauge follows the breaker on a quiet
    /// route).
    pub fn tick(&self, now: Instant) {
        drop(self.live().lock_at(now));
    }

    /// Time left until an open circuit lets a probe through (`None` unless
    /// open).
    pub fn open_remaining(&self, now: Instant) -> Option<Duration> {
        self.live().lock_at(now).breaker.open_remaining(now)
    }

    /// Asks to call the upstream; a refusal is a `circuit_open` [`Rejection`]
    /// with `Retry-After` = time left until the half-open window.
    pub fn acquire(&self, now: Instant) -> Result<Ticket, Rejection> {
        self.acquire_as(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), now)
    }

    /// The same for a call by `client` ([`Circuit::client_of`]).
    pub fn acquire_as(&self, client: std::net::IpAddr, now: Instant) -> Result<Ticket, Rejection> {
        let mut state = self.lock();
        if let Some(next) = self.successor.get() {
            drop(state);
            return next.acquire_as(client, now);
        }
        let (result, transition) = state.breaker.try_acquire_as(client, now);
        if let Some(t) = transition {
            self.on_transition(&mut state, t, now);
        }
        if let (Some(since), Some(slow)) = (state.ramp_since, &self.slow_start) {
            let limit = slow.limit_at(now - since);
            slow.throttle.clone().set_limit(limit);
            if limit >= slow.full {
                state.ramp_since = None;
            }
        }
        drop(state);
        result.map_err(|wait| {
            // Whole seconds, rounded up, spread upwards only: coming back before
            // the window opens would just earn another 503.
            let spread = 1.0 + (retry_factor() - 0.8) / 2.0;
            let secs = (wait.as_secs_f64() * spread).ceil().max(1.0) as u64;
            let rejection = Rejection::new(Reason::CircuitOpen).with_retry_after(secs);
            match &self.fallback {
                Some(answer) => rejection.with_fallback(answer.clone()),
                None => rejection,
            }
        })
    }

    /// Records how a call ended; `None`: neither success nor failure.
    pub fn finish(&self, ticket: Ticket, outcome: Option<CallOutcome>, now: Instant) {
        let mut state = self.lock();
        if let Some(next) = self.successor.get() {
            drop(state);
            return next.finish(ticket, outcome, now);
        }
        let Some(outcome) = outcome else {
            state.breaker.cancel(ticket);
            return;
        };
        if let Some(t) = state.breaker.record(ticket, outcome, now) {
            self.on_transition(&mut state, t, now);
        }
    }

    fn on_transition(&self, state: &mut State, t: Transition, now: Instant) {
        state.transitions += 1;
        self.metrics.state.set(t.to.gauge());
        if let Some((_, counter)) = self
            .metrics
            .transitions
            .iter()
            .find(|(k, _)| *k == (t.from, t.to))
        {
            counter.increment(1);
        }
        match t.open_for {
            Some(open_for) => tracing::warn!(
                route = %self.route,
                from = %t.from,
                to = %t.to,
                cause = %t.cause,
                open_for_ms = open_for.as_millis() as u64,
                "circuit state changed"
            ),
            None => tracing::warn!(
                route = %self.route,
                from = %t.from,
                to = %t.to,
                cause = %t.cause,
                "circuit state changed"
            ),
        }
        if let Some(slow) = &self.slow_start {
            if t.to == CircuitState::Closed {
                state.ramp_since = Some(now);
                slow.throttle.clone().set_limit(slow.from);
            } else {
                state.ramp_since = None;
            }
        }
    }

    /// The live state.
    pub fn snapshot(&self) -> CircuitSnapshot {
        let now = Instant::now();
        let this = self.live();
        let state = this.lock_at(now);
        let b = &state.breaker;
        CircuitSnapshot {
            state: b.state(),
            since_s: (now - b.since()).as_secs_f64(),
            cause: b.cause().map(|c| c.to_string()),
            consecutive_failures: b.consecutive_failures(),
            open_remaining_ms: b.open_remaining(now).map(|d| d.as_millis() as u64),
            slow_start_limit: state
                .ramp_since
                .and(this.slow_start.as_ref())
                .map(|s| s.throttle.limit()),
            transitions: state.transitions,
        }
    }

    /// State changes since the route was built.
    pub fn transitions(&self) -> u64 {
        self.live().lock().transitions
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        self.live().lock_at(Instant::now()).breaker.state()
    }
}
