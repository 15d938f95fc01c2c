//! [`TokioClock`]: governor's clock on tokio's, so that rate limits run on
//! the paused clock in tests like every other timer of the proxy.

use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;

/// governor's clock, read from tokio's, so that rate limits run on the paused
/// clock in tests like every other timer of the proxy.
///
/// governor keeps its buckets' times relative to its first reading of the
/// clock; that reading is always zero here, so that a limiter a reload
/// builds over the same buckets ([`TokioClock::continuing`]) reads them on
/// the same scale.
#[derive(Debug, Clone)]
pub struct TokioClock {
    pub(super) origin: tokio::time::Instant,
    pub(super) read: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
            read: Arc::default(),
        }
    }
}

impl TokioClock {
    /// A clock on the same scale as `self`, for a new limiter over the same
    /// buckets.
    pub(super) fn continuing(&self) -> Self {
        Self {
            origin: self.origin,
            read: Arc::default(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        use std::sync::atomic::Ordering;
        if !self.read.load(Ordering::Relaxed) && !self.read.swap(true, Ordering::Relaxed) {
            return Duration::ZERO;
        }
        self.origin.elapsed()
    }
}
