//! [`DistinctClients`]: how many different clients did something lately,
//! counted up to the number a rule needs. A leaf: the circuit breaker and
//! the adaptive limit both ask it whether enough of their clients saw
//! failures or overload, so that one client cannot move them for everyone.

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Distinct clients (by address) seen over a sliding window, up to `cap`
/// of them: the rules only need to know whether at least `cap` did, so the
/// memory is bounded whatever the number of clients.
#[derive(Debug, Clone)]
pub struct DistinctClients {
    cap: usize,
    window: Duration,
    /// Each client's last time, most recent last.
    seen: Vec<(IpAddr, Instant)>,
}

impl DistinctClients {
    /// Up to `cap` clients, each counted for `window` after it was seen.
    pub fn new(cap: usize, window: Duration) -> Self {
        let cap = cap.max(1);
        Self {
            cap,
            window,
            seen: Vec::with_capacity(cap),
        }
    }

    /// `client` was seen at `now`.
    pub fn note(&mut self, client: IpAddr, now: Instant) {
        if let Some(i) = self.seen.iter().position(|&(c, _)| c == client) {
            self.seen.remove(i);
        } else if self.seen.len() >= self.cap {
            self.seen.remove(0);
        }
        self.seen.push((client, now));
    }

    /// Distinct clients over the window ending at `now`, at most `cap`.
    pub fn count(&self, now: Instant) -> usize {
        self.seen
            .iter()
            .filter(|&&(_, at)| now.saturating_duration_since(at) < self.window)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_client_once_up_to_the_cap_within_the_window() {
        let t0 = Instant::now();
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let mut c = DistinctClients::new(3, Duration::from_secs(10));
        c.note(ip(1), t0);
        c.note(ip(1), t0);
        c.note(ip(2), t0);
        assert_eq!(c.count(t0), 2);
        for n in 3..10 {
            c.note(ip(n), t0);
        }
        assert_eq!(c.count(t0), 3, "never more than the cap");
        assert_eq!(
            c.count(t0 + Duration::from_secs(10)),
            0,
            "out of the window"
        );
    }
}
