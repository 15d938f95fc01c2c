//! How long shed clients should stay away: the estimated time to drain the work
//! ahead, from a moving estimate of the completion rate.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Completions per second while the route is saturated (every slot taken, or
/// requests waiting): its drain rate. Counted, not averaged: the last
/// `window` saturated completions over the saturated time they took.
///
/// Time counts only while saturated (a clock that stops below the limit):
/// below it completions come as fast as requests arrive, so a lull spanned by
/// one slow request says nothing of the drain rate, and idle time is no stall.
/// Counting over a window is exact whether completions come evenly or in
/// bursts (an upstream's workers finishing together): a burst straddling the
/// window's edge moves the count by at most its size, at most the limit, so
/// with `window` = 8 × limit the estimate is within 1/8 of the true rate.
/// A stall lowers it smoothly: the time since the last completion is in the
/// span, the count is not.
#[derive(Debug, Clone)]
pub struct CompletionRate {
    /// Completions the estimate needs before it may refuse a request.
    window: usize,
    /// Saturated-clock readings of the last `window` saturated completions.
    stamps: VecDeque<Duration>,
    /// Where the count starts: the reading of the completion that left the
    /// window (zero until one has).
    origin: Duration,
    /// Saturated time before the current stretch.
    busy: Duration,
    /// Start of the current saturated stretch; `None` below the limit.
    since: Option<Instant>,
}

/// Completions counted per slot of the limit: a burst of at most `limit`
/// straddling the window's edge errs by at most 1/8 (12.5 %).
pub const WINDOW_PER_SLOT: usize = 8;

impl CompletionRate {
    /// A window of `WINDOW_PER_SLOT` × `max_inflight` completions (16..=4096).
    pub fn for_limit(max_inflight: usize) -> Self {
        Self::new(max_inflight.saturating_mul(WINDOW_PER_SLOT).clamp(16, 4096))
    }

