//! The configuration file: serde types, loading and validation.
//!
//! Loading happens in clear steps (as pingora does): parse the TOML, deserialize it
//! into typed values (each value type checks itself, so a bad value is reported with
//! its key path), then [`Config::validate`] checks what spans several keys. Every
//! failure is a [`ConfigError`] that names the file, the key and the problem, so
//! `sluicegate check-config` can answer like `nginx -t` does.

mod adaptive;
mod admission;
mod circuit;
mod cluster;
mod error;
mod rate_limit;
mod server;
mod spool;
mod tls;
mod values;

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::admission::{DEFAULT_PRIORITY_HEADER, PriorityRule};
use crate::proxy::{ForwardSettings, UpstreamClientTls, UpstreamProtocol};

pub use adaptive::{AdaptiveConfig, Algorithm, MaxInflight};
pub use admission::{AdmissionConfig, QueueDiscipline};
pub use circuit::{CircuitConfig, FallbackConfig};
pub use cluster::ClusterConfig;
pub use error::ConfigError;
pub use rate_limit::{QuotaFallback, RateLimitConfig, ScopeConfig, TierConfig};
pub use server::ServerConfig;
pub use spool::{Fsync, SpoolConfig};
pub use tls::{ServerTlsConfig, UpstreamTlsConfig};
pub use values::{ByteSize, Limit, Millis, PathPrefix, UpstreamUrl};

/// The configuration that sluicegate runs with when no `--config` is given.
///
/// It is the repository's `config.toml`, compiled into the binary so that a new
/// user can start the proxy (or `sluicegate demo`) with nothing else on the disk.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config.toml");

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener, admin listener and process settings (`[server]`).
    #[serde(default)]
    pub server: ServerConfig,
    /// The routes, in file order (`[[route]]`).
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// State shared by every replica (`[cluster]`); absent: all local.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// Lower-cases a host name and strips a `:port`, the form routes are matched on.
pub(crate) fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = match host.rsplit_once(':') {
        // `[::1]:80` or `name:80`; a bare IPv6 literal has more colons and no brackets.
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    without_port.to_ascii_lowercase()
}

/// `[[route]]`: where requests with a path prefix (and optionally a host) go.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics, logs and `/status`; defaults to the path prefix.
    #[serde(default)]
    pub name: Option<String>,
    /// Requests whose path starts with this go to this route; the longest wins.
    #[serde(default)]
    pub path_prefix: PathPrefix,
    /// When set, only requests for this host (`Host` or `:authority`, port ignored).
    #[serde(default)]
    pub host: Option<String>,
    /// The upstream, `http://host:port`.
    pub upstream: UpstreamUrl,
    /// Deadline for the upstream's response headers; past it the client gets 504.
    #[serde(default = "values::default_timeout")]
    pub timeout_ms: Millis,
    /// Longest pause between two reads of the upstream's response body; past
    /// it the body is cut off (the headers are already sent).
    #[serde(default = "values::default_read_timeout")]
    pub read_timeout_ms: Millis,
    /// Longest the upstream may take to accept more of a request body that
    /// is ready to go; past it 504, the upstream's failure (nginx's
    /// `proxy_send_timeout`).
    #[serde(default = "values::default_write_timeout")]
    pub write_timeout_ms: Millis,
    /// Deadline for opening a TCP connection to the upstream; past it, 502.
    #[serde(default = "values::default_connect_timeout")]
    pub connect_timeout_ms: Millis,
    /// How long an idle upstream connection stays in the pool. Below the
    /// application server's own idle timeout, so that the proxy, not the
    /// server, closes idle connections.
    #[serde(default = "values::default_pool_idle_timeout")]
    pub pool_idle_timeout_ms: Millis,
    /// Largest request body accepted; larger ones get 413.
    #[serde(default = "values::default_max_body")]
    pub max_body_bytes: ByteSize,
    /// Admission control (`[route.admission]`); absent: requests are only counted.
    #[serde(default)]
    pub admission: Option<AdmissionConfig>,
    /// Circuit breaker (`[route.circuit]`); absent: off.
    #[serde(default)]
    pub circuit: Option<CircuitConfig>,
    /// Per-client rate limit (`[route.rate_limit]`); absent: off.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Store and forward (`[route.spool]`); absent: refusals are answered.
    #[serde(default)]
    pub spool: Option<SpoolConfig>,
    /// What the route speaks to its upstream: `http1` or `http2`.
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// How an `https://` upstream is verified (`[route.upstream_tls]`).
    #[serde(default)]
    pub upstream_tls: Option<UpstreamTlsConfig>,
    /// The client TLS of an `https://` upstream, built from `upstream_tls`
    /// (or the defaults) when the config is read.
    #[serde(skip)]
    pub upstream_client_tls: Option<UpstreamClientTls>,
}

