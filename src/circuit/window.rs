//! [`FailureWindow`]: calls and failures over a sliding time window, in a fixed
//! number of buckets (bounded memory whatever the request rate).

use std::time::Duration;

use tokio::time::Instant;

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket-width slice of time since `origin` this holds.
    slice: u64,
    calls: u32,
    failures: u32,
}

/// Calls and failures over the last `window`, to ±1/10 of it.
#[derive(Debug, Clone)]
pub struct FailureWindow {
    origin: Instant,
    width: Duration,
    buckets: [Bucket; BUCKETS],
}

impl FailureWindow {
    /// An empty window of length `window`.
    pub fn new(window: Duration, now: Instant) -> Self {
        let width = (window / BUCKETS as u32).max(Duration::from_millis(1));
        Self {
            origin: now,
            width,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn slice(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.width.as_nanos()) as u64
    }

    /// Counts one call.
    pub fn record(&mut self, failed: bool, now: Instant) {
        let slice = self.slice(now);
        let bucket = &mut self.buckets[(slice % BUCKETS as u64) as usize];
        if bucket.slice != slice || bucket.calls == 0 {
            *bucket = Bucket {
                slice,
                calls: 0,
                failures: 0,
            };
        }
        bucket.calls = bucket.calls.saturating_add(1);
        bucket.failures = bucket.failures.saturating_add(u32::from(failed));
    }

    /// `(failures, calls)` in the window ending now.
    pub fn counts(&self, now: Instant) -> (u32, u32) {
        let current = self.slice(now);
        self.buckets
            .iter()
            .filter(|b| b.calls > 0 && b.slice <= current && current - b.slice < BUCKETS as u64)
            .fold((0, 0), |(f, c), b| (f + b.failures, c + b.calls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_calls_leave_the_window() {
        let t0 = Instant::now();
        let mut w = FailureWindow::new(Duration::from_secs(10), t0);
        w.record(true, t0);
        w.record(false, t0 + Duration::from_secs(5));
        assert_eq!(w.counts(t0 + Duration::from_secs(5)), (1, 2));
        assert_eq!(w.counts(t0 + Duration::from_millis(10_500)), (0, 1));
        assert_eq!(w.counts(t0 + Duration::from_secs(16)), (0, 0));
        // A bucket reused for a later slice starts from zero.
        w.record(true, t0 + Duration::from_secs(20));
        assert_eq!(w.counts(t0 + Duration::from_secs(20)), (1, 1));
    }
}
