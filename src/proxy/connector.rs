//! [`Connector`]: upstream TCP connections that know whether they are being
//! reused and whether the request on them has had any answer yet.
//!
//! A pooled keep-alive connection can be closed by the application server
//! (Node's `keepAliveTimeout`, gunicorn's `keepalive`) at the very moment the
//! proxy writes the next request on it. The server never read that request,
//! but hyper cannot give it back: the request fails. It is safe to send again
//! when the connection had served an earlier request (the server closed an
//! idle connection, not one it just accepted), no byte of an answer came, and
//! no byte of the body was taken; [`Forward`](super::Forward) then retries it
//! once on a fresh connection. This module tells the first two. It dials with
//! hyper-util's `HttpConnector` (resolution, connect timeout, socket options).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll, ready};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower::{Service, ServiceExt};

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::upstream::UpstreamClientTls;
use crate::body::BoxError;

/// What one connection has done: requests written and answers begun, counted
/// at each turn of an HTTP/1.1 exchange (a write after a read, a read after a
/// write). Only its connection's task touches it; atomics only to share it.
#[derive(Debug, Default)]
pub(super) struct Exchanges {
    requests: AtomicU32,
    answers: AtomicU32,
    /// Whether the last I/O was a write.
    writing: AtomicBool,
}

impl Exchanges {
    fn wrote(&self) {
        if !self.writing.swap(true, Ordering::Relaxed) {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read(&self) {
        if self.writing.swap(false, Ordering::Relaxed) {
            self.answers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the request in progress is on a connection that served one
    /// before, and has had no byte of an answer.
    pub(super) fn reused_and_unanswered(&self) -> bool {
        let requests = self.requests.load(Ordering::Relaxed);
        requests >= 2 && self.answers.load(Ordering::Relaxed) < requests
    }
}

/// An upstream TCP stream that counts its exchanges.
#[derive(Debug)]
pub struct TrackedStream {
    inner: UpstreamIo,
    exchanges: Arc<Exchanges>,
}

/// An upstream connection: plain TCP, or TLS over it.
#[derive(Debug)]
enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:ident, $io:ident => $call:expr) => {
        match $self.get_mut() {
            UpstreamIo::Plain($io) => {
                let $io = Pin::new($io);
                $call
            }
            UpstreamIo::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

impl TrackedStream {
    /// Whether TLS negotiated `protocol` by ALPN (`None`: plain TCP).
    pub(super) fn alpn_is(&self, protocol: &[u8]) -> Option<bool> {
        match &self.inner {
            UpstreamIo::Plain(_) => None,
            UpstreamIo::Tls(tls) => Some(tls.get_ref().1.alpn_protocol() == Some(protocol)),
        }
    }

    /// What this connection has carried so far.
    pub(super) fn exchanges(&self) -> Arc<Exchanges> {
        self.exchanges.clone()
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.exchanges.read();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
        if n > 0 {
            self.exchanges.wrote();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        if n > 0 {
            self.exchanges.wrote();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper-util's HTTP connector, handing out [`TrackedStream`]s: over TLS
/// when given a client configuration (the handshake bounded by `timeout`,
/// as the TCP connect is).
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    tls: Option<(TlsConnector, ServerName<'static>, Duration)>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.as_ref().map(|(_, name, _)| name))
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Wraps `http`, plain TCP.
    pub fn new(http: HttpConnector) -> Self {
        Self { http, tls: None }
    }

    /// A new connection to `target` (`scheme://authority`).
    pub(super) async fn dial(&self, target: &Uri) -> Result<TokioIo<TrackedStream>, BoxError> {
        self.clone().oneshot(target.clone()).await
    }

    /// Wraps `http`, TLS to `tls.server_name` over it.
    pub fn with_tls(mut http: HttpConnector, tls: &UpstreamClientTls, timeout: Duration) -> Self {
        http.enforce_http(false);
        Self {
            http,
            tls: Some((
                TlsConnector::from(tls.config.clone()),
                tls.server_name.clone(),
                timeout,
            )),
        }
    }
}

impl Service<Uri> for Connector {
    type Response = TokioIo<TrackedStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let tls = self.tls.clone();
        Box::pin(async move {
            let stream = connecting.await?.into_inner();
            let inner = match tls {
                None => UpstreamIo::Plain(stream),
                Some((connector, name, timeout)) => {
                    let handshake = tokio::time::timeout(timeout, connector.connect(name, stream))
                        .await
                        .map_err(|_| {
                            format!("no TLS handshake with the upstream within {timeout:?}")
                        })?
                        .map_err(|e| format!("TLS handshake with the upstream failed: {e}"))?;
                    UpstreamIo::Tls(Box::new(handshake))
                }
            };
            Ok(TokioIo::new(TrackedStream {
                inner,
                exchanges: Arc::default(),
            }))
        })
    }
}

/// Runs a client connection's I/O until it closes, on its own task, as
/// hyper's client connections need.
pub(super) fn drive<F>(connection: F)
where
    F: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchanges_tell_a_reused_connection_with_no_answer() {
        let x = Exchanges::default();
        x.wrote(); // request 1, in several writes
        x.wrote();
        assert!(!x.reused_and_unanswered(), "a fresh connection");
        x.read(); // its answer
        x.read();
        x.wrote(); // request 2...
        assert!(x.reused_and_unanswered(), "...closed before any answer");
        x.read(); // ...answered, then cut
        assert!(!x.reused_and_unanswered());
    }
}