impl From<&RouteConfig> for ForwardSettings {
    fn from(route: &RouteConfig) -> Self {
        Self {
            scheme: route.upstream.scheme().clone(),
            authority: route.upstream.authority().clone(),
            connect_timeout: route.connect_timeout_ms.get(),
            pool_idle_timeout: route.pool_idle_timeout_ms.get(),
            read_timeout: route.read_timeout_ms.get(),
            protocol: route.upstream_protocol,
            tls: route.upstream_client_tls.clone(),
        }
    }
}

impl RouteConfig {
    /// Builds the client TLS of an `https://` upstream from its files.
    fn read_upstream_tls(&mut self, at: &str) -> Result<(), (String, String)> {
        if self.upstream.scheme() != &http::uri::Scheme::HTTPS {
            return Ok(());
        }
        let section = format!("{at}.upstream_tls");
        let tls = self.upstream_tls.clone().unwrap_or(UpstreamTlsConfig {
            ca_file: None,
            server_name: None,
            cert_file: None,
            key_file: None,
        });
        let host = self.upstream.authority().host();
        let name = tls.server_name.clone().unwrap_or_else(|| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        });
        let server_name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| {
            (
                format!("{section}.server_name"),
                format!("`{name}` is not a DNS name or an IP address"),
            )
        })?;
        let cert_and_key = match (&tls.cert_file, &tls.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            (Some(_), None) => {
                return Err((
                    format!("{section}.key_file"),
                    "needed with cert_file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    format!("{section}.cert_file"),
                    "needed with key_file".into(),
                ));
            }
        };
        let alpn: &[&[u8]] = match self.upstream_protocol {
            UpstreamProtocol::Http1 => &[b"http/1.1"],
            UpstreamProtocol::Http2 => &[b"h2"],
        };
        let (config, files) =
            crate::tls::client_config(&section, tls.ca_file.as_deref(), cert_and_key, alpn)
                .map_err(|e| (e.key().to_string(), e.problem()))?;
        self.upstream_client_tls = Some(UpstreamClientTls::new(config, server_name, files));
        Ok(())
    }

    /// The route's name as it appears in metrics and logs.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.path_prefix.as_str())
    }

    /// Who a request's client is by address, as the rate limit resolves it
    /// (its `trusted_proxies`, its `ipv6_prefix`): the breaker counts
    /// failing clients by it.
    pub fn client_addresses(&self) -> crate::client_key::KeyExtractor {
        let (trusted, prefix) = self
            .rate_limit
            .as_ref()
            .map_or((Vec::new(), crate::client_key::DEFAULT_IPV6_PREFIX), |r| {
                (r.trusted_proxies.clone(), r.ipv6_prefix)
            });
        crate::client_key::KeyExtractor::new(&crate::client_key::KeySource::Ip, trusted)
            .ipv6_prefix(prefix)
    }

    /// Who a request's tenant is, when the route has a `tenant_key`: for
    /// `"ip"`, the client address as the rate limit resolves it (believing
    /// `X-Forwarded-For` from its `trusted_proxies`).
    pub fn tenant_extractor(&self) -> Option<crate::client_key::KeyExtractor> {
        let source = self.admission.as_ref()?.tenant_key.as_ref()?;
        let trusted = self
            .rate_limit
            .as_ref()
            .map(|r| r.trusted_proxies.clone())
            .unwrap_or_default();
        let prefix = self
            .rate_limit
            .as_ref()
            .map_or(crate::client_key::DEFAULT_IPV6_PREFIX, |r| r.ipv6_prefix);
        Some(crate::client_key::KeyExtractor::new(source, trusted).ipv6_prefix(prefix))
    }

    /// Where a waiting request's class comes from: the admission section's
    /// header, believed from its trusted proxies only, and the rate-limit
    /// tiers' classes.
    pub fn priority_rule(&self) -> PriorityRule {
        let (header, trusted) = match &self.admission {
            Some(a) => (
                a.priority_header.clone(),
                a.priority_trusted_proxies.clone(),
            ),
            None => (DEFAULT_PRIORITY_HEADER, Vec::new()),
        };
        let mut rule = PriorityRule::header(header).trusted_peers(trusted);
        let tiers = self.rate_limit.iter().flat_map(|r| r.tiers.iter());
        for (i, tier) in tiers.enumerate() {
            if let Some(priority) = tier.priority {
                rule = rule.tier(rate_limit::tier_name(tier, i), priority);
            }
        }
        rule
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(&file, &e))?;
        Self::parse(&file, &text)
    }

    /// The embedded default configuration (see [`EMBEDDED_DEFAULT`]).
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::parse("<embedded config.toml>", EMBEDDED_DEFAULT)
    }

    /// Parses and validates configuration text; `file` is only used in messages.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::toml(file, text, &e))?;
        let mut config: Config =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::field(file, text, &e))?;
        config
            .validate()
            .map_err(|(key, msg)| ConfigError::new(file, key, msg))?;
        for (i, route) in config.routes.iter_mut().enumerate() {
            route
                .read_upstream_tls(&format!("route[{i}]"))
                .map_err(|(key, msg)| ConfigError::new(file, key, msg))?;
        }
        Ok(config)
    }

    /// Checks the rules that span several keys. Returns the key path and the problem.
    fn validate(&self) -> Result<(), (String, String)> {
        if self.routes.is_empty() {
            return Err(("route".into(), "at least one [[route]] is required".into()));
        }
        // What spans routes: names, and (host, path prefix) pairs, are unique.
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut places: HashMap<(Option<String>, &str), usize> = HashMap::new();
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        for (i, route) in self.routes.iter().enumerate() {
            route.validate(&format!("route[{i}]"))?;
            if self.cluster.is_none()
                && route
                    .rate_limit
                    .as_ref()
                    .is_some_and(|r| r.scope == rate_limit::ScopeConfig::Cluster)
            {
                return Err((
                    format!("route[{i}].rate_limit.scope"),
                    "\"cluster\" needs a [cluster] section with redis_url".into(),
                ));
            }
            let name = route.display_name();
            if let Some(first) = names.insert(name, i) {
                return Err((
                    format!("route[{i}].name"),
                    format!("duplicate route name `{name}` (also route[{first}])"),
                ));
            }
            if let Some(spool) = &route.spool
                && let Some(j) = self.routes[..i]
                    .iter()
                    .position(|r| r.spool.as_ref().is_some_and(|s| s.dir == spool.dir))
            {
                return Err((
                    format!("route[{i}].spool.dir"),
                    format!(
                        "`{}` is route[{j}]'s spool too: each route needs its own directory",
                        spool.dir.display()
                    ),
                ));
            }
            let host = route.host.as_deref().map(normalize_host);
            if let Some(first) = places.insert((host, route.path_prefix.as_str()), i) {
                return Err((
                    format!("route[{i}].path_prefix"),
                    format!(
                        "route[{first}] already has path_prefix `{}` for the same host; \
                         the second route could never match",
                        route.path_prefix.as_str()
                    ),
                ));
            }
        }
        self.server.validate()
    }
}

