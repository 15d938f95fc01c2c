//! [`Aimd`]: additive increase while answers come back in time, multiplicative
//! decrease on an overload signal (a timeout, a failure, or a latency above
//! `latency_threshold`) — TCP's congestion control, applied to requests.

use std::time::Duration;

use tokio::time::Instant;

use super::{AlgorithmSnapshot, Bounds, LimitAlgorithm, Sample, Window};

/// Tuning of [`Aimd`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AimdSettings {
    /// Length of a measurement window.
    pub window: Duration,
    /// Samples a window needs before it counts.
    pub min_samples: u32,
    /// A window whose mean latency is above this is an overload signal.
    pub latency_threshold: Duration,
    /// Multiplier on an overload signal.
    pub backoff: f64,
    /// Added per window without one.
    pub increase: f64,
}

impl Default for AimdSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(250),
            min_samples: 10,
            latency_threshold: Duration::from_secs(1),
            backoff: 0.9,
            increase: 1.0,
        }
    }
}

/// The AIMD algorithm.
#[derive(Debug, Clone)]
pub struct Aimd {
    bounds: Bounds,
    settings: AimdSettings,
    limit: f64,
    window: Window,
    current: Option<Duration>,
}

impl Aimd {
    /// Starts at `bounds.initial`.
    pub fn new(bounds: Bounds, settings: AimdSettings, now: Instant) -> Self {
        Self {
            bounds,
            settings,
            limit: bounds.initial as f64,
            window: Window::new(now),
            current: None,
        }
    }
}

impl LimitAlgorithm for Aimd {
    fn sample(&mut self, sample: Sample, now: Instant) -> Option<usize> {
        let before = self.limit();
        self.window.add(&sample);
        let s = self.settings;
        if self.window.done(s.window, s.min_samples, now) {
            let window = std::mem::replace(&mut self.window, Window::new(now));
            let mean = window.mean();
            self.current = mean.or(self.current);
            let overloaded = window.overloaded() || mean.is_some_and(|m| m > s.latency_threshold);
            if overloaded {
                self.limit = self.bounds.clamp(self.limit * s.backoff);
            } else if window.max_inflight as f64 >= self.limit / 2.0 {
                self.limit = self.bounds.clamp(self.limit + s.increase);
            }
        }
        let after = self.limit();
        (after != before).then_some(after)
    }

    fn limit(&self) -> usize {
        self.limit.round() as usize
    }

    fn snapshot(&self, _now: Instant) -> AlgorithmSnapshot {
        AlgorithmSnapshot {
            algorithm: "aimd",
            limit: self.limit(),
            phase: None,
            baseline_ms: None,
            baseline_source: None,
            baseline_measured_s_ago: None,
            baseline_confirmed_s_ago: None,
            baseline_stale_in_s: None,
            current_ms: self.current.map(|d| d.as_secs_f64() * 1000.0),
        }
    }
}
