//! Store and forward (README "Store and forward"): while the upstream is
//! down or full, a route with `[route.spool]` writes eligible requests to
//! disk and answers `202 Accepted` once they are durable; a replayer delivers
//! them, oldest first, at the pace admission grants, and moves the ones the
//! upstream refuses for good to a dead-letter store.
//!
//! - [`record`]: the on-disk frames, each with a CRC.
//! - [`store`]: the segment log, its recovery, the writer thread, the
//!   dead-letter files.
//! - [`layer`]: the [`SpoolLayer`] in the request path, which turns an
//!   eligible refusal into a spooled request.
//! - [`intake`]: how a refused request's body gets into the spool, reserved
//!   first and never whole in memory.
//! - [`replay`]: the per-route delivery loop.

mod intake;
mod layer;
mod metrics;
pub mod record;
pub mod replay;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

pub use layer::{SpoolBody, SpoolLayer, Spooling};
pub use metrics::SpoolMetrics;
pub use store::{DeadLetter, SpoolError, SpoolSnapshot, Store};

use crate::body::BoxError;
use crate::classify;
use crate::error::Reason;
use crate::metrics::Registry;

/// When a spooled request is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// An fsync per request before its answer.
    Always,
    /// A group commit every interval; each request answered after its commit.
    Batch(Duration),
}

/// A route's spool settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolSettings {
    /// Its directory.
    pub dir: PathBuf,
    /// Most bytes on disk, dead letters included.
    pub max_bytes: u64,
    /// Most requests held.
    pub max_requests: usize,
    /// Methods that may be spooled.
    pub methods: Vec<Method>,
    /// Refusals that spool.
    pub on: Vec<Reason>,
    /// Deliveries tried before a request becomes a dead letter.
    pub max_attempts: u16,
    /// Header carrying the idempotency key.
    pub idempotency_header: HeaderName,
    /// When a request is durable.
    pub durability: Durability,
}

impl SpoolSettings {
    /// `max_requests` by default: about 50 MB of index at most.
    pub const DEFAULT_MAX_REQUESTS: usize = 1_000_000;
    /// `max_attempts` by default.
    pub const DEFAULT_MAX_ATTEMPTS: u16 = 10;
    /// `fsync_interval_ms` by default.
    pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(10);
}

/// The open spools of a proxy, by route name: opened once per process and
/// kept across reloads.
#[derive(Debug, Clone, Default)]
pub struct Spools(std::collections::HashMap<String, Arc<Spool>>);

impl Spools {
    /// Opens (and recovers) each `(route, settings)`.
    pub fn open<'a>(
        routes: impl IntoIterator<Item = (&'a str, SpoolSettings)>,
        registry: &Registry,
    ) -> std::io::Result<Self> {
        let mut spools = std::collections::HashMap::new();
        for (route, settings) in routes {
            spools.insert(route.to_string(), Spool::open(route, settings, registry)?);
        }
        Ok(Self(spools))
    }

    /// `route`'s spool.
    pub fn get(&self, route: &str) -> Option<Arc<Spool>> {
        self.0.get(route).cloned()
    }

    /// Every spool.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Spool>> {
        self.0.values()
    }
}

/// One route's spool: its store and what it takes.
#[derive(Debug)]
pub struct Spool {
    route: Arc<str>,
    settings: SpoolSettings,
    store: Arc<Store>,
    /// Requests being taken in at once ([`intake::AT_ONCE`]).
    taking: tokio::sync::Semaphore,
}

impl Spool {
    /// Opens (and recovers) `route`'s spool.
    pub fn open(
        route: &str,
        settings: SpoolSettings,
        registry: &Registry,
    ) -> std::io::Result<Arc<Self>> {
        let store = Store::open(&settings, SpoolMetrics::new(route, registry))?;
        Ok(Arc::new(Self {
            route: route.into(),
            settings,
            store,
            taking: tokio::sync::Semaphore::new(intake::AT_ONCE),
        }))
    }

    /// The route's name.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Its settings.
    pub fn settings(&self) -> &SpoolSettings {
        &self.settings
    }

    /// Its store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The places for requests being taken in at once.
    fn taking(&self) -> &tokio::sync::Semaphore {
        &self.taking
    }

    /// Whether requests with `method` may be spooled.
    pub fn takes(&self, method: &Method) -> bool {
        self.settings.methods.contains(method)
    }

    /// Whether `err` is a refusal this spool takes over: one of its `on`
    /// reasons, and for `upstream_unavailable` only when nothing of the
    /// request reached the upstream.
    pub fn takes_over(&self, err: &BoxError) -> bool {
        classify::failure(err.as_ref()).spoolable(&self.settings.on)
    }
}

#[cfg(test)]
mod tests;
