//! What TLS on either side shares: the crypto provider (ring), PEM files
//! read into rustls types, and errors that name the config key and the file.
//! The listener's side is [`crate::server::tls`], the upstreams' is
//! [`crate::proxy`]'s connector.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be built: the key (`server.tls.*`), the
/// file, and the problem.
#[derive(Debug)]
pub struct TlsError {
    key: String,
    path: String,
    message: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = \"{}\": {}", self.key, self.path, self.message)
    }
}

impl std::error::Error for TlsError {}

impl TlsError {
    /// The config key whose file is at fault.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The file and the problem.
    pub fn problem(&self) -> String {
        format!("\"{}\": {}", self.path, self.message)
    }
}

pub(crate) fn error(key: &str, path: &Path, message: impl fmt::Display) -> TlsError {
    TlsError {
        key: key.to_string(),
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The provider every TLS configuration of the process uses.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file's bytes, read once: what is parsed from them, and what tells
/// a rotation, are then the same contents.
pub(crate) struct PemFile<'a> {
    key: &'a str,
    path: &'a Path,
    bytes: Vec<u8>,
}

impl<'a> PemFile<'a> {
    /// Reads the file at `path`, named by config `key`.
    pub(crate) fn read(key: &'a str, path: &'a Path) -> Result<Self, TlsError> {
        let bytes =
            std::fs::read(path).map_err(|e| error(key, path, format!("cannot read: {e}")))?;
        Ok(Self { key, path, bytes })
    }

    fn error(&self, message: impl fmt::Display) -> TlsError {
        error(self.key, self.path, message)
    }

    /// A certificate chain (the leaf first).
    pub(crate) fn certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(&self.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(pem_problem(e)))?;
        if certs.is_empty() {
            return Err(self.error("no CERTIFICATE in the file"));
        }
        Ok(certs)
    }

    /// A private key.
    pub(crate) fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.bytes).map_err(|e| self.error(pem_problem(e)))
    }

    /// CA certificates, as a root store.
    pub(crate) fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in self.certs()? {
            roots
                .add(cert)
                .map_err(|e| self.error(format!("not a usable CA certificate: {e}")))?;
        }
        Ok(roots)
    }
}

fn pem_problem(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// The client side of TLS to an upstream: verified against `ca_file`'s CAs
/// (default: the webpki roots), offering `alpn`, with a client certificate
/// when both `cert_file` and `key_file` are given. `at` is the config key of
/// the section, for errors. Also returns the files' bytes (to tell a rotation).
pub fn client_config(
    at: &str,
    ca_file: Option<&Path>,
    cert_and_key: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<(Arc<rustls::ClientConfig>, Vec<u8>), TlsError> {
    let mut files = Vec::new();
    let (ca_key, cert_key, key_key) = (
        format!("{at}.ca_file"),
        format!("{at}.cert_file"),
        format!("{at}.key_file"),
    );
    let roots = match ca_file {
        Some(path) => {
            let ca = PemFile::read(&ca_key, path)?;
            let roots = ca.roots()?;
            files.extend(ca.bytes);
            roots
        }
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| error(at, Path::new(""), e))?
        .with_root_certificates(roots);
    let mut config = match cert_and_key {
        Some((cert, key)) => {
            let (cert, key) = (
                PemFile::read(&cert_key, cert)?,
                PemFile::read(&key_key, key)?,
            );
            let (chain, private) = (cert.certs()?, key.private_key()?);
            let config = builder.with_client_auth_cert(chain, private).map_err(|e| {
                key.error(format!(
                    "does not match the certificate or is unusable: {e}"
                ))
            })?;
            files.extend(cert.bytes);
            files.extend(key.bytes);
            config
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((Arc::new(config), files))
}
