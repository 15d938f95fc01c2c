//! What a route's forwarder speaks to its upstream: the protocol, and the
//! client side of TLS to an `https://` upstream.

use serde::Deserialize;

/// `upstream_protocol`: what the route speaks to its upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2, multiplexed on a few connections: h2c to `http://`, ALPN h2
    /// to `https://`. Needed for gRPC.
    Http2,
}

/// An `https://` upstream's client side, built from the files when the
/// config is read: equal when the files' contents and the name are, so a
/// reload with rotated files rebuilds the route's connections.
#[derive(Clone)]
pub struct UpstreamClientTls {
    /// The rustls client configuration (ALPN set by the protocol).
    pub config: std::sync::Arc<rustls::ClientConfig>,
    /// SNI and the name verified.
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// The files' bytes, for equality.
    files: Vec<u8>,
}

impl UpstreamClientTls {
    /// Wraps what [`crate::tls::client_config`] built.
    pub fn new(
        config: std::sync::Arc<rustls::ClientConfig>,
        server_name: rustls::pki_types::ServerName<'static>,
        files: Vec<u8>,
    ) -> Self {
        Self {
            config,
            server_name,
            files,
        }
    }
}

impl PartialEq for UpstreamClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name
            && self.files == other.files
            && self.config.alpn_protocols == other.config.alpn_protocols
    }
}

impl Eq for UpstreamClientTls {}

impl std::fmt::Debug for UpstreamClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}
