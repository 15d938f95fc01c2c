//! [`RateLimiter`]: one route's per-client GCRA buckets (governor), their
//! tiers, and the `RateLimit` header fields that tell clients where they stand.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter as Governor};
use http::HeaderValue;
use metrics::{Counter, Gauge};
use serde::Serialize;

use super::store::CappedStore;
use crate::client_key::{ClientKey, KeyExtractor, KeySource};
use crate::cluster::Cluster;
use crate::metrics::{RATE_LIMIT_KEYS, RATE_LIMIT_OVERFLOW_TOTAL, RATE_LIMITED_TOTAL, Registry};

/// governor's clock, read from tokio's, so that rate limits run on the paused
/// clock in tests like every other timer of the proxy.
///
/// governor keeps its buckets' times relative to its first reading of the
/// clock; that reading is always zero here, so that a limiter a reload
/// builds over the same buckets ([`TokioClock::continuing`]) reads them on
/// the same scale.
#[derive(Debug, Clone)]
pub struct TokioClock {
    origin: tokio::time::Instant,
    read: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
            read: Arc::default(),
        }
    }
}

impl TokioClock {
    /// A clock on the same scale as `self`, for a new limiter over the same
    /// buckets.
    fn continuing(&self) -> Self {
        Self {
            origin: self.origin,
            read: Arc::default(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        use std::sync::atomic::Ordering;
        if !self.read.load(Ordering::Relaxed) && !self.read.swap(true, Ordering::Relaxed) {
            return Duration::ZERO;
        }
        self.origin.elapsed()
    }
}

type Keyed = Governor<ClientKey, CappedStore<ClientKey>, TokioClock, StateInformationMiddleware>;

/// A rate: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second (fractions allowed).
    pub per_second: f64,
    /// Requests at once after an idle spell; `None`: one second's worth.
    pub burst: Option<u32>,
}

impl Rate {
    fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
            .max(1)
    }

    /// The GCRA's emission interval and tolerance, as governor derives them
    /// from [`Rate::quota`].
    fn gcra(&self) -> (Duration, Duration) {
        let t = Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1));
        (t, t * (self.burst() - 1))
    }

    fn quota(&self) -> Quota {
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
        fallback: Fallback,
        /// `sync_ms`: each replica takes tokens in batches and spends them
        /// for up to this long; `None`: one round trip per request.
        sync: Option<Duration>,
    },
}

/// Who decides while Redis cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
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

/// One policy: a rate, its buckets, and its `RateLimit-Policy` field.
#[derive(Debug)]
struct Bucket {
    name: String,
    /// The tier's name as the `ClientTier` extension carries it (`None`:
    /// the route's default rate).
    tier: Option<Arc<str>>,
    rate: Rate,
    governor: Keyed,
    /// The governor's store, to ask whether a key fits.
    store: CappedStore<ClientKey>,
    policy: HeaderValue,
}

impl Bucket {
    fn new(
        name: String,
        tier: bool,
        rate: Rate,
        max_keys: usize,
        overflowed: Counter,
        keys: Gauge,
    ) -> Self {
        let burst = rate.burst();
        let window = (f64::from(burst) / rate.per_second).ceil().max(1.0) as u64;
        // Validated names are plain; quote what a client would need escaped.
        let quoted = name.replace(['"', '\\'], "");
        let policy = HeaderValue::from_str(&format!("\"{quoted}\";q={burst};w={window}"))
            .unwrap_or_else(|_| HeaderValue::from_static("\"default\""));
        let store = CappedStore::new(max_keys, overflowed, keys);
        let governor: Keyed = Governor::new(rate.quota(), store.clone(), TokioClock::default());
        Self {
            tier: tier.then(|| Arc::from(name.as_str())),
            name: quoted,
            rate,
            governor,
            store,
            policy,
        }
    }

    /// Counts on in `old`'s buckets (a reload): clients keep what they have
    /// spent, at this bucket's rate. Not when the table's size changed.
    fn carry(&mut self, old: &Bucket) {
        if self.store.max_keys() != old.store.max_keys() {
            return;
        }
        let clock = old.governor.clock().continuing();
        self.governor = Governor::new(self.rate.quota(), old.store.clone(), clock);
        self.store = old.store.clone();
    }

