//! Per-client rate limiting: a GCRA token bucket per client (the `governor`
//! crate), keyed by client address or by a header (an API key), with optional
//! per-key tiers, `429` + `Retry-After`, and the IETF `RateLimit` fields on
//! every response.
//!
//! With `scope = "cluster"` each client's bucket lives on the cluster's Redis
//! instead ([`crate::cluster`]), shared by every replica, decided by one Lua
//! script per request on Redis's clock, with a fallback while Redis cannot
//! answer.
//!
//! Memory is bounded: at most `max_keys` clients are tracked (past that, new
//! ones share one overflow bucket), and clients whose bucket has refilled are
//! forgotten on a timer.

mod bucket;
mod clock;
mod layer;
mod limiter;
mod settings;
mod shared;
mod store;

pub use crate::client_key::{ClientKey, KeyExtractor, KeySource};
pub use bucket::Decision;
pub use clock::TokioClock;
pub use layer::{RATELIMIT, RATELIMIT_POLICY, RateLimit, RateLimitLayer};
pub use limiter::{RateLimitMetrics, RateLimitSnapshot, RateLimiter};
pub use settings::{ClusterFallback, Rate, RateLimitSettings, Scope, Tier};
pub use shared::Ask;
pub use store::CappedStore;

#[cfg(test)]
mod tests;
