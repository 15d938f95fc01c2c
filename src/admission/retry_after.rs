//! How long shed clients should stay away: the estimated time to drain the work
//! ahead, from a moving estimate of the completion rate.

use std::time::Duration;

use tokio::time::Instant;

/// Weight of the newest inter-completion interval in the moving average.
const ALPHA: f64 = 0.05;

/// Completions per second, estimated as the inverse of an exponentially weighted
/// moving average of the time between two completions (of any slot).
///
/// It is conservative when completions stop: the interval since the last
/// completion counts as a lower bound of the current interval, so a stalled
/// upstream is not credited with its old speed.
#[derive(Debug, Clone)]
pub struct CompletionRate {
    mean_interval: Option<f64>,
    last: Option<Instant>,
}

impl Default for CompletionRate {
    fn default() -> Self {
        Self::new()
    }
}

impl CompletionRate {
    /// No completions seen yet.
    pub const fn new() -> Self {
        Self {
            mean_interval: None,
            last: None,
        }
    }

    /// Records a completion at `now`.
    pub fn record(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.mean_interval = Some(match self.mean_interval {
                None => dt,
                Some(mean) => mean + ALPHA * (dt - mean),
            });
        }
        self.last = Some(now);
    }

    /// The upstream became busy at `now` after an idle spell: the idle time says
    /// nothing about its speed, so intervals are measured from here.
    pub fn resume(&mut self, now: Instant) {
        if self.last.is_some() {
            self.last = Some(now);
        }
    }

    /// Completions per second at `now`, once two completions were seen.
    pub fn per_second(&self, now: Instant) -> Option<f64> {
        let mean = self.mean_interval?;
        let since = self
            .last
            .map_or(0.0, |l| now.saturating_duration_since(l).as_secs_f64());
        let interval = mean.max(since).max(1e-6);
        Some(1.0 / interval)
    }

    /// Expected time for `work` requests to complete at the current rate.
    pub fn time_for(&self, work: usize, now: Instant) -> Option<Duration> {
        let rate = self.per_second(now)?;
        Some(Duration::from_secs_f64(work as f64 / rate))
    }
}

/// `Retry-After` in whole seconds: `drain` rounded up, scaled by `jitter`
/// (0.8..=1.2 spreads clients ±20 %), clamped to `min..=max`. With no estimate
/// yet, `min`.
pub fn retry_after_secs(drain: Option<Duration>, jitter: f64, min: u64, max: u64) -> u64 {
    let Some(drain) = drain else {
        return min;
    };
    let secs = (drain.as_secs_f64() * jitter).ceil();
    (secs as u64).clamp(min, max)
}

/// A jitter factor in 0.8..=1.2, from a fast per-thread generator: spreading
/// retries needs no cryptographic randomness.
pub fn jitter() -> f64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, RandomState};
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0u8) | 1);
    }
    STATE.with(|s| {
        // xorshift64*
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        let unit = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        0.8 + 0.4 * unit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn rate_follows_the_completion_interval() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new();
        assert_eq!(rate.per_second(t0), None);
        // 100 completions per second.
        for i in 0..200 {
            rate.record(at(t0, i * 10));
        }
        let r = rate.per_second(at(t0, 1990)).unwrap();
        assert!((r - 100.0).abs() < 1.0, "{r}");
        // The upstream slows to 20 per second: the estimate follows.
        for i in 0..200 {
            rate.record(at(t0, 1990 + (i + 1) * 50));
        }
        let r = rate.per_second(at(t0, 1990 + 200 * 50)).unwrap();
        assert!((r - 20.0).abs() < 1.0, "{r}");
    }

    #[test]
    fn a_stall_lowers_the_rate() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new();
        for i in 0..100 {
            rate.record(at(t0, i * 10));
        }
        // Nothing for 2 s: at most 0.5 per second.
        let r = rate.per_second(at(t0, 990 + 2000)).unwrap();
        assert!(r <= 0.5, "{r}");
    }

    #[test]
    fn idle_time_is_not_a_stall() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new();
        for i in 0..100 {
            rate.record(at(t0, i * 10));
        }
        // Ten idle minutes, then work resumes: still about 100 per second.
        let back = at(t0, 990 + 600_000);
        rate.resume(back);
        let r = rate.per_second(back + Duration::from_millis(5)).unwrap();
        assert!((r - 100.0).abs() < 1.0, "{r}");
    }

    #[test]
    fn drain_time_and_retry_after() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new();
        for i in 0..100 {
            rate.record(at(t0, i * 10)); // 100/s
        }
        let drain = rate.time_for(250, at(t0, 990)).unwrap();
        assert!((drain.as_secs_f64() - 2.5).abs() < 0.05, "{drain:?}");
        assert_eq!(retry_after_secs(Some(drain), 1.0, 1, 60), 3);
        assert_eq!(retry_after_secs(Some(drain), 1.0, 5, 60), 5);
        assert_eq!(
            retry_after_secs(Some(Duration::from_secs(500)), 1.0, 1, 60),
            60
        );
        assert_eq!(retry_after_secs(None, 1.0, 2, 60), 2);
    }

    #[test]
    fn jitter_spreads_within_twenty_percent() {
        let samples: Vec<f64> = (0..10_000).map(|_| jitter()).collect();
        assert!(samples.iter().all(|j| (0.8..=1.2).contains(j)));
        let low = samples.iter().filter(|j| **j < 0.9).count();
        let high = samples.iter().filter(|j| **j > 1.1).count();
        assert!(low > 1500 && high > 1500, "{low} {high}");
        // Over many clients the advice spreads over several whole seconds.
        let drain = Some(Duration::from_secs(10));
        let distinct: std::collections::BTreeSet<u64> = samples
            .iter()
            .map(|j| retry_after_secs(drain, *j, 1, 60))
            .collect();
        assert!(distinct.len() >= 4, "{distinct:?}");
    }
}
