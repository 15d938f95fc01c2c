//! How long shed clients should stay away: the estimated time to drain the work
//! ahead, from a moving estimate of the completion rate.

use std::time::Duration;

use tokio::time::Instant;

use crate::jitter::Jitter;

/// Weight of the newest inter-completion interval in the moving average.
const ALPHA: f64 = 0.05;

/// Completions per second while the route is saturated (every slot taken, or
/// requests waiting): its drain rate, the one thing a full queue's wait and a
/// shed client's `Retry-After` depend on. Estimated as the inverse of an
/// exponentially weighted moving average of the time between two completions.
///
/// Only intervals spent saturated count. Below the limit, completions come as
/// fast as requests arrive, not as fast as the upstream can serve: a lull
/// spanned by one slow request would otherwise read as a collapse of the
/// upstream, and `Retry-After` would jump towards its maximum for the next
/// hundred completions. The estimate is conservative when completions stop
/// under saturation: the time since the last one counts as a lower bound of
/// the current interval, so a stalled upstream is not credited with its old
/// speed.
#[derive(Debug, Clone)]
pub struct CompletionRate {
    mean_interval: Option<f64>,
    /// Start of the interval being measured: the last completion while
    /// saturated, or the moment saturation began. `None` below the limit.
    since: Option<Instant>,
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
            since: None,
        }
    }

    /// The route is saturated at `now` (its last slot was just taken, or a
    /// request joined the queue); intervals count from here.
    pub fn saturated(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// A completion at `now`: `saturated` says whether the route was saturated
    /// as it completed, `still` whether it is once the slot found its next
    /// taker (a waiter, or nobody).
    pub fn record(&mut self, now: Instant, saturated: bool, still: bool) {
        if saturated && let Some(since) = self.since {
            let dt = now.saturating_duration_since(since).as_secs_f64();
            self.mean_interval = Some(match self.mean_interval {
                None => dt,
                Some(mean) => mean + ALPHA * (dt - mean),
            });
        }
        self.since = still.then_some(now);
    }

    /// Completions per second at `now`, once one saturated interval was seen.
    pub fn per_second(&self, now: Instant) -> Option<f64> {
        let mean = self.mean_interval?;
        let stalled = self
            .since
            .map_or(0.0, |s| now.saturating_duration_since(s).as_secs_f64());
        let interval = mean.max(stalled).max(1e-6);
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
    thread_local! {
        static STATE: Cell<Jitter> = Cell::new(Jitter::from_entropy());
    }
    STATE.with(|s| {
        let mut j = s.get();
        let factor = j.between(0.8, 1.2);
        s.set(j);
        factor
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// `n` completions `every` ms apart from `start_ms`, saturated throughout.
    fn busy(rate: &mut CompletionRate, t0: Instant, start_ms: u64, n: u64, every: u64) {
        rate.saturated(at(t0, start_ms));
        for i in 1..=n {
            rate.record(at(t0, start_ms + i * every), true, true);
        }
    }

    #[test]
    fn rate_follows_the_completion_interval() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new();
        assert_eq!(rate.per_second(t0), None);
        busy(&mut rate, t0, 0, 200, 10); // 100 per second
        let r = rate.per_second(at(t0, 2000)).unwrap();
        assert!((r - 100.0).abs() < 1.0, "{r}");
        // The upstream slows to 20 per second: the estimate follows.
        busy(&mut rate, t0, 2000, 200, 50);
        let r = rate.per_second(at(t0, 12_000)).unwrap();
        assert!((r - 20.0).abs() < 1.0, "{r}");
    }

    #[test]
    fn a_stall_under_saturation_lowers_the_rate() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new();
        busy(&mut rate, t0, 0, 100, 10);
        // Saturated, and nothing completes for 2 s: at most 0.5 per second.
        let r = rate.per_second(at(t0, 1000 + 2000)).unwrap();
        assert!(r <= 0.5, "{r}");
    }

    #[test]
    fn idle_time_is_not_a_stall() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new();
        busy(&mut rate, t0, 0, 100, 10);
        // The queue empties; ten idle minutes; work resumes.
        rate.record(at(t0, 1010), true, false);
        let back = at(t0, 601_010);
        let r = rate.per_second(back).unwrap();
        assert!((r - 100.0).abs() < 2.0, "{r}");
    }

    #[test]
    fn a_lull_spanned_by_one_slow_request_is_not_a_slow_drain() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new();
        busy(&mut rate, t0, 0, 100, 10);
        rate.record(at(t0, 1010), true, false);
        // One request, alone below the limit, takes 30 s.
        rate.record(at(t0, 31_010), false, false);
        // Saturated again: the drain rate is what it was, not one per 30 s.
        rate.saturated(at(t0, 31_020));
        let r = rate.per_second(at(t0, 31_021)).unwrap();
        assert!((r - 100.0).abs() < 2.0, "{r}");
        let wait = rate.time_for(32, at(t0, 31_021)).unwrap();
        assert_eq!(retry_after_secs(Some(wait), 1.0, 1, 60), 1);
    }

    #[test]
    fn drain_time_and_retry_after() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new();
        busy(&mut rate, t0, 0, 100, 10); // 100/s
        let drain = rate.time_for(250, at(t0, 1000)).unwrap();
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
