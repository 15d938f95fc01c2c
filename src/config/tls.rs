//! `[server.tls]`: TLS on the proxy listener (README "TLS").

use std::path::PathBuf;

use serde::Deserialize;

/// `[server.tls]`: the listener speaks TLS (1.2 and 1.3, ALPN `h2` and
/// `http/1.1`) with this certificate; with `client_ca_file`, only to clients
/// presenting a certificate that CA signed (mutual TLS).
///
/// The files are read at start and again by every reload (SIGHUP, `POST
/// /reload`), so a rotated certificate takes effect without a restart; a
/// reload that cannot read them is refused and the old ones keep serving.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM: the certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: the CAs whose client certificates are accepted (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// `[route.upstream_tls]`: how an `https://` upstream is verified, and the
/// client certificate shown to it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM: the CAs that may sign the upstream's certificate; default: the
    /// webpki (Mozilla) roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name sent as SNI and verified in the certificate; default: the
    /// upstream's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM: a client certificate and chain, for mutual TLS to the upstream.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM: its private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}
