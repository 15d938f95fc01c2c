//! The proxy listener: accept loop with a connection cap, HTTP/1.1 and h2c on
//! one port (or HTTP/1.1 and h2 over TLS, chosen by ALPN, with
//! `[server.tls]`), header-read timeout, graceful drain.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use super::client_io::ClientIo;
use super::connection::{self, Activity, Bounds, Closed};
use super::drain::Drain;
use super::framing::FramingGuard;
use super::streams::{ResponseBody, StreamExecutor};
use super::tls::TlsListener;
use crate::body::BoxError;
use crate::config::ServerConfig;
use crate::conn::{ClientAddr, PeerClosed};
use crate::error::{AnsweredByProxy, Side};
use crate::pace::MinRate;
use crate::proxy::ReadTimeout;
use crate::stack::ProxyService;

/// The most permits a tokio semaphore can hold.
const MAX_PERMITS: usize = Semaphore::MAX_PERMITS;

/// The HTTP/1.1 + h2c connection builder for the proxy listener; its
/// executor holds each HTTP/2 stream to its client's pace, counting streams
/// reset for it in `send_timeouts`.
pub(super) fn http_builder(
    server: &ServerConfig,
    send_timeouts: metrics::Counter,
) -> auto::Builder<StreamExecutor> {
    let pace = MinRate {
        per_s: server.send_min_bytes_per_s.get(),
        grace: server.send_timeout_ms.get(),
    };
    let mut builder = auto::Builder::new(StreamExecutor::new(pace, send_timeouts));
    let max_header = server.max_header_bytes.as_usize();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout_ms.get())
        .max_buf_size(max_header)
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(
            u32::try_from(server.http2_max_concurrent_streams.get()).unwrap_or(u32::MAX),
        )
        .max_header_list_size(u32::try_from(max_header).unwrap_or(u32::MAX))
        // A stream's unacknowledged data, and a connection's: bounded buffers.
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_send_buf_size(256 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// What the listener counts.
#[derive(Clone)]
pub(super) struct Counters {
    /// Heads the framing guard refused.
    pub(super) framing_refused: metrics::Counter,
    /// Connections closed past `send_timeout_ms`.
    pub(super) send_timeouts: metrics::Counter,
    /// TLS handshakes that failed or timed out.
    pub(super) tls_failed: metrics::Counter,
    /// Connections closed by a bound, by [`Closed::ALL`]'s order.
    pub(super) closed: [metrics::Counter; 3],
}

impl Counters {
    fn closed(&self, why: Closed) {
        self.closed[why as usize].increment(1);
    }
}

/// Accepts connections until `stop` turns true, serving each with `service`.
///
/// At `max_connections` open connections the loop stops accepting (new
/// connections wait in the kernel backlog) until one closes, rather than
/// accepting and failing them.
pub(super) async fn accept_loop(
    listener: TcpListener,
    service: ProxyService,
    server: &ServerConfig,
    drain: &Drain,
    mut stop: watch::Receiver<bool>,
    counters: Counters,
    tls: Option<&Arc<TlsListener>>,
) {
    let builder = Arc::new(http_builder(server, counters.send_timeouts.clone()));
    let tls = tls.cloned();
    let max_head = server.max_header_bytes.as_usize();
    let bounds = Bounds {
        first_request: server.header_read_timeout_ms.get(),
        http2_idle: server.http2_idle_timeout_ms.get(),
    };
    let slots = Arc::new(Semaphore::new(
        server.max_connections.as_usize().min(MAX_PERMITS),
    ));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => return,
            },
            () = stopped(&mut stop) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Usually EMFILE/ENFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set TCP_NODELAY failed");
        }
        let conn = Connection {
            builder: builder.clone(),
            service: service.clone(),
            max_head,
            body_timeout: server.body_read_timeout_ms.get(),
            body_rate: MinRate {
                per_s: server.body_min_bytes_per_s.get(),
                grace: server.body_read_timeout_ms.get(),
            },
            counters: counters.clone(),
        };
        let stream = Arc::new(stream);
        let io = ClientIo::new(
            stream.clone(),
            MinRate {
                per_s: server.send_min_bytes_per_s.get(),
                grace: server.send_timeout_ms.get(),
            },
            counters.send_timeouts.clone(),
        );
        let watcher = drain.watcher();
        match &tls {
            None => {
                tokio::spawn(async move {
                    let served = conn.serve(io, stream, ClientAddr::new(peer), bounds, watcher);
                    if let Err(e) = served.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Some(tls) => {
                // The handshake runs in the connection's own task, bounded by
                // the head timeout as nginx bounds it by client_header_timeout.
                let acceptor = tls.acceptor();
                let handshake_timeout = server.header_read_timeout_ms.get();
                tokio::spawn(async move {
                    let accepted = handshake(acceptor, io, &stream, handshake_timeout).await;
                    let served = match accepted {
                        Ok(tls_io) => {
                            conn.serve(tls_io, stream, ClientAddr::tls(peer), bounds, watcher)
                        }
                        Err(why) => {
                            conn.counters.tls_failed.increment(1);
                            tracing::debug!(%peer, error = %why, "TLS handshake failed");
                            return;
                        }
                    };
                    if let Err(e) = served.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// What serving one client connection needs, whatever its transport.
struct Connection {
    builder: Arc<auto::Builder<StreamExecutor>>,
    service: ProxyService,
    max_head: usize,
    body_timeout: Duration,
    body_rate: MinRate,
    counters: Counters,
}

impl Connection {
    /// Serves HTTP/1.1 or HTTP/2 on `io` (plain or TLS) for `client`
    /// within `bounds`, until it closes or the drain `watcher` says so;
    /// `stream` is the socket underneath, watched for the peer closing.
    async fn serve<I>(
        self,
        io: I,
        stream: Arc<TcpStream>,
        client: ClientAddr,
        bounds: Bounds,
        watcher: watch::Receiver<()>,
    ) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer_closed = PeerClosed::new(Arc::downgrade(&stream));
        let Self {
            builder,
            service,
            max_head,
            body_timeout,
            body_rate,
            counters,
        } = self;
        let activity = Activity::new();
        let requests = activity.clone();
        let hyper_service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let stream = requests.request(req.version() == Version::HTTP_2);
            let ext = req.extensions_mut();
            ext.insert(client.clone());
            // HTTP/2 streams are watched by hyper itself (it reads the
            // connection throughout); HTTP/1 bodies waiting to be read are not.
            if req.version() < Version::HTTP_2 && !req.body().is_end_stream() {
                req.extensions_mut().insert(peer_closed.clone());
            }
            let req = req
                .map(|body| ReadTimeout::new(body, body_timeout, Side::Client).min_rate(body_rate));
            let call = service.clone().oneshot(req);
            async move {
                let res = call.await?;
                if stream.is_stream() && res.extensions().get::<AnsweredByProxy>().is_some() {
                    stream.answered_locally();
                }
                Ok::<_, std::convert::Infallible>(res.map(|body| ResponseBody::new(body, stream)))
            }
        });
        let guarded = FramingGuard::new(io, max_head, counters.framing_refused.clone());
        let conn = builder
            .serve_connection(TokioIo::new(guarded), hyper_service)
            .into_owned();
        connection::serve(conn, activity, bounds, watcher, |why| counters.closed(why)).await
    }
}

/// The TLS handshake on `io`, within `timeout`. A client that speaks plain
/// HTTP to the TLS port gets a `400` saying so (as nginx answers), not a
/// silent close.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    io: ClientIo,
    stream: &TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<ClientIo>, String> {
    let accept = async {
        let mut first = [0u8; 1];
        let n = stream.peek(&mut first).await.map_err(|e| e.to_string())?;
        if n == 1 && first[0].is_ascii_uppercase() {
            let mut io = io;
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                 connection: close\r\ncontent-length: {}\r\n\r\n{PLAIN_HTTP_TO_TLS}",
                PLAIN_HTTP_TO_TLS.len()
            );
            let _ = io.write_all(answer.as_bytes()).await;
            let _ = io.shutdown().await;
            return Err("a plain HTTP request on the TLS port".to_string());
        }
        acceptor.accept(io).await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, accept)
        .await
        .map_err(|_| format!("no handshake within {timeout:?}"))?
}

/// The body of the answer to plain HTTP on the TLS port.
const PLAIN_HTTP_TO_TLS: &str =
    r#"{"error":"bad_request","message":"this port speaks TLS: use https:// (HTTP over TLS)"}"#;

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
