//! `[route.admission]`: how many requests may be at the upstream at once,
//! how many more may wait, for how long, and in what order.

use serde::Deserialize;

use super::values::{self, ByteSize, Limit, Millis};
use super::{AdaptiveConfig, MaxInflight};
use crate::admission::{AdmissionSettings, Discipline};

/// `[route.admission]`: how many requests may be at the upstream at once, and
/// how many more may wait, for how long.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Requests at the upstream at once.
    #[serde(
        default = "values::default_max_inflight",
        deserialize_with = "values::max_inflight"
    )]
    pub max_inflight: MaxInflight,
    /// Requests that may wait beyond `max_inflight`; 0 = none wait.
    #[serde(default = "values::default_queue_capacity")]
    pub queue_capacity: usize,
    /// Longest time a request waits in the queue.
    #[serde(default = "values::default_queue_timeout")]
    pub queue_timeout_ms: Millis,
    /// Request header naming the priority class: `critical`, `normal`, `batch`.
    #[serde(
        default = "values::default_priority_header",
        deserialize_with = "values::header_name"
    )]
    pub priority_header: http::HeaderName,
    /// Peers whose `priority_header` is believed (CIDRs or addresses): the
    /// route's load balancers, internal callers. From anyone else the header
    /// is ignored.
    #[serde(default, deserialize_with = "values::cidrs")]
    pub priority_trusted_proxies: Vec<ipnet::IpNet>,
    /// Who a request's tenant is: `"ip"` (the client address, as the rate
    /// limit resolves it) or `"header:<name>"` (an API key). Absent: one
    /// tenant. Tenants that wait are served in turn.
    #[serde(default, deserialize_with = "values::some_client_key")]
    pub tenant_key: Option<crate::client_key::KeySource>,
    /// Slots one tenant may hold at once (needs `tenant_key`).
    #[serde(default)]
    pub max_inflight_per_tenant: Option<Limit>,
    /// With `tenant_key = "header:..."`: tenants one client address may be
    /// at once; a further name counts as its first (invented names buy no
    /// more turns).
    #[serde(default = "default_tenants_per_client")]
    pub tenants_per_client: Limit,
    /// `"fifo"` (default) or `"codel"`: adaptive LIFO with a short wait
    /// while the queue stands.
    #[serde(default)]
    pub queue_discipline: QueueDiscipline,
    /// `codel`: how long the queue must have been non-empty to stand
    /// (default 100).
    #[serde(default)]
    pub codel_interval_ms: Option<Millis>,
    /// `codel`: the longest wait while it stands (default 5).
    #[serde(default)]
    pub codel_target_ms: Option<Millis>,
    /// Request body bytes admitted at once: each request weighs its
    /// declared `Content-Length`. Absent: bytes are not counted.
    #[serde(default)]
    pub max_inflight_bytes: Option<ByteSize>,
    /// What a body of unknown length weighs (needs `max_inflight_bytes`;
    /// default 65536).
    #[serde(default)]
    pub unknown_length_bytes: Option<ByteSize>,
    /// Smallest `Retry-After` (seconds) sent with a 503.
    #[serde(default = "values::default_retry_after_min")]
    pub retry_after_min_s: u64,
    /// Largest `Retry-After` (seconds) sent with a 503.
    #[serde(default = "values::default_retry_after_max")]
    pub retry_after_max_s: u64,
    /// How an adaptive `max_inflight` moves (`[route.admission.adaptive]`).
    #[serde(default)]
    pub adaptive: Option<AdaptiveConfig>,
}

fn default_tenants_per_client() -> Limit {
    Limit::new(1)
}

/// The most tenant names one client address may use at once.
const MAX_TENANTS_PER_CLIENT: u64 = 1000;

/// `queue_discipline`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueDiscipline {
    /// Oldest first.
    #[default]
    Fifo,
    /// Adaptive LIFO + CoDel.
    Codel,
}

impl AdmissionConfig {
    /// How the queue is served.
    pub fn discipline(&self) -> Discipline {
        match self.queue_discipline {
            QueueDiscipline::Fifo => Discipline::Fifo,
            QueueDiscipline::Codel => Discipline::Codel {
                interval: self
                    .codel_interval_ms
                    .map_or(Discipline::DEFAULT_INTERVAL, Millis::get),
                target: self
                    .codel_target_ms
                    .map_or(Discipline::DEFAULT_TARGET, Millis::get),
            },
        }
    }

    /// The adaptive settings when `max_inflight = "adaptive"` (the section's
    /// values, or its defaults when it is absent).
    pub fn adaptive_settings(&self) -> Option<crate::adaptive::AdaptiveSettings> {
        match self.max_inflight {
            MaxInflight::Fixed(_) => None,
            MaxInflight::Adaptive => Some(self.adaptive.clone().unwrap_or_default().settings()),
        }
    }
}

