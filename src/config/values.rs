//! Value types that check themselves while they are deserialized, so that a bad
//! value is reported with the key path that serde_path_to_error tracks.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde::{Deserialize, Deserializer};

use crate::admission::{AdmissionSettings, DEFAULT_PRIORITY_HEADER};

/// A duration in milliseconds that must be greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
pub struct Millis(Duration);

impl Millis {
    /// Builds a value in code (defaults); `ms` must not be zero.
    pub const fn from_ms(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    /// The duration.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl TryFrom<i64> for Millis {
    type Error = String;
    fn try_from(ms: i64) -> Result<Self, String> {
        positive(ms).map(|ms| Self(Duration::from_millis(ms)))
    }
}

/// A count (connections, requests) that must be greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
pub struct Limit(u64);

impl Limit {
    /// Builds a value in code (defaults); `n` must not be zero.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The number as a `usize`, saturating on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl TryFrom<i64> for Limit {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        positive(n).map(Self)
    }
}

/// A size in bytes that must be greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
pub struct ByteSize(u64);

impl ByteSize {
    /// The number of bytes.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<i64> for ByteSize {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        positive(n).map(Self)
    }
}

fn positive(n: i64) -> Result<u64, String> {
    match u64::try_from(n) {
        Ok(0) => Err("must be greater than 0 (got 0)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("must be greater than 0 (got {n})")),
    }
}

/// A route's path prefix: starts with `/`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PathPrefix(String);

impl PathPrefix {
    /// The prefix.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for PathPrefix {
    fn default() -> Self {
        Self("/".into())
    }
}

impl TryFrom<String> for PathPrefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("`{s}` must start with `/`"));
        }
        if s.contains(['?', '#']) || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "`{s}` must be a plain path (no query, fragment or white space)"
            ));
        }
        Ok(Self(s))
    }
}

/// An upstream base URL: `http://host:port`, with no path, query or credentials.
///
/// Only plain HTTP is supported: sluicegate runs next to the upstream (sidecar) or
/// on a trusted network; TLS to the upstream would need a TLS stack in the binary.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct UpstreamUrl {
    scheme: Scheme,
    authority: Authority,
}

impl UpstreamUrl {
    /// `http` or `https`.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// `host:port`, the address requests are sent to.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

impl fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

impl TryFrom<String> for UpstreamUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let hint = "expected http://host:port or https://host:port, e.g. \"http://127.0.0.1:9000\"";
        let uri: http::Uri = s
            .parse()
            .map_err(|e| format!("`{s}` is not a URL ({e}); {hint}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("`{s}` has no scheme; {hint}"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!(
                "`{s}`: scheme `{scheme}` is not supported, only `http` and `https`; {hint}"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{s}` has no host; {hint}"))?;
        if authority.host().is_empty() {
            return Err(format!("`{s}` has no host; {hint}"));
        }
        if authority.as_str().contains('@') {
            return Err(format!("`{s}` must not contain credentials; {hint}"));
        }
        if authority.port_u16() == Some(0) {
            return Err(format!("`{s}`: port 0 is not a port to connect to"));
        }
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if !(path.is_empty() || path == "/") {
            return Err(format!(
                "`{s}` has a path or query (`{path}`); requests keep their own path, {hint}"
            ));
        }
        Ok(Self { scheme, authority })
    }
}

/// Deserializes `IP:port` with a message that shows the expected form.
pub(super) fn socket_addr<'de, D: Deserializer<'de>>(de: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(de)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`{s}` is not an IP:port address (e.g. \"127.0.0.1:8080\" or \"[::]:8080\")"
        ))
    })
}

pub(super) const fn default_timeout() -> Millis {
    Millis::from_ms(30_000)
}

pub(super) const fn default_read_timeout() -> Millis {
    Millis::from_ms(60_000)
}

/// 60 s, as nginx's `proxy_send_timeout`.
pub(super) const fn default_write_timeout() -> Millis {
    Millis::from_ms(60_000)
}

/// 1 s: below gunicorn's 2 s and Node's 5 s keep-alive timeouts.
pub(super) const fn default_pool_idle_timeout() -> Millis {
    Millis::from_ms(1_000)
}

pub(super) const fn default_connect_timeout() -> Millis {
    Millis::from_ms(5_000)
}

pub(super) const fn default_max_body() -> ByteSize {
    ByteSize(10 * 1024 * 1024)
}

/// `max_inflight`: a positive number, or `"adaptive"`.
pub(super) fn max_inflight<'de, D: Deserializer<'de>>(
    de: D,
) -> Result<super::MaxInflight, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(i64),
        Word(String),
    }
    match Raw::deserialize(de)? {
        Raw::Number(n) => Limit::try_from(n)
            .map(super::MaxInflight::Fixed)
            .map_err(serde::de::Error::custom),
        Raw::Word(w) if w == "adaptive" => Ok(super::MaxInflight::Adaptive),
        Raw::Word(w) => Err(serde::de::Error::custom(format!(
            "`{w}` is neither a number nor \"adaptive\"; give the most requests at the \
             upstream at once, or \"adaptive\" to discover it from the upstream's latency"
        ))),
    }
}

/// A header name, lower-cased.
pub(super) fn header_name<'de, D: Deserializer<'de>>(de: D) -> Result<http::HeaderName, D::Error> {
    let s = String::deserialize(de)?;
    http::HeaderName::from_bytes(s.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a valid header name")))
}

// The admission defaults are the runtime's own, written once there.
const ADMISSION: AdmissionSettings = AdmissionSettings::DEFAULT;

pub(super) const fn default_max_inflight() -> super::MaxInflight {
    super::MaxInflight::Fixed(Limit::new(ADMISSION.max_inflight as u64))
}

pub(super) const fn default_queue_capacity() -> usize {
    ADMISSION.queue_capacity
}

pub(super) const fn default_queue_timeout() -> Millis {
    Millis::from_ms(ADMISSION.queue_timeout.as_millis() as u64)
}

pub(super) fn default_priority_header() -> http::HeaderName {
    DEFAULT_PRIORITY_HEADER
}

pub(super) const fn default_retry_after_min() -> u64 {
    ADMISSION.retry_after_min_s
}

pub(super) const fn default_retry_after_max() -> u64 {
    ADMISSION.retry_after_max_s
}

/// CIDRs, or plain addresses (a single host).
pub(super) fn cidrs<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(de)?
        .iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{s}` is not a CIDR or an IP address (e.g. \"10.0.0.0/8\", \"fd00::/8\")"
                    ))
                })
        })
        .collect()
}

/// `"ip"` or `"header:<name>"`: where a client's key comes from.
pub(super) fn client_key<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<crate::client_key::KeySource, D::Error> {
    use crate::client_key::KeySource;
    use serde::Deserialize;
    let s = String::deserialize(de)?;
    if s == "ip" {
        return Ok(KeySource::Ip);
    }
    let hint = "expected \"ip\" or \"header:<name>\", e.g. \"header:x-api-key\"";
    let Some(name) = s.strip_prefix("header:") else {
        return Err(serde::de::Error::custom(format!("`{s}`: {hint}")));
    };
    http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
        .map(KeySource::Header)
        .map_err(|_| serde::de::Error::custom(format!("`{name}` is not a header name; {hint}")))
}

/// An optional [`client_key`] (a key absent from the file stays `None`).
pub(super) fn some_client_key<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<Option<crate::client_key::KeySource>, D::Error> {
    client_key(de).map(Some)
}
