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
