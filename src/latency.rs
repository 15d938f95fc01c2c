//! [`LatencySketch`]: a fixed-size, lock-free histogram of durations, so that
//! the dashboard's history can show a route's p50/p99 per second without
//! asking Prometheus (whose histograms live in the exporter, not here).
//!
//! Buckets are log-linear, as in HdrHistogram with two significant bits:
//! four per power of two of microseconds, so a quantile is off by at most
//! one bucket, about ±9 % of its value. Recording is one relaxed atomic add.
//! Readers take the cumulative counts and subtract an earlier copy to get
//! the quantiles of an interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 2;
const SUB: usize = 1 << SUB_BITS;
/// Powers of two covered: 1 µs to 2^27 µs (134 s); longer lands in the last.
const OCTAVES: usize = 28;
/// How many buckets a sketch has.
pub const BUCKETS: usize = OCTAVES * SUB;

/// Cumulative counts of a sketch, as [`LatencySketch::counts`] reads them.
pub type Counts = [u64; BUCKETS];

/// Durations counted into log-linear buckets.
pub struct LatencySketch {
    buckets: Box<[AtomicU64; BUCKETS]>,
}

impl std::fmt::Debug for LatencySketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencySketch").finish_non_exhaustive()
    }
}

impl Default for LatencySketch {
    fn default() -> Self {
        Self {
            buckets: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl LatencySketch {
    /// Counts one duration.
    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// Every bucket's count so far.
    pub fn counts(&self) -> Counts {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }
}

/// The bucket of `us` microseconds.
fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        // Below the first full octave: one bucket per microsecond.
        return us as usize;
    }
    let octave = 63 - us.leading_zeros(); // >= SUB_BITS
    let sub = (us >> (octave - SUB_BITS)) as usize & (SUB - 1);
    let index = (octave - SUB_BITS + 1) as usize * SUB + sub;
    index.min(BUCKETS - 1)
}

/// The smallest value in bucket `index`, in microseconds.
fn lower_bound(index: usize) -> f64 {
    if index < SUB {
        return index as f64;
    }
    let octave = (index / SUB) as u32 + SUB_BITS - 1;
    let sub = (index % SUB) as u64;
    ((SUB as u64 + sub) << (octave - SUB_BITS)) as f64
}

/// The `q` quantile (0 to 1) of what was counted between `before` and
/// `after`, in milliseconds: the middle of the bucket holding it. `None`
/// when nothing was counted in between.
pub fn quantile_ms(before: &Counts, after: &Counts, q: f64) -> Option<f64> {
    let delta: Vec<u64> = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total: u64 = delta.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (index, n) in delta.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let low = lower_bound(index);
            let high = if index + 1 < BUCKETS {
                lower_bound(index + 1)
            } else {
                low
            };
            return Some((low + high) / 2.0 / 1000.0);
        }
    }
    None // unreachable: seen reaches total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_bound_their_values() {
        let mut last = 0;
        for us in [0u64, 1, 3, 4, 5, 7, 8, 9, 100, 1_000, 65_535, 1 << 26] {
            let b = bucket(us);
            assert!(b >= last, "{us} µs in bucket {b} after {last}");
            last = b;
            assert!(lower_bound(b) <= us as f64, "{us} below its bucket");
            assert!(lower_bound(b + 1) > us as f64, "{us} above its bucket");
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let sketch = LatencySketch::default();
        let before = sketch.counts();
        for ms in 1..=100u64 {
            sketch.record(Duration::from_millis(ms));
        }
        let after = sketch.counts();
        let p50 = quantile_ms(&before, &after, 0.5).unwrap();
        let p99 = quantile_ms(&before, &after, 0.99).unwrap();
        assert!((p50 - 50.0).abs() / 50.0 < 0.1, "p50 {p50}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.1, "p99 {p99}");
        // Only the interval counts.
        let later = sketch.counts();
        assert_eq!(quantile_ms(&after, &later, 0.5), None);
        sketch.record(Duration::from_secs(2));
        let p = quantile_ms(&after, &sketch.counts(), 0.5).unwrap();
        assert!((p - 2000.0).abs() / 2000.0 < 0.1, "{p}");
    }
}
