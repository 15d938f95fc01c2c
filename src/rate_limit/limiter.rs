//! [`RateLimiter`]: one route's per-client GCRA buckets (governor), their
//! tiers, and the `RateLimit` header fields that tell clients where they stand.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use governor::RateLimiter as Governor;
use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use metrics::{Counter, Gauge};
use serde::Serialize;

use super::bucket::{Bucket, Decision};
use super::clock::TokioClock;
use super::settings::{ClusterFallback, Rate, RateLimitSettings, Scope};
use super::shared::{Ask, Held, SharedBuckets, Spent, batch_cap};
use super::store::CappedStore;
use crate::client_key::{ClientKey, KeyExtractor, KeySource};
use crate::cluster::Cluster;
use crate::metrics::{RATE_LIMIT_KEYS, RATE_LIMIT_OVERFLOW_TOTAL, RATE_LIMITED_TOTAL, Registry};

pub(super) type Keyed =
    Governor<ClientKey, CappedStore<ClientKey>, TokioClock, StateInformationMiddleware>;

/// Prometheus handles of one route's rate limit.
#[derive(Debug, Clone)]
pub struct RateLimitMetrics {
    limited: Counter,
    keys: Gauge,
    overflowed: Counter,
}

impl RateLimitMetrics {
    /// Registers the route's rate-limit metrics.
    pub fn new(route: &str, registry: &Registry) -> Self {
        let r = [("route", route)];
        Self {
            limited: registry.counter(RATE_LIMITED_TOTAL, &r),
            keys: registry.gauge(RATE_LIMIT_KEYS, &r),
            overflowed: registry.counter(RATE_LIMIT_OVERFLOW_TOTAL, &r),
        }
    }

    fn noop() -> Self {
        Self {
            limited: Counter::noop(),
            keys: Gauge::noop(),
            overflowed: Counter::noop(),
        }
    }
}

/// What `/status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimitSnapshot {
    /// Clients tracked by the default policy.
    pub keys: usize,
    /// The cap.
    pub max_keys: usize,
    /// Default rate.
    pub per_second: f64,
    /// Default burst.
    pub burst: u32,
}

/// Per-client rate limiting for one route.
#[derive(Debug)]
pub struct RateLimiter {
    extractor: KeyExtractor,
    default: Bucket,
    tiers: Vec<Bucket>,
    tier_of: HashMap<ClientKey, usize>,
    /// With header keys: each client address's bucket, where a new key is
    /// counted once `max_keys` are tracked (so that keys invented by one
    /// client cannot lock out everyone's new keys), and, with `per_ip`, the
    /// ceiling over all the keys an address sends.
    per_ip: Option<Bucket>,
    /// `per_ip` is a ceiling on every request, not only the overflow's.
    ceiling: bool,
    /// When the default store was last pruned because it was full (ms on
    /// the limiter's clock): at most once a second.
    pruned_at: std::sync::atomic::AtomicU64,
    max_keys: usize,
    metrics: RateLimitMetrics,
    /// `scope = "cluster"`: where the buckets are.
    shared: Option<SharedBuckets>,
}

