//! `[route.spool]`: store and forward (README "Store and forward").

use std::path::PathBuf;

use http::Method;
use serde::{Deserialize, Deserializer};

use super::values::{self, ByteSize, Limit, Millis};
use crate::error::Reason;
use crate::spool::{Durability, SpoolSettings};

/// `[route.spool]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the spool's segment files (created if missing; one
    /// route, one process).
    pub dir: PathBuf,
    /// Most bytes the spool holds on disk, dead letters included.
    pub max_bytes: ByteSize,
    /// Most requests it holds (a bound on its in-memory index).
    #[serde(default = "default_max_requests")]
    pub max_requests: Limit,
    /// Methods that may be spooled.
    #[serde(default = "default_methods", deserialize_with = "methods")]
    pub methods: Vec<Method>,
    /// Refusals that spool instead of answering.
    #[serde(default = "default_on", deserialize_with = "reasons")]
    pub on: Vec<Reason>,
    /// Deliveries tried before a request becomes a dead letter.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: Limit,
    /// Header carrying the request's idempotency key (generated when absent).
    #[serde(
        default = "default_idempotency_header",
        deserialize_with = "values::header_name"
    )]
    pub idempotency_header: http::HeaderName,
    /// `"always"` (an fsync per request) or `"batch"` (group commit).
    #[serde(default)]
    pub fsync: Fsync,
    /// `batch`: how often the group commit runs (default 10).
    #[serde(default)]
    pub fsync_interval_ms: Option<Millis>,
}

/// `fsync`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// One fsync per request, before its answer.
    #[default]
    Always,
    /// One fsync per interval for every request written in it, each
    /// answered after the commit.
    Batch,
}

/// The refusals a spool may take over: those that say nothing of the request.
const SPOOLABLE: [Reason; 4] = [
    Reason::CircuitOpen,
    Reason::QueueFull,
    Reason::QueueTimeout,
    Reason::UpstreamUnavailable,
];

fn default_max_requests() -> Limit {
    Limit::new(SpoolSettings::DEFAULT_MAX_REQUESTS as u64)
}

fn default_methods() -> Vec<Method> {
    vec![Method::POST, Method::PUT]
}

fn default_on() -> Vec<Reason> {
    SPOOLABLE.to_vec()
}

fn default_max_attempts() -> Limit {
    Limit::new(u64::from(SpoolSettings::DEFAULT_MAX_ATTEMPTS))
}

fn default_idempotency_header() -> http::HeaderName {
    http::HeaderName::from_static("idempotency-key")
}

fn methods<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<Method>, D::Error> {
    let names = Vec::<String>::deserialize(de)?;
    if names.is_empty() {
        return Err(serde::de::Error::custom("must name at least one method"));
    }
    names
        .iter()
        .map(|name| {
            let upper = name.trim().to_ascii_uppercase();
            match Method::from_bytes(upper.as_bytes()) {
                // A read is answered from the upstream or not at all.
                Ok(m) if m == Method::GET || m == Method::HEAD || m == Method::OPTIONS => Err(
                    serde::de::Error::custom(format!("`{name}` cannot be spooled: it reads")),
                ),
                Ok(m) => Ok(m),
                Err(_) => Err(serde::de::Error::custom(format!(
                    "`{name}` is not an HTTP method"
                ))),
            }
        })
        .collect()
}

fn reasons<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<Reason>, D::Error> {
    let names = Vec::<String>::deserialize(de)?;
    if names.is_empty() {
        return Err(serde::de::Error::custom(
            "must name at least one refusal (or leave [route.spool] out)",
        ));
    }
    names
        .iter()
        .map(|name| {
            SPOOLABLE
                .into_iter()
                .find(|r| r.as_str() == name.trim())
                .ok_or_else(|| {
                    let known: Vec<&str> = SPOOLABLE.iter().map(|r| r.as_str()).collect();
                    serde::de::Error::custom(format!(
                        "`{name}` is not a refusal that can be spooled (one of {})",
                        known.join(", ")
                    ))
                })
        })
        .collect()
}

impl SpoolConfig {
    /// Checks what spans several keys; `at` is the section's key path.
    pub(super) fn validate(&self, at: &str) -> Result<(), (String, String)> {
        if self.fsync == Fsync::Always && self.fsync_interval_ms.is_some() {
            return Err((
                format!("{at}.fsync_interval_ms"),
                "only applies with fsync = \"batch\"".into(),
            ));
        }
        if self.dir.as_os_str().is_empty() {
            return Err((format!("{at}.dir"), "must not be empty".into()));
        }
        if self.max_attempts.get() > u64::from(u16::MAX) {
            return Err((
                format!("{at}.max_attempts"),
                format!(
                    "must be at most {} (got {})",
                    u16::MAX,
                    self.max_attempts.get()
                ),
            ));
        }
        Ok(())
    }
}

impl From<&SpoolConfig> for SpoolSettings {
    fn from(c: &SpoolConfig) -> Self {
        Self {
            dir: c.dir.clone(),
            max_bytes: c.max_bytes.get(),
            max_requests: c.max_requests.as_usize(),
            methods: c.methods.clone(),
            on: c.on.clone(),
            max_attempts: u16::try_from(c.max_attempts.get()).unwrap_or(u16::MAX),
            idempotency_header: c.idempotency_header.clone(),
            durability: match c.fsync {
                Fsync::Always => Durability::Always,
                Fsync::Batch => Durability::Batch(
                    c.fsync_interval_ms
                        .map_or(SpoolSettings::DEFAULT_FSYNC_INTERVAL, Millis::get),
                ),
            },
        }
    }
}