impl RouteConfig {
    /// Checks what spans several keys of one route; `at` is its key path.
    fn validate(&self, at: &str) -> Result<(), (String, String)> {
        if self.display_name().is_empty() {
            return Err((format!("{at}.name"), "must not be empty".into()));
        }
        if let Some(h) = self.host.as_deref().map(normalize_host)
            && (h.is_empty() || h.contains(['/', ' ']))
        {
            return Err((format!("{at}.host"), format!("`{h}` is not a host name")));
        }
        if let Some(a) = &self.admission {
            a.validate(&format!("{at}.admission"))?;
        }
        if self.write_timeout_ms.get() < self.connect_timeout_ms.get() {
            // Waiting for a way to the upstream (a connection, an HTTP/2
            // stream) is bounded by connect_timeout_ms and answered 502 or
            // 503; a shorter write timeout would cut it first as the
            // upstream's failure.
            return Err((
                format!("{at}.write_timeout_ms"),
                format!(
                    "must be at least connect_timeout_ms ({} < {})",
                    self.write_timeout_ms.get().as_millis(),
                    self.connect_timeout_ms.get().as_millis()
                ),
            ));
        }
        if let Some(r) = &self.rate_limit {
            r.validate(&format!("{at}.rate_limit"))?;
            if self.admission.is_none()
                && let Some(i) = r.tiers.iter().position(|t| t.priority.is_some())
            {
                return Err((
                    format!("{at}.rate_limit.tier[{i}].priority"),
                    "needs [route.admission]: without it no request waits, so no class matters"
                        .into(),
                ));
            }
        }
        if let Some(s) = &self.spool {
            s.validate(&format!("{at}.spool"))?;
        }
        if self.upstream_tls.is_some() && self.upstream.scheme() != &http::uri::Scheme::HTTPS {
            return Err((
                format!("{at}.upstream_tls"),
                format!(
                    "the upstream is `{:?}`: TLS to it needs an https:// upstream",
                    self.upstream
                ),
            ));
        }
        if let Some(c) = &self.circuit {
            let fixed = self
                .admission
                .as_ref()
                .is_some_and(|a| a.max_inflight.fixed().is_some());
            c.validate(&format!("{at}.circuit"), fixed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