    /// The `RateLimit` field: `"name";r=<remaining>;t=<reset>`, written
    /// without the formatting machinery (it is on every response).
    fn state(&self, remaining: u32, reset: u64) -> HeaderValue {
        let (mut r, mut t) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (r, t) = (r.format(remaining), t.format(reset));
        let mut value = Vec::with_capacity(self.name.len() + r.len() + t.len() + 8);
        value.push(b'"');
        value.extend_from_slice(self.name.as_bytes());
        value.extend_from_slice(b"\";r=");
        value.extend_from_slice(r.as_bytes());
        value.extend_from_slice(b";t=");
        value.extend_from_slice(t.as_bytes());
        // The name was stripped of quotes and checked as a header value with
        // the policy; digits cannot make it invalid.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The answer: refused for `retry_after_s`, or allowed with `remaining`.
    fn verdict(&self, retry_after_s: Option<u64>, remaining: u32) -> Verdict {
        let reset = match retry_after_s {
            // Until a token is back, then the rest of the burst.
            Some(s) => s + self.reset_after(1),
            None => self.reset_after(remaining),
        };
        Verdict {
            retry_after_s,
            policy: self.policy.clone(),
            state: self.state(remaining, reset),
            tier: self.tier.clone(),
        }
    }

    /// Seconds until `remaining` (of the burst) is back to the full burst.
    fn reset_after(&self, remaining: u32) -> u64 {
        let missing = f64::from(self.rate.burst().saturating_sub(remaining));
        (missing / self.rate.per_second).ceil() as u64
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `None`: allowed. `Some(s)`: refused; come back in `s` seconds.
    pub retry_after_s: Option<u64>,
    /// `RateLimit-Policy` field value.
    pub policy: HeaderValue,
    /// `RateLimit` field value.
    pub state: HeaderValue,
    /// The client's tier, when its key is in one.
    pub tier: Option<Arc<str>>,
}

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

/// A limiter's buckets on the cluster's Redis.
#[derive(Debug)]
struct SharedBuckets {
    cluster: Arc<Cluster>,
    route: String,
    fallback: Fallback,
    fallbacks: Counter,
    /// `sync_ms`: tokens taken from Redis in a batch, spent here until
    /// they run out or the time is up. At most `max_keys` clients.
    sync: Option<Duration>,
    /// By client: a key is in one bucket only (its tier's, or the default).
    batches: std::sync::Mutex<HashMap<ClientKey, Batch>>,
    max_batches: usize,
}

/// What this replica knows of one client without asking Redis: tokens it
/// took in a batch and has not spent (`sync_ms`), or that Redis refused it
/// until a time (no token can appear sooner: exact, and a client hammering
/// past its quota costs no round trips); and how many to ask for next.
#[derive(Debug, Clone, Copy)]
struct Batch {
    state: Held,
    /// The next batch's size: doubled when one was spent in time, halved
    /// when one ran out of time unspent, so that a replica asks for about
    /// what it spends in `sync_ms` (its share of the client's traffic) and
    /// the tokens it takes and loses stay few.
    size: u32,
}

#[derive(Debug, Clone, Copy)]
enum Held {
    Tokens {
        left: u32,
        until: tokio::time::Instant,
    },
    Refused {
        until: tokio::time::Instant,
    },
    /// A request is asking Redis for the next batch: the others ask for one
    /// token each meanwhile, so that concurrent misses do not each take a
    /// batch (and lose all but one).
    Fetching {
        since: tokio::time::Instant,
    },
    Nothing,
}

/// How long a fetch may stay unanswered before another request fetches.
const FETCH_STALE: Duration = Duration::from_secs(1);

/// What to ask Redis for when the batch does not decide.
#[derive(Debug)]
pub struct Ask {
    tokens: u32,
    /// This request fetches the batch (and keeps what it gets).
    fetcher: bool,
}

/// A decision made here from a [`Batch`].
enum Spent {
    /// A token spent; this many left.
    Allowed(u32),
    /// Still refused for this long.
    Refused(Duration),
}

impl SharedBuckets {
    /// Decides from `key`'s batch if it still holds; else what to ask Redis
    /// for (at most `cap` tokens).
    fn spend(&self, key: &ClientKey, cap: u32) -> Result<Spent, Ask> {
        let mut batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let Some(batch) = batches.get_mut(key) else {
            drop(batches);
            // First sight: one token, and a batch entry to grow from.
            self.keep(key, Held::Fetching { since: now }, 1);
            return Err(Ask {
                tokens: 1,
                fetcher: true,
            });
        };
        match batch.state {
            Held::Fetching { since } if now - since < FETCH_STALE => {
                return Err(Ask {
                    tokens: 1,
                    fetcher: false,
                });
            }
            Held::Tokens { left, until } if left > 0 && until > now => {
                batch.state = Held::Tokens {
                    left: left - 1,
                    until,
                };
                return Ok(Spent::Allowed(left - 1));
            }
            Held::Refused { until } if until > now => return Ok(Spent::Refused(until - now)),
            Held::Tokens { left: 0, .. } => batch.size = batch.size.saturating_mul(2).min(cap),
            Held::Tokens { .. } => batch.size = (batch.size / 2).max(1),
            Held::Refused { .. } | Held::Fetching { .. } | Held::Nothing => {}
        }
        batch.state = Held::Fetching { since: now };
        Err(Ask {
            tokens: batch.size.min(cap).max(1),
            fetcher: true,
        })
    }

    /// Remembers what `key` holds now, asked with `size`.
    fn keep(&self, key: &ClientKey, state: Held, size: u32) {
        let mut batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(batch) = batches.get_mut(key) {
            batch.state = state;
            return;
        }
        if batches.len() >= self.max_batches {
            let now = tokio::time::Instant::now();
            batches.retain(|_, b| match b.state {
                Held::Tokens { left, until } => left > 0 && until > now,
                Held::Refused { until } => until > now,
                Held::Fetching { since } => now - since < FETCH_STALE,
                Held::Nothing => false,
            });
            if batches.len() >= self.max_batches {
                // Full of live batches: unspent tokens are lost (the fleet
                // admits less, never more), a refusal is asked again.
                return;
            }
        }
        batches.insert(key.clone(), Batch { state, size });
    }
}

/// The largest batch a replica takes: what the rate makes in `sync`, at
/// least 1, at most the burst.
fn batch_cap(rate: &Rate, sync: Duration) -> u32 {
    let made = (rate.per_second * sync.as_secs_f64()).ceil();
    made.clamp(1.0, f64::from(rate.burst())) as u32
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
        fallback: Fallback,
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
    pub async fn ask(&self, key: &ClientKey, ask: Ask) -> Verdict {
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
                bucket.verdict(None, remaining + kept)
            }
            Ok(reply) => {
                self.metrics.limited.increment(1);
                let until = tokio::time::Instant::now() + reply.wait;
                if fetcher {
                    shared.keep(key, Held::Refused { until }, n);
                }
                let secs = reply.wait.as_secs_f64().ceil().max(1.0) as u64;
                bucket.verdict(Some(secs), 0)
            }
            Err(_) => {
                if fetcher {
                    shared.keep(key, Held::Nothing, n);
                }
                shared.fallbacks.increment(1);
                match shared.fallback {
                    Fallback::Local => self.check(key),
                    Fallback::Allow => bucket.verdict(None, bucket.rate.burst()),
                    Fallback::Deny => {
                        self.metrics.limited.increment(1);
                        bucket.verdict(Some(1), 0)
                    }
                }
            }
        }
    }

