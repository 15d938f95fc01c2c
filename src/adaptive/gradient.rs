//! [`Gradient`]: moves the limit by the ratio of the no-load latency (the
//! baseline) to the current one, as Netflix's Gradient2 does.
//!
//! The baseline must stay true without costing healthy traffic anything, and
//! that decides how it is kept (measured in BENCHMARKS.md, "Adaptive
//! concurrency that never sheds a healthy load"):
//! - A probe that holds the limit low to measure the no-load latency (Envoy's
//!   minRTT window) sheds whatever arrives meanwhile: every minute, on a
//!   half-loaded upstream.
//! - Gradient2's long-window average follows the latency wherever it goes:
//!   under sustained overload the baseline rises with the queue it measures,
//!   and the limit drifts to its maximum.
//!
//! So the baseline is the fastest window seen (lowered at once), and the load
//! itself keeps it fresh: a window the limit did not bind, as fast as the
//! baseline, shows the baseline still holds. A probe is needed only when no
//! such window came for `baseline_interval` (jittered, so a fleet does not
//! probe in step), and then only while the limit binds: requests are already
//! waiting, the upstream is at capacity or the baseline went stale, and what
//! the probe holds back for two windows is what the limit is holding back
//! anyway.
//!
//! A fresh limit starts at `initial_limit` and grows like TCP's slow start:
//! one slot per answer that found the limit binding and the latency within an
//! eighth of the baseline (HyStart's threshold), until a window is slower than
//! that.

use std::time::Duration;

use tokio::time::Instant;

use super::{AlgorithmSnapshot, BaselineSource, Bounds, LimitAlgorithm, Phase, Sample, Window};
use crate::jitter::Jitter;

/// How far a window's latency may exceed the baseline and still confirm it.
const CONFIRM: f64 = 1.1;
/// Slow start ends at a window slower than the baseline by this factor.
const SLOW_START_EXIT: f64 = 1.125;
/// Each staleness interval is drawn from this range of `baseline_interval`.
const STALE_JITTER: (f64, f64) = (0.75, 1.25);
/// A probe ends after this many times its windows' length, with what it has.
const PROBE_DEADLINE_WINDOWS: u32 = 4;

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
    /// How long the baseline may go unconfirmed before it is stale (±25 %);
    /// a stale baseline is re-measured the next time the limit binds.
    pub baseline_interval: Duration,
    /// Windows a probe lasts.
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

#[derive(Debug, Clone, Copy)]
struct Baseline {
    rtt: Duration,
    source: BaselineSource,
    measured: Instant,
    confirmed: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    /// Its number.
    id: u64,
    /// It ends then, with what it has.
    deadline: Instant,
    windows: u32,
    /// The limit to return to.
    resume: f64,
    /// The fastest window of the probe.
    best: Option<Duration>,
}

/// The gradient algorithm.
#[derive(Debug, Clone)]
pub struct Gradient {
    bounds: Bounds,
    settings: GradientSettings,
    limit: f64,
    window: Window,
    baseline: Option<Baseline>,
    current: Option<Duration>,
    phase: Phase,
    probe: Option<Probe>,
    /// When the baseline goes stale unless a window confirms it first.
    stale_at: Instant,
    jitter: Jitter,
    /// Probes started so far.
    probes: u64,
}

impl Gradient {
    /// Starts at `bounds.initial`, in slow start; the first window gives the
    /// baseline.
    pub fn new(bounds: Bounds, settings: GradientSettings, now: Instant) -> Self {
        Self::with_jitter(bounds, settings, now, Jitter::from_entropy())
    }

    /// As [`Gradient::new`], with the generator of its staleness intervals.
    pub fn with_jitter(
        bounds: Bounds,
        settings: GradientSettings,
        now: Instant,
        jitter: Jitter,
    ) -> Self {
        let mut g = Self {
            bounds,
            settings,
            limit: bounds.initial as f64,
            window: Window::new(now),
            baseline: None,
            current: None,
            phase: Phase::SlowStart,
            probe: None,
            stale_at: now,
            jitter,
            probes: 0,
        };
        g.fresh(now);
        g
    }

