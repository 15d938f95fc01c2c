//! [`Pool`]: one route's keep-alive HTTP/1.1 connections to its upstream.
//!
//! A route has one upstream, so its pool is one list of idle connections, the
//! most recently used last: a checkout takes the warmest, and the coldest age
//! out after `pool_idle_timeout` (as Envoy's and HAProxy's idle timeouts do).
//! That is all hyper-util's legacy client did here, at the price of a hashed
//! lookup by scheme and authority, checkout futures, connection metadata put
//! into every response, and a task spawned per response to wait for the
//! connection to be ready again: about 6 000 instructions per request, a
//! tenth of the proxy's cost (BENCHMARKS.md, "Instructions per request").
//!
//! A connection goes back to the list when its response body has been read to
//! the end and hyper is ready for the next request on it; one the upstream
//! closed, or whose response was cut short, is dropped. At most `max_idle`
//! wait (a bound on file descriptors: the oldest goes first), and while any
//! wait a reaper closes those idle past the timeout, so that the proxy, not
//! the application server, closes an idle connection (see
//! [`retry`](super::retry) for the race when the server does).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;

use super::connector::{Connector, Exchanges, drive};
use super::h2::Stream;
use super::retry::Reclaim;
use crate::body::BoxError;

/// A pool of connections to one upstream. Cheap to clone.
#[derive(Clone)]
pub(super) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    idle: Mutex<Idle>,
    connector: Connector,
    /// What the connector dials: the upstream's scheme and authority.
    target: Uri,
    idle_timeout: Duration,
    max_idle: usize,
}

/// The idle connections, oldest first, and whether a reaper is running.
#[derive(Default)]
struct Idle {
    conns: VecDeque<(Instant, Conn)>,
    reaping: bool,
}

/// One upstream connection, checked out for one request.
pub(super) struct Conn {
    pub(super) tx: http1::SendRequest<Reclaim>,
    /// What the connection has carried, for the idle-race retry.
    pub(super) exchanges: Arc<Exchanges>,
}

impl Pool {
    /// A pool dialling `target` (`scheme://authority`) with `connector`.
    pub(super) fn new(
        connector: Connector,
        target: Uri,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                idle: Mutex::default(),
                connector,
                target,
                idle_timeout,
                max_idle,
            }),
        }
    }

    /// The warmest idle connection ready for a request, or a new one.
    pub(super) async fn checkout(&self) -> Result<Conn, BoxError> {
        match self.take_idle() {
            Some(conn) => Ok(conn),
            None => self.connect().await,
        }
    }

    /// The newest idle connection that is still open and within its idle
    /// timeout; the ones passed over are closed.
    fn take_idle(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.shared.lock();
        while let Some((since, conn)) = idle.conns.pop_back() {
            if now.duration_since(since) >= self.shared.idle_timeout {
                // The rest are older still.
                idle.conns.clear();
                return None;
            }
            if conn.tx.is_ready() {
                return Some(conn);
            }
        }
        None
    }

    /// A new connection (not pooled until its first response is read).
    pub(super) async fn connect(&self) -> Result<Conn, BoxError> {
        let io = self.shared.connector.dial(&self.shared.target).await?;
        let exchanges = io.inner().exchanges();
        let (tx, connection) = http1::Builder::new().writev(false).handshake(io).await?;
        drive(connection);
        Ok(Conn { tx, exchanges })
    }

    /// Takes `conn` back once its response has been read to the end: now if
    /// hyper is ready for the next request on it, else when it is (hyper may
    /// still be finishing the exchange, or sending the rest of a request
    /// body the upstream answered early), never if it closes.
    pub(super) fn put(&self, mut conn: Conn) {
        if conn.tx.is_ready() {
            self.keep(conn);
        } else if !conn.tx.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let pool = Arc::downgrade(&self.shared);
            runtime.spawn(async move {
                if conn.tx.ready().await.is_ok()
                    && let Some(shared) = pool.upgrade()
                {
                    Pool { shared }.keep(conn);
                }
            });
        }
    }

    fn keep(&self, conn: Conn) {
        let evicted;
        let start_reaper;
        {
            let mut idle = self.shared.lock();
            evicted = if idle.conns.len() >= self.shared.max_idle {
                idle.conns.pop_front()
            } else {
                None
            };
            idle.conns.push_back((Instant::now(), conn));
            start_reaper = !std::mem::replace(&mut idle.reaping, true);
        }
        drop(evicted); // closed outside the lock
        if start_reaper {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(reap(Arc::downgrade(&self.shared)));
                }
                // No runtime, no reaper: checkouts still pass over
                // expired connections.
                Err(_) => self.shared.lock().reaping = false,
            }
        }
    }

    /// Idle connections, for tests.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.shared.lock().conns.len()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Idle> {
        // The list stays consistent whatever panicked while holding it.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes idle connections as they pass the idle timeout; ends when none is
/// left (the next `keep` starts another) or the pool is gone.
async fn reap(shared: Weak<Shared>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let now = Instant::now();
            let mut idle = shared.lock();
            let timeout = shared.idle_timeout;
            let expired = idle
                .conns
                .partition_point(|(since, _)| now.duration_since(*since) >= timeout);
            let expired: Vec<_> = idle.conns.drain(..expired).collect();
            let next = idle.conns.front().map(|(since, _)| *since + timeout);
            if next.is_none() {
                idle.reaping = false;
            }
            drop(idle);
            drop(expired);
            next
        };
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => return,
        }
    }
}

/// A response body from the upstream that gives its connection back to the
/// pool once it has been read to the end.
pub struct Pooled {
    body: Incoming,
    /// Until the body ends (or fails, or is dropped unread: then the
    /// connection closes with it).
    conn: Option<(Conn, Pool)>,
    /// Over HTTP/2: the stream, until the body ends.
    stream: Option<Stream>,
}

impl Pooled {
    /// `body`, giving `conn` back to `pool` once read to the end.
    pub(super) fn new(body: Incoming, conn: Conn, pool: Pool) -> Self {
        Self {
            body,
            conn: Some((conn, pool)),
            stream: None,
        }
    }

    /// A body on a multiplexed (HTTP/2) connection: its stream is counted
    /// until the body is done.
    pub(super) fn multiplexed(body: Incoming, stream: Stream) -> Self {
        Self {
            body,
            conn: None,
            stream: Some(stream),
        }
    }

    fn give_back(&mut self) {
        if let Some((conn, pool)) = self.conn.take() {
            pool.put(conn);
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => {
                self.give_back();
                self.stream = None;
            }
            Some(Err(_)) => {
                self.conn = None;
                self.stream = None;
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // hyper's server stops polling a body whose length says it is over.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests;