    /// A shared limiter's decision that needs no round trip (a token of the
    /// client's batch, or a refusal Redis gave that still holds), or what to
    /// ask Redis for ([`RateLimiter::ask`]).
    pub fn decide_here(&self, key: &ClientKey) -> Result<Verdict, Ask> {
        let Some(shared) = &self.shared else {
            return Err(Ask {
                tokens: 1,
                fetcher: false,
            });
        };
        let bucket = self.bucket_of(key);
        let cap = shared.sync.map_or(1, |sync| batch_cap(&bucket.rate, sync));
        Ok(match shared.spend(key, cap)? {
            Spent::Allowed(left) => bucket.verdict(None, left),
            Spent::Refused(wait) => {
                self.metrics.limited.increment(1);
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                bucket.verdict(Some(secs), 0)
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
    pub fn over_ceiling(&self, address: Option<IpAddr>) -> Option<Verdict> {
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
        let verdict = self.spend(per_ip, &key);
        verdict.retry_after_s.is_some().then_some(verdict)
    }

    /// Counts one request of `key` and says whether it may go on.
    pub fn check(&self, key: &ClientKey) -> Verdict {
        self.spend(self.bucket_of(key), key)
    }

    /// The same for a request whose client address `address` finds (header
    /// keys; asked only when needed: for the ceiling, or for a new key once
    /// `max_keys` are tracked): over its address's ceiling it is refused; a
    /// new key that finds no place is counted in its address's bucket.
    pub fn check_from(&self, key: &ClientKey, address: impl FnOnce() -> Option<IpAddr>) -> Verdict {
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
                    return per_ip.verdict(None, 0);
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

    fn spend(&self, bucket: &Bucket, key: &ClientKey) -> Verdict {
        let (retry_after_s, remaining) = match bucket.governor.check_key(key) {
            Ok(snapshot) => (None, snapshot.remaining_burst_capacity()),
            Err(not_until) => {
                self.metrics.limited.increment(1);
                let wait = not_until.wait_time_from(bucket.governor.clock().now());
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                (Some(secs), 0)
            }
        };
        bucket.verdict(retry_after_s, remaining)
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
