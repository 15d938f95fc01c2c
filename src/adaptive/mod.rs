//! Adaptive concurrency: limit algorithms that discover the upstream's capacity
//! from the latency they measure, instead of a guessed `max_inflight` (as
//! Netflix's concurrency-limits, Envoy's adaptive_concurrency filter and
//! Vector's Adaptive Request Concurrency do).
//!
//! An algorithm is pure logic behind [`LimitAlgorithm`]: it is fed one
//! [`Sample`] per answered request and returns the new limit. The admission
//! admission controller applies it; its queue, priority,
//! timeout and Retry-After rules work unchanged on top of the moving limit.

mod aimd;
mod gradient;

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::distinct_clients::DistinctClients;

pub use crate::limit::{AlgorithmSnapshot, BaselineSource, LimitAlgorithm, Phase, Sample};
pub use aimd::{Aimd, AimdSettings};
pub use gradient::{Gradient, GradientSettings};

/// A window's overload signals count when they come from at least this
/// many distinct clients, or from every client of the window when fewer:
/// one client whose requests time out (a query heavier than the others')
/// cannot lower everyone's limit, as it cannot open the circuit.
pub const MIN_OVERLOADED_CLIENTS: usize = 3;

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

impl crate::limit::AlgorithmSettings for AdaptiveSettings {
    fn upper_bound(&self) -> usize {
        self.bounds().max
    }

    fn build(&self, now: Instant) -> Box<dyn LimitAlgorithm> {
        AdaptiveSettings::build(self, now)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn same_as(&self, other: &dyn crate::limit::AlgorithmSettings) -> bool {
        other.as_any().downcast_ref::<Self>() == Some(self)
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
