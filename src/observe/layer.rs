//! [`ObserveLayer`] and its service and future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Outcome, RouteStats};
use crate::error::AnsweredByProxy;
use crate::exchange::{SpoolReceipt, UpstreamLatency};

/// Counts a route's requests by outcome, and writes the access log
/// line (at debug level, target `sluicegate::access`).
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    stats: Arc<RouteStats>,
}

impl ObserveLayer {
    /// Observes into `stats`.
    pub const fn new(stats: Arc<RouteStats>) -> Self {
        Self { stats }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            stats: self.stats.clone(),
        }
    }
}

/// Service of [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    stats: Arc<RouteStats>,
}

impl<S, B, ResB> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Only pay for copying request fields when the access log is on.
        let log = tracing::enabled!(target: "sluicegate::access", tracing::Level::DEBUG)
            .then(|| AccessLog::new(&req));
        ObserveFuture {
            guard: Some(Pending::new(self.stats.clone())),
            inner: self.inner.call(req),
            log,
        }
    }
}

/// Counts the request as cancelled if the future is dropped before the answer.
struct Pending {
    stats: Option<Arc<RouteStats>>,
}

impl Pending {
    fn new(stats: Arc<RouteStats>) -> Self {
        Self { stats: Some(stats) }
    }

    fn finish(mut self, outcome: Outcome) -> Arc<RouteStats> {
        // `stats` is only taken here, and `finish` consumes `self`.
        let stats = self.stats.take().expect("Pending finished twice");
        stats.record(outcome);
        stats
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(stats) = &self.stats {
            stats.record(Outcome::Cancelled);
        }
    }
}

struct AccessLog {
    method: http::Method,
    path: String,
    request_id: Option<http::HeaderValue>,
    start: Instant,
}

impl AccessLog {
    fn new<B>(req: &Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            request_id: req.headers().get("x-request-id").cloned(),
            start: Instant::now(),
        }
    }

    fn write(&self, route: &str, status: Option<http::StatusCode>, outcome: Outcome) {
        tracing::debug!(
            target: "sluicegate::access",
            route,
            method = %self.method,
            path = ?self.path,
            status = status.map(|s| s.as_u16()),
            outcome = ?outcome,
            ms = self.start.elapsed().as_secs_f64() * 1e3,
            request_id = ?self.request_id,
            "request"
        );
    }
}

pin_project! {
    /// Future of [`Observe`].
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        guard: Option<Pending>,
        log: Option<AccessLog>,
    }
}

impl<F, ResB, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        // `guard` is Some until the inner future completes, which happens once.
        let pending = this
            .guard
            .take()
            .expect("ObserveFuture polled after completion");
        Poll::Ready(match result {
            Ok(res) => {
                let outcome = match res.extensions().get::<AnsweredByProxy>() {
                    Some(AnsweredByProxy(reason)) => Outcome::Rejected(*reason),
                    None if res.extensions().get::<SpoolReceipt>().is_some() => Outcome::Spooled,
                    None => Outcome::of_status(res.status()),
                };
                let stats = pending.finish(outcome);
                if let Some(latency) = res.extensions().get::<UpstreamLatency>() {
                    stats.record_upstream_duration(latency.0);
                }
                if let Some(log) = this.log {
                    log.write(stats.name(), Some(res.status()), outcome);
                }
                Ok(res)
            }
            Err(e) => {
                let stats = pending.finish(Outcome::Error);
                if let Some(log) = this.log {
                    log.write(stats.name(), None, Outcome::Error);
                }
                Err(e)
            }
        })
    }
}
