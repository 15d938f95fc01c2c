//! Metric names (a contract: README "Admin endpoints") and the Prometheus registry.
//!
//! Each running proxy owns its own [`Registry`] instead of a process-global
//! recorder, so that several proxies in one process (tests, embedders) do not mix
//! their counts. Metric handles are registered once per route when the stack is
//! built; the request path only touches atomics, never a registry lookup.

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// `sluicegate_requests_total{route,outcome}`: requests answered, by outcome
/// (`2xx`..`5xx` from the upstream, or the reason code of a proxy answer).
pub const REQUESTS_TOTAL: &str = "sluicegate_requests_total";
/// `sluicegate_unmatched_requests_total`: requests no route matched (404).
pub const UNMATCHED_TOTAL: &str = "sluicegate_unmatched_requests_total";
/// `sluicegate_invalid_requests_total`: requests refused with 400 before
/// routing (no one valid Host, a path above the root).
pub const INVALID_TOTAL: &str = "sluicegate_invalid_requests_total";
/// `sluicegate_inflight{route}`: requests being answered, until their response
/// body has finished streaming.
pub const INFLIGHT: &str = "sluicegate_inflight";
/// `sluicegate_queue_depth{route}`: requests waiting for admission.
pub const QUEUE_DEPTH: &str = "sluicegate_queue_depth";
/// `sluicegate_concurrency_limit{route}`: the in-flight limit in force.
pub const CONCURRENCY_LIMIT: &str = "sluicegate_concurrency_limit";
/// `sluicegate_shed_total{route,reason}`: requests refused by admission.
pub const SHED_TOTAL: &str = "sluicegate_shed_total";
/// `sluicegate_queue_wait_seconds{route}`: time admitted requests waited.
pub const QUEUE_WAIT: &str = "sluicegate_queue_wait_seconds";
/// `sluicegate_queue_timeout_seconds{route}`: the route's `queue_timeout_ms`
/// (routes with admission), for alerts that compare the wait with it.
pub const QUEUE_TIMEOUT: &str = "sluicegate_queue_timeout_seconds";
/// `sluicegate_circuit_state{route}`: 0 closed, 1 open, 2 half-open.
pub const CIRCUIT_STATE: &str = "sluicegate_circuit_state";
/// `sluicegate_circuit_transitions_total{route,from,to}`: state changes.
pub const CIRCUIT_TRANSITIONS: &str = "sluicegate_circuit_transitions_total";
/// `sluicegate_rate_limited_total{route}`: requests refused with 429.
pub const RATE_LIMITED_TOTAL: &str = "sluicegate_rate_limited_total";
/// `sluicegate_rate_limit_keys{route}`: clients tracked by the rate limit.
pub const RATE_LIMIT_KEYS: &str = "sluicegate_rate_limit_keys";
/// `sluicegate_rate_limit_overflow_total{route}`: requests of clients beyond
/// `max_keys`, limited together in the shared overflow bucket.
pub const RATE_LIMIT_OVERFLOW_TOTAL: &str = "sluicegate_rate_limit_overflow_total";
/// `sluicegate_config_reload_total{result}`: reloads, `ok` or `error`.
pub const CONFIG_RELOAD_TOTAL: &str = "sluicegate_config_reload_total";
/// `sluicegate_framing_refused_total`: request heads refused with 400 by the
/// framing guard (Content-Length with Transfer-Encoding, bare-LF line ends).
pub const FRAMING_REFUSED_TOTAL: &str = "sluicegate_framing_refused_total";
/// `sluicegate_send_timeout_total`: client connections closed because the
/// client took no response bytes for `send_timeout_ms`.
pub const SEND_TIMEOUT_TOTAL: &str = "sluicegate_send_timeout_total";
/// `sluicegate_tls_handshake_failures_total`: client connections to a TLS
/// listener that closed before a handshake completed (a bad or missing
/// client certificate, no common protocol, plain HTTP, a timeout).
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "sluicegate_tls_handshake_failures_total";
/// Client connections closed by a bound of the listener's own (`reason`:
/// `first_request_timeout`, `http2_idle`, `premature_resets`).
pub const CONNECTIONS_CLOSED_TOTAL: &str = "sluicegate_connections_closed_total";
/// `sluicegate_cluster_up`: 1 while Redis answers (`[cluster]`), else 0.
pub const CLUSTER_UP: &str = "sluicegate_cluster_up";
/// `sluicegate_cluster_fallback_total{route}`: rate-limit decisions made by
/// the route's fallback because Redis was down or slow.
pub const CLUSTER_FALLBACK_TOTAL: &str = "sluicegate_cluster_fallback_total";
/// `sluicegate_spool_requests{route}`: spooled requests waiting for delivery.
pub const SPOOL_REQUESTS: &str = "sluicegate_spool_requests";
/// `sluicegate_spool_bytes{route}`: the spool's bytes on disk.
pub const SPOOL_BYTES: &str = "sluicegate_spool_bytes";
/// `sluicegate_spool_max_bytes{route}`: the spool's `max_bytes`, for alerts
/// on how full it is.
pub const SPOOL_MAX_BYTES: &str = "sluicegate_spool_max_bytes";
/// `sluicegate_spool_oldest_age_seconds{route}`: how long the oldest spooled
/// request has waited.
pub const SPOOL_OLDEST_AGE: &str = "sluicegate_spool_oldest_age_seconds";
/// `sluicegate_spool_dead_letters{route}`: requests in the dead-letter store.
pub const SPOOL_DEAD_LETTERS: &str = "sluicegate_spool_dead_letters";
/// `sluicegate_spooled_total{route}`: requests accepted into the spool (202).
pub const SPOOLED_TOTAL: &str = "sluicegate_spooled_total";
/// `sluicegate_replayed_total{route,result}`: deliveries from the spool,
/// `delivered` or `retried`.
pub const SPOOL_REPLAYED_TOTAL: &str = "sluicegate_replayed_total";
/// `sluicegate_dead_lettered_total{route}`: spooled requests given up on.
pub const SPOOL_DEAD_LETTERED_TOTAL: &str = "sluicegate_dead_lettered_total";
/// `sluicegate_spool_damaged_records_total{route}`: torn or corrupted records
/// skipped when the spool was recovered.
pub const SPOOL_DAMAGED_TOTAL: &str = "sluicegate_spool_damaged_records_total";
/// 1 while a route's replay is paused because its dead letters cannot be
/// written (disk full, I/O error), until one is written again.
pub const SPOOL_REPLAY_PAUSED: &str = "sluicegate_spool_replay_paused";
/// `sluicegate_upstream_duration_seconds{route}`: time until the upstream's
/// response headers.
pub const UPSTREAM_DURATION: &str = "sluicegate_upstream_duration_seconds";

