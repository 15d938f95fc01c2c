//! The proxy listener: accept loop with a connection cap, HTTP/1.1 and h2c on
//! one port, header-read timeout, graceful drain.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use super::client_io::ClientIo;
use super::framing::FramingGuard;
use crate::config::ServerConfig;
use crate::conn::{ClientAddr, PeerClosed};
use crate::error::Side;
use crate::proxy::ReadTimeout;
use crate::stack::ProxyService;

/// The most permits a tokio semaphore can hold.
const MAX_PERMITS: usize = Semaphore::MAX_PERMITS;

/// The HTTP/1.1 + h2c connection builder for the proxy listener.
pub(super) fn http_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
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
pub(super) struct Counters {
    /// Heads the framing guard refused.
    pub(super) framing_refused: metrics::Counter,
    /// Connections closed past `send_timeout_ms`.
    pub(super) send_timeouts: metrics::Counter,
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
    graceful: &GracefulShutdown,
    mut stop: watch::Receiver<bool>,
    counters: Counters,
) {
    let builder = Arc::new(http_builder(server));
    let max_head = server.max_header_bytes.as_usize();
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
        let stream = Arc::new(stream);
        let peer_closed = PeerClosed::new(Arc::downgrade(&stream));
        let client = ClientAddr::new(peer);
        let service = service.clone();
        let body_timeout = server.body_read_timeout_ms.get();
        let hyper_service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let ext = req.extensions_mut();
            ext.insert(client.clone());
            // HTTP/2 streams are watched by hyper itself (it reads the
            // connection throughout); HTTP/1 bodies waiting to be read are not.
            if req.version() < Version::HTTP_2 && !req.body().is_end_stream() {
                req.extensions_mut().insert(peer_closed.clone());
            }
            let req = req.map(|body| ReadTimeout::new(body, body_timeout, Side::Client));
            service.clone().oneshot(req)
        });
        let io = ClientIo::new(
            stream,
            server.send_timeout_ms.get(),
            counters.send_timeouts.clone(),
        );
        let conn = builder
            .serve_connection(
                TokioIo::new(FramingGuard::new(
                    io,
                    max_head,
                    counters.framing_refused.clone(),
                )),
                hyper_service,
            )
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