impl RateLimiter {
    /// A limiter of `rate` per client address, at most `max_keys` clients
    /// tracked, no metrics (for embedding; see [`RateLimiter::with_settings`]).
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        let extractor = KeyExtractor::new(&KeySource::Ip, Vec::new());
        Self::build(extractor, rate, max_keys, RateLimitMetrics::noop())
    }

    fn build(
        extractor: KeyExtractor,
        rate: Rate,
        max_keys: usize,
        metrics: RateLimitMetrics,
    ) -> Self {
        let default = Bucket::new(
            "default".into(),
            false,
            rate,
            max_keys,
            metrics.overflowed.clone(),
            metrics.keys.clone(),
        );
        Self {
            extractor,
            default,
            tiers: Vec::new(),
            tier_of: HashMap::new(),
            per_ip: None,
            ceiling: false,
            pruned_at: std::sync::atomic::AtomicU64::new(0),
            max_keys,
            metrics,
            shared: None,
        }
    }

    /// The limiter `settings` describe (a `[route.rate_limit]` section).
    pub fn with_settings(settings: &RateLimitSettings, metrics: RateLimitMetrics) -> Self {
        let extractor = KeyExtractor::new(&settings.key, settings.trusted_proxies.clone())
            .ipv6_prefix(settings.ipv6_prefix);
        // Shared buckets: long keys must digest the same on every replica.
        let extractor = match settings.scope {
            Scope::Local => extractor,
            Scope::Cluster { .. } => extractor.shared(),
        };
        let mut limiter = Self::build(extractor, settings.rate, settings.max_keys, metrics);
        if matches!(settings.key, KeySource::Header(_)) {
            limiter.per_ip = Some(Bucket::new(
                "per_ip".into(),
                false,
                settings.per_ip.unwrap_or(settings.rate),
                settings.max_keys,
                limiter.metrics.overflowed.clone(),
                Gauge::noop(),
            ));
            limiter.ceiling = settings.per_ip.is_some();
        }
        for tier in &settings.tiers {
            // A tier holds only its listed keys: its store never overflows.
            let bucket = Bucket::new(
                tier.name.clone(),
                true,
                tier.rate,
                tier.keys.len(),
                Counter::noop(),
                Gauge::noop(),
            );
            for key in &tier.keys {
                let key = limiter.extractor.listed(&settings.key, key);
                limiter.tier_of.insert(key, limiter.tiers.len());
            }
            limiter.tiers.push(bucket);
        }
        limiter
    }

    /// Carries on from `old`'s buckets, the limiter of this route before a
    /// reload: a reload must not give every client a fresh burst. Tiers
    /// carry by name; a bucket whose table changed size starts afresh.
    pub fn carry_from(mut self, old: &RateLimiter) -> Self {
        self.default.carry(&old.default);
        for (i, tier) in self.tiers.iter_mut().enumerate() {
            let Some((j, before)) = old
                .tiers
                .iter()
                .enumerate()
                .find(|(_, t)| t.name == tier.name)
            else {
                continue;
            };
            // Its table holds exactly its keys: carried only when they are
            // the same keys, or a new key would find no place.
            let keys = |map: &HashMap<ClientKey, usize>, at| {
                let mut keys: Vec<_> = map
                    .iter()
                    .filter(|(_, n)| **n == at)
                    .map(|(k, _)| k)
                    .collect();
                keys.sort_by_key(|k| k.shared_bytes());
                keys.into_iter().cloned().collect::<Vec<_>>()
            };
            if keys(&self.tier_of, i) == keys(&old.tier_of, j) {
                tier.carry(before);
            }
        }
        if let (Some(per_ip), Some(before)) = (&mut self.per_ip, &old.per_ip) {
            per_ip.carry(before);
        }
        self
    }

    /// Keeps the buckets on `cluster` (`scope = "cluster"`), for `route`,
    /// with `fallback` deciding while Redis cannot; `fallbacks` counts those
    /// decisions.
    pub fn shared_on(
        mut self,
        cluster: Arc<Cluster>,
        route: &str,
        fallback: ClusterFallback,
        sync: Option<Duration>,
        fallbacks: Counter,
    ) -> Self {
        debug_assert!(
            matches!(self.extractor.hasher(), crate::client_key::Digests::Stable),
            "a shared limiter is built from settings with scope = cluster"
        );
        self.shared = Some(SharedBuckets {
            cluster,
            route: route.to_string(),
            fallback,
            fallbacks,
            sync,
            batches: std::sync::Mutex::new(HashMap::new()),
            max_batches: self.max_keys,
        });
        self
    }

    /// Whether decisions are made on Redis ([`RateLimiter::decide`]).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The cluster's state, when shared.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.shared.as_ref().map(|s| &s.cluster)
    }

    /// Asks Redis what [`RateLimiter::decide_here`] could not decide: one
    /// round trip, at most `timeout_ms`; the fallback decides when Redis
    /// cannot.
    pub async fn ask(&self, key: &ClientKey, ask: Ask) -> Decision {
        let Some(shared) = &self.shared else {
            return self.check(key);
        };
        let Ask { tokens: n, fetcher } = ask;
        let bucket = self.bucket_of(key);
        let (t, tau) = bucket.rate.gcra();
        let redis_key = shared
            .cluster
            .key(&shared.route, &bucket.name, &key.shared_bytes());
        match shared.cluster.gcra(&redis_key, t, tau, n, None).await {
            Ok(reply) if reply.allowed() => {
                let kept = reply.granted - 1;
                if fetcher {
                    let held = match shared.sync {
                        Some(sync) => Held::Tokens {
                            left: kept,
                            until: tokio::time::Instant::now() + sync,
                        },
                        None => Held::Nothing,
                    };
                    shared.keep(key, held, n);
                }
                // governor's remaining burst: what fits before tat - tau,
                // and the tokens this replica holds.
                let room = (t + tau).saturating_sub(reply.tat_ahead).min(tau);
                let remaining = (room.as_nanos() / t.as_nanos().max(1)) as u32;
                bucket.decide(None, remaining + kept)
            }
            Ok(reply) => {
                self.metrics.limited.increment(1);
                let until = tokio::time::Instant::now() + reply.wait;
                if fetcher {
                    shared.keep(key, Held::Refused { until }, n);
                }
                let secs = reply.wait.as_secs_f64().ceil().max(1.0) as u64;
                bucket.decide(Some(secs), 0)
            }
            Err(_) => {
                if fetcher {
                    shared.keep(key, Held::Nothing, n);
                }
                shared.fallbacks.increment(1);
                match shared.fallback {
                    ClusterFallback::Local => self.check(key),
                    ClusterFallback::Allow => bucket.decide(None, bucket.rate.burst()),
                    ClusterFallback::Deny => {
                        self.metrics.limited.increment(1);
                        bucket.decide(Some(1), 0)
                    }
                }
            }
        }
    }

    /// A shared limiter's decision that needs no round trip (a token of the
    /// client's batch, or a refusal Redis gave that still holds), or what to
    /// ask Redis for ([`RateLimiter::ask`]).
    pub fn decide_here(&self, key: &ClientKey) -> Result<Decision, Ask> {
        let Some(shared) = &self.shared else {
            return Err(Ask {
                tokens: 1,
                fetcher: false,
            });
        };
        let bucket = self.bucket_of(key);
        let cap = shared.sync.map_or(1, |sync| batch_cap(&bucket.rate, sync));
        Ok(match shared.spend(key, cap)? {
            Spent::Allowed(left) => bucket.decide(None, left),
            Spent::Refused(wait) => {
                self.metrics.limited.increment(1);
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                bucket.decide(Some(secs), 0)
            }
        })
    }

    fn bucket_of(&self, key: &ClientKey) -> &Bucket {
        self.tier_of
            .get(key)
            .map_or(&self.default, |&i| &self.tiers[i])
    }

    /// The key extractor.
    pub fn extractor(&self) -> &KeyExtractor {
        &self.extractor
    }

    /// Whether a per-address ceiling is configured
    /// ([`RateLimiter::over_ceiling`] wants every request's address).
    pub fn has_ceiling(&self) -> bool {
        self.ceiling
    }

    /// The per-address ceiling's refusal, when `address` is over it
    /// (counts the request against it otherwise).
    pub fn over_ceiling(&self, address: Option<IpAddr>) -> Option<Decision> {
        let per_ip = self.per_ip.as_ref().filter(|_| self.ceiling)?;
        let key = ClientKey::Ip(address?);
        if !per_ip.store.takes(&key) {
            self.prune_when_full();
            if !per_ip.store.takes(&key) {
                // No place to count this address alone: its key's own
                // bucket limits it, never a bucket shared with strangers.
                return None;
            }
        }
        let decision = self.spend(per_ip, &key);
        decision.retry_after_s.is_some().then_some(decision)
    }

    /// Counts one request of `key` and says whether it may go on.
    pub fn check(&self, key: &ClientKey) -> Decision {
        self.spend(self.bucket_of(key), key)
    }

    /// The same for a request whose client address `address` finds (header
    /// keys; asked only when needed: for the ceiling, or for a new key once
    /// `max_keys` are tracked): over its address's ceiling it is refused; a
    /// new key that finds no place is counted in its address's bucket.
    pub fn check_from(
        &self,
        key: &ClientKey,
        address: impl FnOnce() -> Option<IpAddr>,
    ) -> Decision {
        let bucket = self.bucket_of(key);
        let Some(per_ip) = self.per_ip.as_ref() else {
            return self.spend(bucket, key);
        };
        let mut address = Some(address);
        let mut ip = None;
        if self.ceiling {
            ip = address.take().and_then(|f| f());
            if let Some(refused) = self.over_ceiling(ip) {
                return refused;
            }
        }
        if bucket.tier.is_none() && !bucket.store.takes(key) {
            self.prune_when_full();
            if !bucket.store.takes(key)
                && let Some(ip) = ip.or_else(|| address.take().and_then(|f| f()))
            {
                self.metrics.overflowed.increment(1);
                if self.ceiling {
                    // Already counted against the ceiling just above.
                    return per_ip.decide(None, 0);
                }
                return self.spend(per_ip, &ClientKey::Ip(ip));
            }
        }
        self.spend(bucket, key)
    }

    /// Forgets refilled buckets now rather than at the next timer, at most
    /// once a second: keys that were used once and have refilled are idle,
    /// and hold places new keys need.
    fn prune_when_full(&self) {
        use std::sync::atomic::Ordering;
        let now = self.default.governor.clock().now().as_millis() as u64;
        let last = self.pruned_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .pruned_at
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.default.governor.retain_recent();
            if let Some(per_ip) = &self.per_ip {
                per_ip.governor.retain_recent();
            }
        }
    }

    fn spend(&self, bucket: &Bucket, key: &ClientKey) -> Decision {
        let (retry_after_s, remaining) = match bucket.governor.check_key(key) {
            Ok(snapshot) => (None, snapshot.remaining_burst_capacity()),
            Err(not_until) => {
                self.metrics.limited.increment(1);
                let wait = not_until.wait_time_from(bucket.governor.clock().now());
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                (Some(secs), 0)
            }
        };
        bucket.decide(retry_after_s, remaining)
    }

    /// Forgets clients whose bucket has refilled (forgetting them changes
    /// nothing). Run it on a timer: [`RateLimiter::spawn_pruner`].
    pub fn prune(&self) {
        self.default.governor.retain_recent();
        self.default.governor.shrink_to_fit();
        if let Some(per_ip) = &self.per_ip {
            per_ip.governor.retain_recent();
            per_ip.governor.shrink_to_fit();
        }
        for tier in &self.tiers {
            tier.governor.retain_recent();
        }
    }

    /// How often a limiter forgets clients whose bucket has refilled.
    pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

    /// Prunes every [`PRUNE_INTERVAL`](Self::PRUNE_INTERVAL) until the
    /// limiter is dropped, when built on a tokio runtime (a limiter built
    /// outside one, in a bench, prunes when full).
    pub fn prune_in_background(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.spawn_pruner(Self::PRUNE_INTERVAL);
        }
    }

    /// Prunes every `interval` on the current tokio runtime, until the
    /// limiter is dropped.
    pub fn spawn_pruner(self: &Arc<Self>, interval: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(limiter) = weak.upgrade() else {
                    return;
                };
                limiter.prune();
            }
        });
    }

    /// Clients tracked by the default policy.
    pub fn keys(&self) -> usize {
        self.default.governor.len()
    }

    /// The live state.
    pub fn snapshot(&self) -> RateLimitSnapshot {
        RateLimitSnapshot {
            keys: self.keys(),
            max_keys: self.max_keys,
            per_second: self.default.rate.per_second,
            burst: self.default.rate.burst(),
        }
    }
}