impl From<&AdmissionConfig> for AdmissionSettings {
    fn from(c: &AdmissionConfig) -> Self {
        Self {
            // Adaptive: the algorithm moves the limit below its upper bound.
            max_inflight: match c.max_inflight {
                MaxInflight::Fixed(limit) => limit.as_usize(),
                MaxInflight::Adaptive => {
                    c.adaptive_settings().map_or(usize::MAX, |a| a.bounds().max)
                }
            },
            queue_capacity: c.queue_capacity,
            queue_timeout: c.queue_timeout_ms.get(),
            retry_after_min_s: c.retry_after_min_s,
            retry_after_max_s: c.retry_after_max_s,
            by_tenant: c.tenant_key.is_some(),
            max_inflight_per_tenant: c.max_inflight_per_tenant.map(Limit::as_usize),
            discipline: c.discipline(),
            max_inflight_bytes: c.max_inflight_bytes.map(ByteSize::get),
            unknown_length_bytes: c.unknown_length_bytes.map_or(
                AdmissionSettings::DEFAULT.unknown_length_bytes,
                ByteSize::get,
            ),
        }
    }
}

impl AdmissionConfig {
    /// Checks what spans several keys; `at` is the section's key path.
    pub(super) fn validate(&self, at: &str) -> Result<(), (String, String)> {
        match (&self.adaptive, self.max_inflight) {
            (Some(_), MaxInflight::Fixed(_)) => {
                return Err((
                    format!("{at}.adaptive"),
                    "only applies with max_inflight = \"adaptive\"".into(),
                ));
            }
            (Some(adaptive), MaxInflight::Adaptive) => {
                adaptive.validate(&format!("{at}.adaptive"))?
            }
            _ => {}
        }
        match self.discipline() {
            Discipline::Fifo => {
                let set = [
                    ("codel_interval_ms", self.codel_interval_ms),
                    ("codel_target_ms", self.codel_target_ms),
                ];
                if let Some((key, _)) = set.iter().find(|(_, v)| v.is_some()) {
                    return Err((
                        format!("{at}.{key}"),
                        "only applies with queue_discipline = \"codel\"".into(),
                    ));
                }
            }
            Discipline::Codel { interval, target } => {
                if target >= interval {
                    return Err((
                        format!("{at}.codel_target_ms"),
                        format!(
                            "must be below codel_interval_ms ({} >= {})",
                            target.as_millis(),
                            interval.as_millis()
                        ),
                    ));
                }
                if target >= self.queue_timeout_ms.get() {
                    return Err((
                        format!("{at}.codel_target_ms"),
                        format!(
                            "must be below queue_timeout_ms ({} >= {})",
                            target.as_millis(),
                            self.queue_timeout_ms.get().as_millis()
                        ),
                    ));
                }
            }
        }
        match (self.max_inflight_bytes, self.unknown_length_bytes) {
            (None, Some(_)) => {
                return Err((
                    format!("{at}.unknown_length_bytes"),
                    "only applies with max_inflight_bytes".into(),
                ));
            }
            (Some(max), Some(unknown)) if unknown.get() > max.get() => {
                return Err((
                    format!("{at}.unknown_length_bytes"),
                    format!(
                        "must not exceed max_inflight_bytes ({} > {})",
                        unknown.get(),
                        max.get()
                    ),
                ));
            }
            (Some(max), None) if max.get() < AdmissionSettings::DEFAULT.unknown_length_bytes => {
                return Err((
                    format!("{at}.max_inflight_bytes"),
                    format!(
                        "below the default unknown_length_bytes ({} < {}): set \
                         unknown_length_bytes too",
                        max.get(),
                        AdmissionSettings::DEFAULT.unknown_length_bytes
                    ),
                ));
            }
            _ => {}
        }
        if self.tenants_per_client.get() > MAX_TENANTS_PER_CLIENT {
            return Err((
                format!("{at}.tenants_per_client"),
                format!(
                    "must be at most {MAX_TENANTS_PER_CLIENT} (got {})",
                    self.tenants_per_client.get()
                ),
            ));
        }
        if let Some(cap) = self.max_inflight_per_tenant {
            if self.tenant_key.is_none() {
                return Err((
                    format!("{at}.max_inflight_per_tenant"),
                    "needs tenant_key: without it every request is one tenant".into(),
                ));
            }
            if let Some(max) = self.max_inflight.fixed()
                && cap.get() > max.get()
            {
                return Err((
                    format!("{at}.max_inflight_per_tenant"),
                    format!(
                        "must not exceed max_inflight ({} > {})",
                        cap.get(),
                        max.get()
                    ),
                ));
            }
        }
        if self.retry_after_min_s > self.retry_after_max_s {
            return Err((
                format!("{at}.retry_after_min_s"),
                format!(
                    "must not exceed retry_after_max_s ({} > {})",
                    self.retry_after_min_s, self.retry_after_max_s
                ),
            ));
        }
        Ok(())
    }
}
