//! `[route.rate_limit]`: how fast each client may send (phase 5 of the request path, `stack.rs`).

use serde::{Deserialize, Deserializer};

use crate::admission::Priority;
use crate::rate_limit::{ClusterFallback, KeySource, Rate, RateLimitSettings, Scope, Tier};

/// `[route.rate_limit]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// What identifies a client: its address, or a request header.
    #[serde(default, deserialize_with = "super::values::client_key")]
    pub key: KeySource,
    /// Sustained requests per second per client (fractions allowed: 0.5 = one
    /// every 2 s).
    pub per_second: f64,
    /// Requests a client may send at once after being idle; default: one
    /// second's worth (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Load balancers whose `X-Forwarded-For` is believed (CIDRs). Without
    /// them the socket address is the client, whatever the headers say.
    #[serde(default, deserialize_with = "super::values::cidrs")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Most clients tracked at once; past it a new header key is counted
    /// in its client address's bucket, a new address in one shared bucket.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// With `key = "header:..."`: the most one client address may send per
    /// second, whatever keys it sends (a ceiling over invented keys).
    #[serde(default)]
    pub per_ip_per_second: Option<f64>,
    /// Its burst; default one second's worth.
    #[serde(default)]
    pub per_ip_burst: Option<u32>,
    /// IPv6 clients are counted by their network of this many bits (a
    /// host can choose any address in its /64).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    /// Per-key overrides (`[[route.rate_limit.tier]]`), for API-key plans.
    #[serde(default, rename = "tier")]
    pub tiers: Vec<TierConfig>,
    /// `"local"` (each replica counts alone) or `"cluster"` (every replica
    /// shares each client's bucket on Redis; needs `[cluster]`).
    #[serde(default)]
    pub scope: ScopeConfig,
    /// `cluster`: who decides while Redis is down or slow: `"local"` (this
    /// replica's own bucket at the same rate), `"allow"` or `"deny"`.
    #[serde(default)]
    pub fallback: Option<QuotaFallback>,
    /// `cluster`: 0 (exact: a round trip per request), or how long each
    /// replica may spend tokens it took from Redis in a batch.
    #[serde(default)]
    pub sync_ms: u64,
}

/// `scope`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeConfig {
    /// Per replica.
    #[default]
    Local,
    /// Shared on Redis.
    Cluster,
}

/// `fallback`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaFallback {
    /// The local limiter at the same rate.
    #[default]
    Local,
    /// Let every request through.
    Allow,
    /// Refuse every request (429).
    Deny,
}

/// `[[route.rate_limit.tier]]`: these keys get their own rate.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Name used in the `RateLimit-Policy` header; default `tier<N>`.
    #[serde(default)]
    pub name: Option<String>,
    /// The keys (header values, or client addresses for `key = "ip"`).
    pub keys: Vec<String>,
    /// Their rate.
    pub per_second: f64,
    /// Their burst; default one second's worth.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Their admission class (`critical`, `normal`, `batch`) when they queue;
    /// needs `[route.admission]`. Default: the route's priority rule.
    #[serde(default, deserialize_with = "priority")]
    pub priority: Option<Priority>,
}

/// Tier `i`'s name: its own, or `tier<i>`.
pub(super) fn tier_name(tier: &TierConfig, i: usize) -> String {
    tier.name.clone().unwrap_or_else(|| format!("tier{i}"))
}

fn priority<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Priority>, D::Error> {
    let s = String::deserialize(de)?;
    Priority::parse(&s).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "`{s}`: expected \"critical\", \"normal\" or \"batch\""
        ))
    })
}

const fn default_max_keys() -> usize {
    RateLimitSettings::DEFAULT_MAX_KEYS
}

const fn default_ipv6_prefix() -> u8 {
    crate::client_key::DEFAULT_IPV6_PREFIX
}

/// Largest rate accepted: beyond a million per second per client, a limit
/// means nothing.
const MAX_RATE: f64 = 1_000_000.0;

fn check_rate(key: String, rate: f64) -> Result<(), (String, String)> {
    if !(rate.is_finite() && rate > 0.0 && rate <= MAX_RATE) {
        return Err((
            key,
            format!("must be above 0 and at most {MAX_RATE} requests per second (got {rate})"),
        ));
    }
    if 1.0 / rate > 86_400.0 {
        return Err((key, format!("{rate} per second is less than one a day")));
    }
    Ok(())
}

/// Longest time a full burst may take to refill: beyond a year a limit means
/// nothing, and governor's nanosecond arithmetic (period × burst) would
/// overflow long before its `u64` does at the largest bursts.
const MAX_REFILL_S: f64 = 365.0 * 86_400.0;

