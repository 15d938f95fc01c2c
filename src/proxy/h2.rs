//! [`H2Pool`]: one route's HTTP/2 connections to its upstream.
//!
//! HTTP/2 multiplexes, so a route needs few connections: requests go to the
//! open connection with the fewest streams in flight, and another is opened
//! only when every open one carries [`STREAMS_PER_CONNECTION`] (the common
//! server limit is 100 or more), up to [`H2_CONNECTIONS`], as Envoy opens
//! more only when streams run out. Connections are kept alive with pings and
//! replaced once they close (the upstream's GOAWAY, an idle timeout, a broken
//! socket). h2c to `http://` upstreams, ALPN h2 to `https://` ones.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::Uri;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::connector::{Connector, drive};
use super::retry::Reclaim;
use crate::body::BoxError;

/// Connections per route to an HTTP/2 upstream, at most.
pub(super) const H2_CONNECTIONS: usize = 4;

/// Streams in flight on each connection before another is opened.
pub(super) const STREAMS_PER_CONNECTION: usize = 100;

/// A request's stream window, and a connection's: bounded buffers, as on the
/// listener.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The HTTP/2 connections of one route. Cheap to clone.
#[derive(Clone)]
pub(super) struct H2Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    target: Uri,
    conns: Mutex<Vec<Arc<H2Conn>>>,
    /// Serializes dials, so that a burst opens one connection, not many.
    dialing: tokio::sync::Mutex<()>,
}

/// One connection and the streams it carries.
struct H2Conn {
    tx: http2::SendRequest<Reclaim>,
    streams: AtomicUsize,
}

/// A stream on a connection, counted until its response body is done.
pub(super) struct Stream {
    conn: Arc<H2Conn>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stream {
    /// The connection's sender.
    pub(super) fn sender(&self) -> http2::SendRequest<Reclaim> {
        self.conn.tx.clone()
    }
}

impl H2Pool {
    pub(super) fn new(connector: Connector, target: Uri) -> Self {
        Self {
            shared: Arc::new(Shared {
                connector,
                target,
                conns: Mutex::new(Vec::with_capacity(H2_CONNECTIONS)),
                dialing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// A stream on the least busy open connection, or on a new one when
    /// all are busy and there is room.
    pub(super) async fn stream(&self) -> Result<Stream, BoxError> {
        if let Some(stream) = self.least_busy(false) {
            return Ok(stream);
        }
        let _dialing = self.shared.dialing.lock().await;
        // Another request may have dialled while this one waited.
        if let Some(stream) = self.least_busy(false) {
            return Ok(stream);
        }
        match self.connect().await {
            Ok(tx) => {
                let conn = Arc::new(H2Conn {
                    tx,
                    streams: AtomicUsize::new(1),
                });
                let mut conns = self.lock();
                conns.retain(|c| !c.tx.is_closed());
                conns.push(conn.clone());
                Ok(Stream { conn })
            }
            // At the connection cap, or the dial failed with one still open:
            // share the open ones past their stream target.
            Err(e) => self.least_busy(true).ok_or(e),
        }
    }

    /// The open connection with the fewest streams, if it is under the
    /// target (or `any`); counts the new stream.
    fn least_busy(&self, any: bool) -> Option<Stream> {
        let mut conns = self.lock();
        conns.retain(|c| !c.tx.is_closed());
        let conn = conns
            .iter()
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))?
            .clone();
        let busy = conn.streams.load(Ordering::Relaxed) >= STREAMS_PER_CONNECTION;
        if busy && !any && conns.len() < H2_CONNECTIONS {
            return None;
        }
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Some(Stream { conn })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<H2Conn>>> {
        self.shared.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connect(&self) -> Result<http2::SendRequest<Reclaim>, BoxError> {
        if self.lock().len() >= H2_CONNECTIONS {
            return Err("every HTTP/2 connection to the upstream is busy".into());
        }
        let io = self.shared.connector.dial(&self.shared.target).await?;
        if io.inner().alpn_is(b"h2") == Some(false) {
            return Err("the upstream did not agree to HTTP/2 (ALPN h2); \
                        set upstream_protocol = \"http1\" for it"
                .into());
        }
        let (tx, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await?;
        drive(connection);
        Ok(tx)
    }
}
