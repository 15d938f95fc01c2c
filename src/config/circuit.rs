//! `[route.circuit]`: when the circuit breaker opens, how long it stays open, and
//! what it takes to close again (README `[route.circuit]`).

use std::time::Duration;

use serde::Deserialize;

use super::values::{Limit, Millis};
use crate::circuit::{CircuitSettings, FailurePolicy, FailureRate};

/// `[route.circuit]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitConfig {
    /// Consecutive failures that open the circuit.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: Limit,
    /// Also open when this share of calls (percent, 0 < p ≤ 100) failed over
    /// `window_ms`, once at least `min_calls` were seen. Absent: off.
    #[serde(default)]
    pub failure_rate_threshold: Option<f64>,
    /// The failure-rate window.
    #[serde(default)]
    pub window_ms: Option<Millis>,
    /// Calls in the window before the failure rate counts.
    #[serde(default)]
    pub min_calls: Option<Limit>,
    /// Upstream statuses that count as failures.
    #[serde(default = "default_failure_statuses")]
    pub failure_statuses: Vec<u16>,
    /// Upstream statuses that, with a `Retry-After`, are route-wide
    /// backpressure: a failure that holds an open circuit open that long. An
    /// upstream `429` is usually one client's quota, so the default is `[503]`.
    #[serde(default = "default_backpressure_statuses")]
    pub backpressure_statuses: Vec<u16>,
    /// When set, a call whose upstream took longer counts as a failure.
    #[serde(default)]
    pub slow_call_ms: Option<Millis>,
    /// First open duration; doubles each time a half-open probe fails.
    #[serde(default = "default_open")]
    pub open_ms: Millis,
    /// Cap of the growing open duration (and of an upstream's Retry-After).
    #[serde(default = "default_max_open")]
    pub max_open_ms: Millis,
    /// Probes at the upstream at once while half-open.
    #[serde(default = "default_probes")]
    pub half_open_max_probes: Limit,
    /// Consecutive probe successes that close the circuit.
    #[serde(default = "default_success_threshold")]
    pub success_threshold: Limit,
    /// Shortest stay in half-open, whatever the successes.
    #[serde(default = "default_min_half_open")]
    pub min_half_open_ms: u64,
    /// A half-open probe not decided within this long gives its probe slot
    /// to another request (its outcome still counts if it comes).
    #[serde(default = "default_probe_timeout")]
    pub probe_timeout_ms: Millis,
    /// Failures must come from at least this many distinct clients over
    /// the window (or from every client that called, when fewer did) to
    /// open the circuit.
    #[serde(default = "default_min_failing_clients")]
    pub min_failing_clients: Limit,
    /// After closing, the admission limit ramps up over this long; 0 = off.
    #[serde(default)]
    pub slow_start_ms: u64,
    /// A static answer served instead of the 503 while open.
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
}

/// `[route.circuit.fallback]`: for clients that cannot retry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// The status, 200..=599.
    #[serde(deserialize_with = "final_status")]
    pub status: http::StatusCode,
    /// The body, sent as is.
    #[serde(default)]
    pub body: String,
    /// Its `Content-Type`.
    #[serde(default = "default_content_type", deserialize_with = "header_value")]
    pub content_type: http::HeaderValue,
}

fn final_status<'de, D: serde::Deserializer<'de>>(de: D) -> Result<http::StatusCode, D::Error> {
    let n = u16::deserialize(de)?;
    http::StatusCode::from_u16(n)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| {
            serde::de::Error::custom(format!("{n} is not a final HTTP status (200..=599)"))
        })
}

fn header_value<'de, D: serde::Deserializer<'de>>(de: D) -> Result<http::HeaderValue, D::Error> {
    let s = String::deserialize(de)?;
    http::HeaderValue::from_str(&s)
        .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a valid header value")))
}

