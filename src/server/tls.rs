//! TLS on the proxy listener (`[server.tls]`): rustls with the ring provider,
//! TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, optional client certificates.
//!
//! [`TlsListener`] holds the rustls configuration in force behind an
//! `ArcSwap`: each handshake takes the current one, and a reload swaps in a
//! new one built from the files as they are now, so that a rotated
//! certificate serves new connections without a restart while open ones
//! keep theirs. A reload that cannot build it changes nothing.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::config::ServerTlsConfig;
pub use crate::tls::TlsError;
use crate::tls::{PemFile, error, provider};

/// Builds the listener's rustls configuration from the files `config` names.
pub fn server_config(config: &ServerTlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = PemFile::read("server.tls.cert_file", &config.cert_file)?.certs()?;
    let key = PemFile::read("server.tls.key_file", &config.key_file)?.private_key()?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| error("server.tls", &config.cert_file, e))?;
    let builder = match &config.client_ca_file {
        Some(path) => {
            let roots = PemFile::read("server.tls.client_ca_file", path)?.roots()?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| error("server.tls.client_ca_file", path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(certs, key).map_err(|e| {
        error(
            "server.tls.key_file",
            &config.key_file,
            format!("does not match the certificate or is unusable: {e}"),
        )
    })?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// The listener's TLS configuration in force, swapped by reloads.
pub struct TlsListener {
    current: ArcSwap<rustls::ServerConfig>,
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener").finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Reads the files `config` names.
    pub fn new(config: &ServerTlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: ArcSwap::new(server_config(config)?),
        })
    }

    /// Serves new connections with `config` (built by [`server_config`]
    /// when a reload reads the files again).
    pub fn install(&self, config: Arc<rustls::ServerConfig>) {
        self.current.store(config);
    }

    /// An acceptor with the configuration in force.
    pub(super) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}