    fn effective(&self) -> usize {
        match self.phase {
            Phase::Probing => self.bounds.min,
            _ => self.limit.round() as usize,
        }
    }

    /// The baseline is not due again before a jittered interval.
    fn postpone(&mut self, now: Instant) {
        let (low, high) = STALE_JITTER;
        let interval = self
            .settings
            .baseline_interval
            .mul_f64(self.jitter.between(low, high));
        self.stale_at = now + interval;
    }

    /// The baseline was measured or confirmed at `now`.
    fn fresh(&mut self, now: Instant) {
        self.postpone(now);
        if let Some(b) = &mut self.baseline {
            b.confirmed = now;
        }
    }

    fn measured(&mut self, rtt: Duration, source: BaselineSource, now: Instant) {
        self.baseline = Some(Baseline {
            rtt,
            source,
            measured: now,
            confirmed: now,
        });
        self.fresh(now);
    }

    /// One more probe window; at the last, the fastest becomes the baseline
    /// (whatever the old one was: the point is to find out) and the limit
    /// returns.
    fn probe_window(&mut self, mean: Option<Duration>, now: Instant) {
        let Some(probe) = &mut self.probe else {
            return;
        };
        probe.windows += 1;
        if let Some(m) = mean {
            probe.best = Some(probe.best.map_or(m, |b| b.min(m)));
        }
        if probe.windows < self.settings.baseline_windows {
            return;
        }
        let Some(best) = probe.best else {
            return;
        };
        self.end_probe(Some(best), now);
    }

    /// The probe ends: the limit returns; `best` becomes the baseline, or,
    /// with nothing measured, the old one stays until the next interval.
    fn end_probe(&mut self, best: Option<Duration>, now: Instant) {
        let Some(probe) = self.probe.take() else {
            return;
        };
        self.limit = probe.resume;
        self.phase = Phase::Tracking;
        match best {
            Some(best) => self.measured(best, BaselineSource::Probe, now),
            None => self.postpone(now),
        }
    }