fn check_burst(key: String, burst: Option<u32>, rate: f64) -> Result<(), (String, String)> {
    match burst {
        Some(0) => Err((key, "must be greater than 0 (got 0)".into())),
        Some(b) if f64::from(b) / rate > MAX_REFILL_S => Err((
            key,
            format!(
                "{b} at {rate} per second takes {:.0} days to refill; at most 365",
                f64::from(b) / rate / 86_400.0
            ),
        )),
        _ => Ok(()),
    }
}

impl RateLimitConfig {
    /// Checks what spans several keys; `at` is the section's key path.
    pub(super) fn validate(&self, at: &str) -> Result<(), (String, String)> {
        check_rate(format!("{at}.per_second"), self.per_second)?;
        check_burst(format!("{at}.burst"), self.burst, self.per_second)?;
        if self.max_keys == 0 {
            return Err((
                format!("{at}.max_keys"),
                "must be greater than 0 (got 0)".into(),
            ));
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            return Err((
                format!("{at}.ipv6_prefix"),
                format!("must be 1 to 128 bits (got {})", self.ipv6_prefix),
            ));
        }
        match (self.per_ip_per_second, &self.key) {
            (Some(rate), KeySource::Header(_)) => {
                check_rate(format!("{at}.per_ip_per_second"), rate)?;
                check_burst(format!("{at}.per_ip_burst"), self.per_ip_burst, rate)?;
            }
            (Some(_), KeySource::Ip) => {
                return Err((
                    format!("{at}.per_ip_per_second"),
                    "only applies with key = \"header:...\" (with key = \"ip\", per_second is per address)"
                        .into(),
                ));
            }
            (None, _) if self.per_ip_burst.is_some() => {
                return Err((
                    format!("{at}.per_ip_burst"),
                    "needs per_ip_per_second".into(),
                ));
            }
            (None, _) => {}
        }
        if self.scope == ScopeConfig::Local {
            let set = [
                ("fallback", self.fallback.is_some()),
                ("sync_ms", self.sync_ms > 0),
            ];
            if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
                return Err((
                    format!("{at}.{key}"),
                    "only applies with scope = \"cluster\"".into(),
                ));
            }
        }
        if self.sync_ms > 60_000 {
            return Err((
                format!("{at}.sync_ms"),
                format!("must be at most 60000 (got {})", self.sync_ms),
            ));
        }
        let mut seen = std::collections::HashMap::new();
        for (i, tier) in self.tiers.iter().enumerate() {
            let at = format!("{at}.tier[{i}]");
            check_rate(format!("{at}.per_second"), tier.per_second)?;
            check_burst(format!("{at}.burst"), tier.burst, tier.per_second)?;
            if tier.keys.is_empty() {
                return Err((format!("{at}.keys"), "must list at least one key".into()));
            }
            for key in &tier.keys {
                if self.key == KeySource::Ip && key.parse::<std::net::IpAddr>().is_err() {
                    return Err((
                        format!("{at}.keys"),
                        format!("`{key}` is not an IP address (the route's key is \"ip\")"),
                    ));
                }
                if let Some(first) = seen.insert(key.as_str(), i) {
                    return Err((
                        format!("{at}.keys"),
                        format!("`{key}` is already in tier[{first}]"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl From<&RateLimitConfig> for RateLimitSettings {
    fn from(c: &RateLimitConfig) -> Self {
        Self {
            key: c.key.clone(),
            rate: Rate {
                per_second: c.per_second,
                burst: c.burst,
            },
            trusted_proxies: c.trusted_proxies.clone(),
            max_keys: c.max_keys,
            per_ip: c.per_ip_per_second.map(|per_second| Rate {
                per_second,
                burst: c.per_ip_burst,
            }),
            ipv6_prefix: c.ipv6_prefix,
            tiers: c
                .tiers
                .iter()
                .enumerate()
                .map(|(i, t)| Tier {
                    name: tier_name(t, i),
                    rate: Rate {
                        per_second: t.per_second,
                        burst: t.burst,
                    },
                    keys: t.keys.clone(),
                })
                .collect(),
            scope: match c.scope {
                ScopeConfig::Local => Scope::Local,
                ScopeConfig::Cluster => Scope::Cluster {
                    fallback: match c.fallback.unwrap_or_default() {
                        QuotaFallback::Local => ClusterFallback::Local,
                        QuotaFallback::Allow => ClusterFallback::Allow,
                        QuotaFallback::Deny => ClusterFallback::Deny,
                    },
                    sync: (c.sync_ms > 0).then(|| std::time::Duration::from_millis(c.sync_ms)),
                },
            },
        }
    }
}
