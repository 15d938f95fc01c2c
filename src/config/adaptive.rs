//! `[route.admission.adaptive]`: how an adaptive `max_inflight` finds the
//! upstream's capacity.

use std::time::Duration;

use serde::Deserialize;

use super::values::{Limit, Millis};
use crate::adaptive::{AdaptiveSettings, AimdSettings, Bounds, GradientSettings};

/// `max_inflight`: a number, or `"adaptive"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxInflight {
    /// At most this many requests at the upstream.
    Fixed(Limit),
    /// Discovered from the upstream's latency (`[route.admission.adaptive]`).
    Adaptive,
}

impl MaxInflight {
    /// The fixed limit, if any.
    pub fn fixed(self) -> Option<Limit> {
        match self {
            MaxInflight::Fixed(l) => Some(l),
            MaxInflight::Adaptive => None,
        }
    }
}

/// The limit algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Latency gradient against a periodically re-measured no-load baseline.
    #[default]
    Gradient,
    /// Additive increase, multiplicative decrease on overload signals.
    Aimd,
}

/// `[route.admission.adaptive]`; every key optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// `gradient` (default) or `aimd`.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// The limit never goes below this.
    #[serde(default = "default_min")]
    pub min_limit: Limit,
    /// Nor above this.
    #[serde(default = "default_max")]
    pub max_limit: Limit,
    /// Where it starts.
    #[serde(default = "default_initial")]
    pub initial_limit: Limit,
    /// Length of a measurement window.
    #[serde(default = "default_window")]
    pub window_ms: Millis,
    /// Answers a window needs before it counts.
    #[serde(default = "default_min_samples")]
    pub min_samples: Limit,
    /// Multiplier on an overload signal (0 < b < 1).
    #[serde(default = "default_backoff")]
    pub backoff: f64,
    /// gradient: how far latency may rise over the baseline before shrinking (≥ 1).
    #[serde(default)]
    pub tolerance: Option<f64>,
    /// gradient: weight of a new estimate (0 < s ≤ 1).
    #[serde(default)]
    pub smoothing: Option<f64>,
    /// gradient: how often the no-load baseline is re-measured at min_limit.
    #[serde(default)]
    pub baseline_interval_ms: Option<Millis>,
    /// aimd: a window slower than this on average is an overload signal.
    #[serde(default)]
    pub latency_threshold_ms: Option<Millis>,
    /// aimd: added to the limit per window without an overload signal.
    #[serde(default)]
    pub increase: Option<f64>,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::default(),
            min_limit: default_min(),
            max_limit: default_max(),
            initial_limit: default_initial(),
            window_ms: default_window(),
            min_samples: default_min_samples(),
            backoff: default_backoff(),
            tolerance: None,
            smoothing: None,
            baseline_interval_ms: None,
            latency_threshold_ms: None,
            increase: None,
        }
    }
}

const fn default_min() -> Limit {
    Limit::new(1)
}
const fn default_max() -> Limit {
    Limit::new(1000)
}
const fn default_initial() -> Limit {
    Limit::new(10)
}
const fn default_window() -> Millis {
    Millis::from_ms(250)
}
const fn default_min_samples() -> Limit {
    Limit::new(10)
}
const fn default_backoff() -> f64 {
    0.9
}

impl AdaptiveConfig {
    /// Checks the keys against each other; `at` is the section's key path.
    pub(super) fn validate(&self, at: &str) -> Result<(), (String, String)> {
        let key = |k: &str| format!("{at}.{k}");
        let (min, max, initial) = (
            self.min_limit.get(),
            self.max_limit.get(),
            self.initial_limit.get(),
        );
        if min > max {
            return Err((
                key("min_limit"),
                format!("must not exceed max_limit ({min} > {max})"),
            ));
        }
        if !(min..=max).contains(&initial) {
            return Err((
                key("initial_limit"),
                format!("must be within min_limit..=max_limit ({min}..={max}), got {initial}"),
            ));
        }
        if !(self.backoff > 0.0 && self.backoff < 1.0) {
            return Err((
                key("backoff"),
                format!("must be above 0 and below 1 (got {})", self.backoff),
            ));
        }
        let foreign: &[(&str, bool)] = match self.algorithm {
            Algorithm::Gradient => &[
                ("latency_threshold_ms", self.latency_threshold_ms.is_some()),
                ("increase", self.increase.is_some()),
            ],
            Algorithm::Aimd => &[
                ("tolerance", self.tolerance.is_some()),
                ("smoothing", self.smoothing.is_some()),
                ("baseline_interval_ms", self.baseline_interval_ms.is_some()),
            ],
        };
        if let Some((name, _)) = foreign.iter().find(|(_, set)| *set) {
            let other = match self.algorithm {
                Algorithm::Gradient => "aimd",
                Algorithm::Aimd => "gradient",
            };
            return Err((
                key(name),
                format!("is a setting of algorithm = \"{other}\"; it has no effect here"),
            ));
        }
        if let Some(t) = self.tolerance
            && !(1.0..=10.0).contains(&t)
        {
            return Err((
                key("tolerance"),
                format!("must be within 1.0..=10.0 (got {t})"),
            ));
        }
        if let Some(s) = self.smoothing
            && !(s > 0.0 && s <= 1.0)
        {
            return Err((
                key("smoothing"),
                format!("must be above 0 and at most 1 (got {s})"),
            ));
        }
        if let Some(i) = self.increase
            && !(i > 0.0 && i.is_finite())
        {
            return Err((key("increase"), format!("must be above 0 (got {i})")));
        }
        Ok(())
    }

    /// The algorithm's settings.
    pub fn settings(&self) -> AdaptiveSettings {
        let bounds = Bounds {
            min: self.min_limit.as_usize(),
            max: self.max_limit.as_usize(),
            initial: self.initial_limit.as_usize(),
        };
        let window: Duration = self.window_ms.get();
        let min_samples = u32::try_from(self.min_samples.get()).unwrap_or(u32::MAX);
        match self.algorithm {
            Algorithm::Gradient => {
                let d = GradientSettings::default();
                AdaptiveSettings::Gradient(
                    bounds,
                    GradientSettings {
                        window,
                        min_samples,
                        tolerance: self.tolerance.unwrap_or(d.tolerance),
                        smoothing: self.smoothing.unwrap_or(d.smoothing),
                        baseline_interval: self
                            .baseline_interval_ms
                            .map_or(d.baseline_interval, |m| m.get()),
                        baseline_windows: d.baseline_windows,
                        backoff: self.backoff,
                    },
                )
            }
            Algorithm::Aimd => {
                let d = AimdSettings::default();
                AdaptiveSettings::Aimd(
                    bounds,
                    AimdSettings {
                        window,
                        min_samples,
                        latency_threshold: self
                            .latency_threshold_ms
                            .map_or(d.latency_threshold, |m| m.get()),
                        backoff: self.backoff,
                        increase: self.increase.unwrap_or(d.increase),
                    },
                )
            }
        }
    }
}
