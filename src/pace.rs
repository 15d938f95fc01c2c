//! [`MinRate`] and [`Credit`]: how long the proxy may keep waiting on a
//! party that sends (or takes) bytes slowly, on the whole and not only per
//! pause.
//!
//! A bound on each pause does not bound a party that moves one byte just
//! inside every pause (Apache's `mod_reqtimeout` `MinRate` answers that).
//! Here the time spent waiting draws on a credit: it starts at one grace
//! period, every byte moved earns `1 / per_s` seconds back, and it never
//! holds more than one grace period, so bytes moved early cannot buy hours
//! of waiting later. A party that keeps up `per_s` on average never runs
//! out; one that falls behind does, a grace period after it started to.
//!
//! A leaf: the request body's read timeout, the client connection's writes
//! and each HTTP/2 stream's answer all keep one.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::Stall;

/// The pace a party must keep while waited on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    /// Bytes per second, on average over the time it is waited on.
    pub per_s: u64,
    /// The credit it starts with, and the most it may hold.
    pub grace: Duration,
}

/// The waiting a party has left (see the module).
#[derive(Debug, Clone, Copy)]
pub struct Credit {
    min: MinRate,
    left: Duration,
}

impl Credit {
    /// A full credit.
    pub fn new(min: MinRate) -> Self {
        Self {
            min,
            left: min.grace,
        }
    }

    /// A wait of `waited` ended.
    pub fn waited(&mut self, waited: Duration) {
        self.left = self.left.saturating_sub(waited);
    }

    /// `bytes` moved: their time is earned back, up to the grace.
    pub fn moved(&mut self, bytes: u64) {
        let earned = Duration::from_secs_f64(bytes as f64 / self.min.per_s.max(1) as f64);
        self.left = (self.left + earned).min(self.min.grace);
    }

    /// When a wait that began at `since` must end: at most `pause` after it
    /// began, and no later than the credit lasts; and which bound that is.
    pub fn deadline(&self, since: Instant, pause: Duration) -> (Instant, Stall) {
        match self.left < pause {
            true => (since + self.left, Stall::Rate(self.min.per_s)),
            false => (since + pause, Stall::Pause(pause)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: MinRate = MinRate {
        per_s: 100,
        grace: Duration::from_secs(10),
    };

    #[test]
    fn bytes_moved_early_buy_no_more_than_the_grace() {
        let mut credit = Credit::new(MIN);
        // A megabyte at once: worth 10 000 s, held as 10.
        credit.moved(1 << 20);
        let t0 = Instant::now();
        assert_eq!(
            credit.deadline(t0, Duration::from_secs(60)),
            (t0 + Duration::from_secs(10), Stall::Rate(100))
        );
        // Then a byte per 9 s: 0.01 s earned per 9 s waited.
        credit.waited(Duration::from_secs(9));
        credit.moved(1);
        assert!(credit.left < Duration::from_secs(2), "{:?}", credit.left);
    }

    #[test]
    fn a_party_at_the_rate_never_runs_out() {
        let mut credit = Credit::new(MIN);
        for _ in 0..10_000 {
            credit.waited(Duration::from_millis(10));
            credit.moved(1);
        }
        assert_eq!(credit.left, MIN.grace);
    }

    #[test]
    fn the_pause_bound_stands_while_the_credit_is_larger() {
        let credit = Credit::new(MIN);
        let t0 = Instant::now();
        let pause = Duration::from_secs(1);
        assert_eq!(
            credit.deadline(t0, pause),
            (t0 + pause, Stall::Pause(pause))
        );
    }
}
