//! The concurrency limit as the protections other than admission see it:
//! what an adaptive algorithm is fed and says ([`LimitAlgorithm`]), how its
//! settings make one ([`AlgorithmSettings`]), and the hold a circuit's slow
//! start keeps on it ([`Throttle`]). Admission owns the limit; the adaptive
//! algorithms and the circuit breaker reach it only through these, and the
//! stack wires them together, so that none of them imports another.
//!
//! A leaf: vocabulary, nothing of the layers.

use std::any::Any;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// One answered request, as an algorithm sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Time from admission to the upstream's response headers.
    pub rtt: Duration,
    /// Requests in flight when it finished (itself included).
    pub inflight: usize,
    /// An overload signal: a timeout, a connection failure, a 503 or 504.
    pub dropped: bool,
    /// The limit was binding when it finished: every slot taken, or requests
    /// waiting for one. Demand, not the limit, set the pace otherwise.
    pub limited: bool,
    /// Who sent it (its address), when known: overload signals count only
    /// when enough of the clients see them.
    pub client: Option<IpAddr>,
}

/// What `/status` shows of an algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AlgorithmSnapshot {
    /// `gradient` or `aimd`.
    pub algorithm: &'static str,
    /// The limit now.
    pub limit: usize,
    /// gradient: what it is doing.
    pub phase: Option<Phase>,
    /// The no-load latency the limit is measured against (gradient), ms.
    pub baseline_ms: Option<f64>,
    /// gradient: how the baseline was last measured.
    pub baseline_source: Option<BaselineSource>,
    /// gradient: seconds since the baseline was last measured.
    pub baseline_measured_s_ago: Option<f64>,
    /// gradient: seconds since a window the limit did not bind last matched
    /// the baseline (or since it was measured).
    pub baseline_confirmed_s_ago: Option<f64>,
    /// gradient: seconds until the baseline goes stale unless confirmed; a
    /// stale baseline is re-measured by a probe the next time the limit binds
    /// (0: stale now).
    pub baseline_stale_in_s: Option<f64>,
    /// The latency of the last window, ms.
    pub current_ms: Option<f64>,
}

/// A limit algorithm: fed a sample per answered request, it says the limit.
pub trait LimitAlgorithm: Send + std::fmt::Debug {
    /// Takes one sample; returns the new limit when it changed.
    fn sample(&mut self, sample: Sample, now: Instant) -> Option<usize>;
    /// The limit now.
    fn limit(&self) -> usize;
    /// Its live state at `now`.
    fn snapshot(&self, now: Instant) -> AlgorithmSnapshot;
    /// While a probe holds the limit at `min_limit`: the probe's number (a
    /// new one per probe). Requests admitted before it neither hold its
    /// slots nor teach it.
    fn probe(&self) -> Option<u64> {
        None
    }
    /// Time passed without a sample: a probe past its deadline ends.
    /// Returns the new limit when it changed.
    fn tick(&mut self, _now: Instant) -> Option<usize> {
        None
    }
}

/// What the algorithm is doing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Since start: growing by one per answer that found the limit binding,
    /// until the latency rises.
    SlowStart,
    /// Moving the limit by the gradient.
    Tracking,
    /// Holding the limit at `min_limit` to measure the no-load latency.
    Probing,
}

/// How the baseline was last measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineSource {
    /// The first window after start, at `initial_limit` or below.
    FirstWindow,
    /// A window faster than the baseline lowered it.
    FasterWindow,
    /// A probe: the limit held at `min_limit` for `baseline_windows`.
    Probe,
}

/// Settings that make a [`LimitAlgorithm`] (the adaptive module's
/// `AdaptiveSettings`): admission builds its algorithm from them, and keeps
/// its state across a reload that keeps them.
pub trait AlgorithmSettings: std::fmt::Debug + Send + Sync + 'static {
    /// The limit's upper bound (it replaces `max_inflight`).
    fn upper_bound(&self) -> usize;
    /// A fresh algorithm, started at `now`.
    fn build(&self, now: Instant) -> Box<dyn LimitAlgorithm>;
    /// Itself, to compare.
    fn as_any(&self) -> &dyn Any;
    /// Whether `other` are the same settings.
    fn same_as(&self, other: &dyn AlgorithmSettings) -> bool;
}

/// A concurrency limit another protection may hold down for a while: the
/// circuit breaker's slow start ramps admission's limit back up after the
/// circuit closes (HAProxy's `slowstart`).
pub trait Throttle: std::fmt::Debug + Send + Sync {
    /// The limit configured: where a ramp ends.
    fn full_limit(&self) -> usize;
    /// The limit in force.
    fn limit(&self) -> usize;
    /// Holds the limit at `limit`.
    fn set_limit(self: std::sync::Arc<Self>, limit: usize);
}