/// Histogram buckets for latencies, from 0.5 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

/// One proxy's metrics: registers handles and renders the Prometheus text.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry with latency histograms bucketed for Prometheus.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            // The matcher is a non-empty literal list, so this cannot fail.
            .expect("non-empty bucket list")
            .build_recorder();
        let handle = recorder.handle();
        let this = Self { recorder, handle };
        this.describe();
        this
    }

    fn describe(&self) {
        let r = &self.recorder;
        r.describe_counter(
            REQUESTS_TOTAL.into(),
            None,
            "Requests answered, by route and outcome".into(),
        );
        r.describe_counter(
            UNMATCHED_TOTAL.into(),
            None,
            "Requests that no route matched (answered 404)".into(),
        );
        r.describe_gauge(
            INFLIGHT.into(),
            None,
            "Requests admitted to the upstream, until their response body has finished".into(),
        );
        r.describe_gauge(
            QUEUE_DEPTH.into(),
            None,
            "Requests waiting in the admission queue".into(),
        );
        r.describe_gauge(
            CONCURRENCY_LIMIT.into(),
            None,
            "In-flight limit in force".into(),
        );
        r.describe_gauge(
            QUEUE_TIMEOUT.into(),
            None,
            "Longest wait in the admission queue (queue_timeout_ms)".into(),
        );
        r.describe_counter(
            SHED_TOTAL.into(),
            None,
            "Requests refused by admission control, by reason".into(),
        );
        r.describe_histogram(
            QUEUE_WAIT.into(),
            Some(Unit::Seconds),
            "Time admitted requests waited in the queue".into(),
        );
        r.describe_gauge(
            CLUSTER_UP.into(),
            None,
            "1 while the cluster's Redis answers, else 0".into(),
        );
        r.describe_counter(
            CLUSTER_FALLBACK_TOTAL.into(),
            None,
            "Rate-limit decisions made by the route's fallback while Redis was down or slow".into(),
        );
        for (name, help) in [
            (SPOOL_REQUESTS, "Spooled requests waiting for delivery"),
            (
                SPOOL_BYTES,
                "Bytes the spool holds on disk, dead letters included",
            ),
            (
                SPOOL_OLDEST_AGE,
                "Age of the oldest spooled request waiting",
            ),
            (SPOOL_DEAD_LETTERS, "Requests in the dead-letter store"),
            (SPOOL_MAX_BYTES, "The spool's max_bytes"),
        ] {
            r.describe_gauge(name.into(), None, help.into());
        }
        for (name, help) in [
            (SPOOLED_TOTAL, "Requests accepted into the spool (202)"),
            (SPOOL_REPLAYED_TOTAL, "Deliveries from the spool, by result"),
            (
                SPOOL_DEAD_LETTERED_TOTAL,
                "Spooled requests moved to the dead-letter store",
            ),
            (
                SPOOL_DAMAGED_TOTAL,
                "Damaged spool records skipped at recovery",
            ),
        ] {
            r.describe_counter(name.into(), None, help.into());
        }
        r.describe_histogram(
            UPSTREAM_DURATION.into(),
            Some(Unit::Seconds),
            "Time until the upstream's response headers".into(),
        );
    }

    /// A counter with labels.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    /// A gauge with labels.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    /// A histogram with labels.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&key(name, labels), &METADATA)
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; call it periodically so that
    /// memory stays bounded between scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}
