//! [`UpstreamTimeoutLayer`]: the upstream's deadline for its response headers,
//! counted from the moment the request body has been sent in full.
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

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::body::{BoxError, ended};
use crate::deadline::{ClientDeadline, Deadline};
use crate::error::{Reason, Rejection};

/// Response extension: the upstream's own time, from the end of the request
/// body to the response headers (queue waits and uploads excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamLatency(pub Duration);

/// Bounds the wait for the response headers of the service below, from the end
/// of the request body; past it an `upstream_timeout`
/// [`Rejection`] (`504` once rescued).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeoutLayer {
    timeout: Duration,
}

impl UpstreamTimeoutLayer {
    /// Response headers must come within `timeout` of the request body's end.
    pub const fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for UpstreamTimeoutLayer {
    type Service = UpstreamTimeout<S>;
    fn layer(&self, inner: S) -> UpstreamTimeout<S> {
        UpstreamTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Service of [`UpstreamTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct UpstreamTimeout<S> {
    inner: S,
    timeout: Duration,
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let now = Instant::now();
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        // A body already at its end will never be polled: the clock starts now.
        let (signal, sent) = if req.body().is_end_stream() {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        let req = req.map(|inner| SentBody { inner, signal });
        let until = cut_at(now + self.timeout, deadline);
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: tokio::time::sleep_until(until),
            sent,
            started: now,
            timeout: self.timeout,
            deadline,
        }
    }
}

pin_project! {
    /// Future of [`UpstreamTimeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Armed (polled) only once the body is sent; reset to that moment.
        #[pin]
        sleep: Sleep,
        // Until the request body has been sent.
        sent: Option<oneshot::Receiver<()>>,
        // When the clock started (the call, then the end of the body).
        started: Instant,
        timeout: Duration,
        // The client's deadline: never waited past, whenever the body ends.
        deadline: Option<Instant>,
    }
}

/// The earlier of the route's timeout and the client's deadline.
fn cut_at(timeout: Instant, deadline: Option<Instant>) -> Instant {
    deadline.map_or(timeout, |d| d.min(timeout))
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            let mut res = result.map_err(Into::into)?;
            // An upstream that answers before the body is in has taken no time
            // of its own beyond the upload; measured from the call then.
            res.extensions_mut()
                .insert(UpstreamLatency(this.started.elapsed()));
            return Poll::Ready(Ok(res));
        }
        if let Some(sent) = this.sent {
            // Sent, or the body was dropped unsent (the call is failing): the
            // deadline runs from here either way, so nothing waits for ever.
            let _ = ready!(Pin::new(sent).poll(cx));
            *this.sent = None;
            let now = Instant::now();
            *this.started = now;
            this.sleep
                .as_mut()
                .reset(cut_at(now + *this.timeout, *this.deadline));
        }
        ready!(this.sleep.poll(cx));
        let rejection = Rejection::new(Reason::UpstreamTimeout);
        let rejection = match *this.deadline {
            // The client's budget, not the upstream's: see ClientDeadline.
            Some(d) if d <= Instant::now() && d < *this.started + *this.timeout => {
                rejection.with_cause(ClientDeadline)
            }
            _ => rejection.with_cause(format!(
                "no response headers within {} ms of the request's end",
                this.timeout.as_millis()
            )),
        };
        Poll::Ready(Err(rejection.into()))
    }
}

pin_project! {
    /// A request body that tells [`UpstreamTimeout`] when it has been sent in
    /// full (its end read, or its last frame).
    pub struct SentBody<B> {
        #[pin]
        inner: B,
        signal: Option<oneshot::Sender<()>>,
    }
}

impl<B: Body> Body for SentBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if ended(&frame, &*this.inner) == Some(true)
            && let Some(signal) = this.signal.take()
        {
            let _ = signal.send(());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tower::ServiceExt;

    /// `chunks` one-byte frames, one every `every`: a slow uplink.
    struct Trickle {
        chunks: u32,
        every: Duration,
        sleep: Pin<Box<Sleep>>,
    }

    impl Trickle {
        fn new(chunks: u32, every: Duration) -> Self {
            Self {
                chunks,
                every,
                sleep: Box::pin(tokio::time::sleep(every)),
            }
        }
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.chunks == 0 {
                return Poll::Ready(None);
            }
            ready!(self.sleep.as_mut().poll(cx));
            self.chunks -= 1;
            let next = Instant::now() + self.every;
            self.sleep.as_mut().reset(next);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    /// Reads the whole request body, then answers after `work` (never if None).
    async fn upstream<B>(req: Request<B>, work: Option<Duration>) -> Result<Response<()>, BoxError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        req.into_body().collect().await.map_err(Into::into)?;
        match work {
            Some(work) => tokio::time::sleep(work).await,
            None => std::future::pending().await,
        }
        Ok(Response::new(()))
    }

    fn timeout_of(err: &BoxError) -> Reason {
        err.downcast_ref::<Rejection>()
            .expect("a rejection")
            .reason()
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_upload_does_not_count_against_the_deadline() {
        let svc =
            UpstreamTimeoutLayer::new(Duration::from_millis(100)).layer(tower::service_fn(|req| {
                upstream(req, Some(Duration::from_millis(90)))
            }));
        // Ten frames 50 ms apart: the upload alone is five times the deadline.
        let req = Request::new(Trickle::new(10, Duration::from_millis(50)));
        let res = svc.oneshot(req).await.expect("answered in time");
        assert_eq!(
            res.extensions().get(),
            Some(&UpstreamLatency(Duration::from_millis(90)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_runs_from_the_end_of_the_body() {
        let svc = UpstreamTimeoutLayer::new(Duration::from_millis(100))
            .layer(tower::service_fn(|req| upstream(req, None)));
        let start = Instant::now();
        let req = Request::new(Trickle::new(10, Duration::from_millis(50)));
        let err = svc
            .oneshot(req)
            .await
            .expect_err("the upstream never answers");
        assert_eq!(timeout_of(&err), Reason::UpstreamTimeout);
        assert_eq!(start.elapsed(), Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_body_the_clock_starts_at_once() {
        let svc = UpstreamTimeoutLayer::new(Duration::from_millis(100))
            .layer(tower::service_fn(|req| upstream(req, None)));
        let start = Instant::now();
        let err = svc
            .oneshot(Request::new(Empty::<Bytes>::new()))
            .await
            .expect_err("the upstream never answers");
        assert_eq!(timeout_of(&err), Reason::UpstreamTimeout);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_dropped_unsent_still_arms_the_deadline() {
        // An inner service that drops the body at once and never answers.
        let svc = UpstreamTimeoutLayer::new(Duration::from_millis(100)).layer(tower::service_fn(
            |req: Request<SentBody<Trickle>>| async move {
                drop(req);
                std::future::pending::<Result<Response<()>, BoxError>>().await
            },
        ));
        let start = Instant::now();
        let req = Request::new(Trickle::new(10, Duration::from_millis(50)));
        let err = svc.oneshot(req).await.expect_err("times out");
        assert_eq!(timeout_of(&err), Reason::UpstreamTimeout);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }
}
