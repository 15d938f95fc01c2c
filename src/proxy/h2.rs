//! [`H2Pool`]: one route's HTTP/2 connections to its upstream.
//!
//! HTTP/2 multiplexes, so a route needs few connections: requests go to the
//! open connection with the fewest streams in flight, and another is opened
//! only when every open one carries as many as it may, up to
//! [`H2_CONNECTIONS`], as Envoy opens more only when streams run out.
//! Connections are kept alive with pings and replaced once they close (the
//! upstream's GOAWAY, an idle timeout, a broken socket). h2c to `http://`
//! upstreams, ALPN h2 to `https://` ones.
//!
//! Two limits shape it:
//!
//! - **The upstream's stream limit** (`SETTINGS_MAX_CONCURRENT_STREAMS`):
//!   hyper queues a stream past it silently, on the same connection, while
//!   the request's deadlines run. The pool reads the limit as the connection
//!   learns it (starting at 1 until the upstream's SETTINGS arrive, so a
//!   burst on a new connection is never refused), puts a stream only where
//!   there is room, opens another connection when there is none, and makes
//!   a request wait (bounded by the caller) when all [`H2_CONNECTIONS`] are
//!   full.
//! - **Flow control**: a response body holds its stream's window until the
//!   client reads it, and the connection's window with it. The connection
//!   window is sized so that every stream may stall holding its whole window
//!   and one more can still flow: a client that stops reading slows only
//!   its own stream, never the others on the connection.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::Uri;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connector::{Connector, TrackedStream, drive};
use super::retry::Reclaim;
use crate::body::BoxError;

/// Connections per route to an HTTP/2 upstream, at most.
pub(super) const H2_CONNECTIONS: usize = 4;

/// Streams in flight on each connection at most, whatever the upstream
/// allows (the common server limit is 100 or more).
pub(super) const STREAMS_PER_CONNECTION: usize = 100;

/// A request's stream window: a bounded buffer per response.
const STREAM_WINDOW: u32 = 64 * 1024;

/// A connection's window: every stream stalled with its whole window still
/// leaves one stream's worth flowing (6.3 MiB, a bound on what stalled
/// clients can hold, not memory taken up front).
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * (STREAMS_PER_CONNECTION as u32 + 1);

/// How often a request waiting for a stream looks at the connections' limits
/// again.
const LOOK_AGAIN: Duration = Duration::from_millis(5);

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
    /// Told when a stream ends.
    freed: Notify,
}

/// A connection's I/O, driven by its own task and asked for the upstream's
/// stream limit by the pool.
type Driven = Arc<Mutex<http2::Connection<TokioIo<TrackedStream>, Reclaim, TokioExecutor>>>;

/// One connection and the streams it carries.
struct H2Conn {
    tx: http2::SendRequest<Reclaim>,
    streams: AtomicUsize,
    conn: Driven,
    /// The upstream sent a graceful GOAWAY: no new streams here.
    going_away: AtomicBool,
}

impl H2Conn {
    /// Streams it may carry now: the upstream's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` as the connection knows it (hyper
    /// applies SETTINGS on a task of its own: read when asked, not when
    /// polled).
    fn cap(&self) -> usize {
        let limit = self
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current_max_send_streams();
        limit.min(STREAMS_PER_CONNECTION)
    }
}

/// A stream on a connection, counted until its response body is done.
pub(super) struct Stream {
    conn: Arc<H2Conn>,
    pool: Arc<Shared>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
        self.pool.freed.notify_one();
    }
}

impl Stream {
    /// The connection's sender.
    pub(super) fn sender(&self) -> http2::SendRequest<Reclaim> {
        self.conn.tx.clone()
    }

    /// Its connection, to try a retry elsewhere once this stream is gone.
    pub(super) fn connection(&self) -> Avoid {
        Avoid(self.conn.clone())
    }

    /// The upstream is closing this stream's connection (a GOAWAY): no
    /// request is sent on it any more (the streams it took finish).
    pub(super) fn going_away(&self) {
        self.conn.going_away.store(true, Ordering::Relaxed);
    }
}

/// A connection a retry should not go to (it refused the stream).
pub(super) struct Avoid(Arc<H2Conn>);

/// No stream could be had in time.
#[derive(Debug)]
pub(super) struct NoStream;

impl std::fmt::Display for NoStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no HTTP/2 stream free in time: every connection ({H2_CONNECTIONS}) \
             at the upstream's stream limit"
        )
    }
}

