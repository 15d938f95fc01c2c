//! The dashboard's memory: each route's last [`HISTORY_SECONDS`], one sample
//! a second, served by `GET /status/history`.
//!
//! A sample is what changed in that second (answers by outcome, the queue
//! wait and upstream quantiles, circuit transitions) and what stood at its end
//! (in flight, the limit, the queue, the circuit's state, the spool's depth).
//! Counters are read as differences of cumulative readings, so the request
//! path pays nothing for the history beyond the sketches' one atomic add.
//!
//! Bounded: [`HISTORY_SECONDS`] samples per configured route; a route that a
//! reload removes loses its history, one that a reload rebuilds starts its
//! counters afresh (its first second after the reload is not sampled).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::admission::Controller;
use crate::circuit::{Circuit, CircuitState};
use crate::error::Reason;
use crate::latency::{self, Counts};
use crate::observe::{Outcome, RouteStats};
use crate::stack::RouteInfo;

/// Seconds of history kept per route.
pub(crate) const HISTORY_SECONDS: usize = 300;

/// How often a sample is taken.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Every route's recent samples.
#[derive(Debug, Default)]
pub(crate) struct History {
    routes: Mutex<Vec<RouteHistory>>,
}

#[derive(Debug)]
struct RouteHistory {
    name: Arc<str>,
    /// The readings of the previous sample, and whose they were.
    last: Option<Reading>,
    samples: VecDeque<Sample>,
    has_rate_limit: bool,
    has_spool: bool,
    has_circuit: bool,
}

/// Cumulative counts at one instant, from one build of a route.
#[derive(Debug)]
struct Reading {
    stats: Arc<RouteStats>,
    admission: Arc<Controller>,
    circuit: Option<Arc<Circuit>>,
    outcomes: Vec<(Outcome, u64)>,
    upstream: Box<Counts>,
    queue_wait: Box<Counts>,
    transitions: u64,
}

impl Reading {
    fn of(route: &RouteInfo) -> Self {
        let p = &route.protections;
        Self {
            stats: route.stats.clone(),
            admission: p.admission.clone(),
            circuit: p.circuit.clone(),
            outcomes: route.stats.counts().collect(),
            upstream: Box::new(route.stats.upstream_latency().counts()),
            queue_wait: Box::new(p.admission.queue_wait().counts()),
            transitions: p.circuit.as_ref().map_or(0, |c| c.transitions()),
        }
    }

    /// Whether both readings are of the same build of the route.
    fn same_source(&self, other: &Reading) -> bool {
        Arc::ptr_eq(&self.stats, &other.stats)
            && Arc::ptr_eq(&self.admission, &other.admission)
            && match (&self.circuit, &other.circuit) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// One route's second.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    /// Unix time at the end of the second.
    t: u64,
    /// Requests answered (by anyone).
    offered: u64,
    /// Answered by the upstream.
    admitted: u64,
    /// Refused by the proxy, by [`Reason`] (in [`Reason::ALL`] order).
    shed: [u64; Reason::ALL.len()],
    spooled: u64,
    inflight: usize,
    limit: Option<usize>,
    queued: usize,
    queue_wait_p99_ms: Option<f64>,
    upstream_p50_ms: Option<f64>,
    upstream_p99_ms: Option<f64>,
    circuit: Option<CircuitState>,
    circuit_transitions: u64,
    spool_depth: Option<usize>,
}

impl History {
    /// Takes one sample of each of `routes` at unix time `t`.
    pub(crate) fn sample(&self, routes: &[RouteInfo], t: u64) {
        let mut histories = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the histories of the routes still configured, in their order.
        let mut kept = Vec::with_capacity(routes.len());
        for route in routes {
            let name = route.stats.name();
            let mut history = match histories.iter().position(|h| h.name == *name) {
                Some(i) => histories.swap_remove(i),
                None => RouteHistory {
                    name: name.clone(),
                    last: None,
                    samples: VecDeque::with_capacity(HISTORY_SECONDS),
                    has_rate_limit: false,
                    has_spool: false,
                    has_circuit: false,
                },
            };
            history.take(route, t);
            kept.push(history);
        }
        *histories = kept;
    }

