//! What a route's rate limit is: [`Rate`], tiers, and where its buckets live
//! ([`Scope`]).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::Quota;
use serde::Serialize;

use crate::client_key::KeySource;

/// A rate: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second (fractions allowed).
    pub per_second: f64,
    /// Requests at once after an idle spell; `None`: one second's worth.
    pub burst: Option<u32>,
}

impl Rate {
    pub(super) fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
            .max(1)
    }

    /// The GCRA's emission interval and tolerance, as governor derives them
    /// from [`Rate::quota`].
    pub(super) fn gcra(&self) -> (Duration, Duration) {
        let t = Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1));
        (t, t * (self.burst() - 1))
    }

    pub(super) fn quota(&self) -> Quota {
        let period = Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(self.burst()).unwrap_or(NonZeroU32::MIN);
        // `with_period` refuses only a zero period, ruled out just above.
        Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst)
    }
}

/// What a route's rate limit is: who a client is, its rate, and the tiers.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitSettings {
    /// Where a client's key comes from.
    pub key: KeySource,
    /// The rate of every client outside a tier.
    pub rate: Rate,
    /// Load balancers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Most clients tracked at once; past it a new header key is counted in
    /// its client address's bucket, a new address in one shared bucket.
    pub max_keys: usize,
    /// With header keys: the most one client address may send, whatever
    /// keys it sends (`per_ip_per_second`, `per_ip_burst`).
    pub per_ip: Option<Rate>,
    /// IPv6 clients are counted by their network of this many bits.
    pub ipv6_prefix: u8,
    /// Per-key overrides.
    pub tiers: Vec<Tier>,
    /// Whose buckets: this replica's, or every replica's on Redis.
    pub scope: Scope,
}

/// Where a limiter's buckets live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scope {
    /// In this process.
    #[default]
    Local,
    /// On the cluster's Redis, shared by every replica; the fallback decides
    /// while Redis is down or slow.
    Cluster {
        /// Who decides while Redis cannot.
        fallback: ClusterFallback,
        /// `sync_ms`: each replica takes tokens in batches and spends them
        /// for up to this long; `None`: one round trip per request.
        sync: Option<Duration>,
    },
}

/// Who decides while Redis cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterFallback {
    /// This replica's own bucket at the same rate: the fleet admits at most
    /// N× for the while.
    Local,
    /// Every request goes.
    Allow,
    /// Every request is refused (429).
    Deny,
}

impl RateLimitSettings {
    /// Clients tracked at once unless configured.
    pub const DEFAULT_MAX_KEYS: usize = 100_000;
}

/// Listed keys with a rate of their own (an API-key plan).
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    /// Its name in the `RateLimit-Policy` field.
    pub name: String,
    /// Its rate.
    pub rate: Rate,
    /// The keys it holds.
    pub keys: Vec<String>,
}
