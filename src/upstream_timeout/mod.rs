//! [`UpstreamTimeoutLayer`]: one exchange with the upstream, bounded in each
//! phase: the upstream must keep taking the request body (`write_timeout`),
//! and must send its response headers within `timeout` of the body's end.
//!
//! A deadline that starts when the request arrives also times the client's
//! upload: a 10 MB body on a slow uplink would become a `504` blamed on the
//! upstream, a circuit failure and an overload sample. Like Envoy's route
//! timeout, which starts at the end of the downstream request, the clock here
//! starts when the last byte of the request body was handed to the upstream
//! connection (at once for a request without a body). The same moment is the
//! start of [`UpstreamLatency`], the upstream's own time, which the circuit
//! breaker's slow-call rule, the adaptive limit and the upstream-duration
//! histogram read.
//!
//! That clock alone would wait for ever on an upstream that accepts a
//! connection and stops reading (a hung worker, a body larger than the socket
//! buffers): the body is never sent in full. So the upload has a bound of its
//! own, on the upstream's side only: a frame handed to the upstream
//! connection must be followed by its asking for the next within
//! `write_timeout` (HAProxy's `timeout server`, nginx's
//! `proxy_send_timeout`). Time spent waiting for the client's next bytes is
//! the client's (`body_read_timeout_ms`), never counted here. A request that
//! waits for an upstream connection or HTTP/2 stream to carry it waits under
//! the same bound. And while an upload drags on, the client's connection is
//! watched, so that a client that goes away frees its slot at once.

mod body;
mod future;
#[cfg(test)]
mod tests;

use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower::{Layer, Service};

use body::Progress;
pub use body::SentBody;
pub use future::{ResponseFuture, UpstreamGaveUp, WriteTimedOut};
use future::{Uploading, WATCH_CLIENT_AFTER, cut_at};

use crate::body::BodyProgress;
use crate::body::BoxError;
use crate::conn::PeerClosed;
use crate::deadline::Deadline;
use crate::dispatch::Dispatch;

/// The default `write_timeout`, as nginx's `proxy_send_timeout`.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bounds the exchanges of the service below: the upload by `write_timeout`
/// of upstream inactivity, the response headers by `timeout` from the request
/// body's end; past either an `upstream_timeout` [`Rejection`](crate::error::Rejection)
/// (`504` once rescued).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeoutLayer {
    timeout: Duration,
    write_timeout: Duration,
    from_dispatch: bool,
}

impl UpstreamTimeoutLayer {
    /// Response headers must come within `timeout` of the request body's
    /// end; the upload is bounded by [`DEFAULT_WRITE_TIMEOUT`].
    pub const fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            from_dispatch: false,
        }
    }

    /// For a service below that may hold a request before sending it (an
    /// HTTP/2 pool waiting for a stream): a request without a body carries a
    /// [`Dispatch`], and its response deadline starts when that is told, not
    /// at the call.
    pub const fn from_dispatch(mut self, yes: bool) -> Self {
        self.from_dispatch = yes;
        self
    }

    /// The upstream must take the next request bytes within `write_timeout`
    /// of the last ones handed to it.
    pub const fn write_timeout(mut self, write_timeout: Duration) -> Self {
        self.write_timeout = write_timeout;
        self
    }
}

impl<S> Layer<S> for UpstreamTimeoutLayer {
    type Service = UpstreamTimeout<S>;
    fn layer(&self, inner: S) -> UpstreamTimeout<S> {
        UpstreamTimeout {
            inner,
            timeout: self.timeout,
            write_timeout: self.write_timeout,
            from_dispatch: self.from_dispatch,
        }
    }
}

/// Service of [`UpstreamTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct UpstreamTimeout<S> {
    inner: S,
    timeout: Duration,
    write_timeout: Duration,
    from_dispatch: bool,
}

impl<S, B, ResB> Service<Request<B>> for UpstreamTimeout<S>
where
    S: Service<Request<SentBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: Body,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let now = Instant::now();
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let bodyless = req.body().is_end_stream();
        // A body already at its end will never be polled: the clock starts
        // now, or when the request is dispatched.
        let (uploading, first_check) = if bodyless && !self.from_dispatch {
            (None, now + self.timeout)
        } else {
            let peer = req.extensions().get::<PeerClosed>().cloned();
            let first_check = match peer {
                Some(_) => now + self.write_timeout.min(WATCH_CLIENT_AFTER),
                None => now + self.write_timeout,
            };
            let uploading = Uploading {
                progress: Progress::new(now),
                write_timeout: self.write_timeout,
                peer,
                watching: None,
            };
            (Some(Box::new(uploading)), first_check)
        };
        let progress = uploading.as_ref().map(|u| u.progress.clone());
        let progress = match (bodyless, progress) {
            (true, Some(progress)) => {
                req.extensions_mut().insert(Dispatch(progress));
                None
            }
            (_, progress) => progress,
        };
        // Admission re-weighs a body of unknown length as it streams.
        let budget = req.extensions().get::<BodyProgress>().cloned();
        let req = req.map(|inner| SentBody::new(inner, progress, budget));
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: tokio::time::sleep_until(cut_at(first_check, deadline)),
            uploading,
            started: now,
            timeout: self.timeout,
            deadline,
        }
    }
}
