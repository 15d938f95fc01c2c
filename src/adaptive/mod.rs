//! Adaptive concurrency: limit algorithms that discover the upstream's capacity
//! from the latency they measure, instead of a guessed `max_inflight` (as
//! Netflix's concurrency-limits, Envoy's adaptive_concurrency filter and
//! Vector's Adaptive Request Concurrency do).
//!
//! An algorithm is pure logic behind [`LimitAlgorithm`]: it is fed one
//! [`Sample`] per answered request and returns the new limit. The admission
//! [`Controller`](crate::admission::Controller) applies it; its queue, priority,
//! timeout and Retry-After rules work unchanged on top of the moving limit.

mod aimd;
mod gradient;

use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::distinct_clients::DistinctClients;

pub use aimd::{Aimd, AimdSettings};
pub use gradient::{BaselineSource, Gradient, GradientSettings, Phase};

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

/// A window's overload signals count when they come from at least this
/// many distinct clients, or from every client of the window when fewer:
/// one client whose requests time out (a query heavier than the others')
/// cannot lower everyone's limit, as it cannot open the circuit.
pub const MIN_OVERLOADED_CLIENTS: usize = 3;

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

/// Bounds shared by every algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The limit never goes below this.
    pub min: usize,
    /// Nor above this.
    pub max: usize,
    /// Where it starts.
    pub initial: usize,
}

impl Bounds {
    fn clamp(&self, limit: f64) -> f64 {
        limit.clamp(self.min as f64, self.max as f64)
    }
}

/// Which algorithm, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdaptiveSettings {
    /// Latency gradient with a periodically re-measured baseline.
    Gradient(Bounds, GradientSettings),
    /// Additive increase, multiplicative decrease on overload signals.
    Aimd(Bounds, AimdSettings),
}

impl AdaptiveSettings {
    /// A fresh algorithm.
    pub fn build(&self, now: Instant) -> Box<dyn LimitAlgorithm> {
        match *self {
            AdaptiveSettings::Gradient(bounds, s) => Box::new(Gradient::new(bounds, s, now)),
            AdaptiveSettings::Aimd(bounds, s) => Box::new(Aimd::new(bounds, s, now)),
        }
    }

    /// The bounds.
    pub fn bounds(&self) -> Bounds {
        match *self {
            AdaptiveSettings::Gradient(b, _) | AdaptiveSettings::Aimd(b, _) => b,
        }
    }
}

/// Samples gathered over one window: at least `min_samples` and `length`.
#[derive(Debug, Clone)]
struct Window {
    started: Instant,
    count: u32,
    rtt_sum: Duration,
    dropped: u32,
    /// Samples that finished with the limit binding.
    limited: u32,
    max_inflight: usize,
    /// The window's clients, and those whose samples were dropped.
    callers: DistinctClients,
    droppers: DistinctClients,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            count: 0,
            rtt_sum: Duration::ZERO,
            dropped: 0,
            limited: 0,
            max_inflight: 0,
            // Counted for the window's life: a window starts them afresh.
            callers: DistinctClients::new(MIN_OVERLOADED_CLIENTS, Duration::MAX),
            droppers: DistinctClients::new(MIN_OVERLOADED_CLIENTS, Duration::MAX),
        }
    }

    fn add(&mut self, s: &Sample) {
        self.count += 1;
        self.max_inflight = self.max_inflight.max(s.inflight);
        self.limited += u32::from(s.limited);
        // A client not known (a service outside the listener) is one client.
        let client = s
            .client
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        self.callers.note(client, self.started);
        if s.dropped {
            self.dropped += 1;
            self.droppers.note(client, self.started);
        } else {
            self.rtt_sum += s.rtt;
        }
    }

    fn done(&self, length: Duration, min_samples: u32, now: Instant) -> bool {
        self.count >= min_samples && now - self.started >= length
    }

    /// Overload signals from enough of the window's clients (see
    /// [`MIN_OVERLOADED_CLIENTS`]).
    fn overloaded(&self) -> bool {
        self.dropped > 0 && self.droppers.count(self.started) >= self.callers.count(self.started)
    }

    /// The limit bound at least half the window: demand was held back.
    fn binding(&self) -> bool {
        self.limited * 2 >= self.count
    }

    /// The limit bound at no point of the window: the upstream saw the
    /// clients' own demand.
    fn unbound(&self) -> bool {
        self.limited == 0
    }

    /// Mean latency of the answered (not dropped) samples.
    fn mean(&self) -> Option<Duration> {
        let ok = self.count - self.dropped;
        (ok > 0).then(|| self.rtt_sum / ok)
    }
}

#[cfg(test)]
mod tests;
