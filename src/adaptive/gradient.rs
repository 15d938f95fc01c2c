//! [`Gradient`]: moves the limit by the ratio of the no-load latency to the
//! current one (Netflix's Gradient2), with a baseline that is re-measured
//! periodically at a low limit (Envoy's minRTT window) so that a baseline
//! taken under load does not stick.

use std::time::Duration;

use tokio::time::Instant;

use super::{AlgorithmSnapshot, Bounds, LimitAlgorithm, Sample, Window};

/// Tuning of [`Gradient`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradientSettings {
    /// Length of a measurement window.
    pub window: Duration,
    /// Samples a window needs before it counts.
    pub min_samples: u32,
    /// How much the current latency may exceed the baseline before the limit
    /// shrinks (1.0: not at all).
    pub tolerance: f64,
    /// Weight of a new estimate against the old limit (0..=1).
    pub smoothing: f64,
    /// How often the baseline is re-measured at `min_limit`.
    pub baseline_interval: Duration,
    /// Windows the re-measurement lasts.
    pub baseline_windows: u32,
    /// Multiplier on an overload signal (a window with a timeout or 5xx).
    pub backoff: f64,
}

impl Default for GradientSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(250),
            min_samples: 10,
            tolerance: 1.0,
            smoothing: 0.2,
            baseline_interval: Duration::from_secs(60),
            baseline_windows: 2,
            backoff: 0.9,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Moving the limit by the gradient.
    Tracking,
    /// Holding the limit at `min` to measure the no-load latency; `windows`
    /// measured so far, the limit to return to.
    Baseline {
        windows: u32,
        resume: f64,
        best: Option<Duration>,
    },
}

/// The gradient algorithm.
#[derive(Debug, Clone)]
pub struct Gradient {
    bounds: Bounds,
    settings: GradientSettings,
    limit: f64,
    window: Window,
    baseline: Option<Duration>,
    current: Option<Duration>,
    phase: Phase,
    next_baseline: Instant,
}

impl Gradient {
    /// Starts at `bounds.initial`, measuring the baseline at once.
    pub fn new(bounds: Bounds, settings: GradientSettings, now: Instant) -> Self {
        Self {
            bounds,
            settings,
            limit: bounds.initial as f64,
            window: Window::new(now),
            baseline: None,
            current: None,
            phase: Phase::Baseline {
                windows: 0,
                resume: bounds.initial as f64,
                best: None,
            },
            next_baseline: now + settings.baseline_interval,
        }
    }

    fn effective(&self) -> usize {
        match self.phase {
            Phase::Baseline { .. } => self.bounds.min,
            Phase::Tracking => self.limit.round() as usize,
        }
    }

    fn end_window(&mut self, now: Instant) {
        let window = std::mem::replace(&mut self.window, Window::new(now));
        let mean = window.mean();
        self.current = mean.or(self.current);
        let s = self.settings;
        match &mut self.phase {
            Phase::Baseline {
                windows,
                resume,
                best,
            } => {
                *windows += 1;
                if let Some(m) = mean {
                    *best = Some(best.map_or(m, |b| b.min(m)));
                }
                if *windows >= s.baseline_windows && best.is_some() {
                    self.baseline = *best;
                    self.limit = *resume;
                    self.phase = Phase::Tracking;
                    self.next_baseline = now + s.baseline_interval;
                }
                return;
            }
            Phase::Tracking => {}
        }
        if now >= self.next_baseline {
            self.phase = Phase::Baseline {
                windows: 0,
                resume: self.limit,
                best: None,
            };
            return;
        }
        if window.dropped > 0 {
            self.limit = self.bounds.clamp(self.limit * s.backoff);
            return;
        }
        let (Some(baseline), Some(current)) = (self.baseline, mean) else {
            return;
        };
        // A faster window than the baseline lowers the baseline at once.
        if current < baseline {
            self.baseline = Some(current);
        }
        let gradient =
            (s.tolerance * baseline.as_secs_f64() / current.as_secs_f64()).clamp(0.5, 1.0);
        // Demand below half the limit says nothing about capacity: do not grow.
        if gradient >= 1.0 && (window.max_inflight as f64) < self.limit / 2.0 {
            return;
        }
        let queue = self.limit.sqrt();
        let estimate = self.limit * gradient + queue;
        self.limit = self
            .bounds
            .clamp((1.0 - s.smoothing) * self.limit + s.smoothing * estimate);
    }
}

impl LimitAlgorithm for Gradient {
    fn sample(&mut self, sample: Sample, now: Instant) -> Option<usize> {
        let before = self.effective();
        self.window.add(&sample);
        if self
            .window
            .done(self.settings.window, self.settings.min_samples, now)
        {
            self.end_window(now);
        }
        let after = self.effective();
        (after != before).then_some(after)
    }

    fn limit(&self) -> usize {
        self.effective()
    }

    fn snapshot(&self) -> AlgorithmSnapshot {
        AlgorithmSnapshot {
            algorithm: "gradient",
            limit: self.effective(),
            baseline_ms: self.baseline.map(|d| d.as_secs_f64() * 1000.0),
            current_ms: self.current.map(|d| d.as_secs_f64() * 1000.0),
        }
    }
}
