//! What the proxy knows of a request's client beyond the request: its
//! address, whether it has gone away, and which rate-limit plan it is on.
//!
//! The listener puts the first two in every request's extensions, the rate
//! limit the third; layers read them without depending on the server or on
//! each other.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use http::HeaderValue;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Request extension: the address of the client connection, set by the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAddr {
    addr: SocketAddr,
    ip: HeaderValue,
    tls: bool,
}

impl ClientAddr {
    /// The client at `addr`, over plain TCP.
    pub fn new(addr: SocketAddr) -> Self {
        // Formatted once per connection, not once per request.
        let ip = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            addr,
            ip,
            tls: false,
        }
    }

    /// The client at `addr`, over TLS.
    pub fn tls(addr: SocketAddr) -> Self {
        Self {
            tls: true,
            ..Self::new(addr)
        }
    }

    /// Whether the client connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The scheme the client used, as `X-Forwarded-Proto` says it.
    pub fn proto_header(&self) -> HeaderValue {
        HeaderValue::from_static(if self.tls { "https" } else { "http" })
    }

    /// The connection's peer address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The peer's IP address as a header value (`X-Forwarded-For`).
    pub fn ip_header(&self) -> &HeaderValue {
        &self.ip
    }
}

/// Request extension, set by the rate limit when the client's key is in a
/// named tier (`[[route.rate_limit.tier]]`): its name, so that later layers
/// can treat plans differently (admission's priority class).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTier(pub Arc<str>);

/// Request extension (HTTP/1 requests with a body): notices a client that
/// closes or resets its connection while its request waits.
///
/// hyper notices a client that goes away mid-request only while it reads the
/// socket, and it stops reading once a request body is waiting to be
/// consumed: a POST queued for admission would hold its place until its queue
/// timeout, its connection closed long ago. This watches the socket for the
/// peer's FIN or RST (`EPOLLRDHUP`, as Envoy's early-close detection does)
/// without reading a byte of the body, which stays hyper's. As with hyper's
/// own rule (no half-close), a client that shuts down its sending side
/// mid-request has gone away.
#[derive(Debug, Clone)]
pub struct PeerClosed {
    stream: Weak<TcpStream>,
}

impl PeerClosed {
    /// Watches the connection `stream` (the listener keeps it alive).
    pub fn new(stream: Weak<TcpStream>) -> Self {
        Self { stream }
    }

    /// Resolves once the client has closed or reset the connection (at once
    /// when the connection is already gone). Cancel-safe.
    pub async fn closed(&self) {
        let Some(stream) = self.stream.upgrade() else {
            return;
        };
        // A second descriptor of the same socket with a readiness of its own:
        // waiting on it leaves the readiness hyper reads by untouched. Made
        // only while a request waits, so idle connections cost no descriptor.
        let watcher = socket2::SockRef::from(&*stream)
            .try_clone()
            .map(std::net::TcpStream::from)
            .and_then(TcpStream::from_std);
        drop(stream);
        let watcher = match watcher {
            Ok(watcher) => watcher,
            Err(e) => {
                // Out of descriptors: the queue timeout still bounds the wait.
                tracing::debug!(error = %e, "cannot watch the client connection");
                return std::future::pending().await;
            }
        };
        loop {
            match watcher.ready(Interest::READABLE).await {
                Ok(ready) if !(ready.is_read_closed() || ready.is_error()) => {
                    // More body bytes, not an end: forget this readiness (the
                    // bytes stay in the socket) and wait for the next event.
                    let _ = watcher.try_io(Interest::READABLE, || {
                        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                    });
                }
                _ => return,
            }
        }
    }
}
