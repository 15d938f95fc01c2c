//! [`ClientKey`] and [`KeyExtractor`]: who a request counts against, for the
//! rate limit (whose bucket) and admission (which tenant).

use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderName, header::HeaderValue};

use crate::conn::ClientAddr;
use crate::proxy::headers::X_FORWARDED_FOR;

/// Where a client's key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KeySource {
    /// The client address (see `trusted_proxies`).
    #[default]
    Ip,
    /// A request header (an API key); requests without it fall back to the
    /// client address.
    Header(http::HeaderName),
}

/// Header values longer than this are kept as a 64-bit digest, so that a key
/// costs the store a bounded number of bytes whatever clients send.
const MAX_KEY_BYTES: usize = 64;

/// What a client's requests are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A client address.
    Ip(IpAddr),
    /// A header value (an API key).
    Value(Box<[u8]>),
    /// A long header value, as a keyed digest.
    Digest(u64),
}

impl ClientKey {
    /// The key a tier lists (`keys = [...]`), as requests will produce it.
    pub fn listed(source: &KeySource, text: &str, hasher: &Digests) -> Self {
        match (source, text.parse::<IpAddr>()) {
            (KeySource::Ip, Ok(ip)) => ClientKey::Ip(ip),
            _ => Self::value(text.as_bytes(), hasher),
        }
    }

    fn value(bytes: &[u8], hasher: &Digests) -> Self {
        if bytes.len() <= MAX_KEY_BYTES {
            ClientKey::Value(bytes.into())
        } else {
            ClientKey::Digest(hasher.digest(bytes))
        }
    }

    /// The key as bytes that mean the same on every replica (Redis keys).
    pub fn shared_bytes(&self) -> Vec<u8> {
        match self {
            ClientKey::Ip(ip) => format!("ip:{ip}").into_bytes(),
            ClientKey::Value(v) => [b"v:".as_slice(), v].concat(),
            ClientKey::Digest(d) => format!("d:{d:016x}").into_bytes(),
        }
    }
}

/// Finds a request's client key: a header when configured and present, else
/// the client address — the socket peer, or, when the peer is a trusted proxy,
/// the right-most untrusted address of `X-Forwarded-For` (as nginx's
/// `real_ip_recursive` does). An untrusted peer cannot choose its key by
/// sending headers.
#[derive(Debug, Clone)]
pub struct KeyExtractor {
    header: Option<HeaderName>,
    trusted: Vec<ipnet::IpNet>,
    hasher: Digests,
    /// IPv6 clients are their network of this many bits: one host holds a
    /// /64 (or more) and can pick any address in it.
    ipv6_prefix: u8,
}

/// The prefix an IPv6 client is known by unless configured: a /64 is what
/// one subscriber, or one host, gets (RFC 6177), and picks addresses from
/// freely (privacy addresses, RFC 8981).
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// How keys longer than 64 bytes are digested.
#[derive(Debug, Clone)]
pub enum Digests {
    /// Keyed per process (no one can aim collisions at the map): local
    /// state.
    Random(RandomState),
    /// The same on every replica (SHA-1, truncated): state shared through
    /// Redis.
    Stable,
}

impl Digests {
    fn digest(&self, bytes: &[u8]) -> u64 {
        match self {
            Digests::Random(state) => state.hash_one(bytes),
            Digests::Stable => {
                let sum = sha1_smol::Sha1::from(bytes).digest().bytes();
                u64::from_be_bytes(sum[..8].try_into().expect("20 bytes"))
            }
        }
    }
}

impl KeyExtractor {
    /// Keys from `source`, believing `X-Forwarded-For` from `trusted` peers.
    pub fn new(source: &KeySource, trusted: Vec<ipnet::IpNet>) -> Self {
        Self {
            header: match source {
                KeySource::Ip => None,
                KeySource::Header(name) => Some(name.clone()),
            },
            trusted,
            hasher: Digests::Random(RandomState::new()),
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
        }
    }

    /// Knows IPv6 clients by their network of `bits` (1 to 128).
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits.clamp(1, 128);
        self
    }

    /// The key a tier lists (`keys = [...]`), as requests will produce it.
    pub fn listed(&self, source: &KeySource, text: &str) -> ClientKey {
        match ClientKey::listed(source, text, &self.hasher) {
            ClientKey::Ip(ip) => ClientKey::Ip(self.group(ip)),
            key => key,
        }
    }

    /// An address as clients are counted: IPv4 as is, IPv6 by its network.
    fn group(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let net = ipnet::Ipv6Net::new(v6, self.ipv6_prefix).map_or(v6, |n| n.network());
                IpAddr::V6(net)
            }
            v4 => v4,
        }
    }

    /// The same, digesting long keys the same way on every replica (for
    /// state shared through Redis).
    pub fn shared(mut self) -> Self {
        self.hasher = Digests::Stable;
        self
    }

    /// The hasher for long keys (tiers must hash their keys the same way).
    pub fn hasher(&self) -> &Digests {
        &self.hasher
    }

    /// The key of a request with these headers and extensions.
    pub fn key(&self, headers: &HeaderMap, extensions: &http::Extensions) -> ClientKey {
        if let Some(value) = self
            .header
            .as_ref()
            .and_then(|name| headers.get(name))
            .filter(|v| !v.is_empty())
        {
            return ClientKey::value(value.as_bytes(), &self.hasher);
        }
        ClientKey::Ip(self.address(headers, extensions))
    }

    /// The client address of a request with these headers and extensions,
    /// as clients are counted (an IPv6 client by its network).
    pub fn address(&self, headers: &HeaderMap, extensions: &http::Extensions) -> IpAddr {
        // Without a peer address (a service not behind our listener) every
        // request shares one key.
        let peer = extensions
            .get::<ClientAddr>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.addr().ip());
        self.group(self.client_ip(peer, headers.get_all(&X_FORWARDED_FOR)))
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        // `::ffff:1.2.3.4` (a dual-stack socket's IPv4 peer) is 1.2.3.4.
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded: http::header::GetAll<'a, HeaderValue>,
    ) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer.to_canonical();
        }
        let mut client = peer.to_canonical();
        // Right to left over every X-Forwarded-For line and entry.
        for line in forwarded.iter().rev() {
            let Ok(line) = line.to_str() else {
                return client;
            };
            for entry in line.rsplit(',') {
                let Some(ip) = parse_entry(entry.trim()) else {
                    // Garbage from a trusted hop: go no further than what we trust.
                    return client;
                };
                client = ip;
                if !self.is_trusted(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

/// An address as `X-Forwarded-For` carries it: `1.2.3.4`, `1.2.3.4:5678`,
/// `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    entry
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}
