//! [`RouteStats`]: one route's live counters, read by `/status` and exported to
//! Prometheus.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Histogram};
use serde::Serialize;

use crate::error::Reason;
use crate::latency::LatencySketch;
use crate::metrics::{REQUESTS_TOTAL, Registry, UPSTREAM_DURATION};

/// How a request ended, the `outcome` label of `sluicegate_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with a status of this class (1 to 5).
    Status(u8),
    /// The proxy answered itself.
    Rejected(Reason),
    /// Spooled for later delivery (`202`, README "store and forward").
    Spooled,
    /// The client went away before the response headers.
    Cancelled,
    /// The inner service failed without a response (no rescue below).
    Error,
}

const STATUS_LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const OUTCOMES: usize = STATUS_LABELS.len() + Reason::ALL.len() + 3;

impl Outcome {
    /// The outcome of a response status.
    pub fn of_status(status: http::StatusCode) -> Self {
        // StatusCode guarantees 100..=999; classes above 5 are folded into 5xx.
        Outcome::Status((status.as_u16() / 100).clamp(1, 5) as u8)
    }

    fn index(self) -> usize {
        match self {
            Outcome::Status(class) => usize::from(class.clamp(1, 5)) - 1,
            Outcome::Rejected(r) => STATUS_LABELS.len() + r as usize,
            Outcome::Spooled => OUTCOMES - 3,
            Outcome::Cancelled => OUTCOMES - 2,
            Outcome::Error => OUTCOMES - 1,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Status(class) => STATUS_LABELS[usize::from(class.clamp(1, 5)) - 1],
            Outcome::Rejected(r) => r.as_str(),
            Outcome::Spooled => "spooled",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }

    fn all() -> impl Iterator<Item = Outcome> {
        (1..=5)
            .map(Outcome::Status)
            .chain(Reason::ALL.into_iter().map(Outcome::Rejected))
            .chain([Outcome::Spooled, Outcome::Cancelled, Outcome::Error])
    }
}

struct OutcomeCount {
    label: &'static str,
    count: AtomicU64,
    counter: Counter,
}

/// One route's request counters. Every update goes both to an atomic (for `/status`) and
/// to a pre-registered Prometheus handle (for `/metrics`).
pub struct RouteStats {
    name: Arc<str>,
    outcomes: Box<[OutcomeCount]>,
    upstream_duration: Histogram,
    /// The same durations, for the dashboard's per-second quantiles.
    upstream_sketch: LatencySketch,
}

impl std::fmt::Debug for RouteStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteStats")
            .field("name", &self.name)
            .finish()
    }
}

impl RouteStats {
    /// Registers the route's metrics in `registry`.
    pub fn new(name: &str, registry: &Registry) -> Self {
        let outcomes = Outcome::all()
            .map(|o| OutcomeCount {
                label: o.label(),
                count: AtomicU64::new(0),
                counter: registry
                    .counter(REQUESTS_TOTAL, &[("route", name), ("outcome", o.label())]),
            })
            .collect();
        Self {
            name: name.into(),
            outcomes,
            upstream_duration: registry.histogram(UPSTREAM_DURATION, &[("route", name)]),
            upstream_sketch: LatencySketch::default(),
        }
    }

    /// The route's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Counts one answered request.
    pub fn record(&self, outcome: Outcome) {
        let slot = &self.outcomes[outcome.index()];
        slot.count.fetch_add(1, Ordering::Relaxed);
        slot.counter.increment(1);
    }

    /// How many requests ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].count.load(Ordering::Relaxed)
    }

    /// Records the upstream's own time to its response headers (from the end
    /// of the request body).
    pub fn record_upstream_duration(&self, elapsed: std::time::Duration) {
        self.upstream_duration.record(elapsed.as_secs_f64());
        self.upstream_sketch.record(elapsed);
    }

    /// The upstream durations recorded so far.
    pub fn upstream_latency(&self) -> &LatencySketch {
        &self.upstream_sketch
    }

    /// Every outcome's count so far, in [`Outcome::all`] order.
    pub fn counts(&self) -> impl Iterator<Item = (Outcome, u64)> + '_ {
        Outcome::all().map(|o| (o, self.count(o)))
    }

    /// The live state for `/status`.
    pub fn snapshot(&self) -> RouteStatsSnapshot {
        let requests = self
            .outcomes
            .iter()
            .map(|o| (o.label, o.count.load(Ordering::Relaxed)))
            .collect();
        RouteStatsSnapshot { requests }
    }
}

/// What `/status` shows of a route's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteStatsSnapshot {
    /// Requests answered so far, by outcome label.
    pub requests: BTreeMap<&'static str, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_indexes_are_distinct_and_in_range() {
        let mut seen = [false; OUTCOMES];
        for o in Outcome::all() {
            assert!(!seen[o.index()], "{o:?} shares an index");
            seen[o.index()] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn status_classes() {
        assert_eq!(Outcome::of_status(http::StatusCode::OK).label(), "2xx");
        assert_eq!(
            Outcome::of_status(http::StatusCode::BAD_GATEWAY).label(),
            "5xx"
        );
        let odd = http::StatusCode::from_u16(799).unwrap();
        assert_eq!(Outcome::of_status(odd).label(), "5xx");
    }
}