impl std::error::Error for NoStream {}

impl H2Pool {
    pub(super) fn new(connector: Connector, target: Uri) -> Self {
        Self {
            shared: Arc::new(Shared {
                connector,
                target,
                conns: Mutex::new(Vec::with_capacity(H2_CONNECTIONS)),
                dialing: tokio::sync::Mutex::new(()),
                freed: Notify::new(),
            }),
        }
    }

    /// A stream on the least busy open connection with room, or on a new one
    /// when none has room and there may be more; else waits for one to free
    /// up, until `until` ([`NoStream`] then).
    pub(super) async fn stream(&self, until: Instant) -> Result<Stream, BoxError> {
        self.stream_avoiding(until, None).await
    }

    /// The same, on another connection than `avoid`'s when there is or may
    /// be one (a stream the upstream refused is tried elsewhere).
    pub(super) async fn stream_avoiding(
        &self,
        until: Instant,
        avoid: Option<&Avoid>,
    ) -> Result<Stream, BoxError> {
        let avoid = avoid.map(|a| &a.0);
        loop {
            // Registered before looking, so that a stream freed meanwhile
            // is not missed.
            let freed = self.shared.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if let Some(stream) = self.least_busy(avoid) {
                return Ok(stream);
            }
            if self.lock().len() < H2_CONNECTIONS {
                // Bounded: behind a dial that hangs, the next waits no
                // longer than its own deadline.
                let Ok(_dialing) = tokio::time::timeout_at(until, self.shared.dialing.lock()).await
                else {
                    return Err(NoStream.into());
                };
                // Another request may have dialled while this one waited.
                if let Some(stream) = self.least_busy(avoid) {
                    return Ok(stream);
                }
                if self.lock().len() < H2_CONNECTIONS {
                    match self.connect().await {
                        Ok(conn) => return Ok(self.push(conn)),
                        // Nothing open to wait for: the upstream is down.
                        Err(e) if self.lock().is_empty() => return Err(e),
                        Err(e) => tracing::debug!(error = %e, "another HTTP/2 connection failed"),
                    }
                }
            }
            // No other connection to be had: the avoided one will do.
            if let Some(stream) = avoid.and_then(|_| self.least_busy(None)) {
                return Ok(stream);
            }
            if Instant::now() >= until {
                return Err(NoStream.into());
            }
            // A stream ending wakes this at once; the upstream raising its
            // limit (its SETTINGS) is seen at the next look.
            let look = (Instant::now() + LOOK_AGAIN).min(until);
            let _ = tokio::time::timeout_at(look, freed).await;
        }
    }

    /// The open connection with the fewest streams, if it has room; counts
    /// the new stream.
    fn least_busy(&self, avoid: Option<&Arc<H2Conn>>) -> Option<Stream> {
        let mut conns = self.lock();
        // A connection going away leaves the pool (its streams finish).
        conns.retain(|c| !c.tx.is_closed() && !c.going_away.load(Ordering::Relaxed));
        let conn = conns
            .iter()
            .filter(|c| avoid.is_none_or(|a| !Arc::ptr_eq(a, c)))
            .filter(|c| c.streams.load(Ordering::Relaxed) < c.cap())
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))?
            .clone();
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Some(Stream {
            conn,
            pool: self.shared.clone(),
        })
    }

    /// Adds `conn` to the pool with one stream taken on it.
    fn push(&self, conn: H2Conn) -> Stream {
        conn.streams.store(1, Ordering::Relaxed);
        let conn = Arc::new(conn);
        let mut conns = self.lock();
        conns.retain(|c| !c.tx.is_closed() && !c.going_away.load(Ordering::Relaxed));
        conns.push(conn.clone());
        Stream {
            conn,
            pool: self.shared.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<H2Conn>>> {
        self.shared.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connect(&self) -> Result<H2Conn, BoxError> {
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
            // One stream until the upstream's SETTINGS say how many: a burst
            // on a new connection is never refused for going past it.
            .initial_max_send_streams(1)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await?;
        let conn: Driven = Arc::new(Mutex::new(connection));
        let driven = conn.clone();
        drive(poll_fn(move |cx| {
            let mut connection = driven.lock().unwrap_or_else(|e| e.into_inner());
            Pin::new(&mut *connection).poll(cx)
        }));
        Ok(H2Conn {
            tx,
            streams: AtomicUsize::new(0),
            conn,
            going_away: AtomicBool::new(false),
        })
    }
}
