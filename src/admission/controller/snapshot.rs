//! What a controller shows: its Prometheus series ([`AdmissionMetrics`]) and
//! its live state for `/status` ([`AdmissionSnapshot`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use serde::Serialize;
use tokio::time::Instant;

use super::super::tenants::TenantCount;
use super::{Controller, Locked};
use crate::error::Reason;
use crate::latency::LatencySketch;
use crate::limit::AlgorithmSnapshot;
use crate::metrics::{
    CONCURRENCY_LIMIT, INFLIGHT, QUEUE_DEPTH, QUEUE_TIMEOUT, QUEUE_WAIT, Registry, SHED_TOTAL,
};

/// Prometheus handles of one route's admission.
#[derive(Debug, Clone)]
pub struct AdmissionMetrics {
    pub(super) inflight: Gauge,
    pub(super) queue_depth: Gauge,
    pub(super) limit: Gauge,
    pub(super) queue_timeout: Gauge,
    pub(super) shed_full: Counter,
    pub(super) shed_timeout: Counter,
    pub(super) queue_wait: Histogram,
    /// The same waits, for the dashboard's per-second quantiles.
    pub(super) queue_wait_sketch: Arc<LatencySketch>,
}

impl AdmissionMetrics {
    /// Registers the route's admission metrics.
    pub fn new(route: &str, registry: &Registry) -> Self {
        let r = [("route", route)];
        let shed = |reason: Reason| {
            registry.counter(SHED_TOTAL, &[("route", route), ("reason", reason.as_str())])
        };
        Self {
            inflight: registry.gauge(INFLIGHT, &r),
            queue_depth: registry.gauge(QUEUE_DEPTH, &r),
            limit: registry.gauge(CONCURRENCY_LIMIT, &r),
            queue_timeout: registry.gauge(QUEUE_TIMEOUT, &r),
            shed_full: shed(Reason::QueueFull),
            shed_timeout: shed(Reason::QueueTimeout),
            queue_wait: registry.histogram(QUEUE_WAIT, &r),
            queue_wait_sketch: Arc::default(),
        }
    }

    /// The metrics of a route without admission, which only counts what is
    /// in flight: no limit and no queue timeout to export (absent, not 0,
    /// so that a dashboard draws no limit of 0 and no alert compares with it).
    pub fn unlimited(route: &str, registry: &Registry) -> Self {
        let r = [("route", route)];
        Self {
            inflight: registry.gauge(INFLIGHT, &r),
            queue_depth: registry.gauge(QUEUE_DEPTH, &r),
            ..Self::noop()
        }
    }

    pub(super) fn record_wait(&self, waited: Duration) {
        self.queue_wait.record(waited.as_secs_f64());
        self.queue_wait_sketch.record(waited);
    }

    pub(super) fn noop() -> Self {
        Self {
            inflight: Gauge::noop(),
            queue_depth: Gauge::noop(),
            limit: Gauge::noop(),
            queue_timeout: Gauge::noop(),
            shed_full: Counter::noop(),
            shed_timeout: Counter::noop(),
            queue_wait: Histogram::noop(),
            queue_wait_sketch: Arc::default(),
        }
    }
}

/// The live state, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdmissionSnapshot {
    /// Requests admitted and not finished (response body included).
    pub inflight: usize,
    /// Requests waiting.
    pub queued: usize,
    /// The in-flight limit (absent: unlimited).
    pub limit: Option<usize>,
    /// Waiting capacity.
    pub queue_capacity: usize,
    /// Estimated completions per second while saturated: the drain rate
    /// (routes with admission only).
    pub completion_rate: Option<f64>,
    /// Requests shed because the queue was full or the wait predicted too long.
    pub shed_queue_full: u64,
    /// Requests shed after waiting `queue_timeout`.
    pub shed_queue_timeout: u64,
    /// The adaptive limit's algorithm, when `max_inflight = "adaptive"`.
    pub adaptive: Option<AlgorithmSnapshot>,
    /// The tenants, when the route has a `tenant_key`.
    pub tenants: Option<TenantsSnapshot>,
    /// Request body bytes admitted and not finished (with `max_inflight_bytes`).
    pub inflight_bytes: Option<u64>,
    /// `max_inflight_bytes`.
    pub bytes_limit: Option<u64>,
}

/// Tenants at a glance: how many wait, and which wait and shed most (the
/// top [`TOP_TENANTS`] of each; Prometheus gets no per-tenant series, as
/// tenants are whatever clients send).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantsSnapshot {
    /// Tenants with a request waiting.
    pub waiting: usize,
    /// Tenants holding a slot (counted when `max_inflight_per_tenant` is set).
    pub holding: Option<usize>,
    /// The tenants with the most requests waiting.
    pub top_queued: Vec<TenantCount>,
    /// The tenants shed most since start (approximate past the
    /// shed counts' capacity: the heavy hitters stay exact).
    pub top_shed: Vec<TenantCount>,
}

/// Tenants listed in each of `/status`'s tenant tables.
pub const TOP_TENANTS: usize = 10;

impl Controller {
    /// The queue waits of admitted requests recorded so far.
    pub fn queue_wait(&self) -> &LatencySketch {
        &self.metrics.queue_wait_sketch
    }

    /// The live state.
    pub fn snapshot(&self) -> AdmissionSnapshot {
        let now = Instant::now();
        let mut snapshot = AdmissionSnapshot {
            inflight: 0,
            queued: 0,
            limit: None,
            queue_capacity: self.settings.queue_capacity,
            completion_rate: None,
            shed_queue_full: self.shed_full.load(Ordering::Relaxed),
            shed_queue_timeout: self.shed_timeout.load(Ordering::Relaxed),
            adaptive: None,
            tenants: None,
            inflight_bytes: None,
            bytes_limit: self.settings.max_inflight_bytes,
        };
        match self.lock() {
            Locked::Unlimited(inflight) => snapshot.inflight = inflight.load(Ordering::Relaxed),
            Locked::Limited(state) => {
                snapshot.inflight = state.inflight;
                snapshot.queued = state.queue.len();
                snapshot.limit = Some(state.limit.current());
                snapshot.completion_rate = state.rate.per_second(now);
                snapshot.adaptive = state.limit.snapshot(now);
                snapshot.inflight_bytes = self
                    .settings
                    .max_inflight_bytes
                    .map(|_| state.inflight_bytes);
                snapshot.tenants = self.settings.by_tenant.then(|| TenantsSnapshot {
                    waiting: state.queue.tenants(),
                    holding: self
                        .settings
                        .max_inflight_per_tenant
                        .map(|_| state.holding.len()),
                    top_queued: state
                        .queue
                        .top(TOP_TENANTS)
                        .into_iter()
                        .map(|(t, n)| TenantCount::new(&t, n as u64))
                        .collect(),
                    top_shed: state.shed_by_tenant.top(TOP_TENANTS),
                });
            }
        }
        snapshot
    }
}