    /// A probe past its deadline ends with the fastest of its windows,
    /// the unfinished one included.
    fn expire_probe(&mut self, now: Instant) {
        let Some(probe) = self.probe else {
            return;
        };
        if now < probe.deadline {
            return;
        }
        let window = std::mem::replace(&mut self.window, Window::new(now));
        let best = match (probe.best, window.mean()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.end_probe(best, now);
    }

    fn end_window(&mut self, now: Instant) {
        let window = std::mem::replace(&mut self.window, Window::new(now));
        let mean = window.mean();
        self.current = mean.or(self.current);
        let s = self.settings;
        if self.phase == Phase::Probing {
            return self.probe_window(mean, now);
        }
        if window.overloaded() {
            self.limit = self.bounds.clamp(self.limit * s.backoff);
            self.phase = Phase::Tracking;
            return;
        }
        let Some(mean) = mean else {
            return;
        };
        let baseline = match self.baseline {
            None => {
                self.measured(mean, BaselineSource::FirstWindow, now);
                if window.binding() {
                    // Measured at a limit that held demand back: if that limit
                    // was above the upstream's capacity, the latency includes
                    // its queue. Re-measure at the next window that binds.
                    self.stale_at = now;
                }
                return;
            }
            Some(b) if mean < b.rtt => {
                self.measured(mean, BaselineSource::FasterWindow, now);
                mean
            }
            Some(b) => b.rtt,
        };
        let ratio = baseline.as_secs_f64() / mean.as_secs_f64();
        if window.unbound() && ratio * CONFIRM >= 1.0 {
            self.fresh(now);
        }
        if now >= self.stale_at && window.binding() {
            self.phase = Phase::Probing;
            self.probes += 1;
            let deadline = s.window * PROBE_DEADLINE_WINDOWS * s.baseline_windows;
            self.probe = Some(Probe {
                id: self.probes,
                deadline: now + deadline,
                windows: 0,
                resume: self.limit,
                best: None,
            });
            return;
        }
        let gradient = (s.tolerance * ratio).clamp(0.5, 1.0);
        let queue = self.limit.sqrt();
        if self.phase == Phase::SlowStart {
            if ratio * SLOW_START_EXIT >= 1.0 {
                return; // still growing, answer by answer
            }
            // The latency rose: the limit overshot the knee by what was
            // admitted in the last round trip. Step back in one go.
            self.phase = Phase::Tracking;
            self.limit = self.bounds.clamp(self.limit * gradient + queue);
            return;
        }
        let estimate = self.limit * gradient + queue;
        let mut next = (1.0 - s.smoothing) * self.limit + s.smoothing * estimate;
        // Demand below half the limit says nothing about capacity: do not
        // grow (Gradient2's rule). Without it, the √limit allowance outweighs
        // a slightly slower window and the limit creeps up for ever on a
        // calm route, and a surge would then find no limit at all.
        if (window.max_inflight as f64) < self.limit / 2.0 {
            next = next.min(self.limit);
        }
        self.limit = self.bounds.clamp(next);
    }

    /// Slow start: an answer that found the limit binding, as fast as the
    /// baseline, earns one more slot (the limit doubles per round trip).
    fn slow_start(&mut self, sample: &Sample) {
        let Some(baseline) = self.baseline else {
            return;
        };
        if sample.limited
            && !sample.dropped
            && sample.rtt.as_secs_f64() <= baseline.rtt.as_secs_f64() * SLOW_START_EXIT
        {
            self.limit = self.bounds.clamp(self.limit + 1.0);
        }
    }
}

impl LimitAlgorithm for Gradient {
    fn sample(&mut self, sample: Sample, now: Instant) -> Option<usize> {
        let before = self.effective();
        self.expire_probe(now);
        match self.phase {
            Phase::SlowStart => self.slow_start(&sample),
            // A probe learns only from requests sent at its own concurrency:
            // those still draining from the old limit carry its queue.
            Phase::Probing if sample.inflight > self.bounds.min => return None,
            _ => {}
        }
        self.window.add(&sample);
        // The first window needs only its samples: the sooner a baseline,
        // the sooner slow start can grow a limit that is too small.
        let length = match self.baseline {
            Some(_) => self.settings.window,
            None => Duration::ZERO,
        };
        if self.window.done(length, self.settings.min_samples, now) {
            self.end_window(now);
        }
        let after = self.effective();
        (after != before).then_some(after)
    }

    fn limit(&self) -> usize {
        self.effective()
    }

    fn probe(&self) -> Option<u64> {
        self.probe.map(|p| p.id)
    }

    fn tick(&mut self, now: Instant) -> Option<usize> {
        let before = self.effective();
        self.expire_probe(now);
        let after = self.effective();
        (after != before).then_some(after)
    }

    fn snapshot(&self, now: Instant) -> AlgorithmSnapshot {
        let ago = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
        let b = self.baseline;
        AlgorithmSnapshot {
            algorithm: "gradient",
            limit: self.effective(),
            phase: Some(self.phase),
            baseline_ms: b.map(|b| b.rtt.as_secs_f64() * 1000.0),
            baseline_source: b.map(|b| b.source),
            baseline_measured_s_ago: b.map(|b| ago(b.measured)),
            baseline_confirmed_s_ago: b.map(|b| ago(b.confirmed)),
            baseline_stale_in_s: b
                .map(|_| self.stale_at.saturating_duration_since(now).as_secs_f64()),
            current_ms: self.current.map(|d| d.as_secs_f64() * 1000.0),
        }
    }
}
