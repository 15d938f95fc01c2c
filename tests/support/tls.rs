//! Certificates made in the test (rcgen) and a TLS client that speaks
//! HTTP/1.1 or h2 over them.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A private CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: CertificateDer<'static>,
}

/// A certificate the CA signed, and its key, as PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// Writes `leaf` as `cert.pem` and `key.pem` in `dir`, and `ca` as `ca.pem`.
pub fn write(dir: &Path, leaf: &Leaf, ca: &Ca) {
    std::fs::write(dir.join("cert.pem"), format!("{}{}", leaf.cert_pem, ca.pem)).unwrap();
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
}

/// A client trusting `ca`, offering `alpn`, with a client certificate when
/// given one.
pub fn connector(ca: &Ca, alpn: &[&[u8]], client: Option<&Leaf>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(leaf) => {
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
            builder
                .with_client_auth_cert(vec![leaf.der.clone()], key)
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

use rustls::pki_types::pem::PemObject;

/// Connects to `addr` as `name`.
pub async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    connector.connect(name, tcp).await
}

/// One GET of `path` over `stream`, in HTTP/2 when ALPN chose `h2`, else
/// HTTP/1.1; the response and its body.
pub async fn get_over(
    stream: TlsStream<TcpStream>,
    path: &str,
) -> Result<(Response<()>, Bytes), hyper::Error> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let req = |version| {
        Request::get(if version == http::Version::HTTP_2 {
            format!("https://localhost{path}")
        } else {
            path.to_string()
        })
        .version(version)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
    };
    let res = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(req(http::Version::HTTP_2)).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        send.send_request(req(http::Version::HTTP_11)).await?
    };
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((Response::from_parts(parts, ()), body))
}

/// A TLS server config for `leaf`, offering `alpn`, requiring a client
/// certificate from `client_ca` when given.
pub fn server_config(
    leaf: &Leaf,
    ca: &Ca,
    alpn: &[&[u8]],
    client_ca: Option<&Ca>,
) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(client_ca.der.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut config = builder
        .with_single_cert(vec![leaf.der.clone(), ca.der.clone()], key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// What a TLS upstream saw.
#[derive(Default)]
pub struct TlsUpstream {
    /// The SNI of each handshake that completed.
    pub sni: std::sync::Mutex<Vec<Option<String>>>,
    /// Handshakes that failed.
    pub refused: std::sync::atomic::AtomicU64,
}

/// Serves `service` over TLS with `config` on 127.0.0.1:0, HTTP/1.1 or h2 by
/// ALPN; returns its address and what it saw.
pub async fn serve_tls<S, B>(
    config: Arc<rustls::ServerConfig>,
    service: S,
) -> (SocketAddr, Arc<TlsUpstream>)
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(TlsUpstream::default());
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let state = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let service = service.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        state
                            .refused
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                state.sni.lock().unwrap().push(sni);
                let svc = hyper::service::service_fn(move |req| {
                    let mut service = service.clone();
                    async move {
                        std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                        service.call(req).await
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}