// Each default is the runtime's own (`CircuitSettings::default`,
// `FailurePolicy::default`), written once there.
fn runtime() -> CircuitSettings {
    CircuitSettings::default()
}
fn limit(n: u32) -> Limit {
    Limit::new(u64::from(n))
}
fn millis(d: Duration) -> Millis {
    Millis::from_ms(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
fn default_failure_threshold() -> Limit {
    limit(runtime().failure_threshold)
}
fn default_failure_statuses() -> Vec<u16> {
    FailurePolicy::DEFAULT_STATUSES.to_vec()
}
fn default_backpressure_statuses() -> Vec<u16> {
    FailurePolicy::DEFAULT_BACKPRESSURE.to_vec()
}
fn default_open() -> Millis {
    millis(runtime().open)
}
fn default_max_open() -> Millis {
    millis(runtime().max_open)
}
fn default_probes() -> Limit {
    limit(runtime().half_open_max_probes)
}
fn default_success_threshold() -> Limit {
    limit(runtime().success_threshold)
}
fn default_min_failing_clients() -> Limit {
    limit(runtime().min_failing_clients)
}
fn default_min_half_open() -> u64 {
    u64::try_from(runtime().min_half_open.as_millis()).unwrap_or(u64::MAX)
}
fn default_probe_timeout() -> Millis {
    millis(runtime().probe_timeout)
}
fn default_content_type() -> http::HeaderValue {
    http::HeaderValue::from_static("application/json")
}

/// The most distinct failing clients the breaker can be asked to wait for
/// (it remembers that many per route).
const MAX_FAILING_CLIENTS: u64 = 64;

fn count(limit: Limit) -> u32 {
    u32::try_from(limit.get()).unwrap_or(u32::MAX)
}

impl From<&CircuitConfig> for CircuitSettings {
    fn from(c: &CircuitConfig) -> Self {
        Self {
            failure_threshold: count(c.failure_threshold),
            failure_rate: c.failure_rate_threshold.map(|p| FailureRate {
                threshold: p / 100.0,
                window: c.window_ms.map_or(FailureRate::DEFAULT_WINDOW, |w| w.get()),
                min_calls: c.min_calls.map_or(FailureRate::DEFAULT_MIN_CALLS, count),
            }),
            open: c.open_ms.get(),
            max_open: c.max_open_ms.get(),
            half_open_max_probes: count(c.half_open_max_probes),
            success_threshold: count(c.success_threshold),
            min_half_open: Duration::from_millis(c.min_half_open_ms),
            probe_timeout: c.probe_timeout_ms.get(),
            min_failing_clients: count(c.min_failing_clients),
        }
    }
}

impl From<&CircuitConfig> for FailurePolicy {
    fn from(c: &CircuitConfig) -> Self {
        FailurePolicy::new(
            &c.failure_statuses,
            &c.backpressure_statuses,
            c.slow_call_ms.map(|m| m.get()),
        )
    }
}

impl CircuitConfig {
    /// Checks what spans several keys; `at` is the section's key path.
    pub(super) fn validate(
        &self,
        at: &str,
        has_static_admission: bool,
    ) -> Result<(), (String, String)> {
        let key = |k: &str| format!("{at}.{k}");
        if let Some(p) = self.failure_rate_threshold
            && !(p > 0.0 && p <= 100.0)
        {
            return Err((
                key("failure_rate_threshold"),
                format!("must be a percentage above 0 and at most 100 (got {p})"),
            ));
        }
        if self.failure_rate_threshold.is_none() {
            for (name, set) in [
                ("window_ms", self.window_ms.is_some()),
                ("min_calls", self.min_calls.is_some()),
            ] {
                if set {
                    return Err((
                        key(name),
                        "has no effect without failure_rate_threshold; set both or neither".into(),
                    ));
                }
            }
        }
        if self.failure_statuses.is_empty() {
            return Err((
                key("failure_statuses"),
                "must list at least one status (e.g. [500, 502, 503, 504])".into(),
            ));
        }
        for (name, statuses) in [
            ("failure_statuses", &self.failure_statuses),
            ("backpressure_statuses", &self.backpressure_statuses),
        ] {
            if let Some(s) = statuses.iter().find(|s| !(100..=599).contains(*s)) {
                return Err((key(name), format!("{s} is not an HTTP status (100..=599)")));
            }
        }
        if self.max_open_ms.get() < self.open_ms.get() {
            return Err((
                key("max_open_ms"),
                format!(
                    "must not be below open_ms ({} < {})",
                    self.max_open_ms.get().as_millis(),
                    self.open_ms.get().as_millis()
                ),
            ));
        }
        if self.min_failing_clients.get() > MAX_FAILING_CLIENTS {
            return Err((
                key("min_failing_clients"),
                format!(
                    "must be at most {MAX_FAILING_CLIENTS} (got {})",
                    self.min_failing_clients.get()
                ),
            ));
        }
        if self.slow_start_ms > 0 && !has_static_admission {
            return Err((
                key("slow_start_ms"),
                "ramps the admission limit, so the route needs [route.admission] with a \
                 numeric max_inflight"
                    .into(),
            ));
        }
        Ok(())
    }
}