    /// The `/status/history` document.
    pub(crate) fn document(&self) -> Value {
        let histories = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let routes: Vec<Value> = histories.iter().map(RouteHistory::columns).collect();
        serde_json::json!({
            "interval_s": SAMPLE_INTERVAL.as_secs(),
            "capacity": HISTORY_SECONDS,
            "routes": routes,
        })
    }
}

impl RouteHistory {
    fn take(&mut self, route: &RouteInfo, t: u64) {
        let p = &route.protections;
        self.has_rate_limit = p.rate_limit.is_some();
        self.has_spool = p.spool.is_some();
        self.has_circuit = p.circuit.is_some();
        let now = Reading::of(route);
        let last = self.last.replace(now);
        let (Some(before), Some(now)) = (last, &self.last) else {
            return; // the first reading: nothing to take differences of
        };
        if !before.same_source(now) {
            return; // rebuilt by a reload: its counters started afresh
        }
        let mut sample = Sample {
            t,
            offered: 0,
            admitted: 0,
            shed: [0; Reason::ALL.len()],
            spooled: 0,
            inflight: 0,
            limit: None,
            queued: 0,
            queue_wait_p99_ms: latency::quantile_ms(&before.queue_wait, &now.queue_wait, 0.99),
            upstream_p50_ms: latency::quantile_ms(&before.upstream, &now.upstream, 0.5),
            upstream_p99_ms: latency::quantile_ms(&before.upstream, &now.upstream, 0.99),
            circuit: p.circuit.as_ref().map(|c| c.state()),
            circuit_transitions: now.transitions.saturating_sub(before.transitions),
            spool_depth: p.spool.as_ref().map(|s| s.store().snapshot().requests),
        };
        for (&(outcome, was), &(_, is)) in before.outcomes.iter().zip(&now.outcomes) {
            let n = is.saturating_sub(was);
            sample.offered += n;
            match outcome {
                Outcome::Status(_) => sample.admitted += n,
                Outcome::Rejected(reason) => sample.shed[reason as usize] += n,
                Outcome::Spooled => sample.spooled += n,
                Outcome::Cancelled | Outcome::Error => {}
            }
        }
        let admission = p.admission.snapshot();
        sample.inflight = admission.inflight;
        sample.limit = admission.limit;
        sample.queued = admission.queued;
        if self.samples.len() == HISTORY_SECONDS {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The route's samples as columns (one array per series, as chart
    /// libraries take them). Series a route does not have are absent; shed
    /// reasons appear only when they happened in the window.
    fn columns(&self) -> Value {
        let s = &self.samples;
        let mut doc = Map::new();
        doc.insert("name".into(), self.name.as_ref().into());
        column(&mut doc, "t", s, |x| x.t);
        column(&mut doc, "offered", s, |x| x.offered);
        column(&mut doc, "admitted", s, |x| x.admitted);
        let mut shed = Map::new();
        for reason in Reason::ALL {
            if reason == Reason::RateLimited {
                continue; // its own series
            }
            let i = reason as usize;
            if s.iter().any(|x| x.shed[i] > 0) {
                column(&mut shed, reason.as_str(), s, |x| x.shed[i]);
            }
        }
        doc.insert("shed".into(), shed.into());
        column(&mut doc, "inflight", s, |x| x.inflight);
        column(&mut doc, "limit", s, |x| x.limit);
        column(&mut doc, "queued", s, |x| x.queued);
        column(&mut doc, "queue_wait_p99_ms", s, |x| x.queue_wait_p99_ms);
        column(&mut doc, "upstream_p50_ms", s, |x| x.upstream_p50_ms);
        column(&mut doc, "upstream_p99_ms", s, |x| x.upstream_p99_ms);
        if self.has_rate_limit {
            let i = Reason::RateLimited as usize;
            column(&mut doc, "rate_limited", s, |x| x.shed[i]);
        }
        if self.has_circuit {
            column(&mut doc, "circuit", s, |x| {
                x.circuit.map(CircuitState::as_str)
            });
            column(&mut doc, "circuit_transitions", s, |x| {
                x.circuit_transitions
            });
        }
        if self.has_spool {
            column(&mut doc, "spooled", s, |x| x.spooled);
            column(&mut doc, "spool_depth", s, |x| x.spool_depth);
        }
        doc.into()
    }
}

fn column<T: Serialize>(
    doc: &mut Map<String, Value>,
    key: &str,
    samples: &VecDeque<Sample>,
    field: impl Fn(&Sample) -> T,
) {
    let values = samples
        .iter()
        .map(|s| serde_json::to_value(field(s)).unwrap_or(Value::Null))
        .collect();
    doc.insert(key.into(), Value::Array(values));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Registry;
    use crate::stack::{self, Opened};

    fn routes(text: &str) -> Vec<RouteInfo> {
        let config = Config::parse("test.toml", text).unwrap();
        let registry = Registry::new();
        let built = stack::build(&config, &registry, Opened::none());
        built.proxy.generation().routes.clone()
    }

    const CONFIG: &str = r#"
        [[route]]
        name = "ingest"
        path_prefix = "/"
        upstream = "http://127.0.0.1:9"
        [route.admission]
        max_inflight = 4
        [route.circuit]
        failure_threshold = 2
    "#;

    #[test]
    fn samples_are_differences_per_second() {
        let routes = routes(CONFIG);
        let stats = &routes[0].stats;
        let history = History::default();
        stats.record(Outcome::Status(2));
        history.sample(&routes, 100); // the baseline: no sample yet
        for _ in 0..3 {
            stats.record(Outcome::Status(2));
        }
        stats.record(Outcome::Rejected(Reason::QueueFull));
        stats.record_upstream_duration(Duration::from_millis(10));
        history.sample(&routes, 101);
        history.sample(&routes, 102);
        let doc = history.document();
        let r = &doc["routes"][0];
        assert_eq!(r["name"], "ingest");
        assert_eq!(r["t"], serde_json::json!([101, 102]));
        assert_eq!(r["offered"], serde_json::json!([4, 0]));
        assert_eq!(r["admitted"], serde_json::json!([3, 0]));
        assert_eq!(r["shed"]["queue_full"], serde_json::json!([1, 0]));
        assert!(r["shed"].get("queue_timeout").is_none(), "{r}");
        assert_eq!(r["limit"], serde_json::json!([4, 4]));
        assert_eq!(r["circuit"], serde_json::json!(["closed", "closed"]));
        assert!(r.get("rate_limited").is_none() && r.get("spooled").is_none());
        let p50 = r["upstream_p50_ms"][0].as_f64().unwrap();
        assert!((9.0..11.0).contains(&p50), "{p50}");
        assert!(r["upstream_p50_ms"][1].is_null());
    }

    #[test]
    fn bounded_and_reset_by_a_rebuild() {
        let first = routes(CONFIG);
        let history = History::default();
        for t in 0..(HISTORY_SECONDS as u64 + 10) {
            history.sample(&first, t);
        }
        let doc = history.document();
        let t = doc["routes"][0]["t"].as_array().unwrap();
        assert_eq!(t.len(), HISTORY_SECONDS);
        assert_eq!(t[0], 10);
        // A reload rebuilt the route: its counters start at zero, which is
        // not a negative second; the next one is sampled again.
        let rebuilt = routes(CONFIG);
        history.sample(&rebuilt, 1000);
        history.sample(&rebuilt, 1001);
        let doc = history.document();
        let t = doc["routes"][0]["t"].as_array().unwrap();
        assert_eq!(t.last().unwrap(), 1001);
        assert_eq!(t[t.len() - 2], HISTORY_SECONDS as u64 + 9);
        // A route a reload removed loses its history.
        history.sample(&[], 1002);
        assert_eq!(history.document()["routes"], serde_json::json!([]));
    }
}