    /// No completions seen yet; warm after `window`.
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            stamps: VecDeque::new(),
            origin: Duration::ZERO,
            busy: Duration::ZERO,
            since: None,
        }
    }

    /// Saturated time at `now`.
    fn clock(&self, now: Instant) -> Duration {
        self.busy
            + self
                .since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }

    /// The route is saturated at `now` (its last slot was just taken, or a
    /// request joined the queue): the clock runs from here.
    pub fn saturated(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// A completion at `now`: `saturated` says whether the route was saturated
    /// as it completed, `still` whether it is once the slot found its next
    /// taker (a waiter, or nobody).
    pub fn record(&mut self, now: Instant, saturated: bool, still: bool) {
        if saturated && self.since.is_some() {
            let at = self.clock(now);
            if self.stamps.len() == self.window {
                self.origin = self.stamps.pop_front().unwrap_or(self.origin);
            }
            self.stamps.push_back(at);
        }
        match (self.since, still) {
            (Some(s), false) => {
                self.busy += now.saturating_duration_since(s);
                self.since = None;
            }
            (None, true) => self.since = Some(now),
            _ => {}
        }
    }

    /// Saturated completions counted (at most the window).
    pub fn samples(&self) -> usize {
        self.stamps.len()
    }

    /// Whether the window is full: only then may a prediction refuse.
    pub fn is_warm(&self) -> bool {
        self.stamps.len() >= self.window
    }

    /// Completions per second at `now`, from however many were counted
    /// (`/status`; see [`CompletionRate::warm_per_second`] for decisions).
    pub fn per_second(&self, now: Instant) -> Option<f64> {
        if self.stamps.is_empty() {
            return None;
        }
        let span = self.clock(now).saturating_sub(self.origin).as_secs_f64();
        Some(self.stamps.len() as f64 / span.max(1e-6))
    }

    /// [`CompletionRate::per_second`], once warm.
    pub fn warm_per_second(&self, now: Instant) -> Option<f64> {
        self.per_second(now).filter(|_| self.is_warm())
    }

    /// Time for `work` requests to complete, from a warm estimate only: what
    /// a deadline-aware refusal may rely on.
    pub fn time_for(&self, work: usize, now: Instant) -> Option<Duration> {
        self.warm_per_second(now).map(|r| secs(work as f64 / r))
    }

    /// Time for `work` requests to complete, once `min` completions were
    /// counted: advice (`Retry-After`), not a decision.
    pub fn advise(&self, work: usize, now: Instant, min: usize) -> Option<Duration> {
        if self.samples() < min.clamp(1, self.window) {
            return None;
        }
        self.per_second(now).map(|r| secs(work as f64 / r))
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jitter::retry_factor;

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
        let mut rate = CompletionRate::new(16);
        assert_eq!(rate.per_second(t0), None);
        busy(&mut rate, t0, 0, 200, 10); // 100 per second
        let r = rate.per_second(at(t0, 2000)).unwrap();
        assert!((r - 100.0).abs() < 1.0, "{r}");
        busy(&mut rate, t0, 2000, 200, 50);
        let r = rate.per_second(at(t0, 12_000)).unwrap();
        assert!((r - 20.0).abs() < 1.0, "{r}");
    }

    #[test]
    fn a_stall_under_saturation_lowers_the_rate() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new(16);
        busy(&mut rate, t0, 0, 100, 10);
        // Saturated, and nothing completes for 2 s: 16 in 2.16 s at most.
        let r = rate.per_second(at(t0, 1000 + 2000)).unwrap();
        assert!(r <= 16.0 / 2.0, "{r}");
    }

    #[test]
    fn idle_time_is_not_a_stall() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new(16);
        busy(&mut rate, t0, 0, 100, 10);
        rate.record(at(t0, 1010), true, false);
        let r = rate.per_second(at(t0, 601_010)).unwrap();
        assert!((r - 100.0).abs() < 2.0, "{r}");
    }

    #[test]
    fn a_lull_spanned_by_one_slow_request_is_not_a_slow_drain() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new(16);
        busy(&mut rate, t0, 0, 100, 10);
        rate.record(at(t0, 1010), true, false);
        rate.record(at(t0, 31_010), false, false);
        rate.saturated(at(t0, 31_020));
        let r = rate.per_second(at(t0, 31_021)).unwrap();
        assert!((r - 100.0).abs() < 2.0, "{r}");
        let wait = rate.time_for(32, at(t0, 31_021)).unwrap();
        assert_eq!(retry_after_secs(Some(wait), 1.0, 1, 60), 1);
    }

    #[test]
    fn drain_time_and_retry_after() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::new(16);
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

    /// 16 workers × 20 ms finishing together (the simulator's lock-step):
    /// 800/s, in bursts of 16 every 20 ms, sampled at every millisecond and
    /// at odd offsets within them.
    #[test]
    fn bursts_of_completions_are_counted_within_15_percent() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::for_limit(16);
        rate.saturated(t0);
        let mut worst = (f64::MAX, 0.0f64);
        for burst in 1..=200u64 {
            let end = at(t0, burst * 20);
            // Between bursts: the time since the last one counts.
            if burst > 8 {
                for us in (0..20_000).step_by(333) {
                    let r = rate
                        .per_second(end - Duration::from_micros(20_000 - us))
                        .unwrap();
                    worst = (worst.0.min(r), worst.1.max(r));
                    assert!(
                        (r - 800.0).abs() <= 0.15 * 800.0,
                        "{r} at burst {burst}+{us}µs"
                    );
                }
            }
            for _ in 0..16 {
                rate.record(end, true, true);
            }
        }
        eprintln!("windowed: {:.0}..{:.0}", worst.0, worst.1);
    }

    /// Evenly spread completions (the same 800/s, one every 1.25 ms).
    #[test]
    fn even_completions_are_counted_within_15_percent() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::for_limit(16);
        rate.saturated(t0);
        for i in 1..=3200u64 {
            let t = t0 + Duration::from_micros(1250 * i);
            if i > 128 {
                let r = rate.per_second(t - Duration::from_micros(600)).unwrap();
                assert!((r - 800.0).abs() <= 0.15 * 800.0, "{r}");
            }
            rate.record(t, true, true);
        }
    }

    #[test]
    fn cold_estimates_decide_nothing() {
        let t0 = Instant::now();
        let mut rate = CompletionRate::for_limit(16); // window 128
        rate.saturated(t0);
        // The first request takes its full service time: 1 completion in
        // 20 ms reads 50/s, a sixteenth of the truth.
        rate.record(at(t0, 20), true, true);
        assert!(rate.per_second(at(t0, 20)).unwrap() < 60.0);
        assert_eq!(rate.time_for(10, at(t0, 20)), None, "no refusal from 1");
        assert_eq!(rate.advise(10, at(t0, 20), 16), None, "Retry-After: min");
        for _ in 1..127 {
            rate.record(at(t0, 40), true, true);
        }
        assert_eq!(rate.time_for(10, at(t0, 40)), None, "127 < 128");
        assert!(rate.advise(10, at(t0, 40), 16).is_some());
        rate.record(at(t0, 40), true, true);
        assert!(rate.time_for(10, at(t0, 40)).is_some(), "warm at 128");
    }

    /// The estimator of issue 26, on the same bursty trace: how far it swings.
    #[test]
    fn reference_the_old_ewma_swings_on_bursts() {
        struct Ewma {
            mean: Option<f64>,
            since: Option<Instant>,
        }
        impl Ewma {
            fn record(&mut self, now: Instant) {
                if let Some(s) = self.since {
                    let dt = now.saturating_duration_since(s).as_secs_f64();
                    self.mean = Some(self.mean.map_or(dt, |m| m + 0.05 * (dt - m)));
                }
                self.since = Some(now);
            }
            fn per_second(&self, now: Instant) -> f64 {
                let st = self
                    .since
                    .map_or(0.0, |s| now.saturating_duration_since(s).as_secs_f64());
                1.0 / self.mean.unwrap().max(st).max(1e-6)
            }
        }
        let t0 = Instant::now();
        let mut e = Ewma {
            mean: None,
            since: Some(t0),
        };
        let mut first = None;
        let (mut lo, mut hi) = (f64::MAX, 0.0f64);
        for burst in 1..=200u64 {
            let end = at(t0, burst * 20);
            if burst > 8 {
                for us in (0..20_000).step_by(333) {
                    let r = e.per_second(end - Duration::from_micros(20_000 - us));
                    lo = lo.min(r);
                    hi = hi.max(r);
                }
            }
            for _ in 0..16 {
                e.record(end);
                first.get_or_insert(e.per_second(end));
            }
        }
        eprintln!(
            "old EWMA: first {:.0}/s, then {lo:.0}..{hi:.0} (truth 800)",
            first.unwrap()
        );
        eprintln!("32 ahead at {lo:.0}/s: {:.0} ms", 32.0 / lo * 1000.0);
    }

    #[test]
    fn jitter_spreads_within_twenty_percent() {
        let samples: Vec<f64> = (0..10_000).map(|_| retry_factor()).collect();
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
