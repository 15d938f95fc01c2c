//! The spool's metrics, registered once per route.

use metrics::{Counter, Gauge};

use crate::metrics::{
    Registry, SPOOL_BYTES, SPOOL_DAMAGED_TOTAL, SPOOL_DEAD_LETTERED_TOTAL, SPOOL_DEAD_LETTERS,
    SPOOL_MAX_BYTES, SPOOL_OLDEST_AGE, SPOOL_REPLAY_PAUSED, SPOOL_REPLAYED_TOTAL, SPOOL_REQUESTS,
    SPOOLED_TOTAL,
};

/// One route's spool metrics.
#[derive(Debug, Clone)]
pub struct SpoolMetrics {
    pub(crate) requests: Gauge,
    pub(crate) bytes: Gauge,
    pub(crate) oldest_age: Gauge,
    pub(crate) dead_letters: Gauge,
    pub(crate) max_bytes: Gauge,
    pub(crate) spooled: Counter,
    pub(crate) delivered: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) damaged: Counter,
    pub(crate) replay_paused: Gauge,
}

impl SpoolMetrics {
    /// Registers `route`'s spool metrics.
    pub fn new(route: &str, registry: &Registry) -> Self {
        let labels = [("route", route)];
        let replayed = |result| {
            registry.counter(
                SPOOL_REPLAYED_TOTAL,
                &[("route", route), ("result", result)],
            )
        };
        Self {
            requests: registry.gauge(SPOOL_REQUESTS, &labels),
            bytes: registry.gauge(SPOOL_BYTES, &labels),
            oldest_age: registry.gauge(SPOOL_OLDEST_AGE, &labels),
            dead_letters: registry.gauge(SPOOL_DEAD_LETTERS, &labels),
            max_bytes: registry.gauge(SPOOL_MAX_BYTES, &labels),
            spooled: registry.counter(SPOOLED_TOTAL, &labels),
            delivered: replayed("delivered"),
            retried: replayed("retried"),
            dead_lettered: registry.counter(SPOOL_DEAD_LETTERED_TOTAL, &labels),
            damaged: registry.counter(SPOOL_DAMAGED_TOTAL, &labels),
            replay_paused: registry.gauge(SPOOL_REPLAY_PAUSED, &labels),
        }
    }
}
