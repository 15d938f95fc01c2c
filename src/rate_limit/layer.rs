//! [`RateLimitLayer`] and its service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, HeaderName, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt};

use super::bucket::Decision;
use super::limiter::RateLimiter;
use crate::body::{BoxError, BoxFuture};
use crate::conn::ClientTier;
use crate::error::{Reason, Rejection, refused};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Per-client rate limiting for any `Service<http::Request<B>>`.
///
/// Over the limit a request is refused at once with a `rate_limited`
/// [`Rejection`] error (`429` + `Retry-After` once a
/// [`RescueLayer`](crate::respond::RescueLayer) above turns it into a
/// response); every response, admitted or refused, carries the `RateLimit-Policy`
/// and `RateLimit` fields so that clients can pace themselves.
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use sluicegate::body::{BoxError, full};
/// use sluicegate::rate_limit::{Rate, RateLimitLayer, RateLimiter};
/// use sluicegate::respond::RescueLayer;
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let limiter = RateLimiter::new(Rate { per_second: 10.0, burst: Some(2) }, 100_000);
/// let app = ServiceBuilder::new()
///     .layer(RescueLayer::new("ingest")) // refusals -> 429 + Retry-After + JSON
///     .layer(RateLimitLayer::new(limiter))
///     .service_fn(|_req: Request<String>| async {
///         Ok::<_, BoxError>(Response::new(full("stored")))
///     });
///
/// for _ in 0..2 {
///     let res = app.clone().oneshot(Request::new(String::new())).await.unwrap();
///     assert_eq!(res.status(), StatusCode::OK);
///     assert!(res.headers().contains_key("ratelimit"));
/// }
/// let res = app.oneshot(Request::new(String::new())).await.unwrap();
/// assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
/// assert_eq!(res.headers()["retry-after"], "1");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<RateLimiter>,
}

impl RateLimitLayer {
    /// A layer over `limiter`.
    pub fn new(limiter: RateLimiter) -> Self {
        Self::with_limiter(Arc::new(limiter))
    }

    /// A layer over a shared limiter.
    pub fn with_limiter(limiter: Arc<RateLimiter>) -> Self {
        Self { limiter }
    }

    /// The limiter, for its live state and pruning.
    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// Service of [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<RateLimiter>,
}

fn fields(decision: &Decision) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(2);
    headers.insert(RATELIMIT_POLICY, decision.policy.clone());
    headers.insert(RATELIMIT, decision.state.clone());
    headers
}

/// The refusal of a client over its rate.
fn over_rate(decision: &Decision, secs: u64) -> Rejection {
    Rejection::new(Reason::RateLimited)
        .with_retry_after(secs)
        .with_headers(fields(decision))
}

/// The inner answer with the client's `RateLimit` fields: on a response,
/// and on a refusal further down (a full queue, an open circuit), which
/// still tells the client where it stands with its rate.
fn with_fields<ResB>(
    result: Result<Response<ResB>, BoxError>,
    decision: Decision,
) -> Result<Response<ResB>, BoxError> {
    match result {
        Ok(mut res) => {
            let headers = res.headers_mut();
            headers.insert(RATELIMIT_POLICY, decision.policy);
            headers.insert(RATELIMIT, decision.state);
            Ok(res)
        }
        Err(err) => match err.downcast::<Rejection>() {
            Ok(rejection) => Err(rejection.with_headers(fields(&decision)).into()),
            Err(err) => Err(err),
        },
    }
}

impl<S, B, ResB> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The decision is per request (the key is in the request); readiness
        // is the inner service's.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let key = self
            .limiter
            .extractor()
            .key(req.headers(), req.extensions());
        // Header keys: the client's address too, when asked (its ceiling,
        // its bucket for a key beyond `max_keys`).
        let address = || {
            Some(
                self.limiter
                    .extractor()
                    .address(req.headers(), req.extensions()),
            )
        };
        let here = if self.limiter.is_shared() {
            let ceiling = self.limiter.has_ceiling().then(address).flatten();
            match self.limiter.over_ceiling(ceiling) {
                Some(refused) => Ok(refused),
                None => self.limiter.decide_here(&key),
            }
        } else {
            Ok(self.limiter.check_from(&key, address))
        };
        let decision = match here {
            Ok(decision) => decision,
            Err(ask) => {
                // A round trip to Redis first: the request waits in a future of
                // its own, with the service made ready (this one keeps a clone).
                let limiter = self.limiter.clone();
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                return ResponseFuture::Deciding {
                    future: Box::pin(async move {
                        let decision = limiter.ask(&key, ask).await;
                        if let Some(secs) = decision.retry_after_s {
                            return Err(over_rate(&decision, secs).into());
                        }
                        if let Some(tier) = &decision.tier {
                            req.extensions_mut().insert(ClientTier(tier.clone()));
                        }
                        let result = inner.oneshot(req).await.map_err(Into::into);
                        with_fields(result, decision)
                    }),
                };
            }
        };
        if let Some(secs) = decision.retry_after_s {
            return ResponseFuture::Refused {
                rejection: Some(over_rate(&decision, secs)),
            };
        }
        if let Some(tier) = &decision.tier {
            req.extensions_mut().insert(ClientTier(tier.clone()));
        }
        ResponseFuture::Called {
            inner: self.inner.call(req),
            decision: Some(decision),
        }
    }
}

pin_project! {
    /// Future of [`RateLimit`].
    #[allow(missing_docs)] // pin-project-lite allows no docs on variant fields
    #[project = ResponseProj]
    pub enum ResponseFuture<F, ResB> {
        /// Within its rate: the answer gets the client's `RateLimit` fields.
        Called {
            #[pin]
            inner: F,
            decision: Option<Decision>,
        },
        /// Decided on the cluster's Redis, then called.
        Deciding {
            future: BoxFuture<Response<ResB>>,
        },
        /// Over its rate.
        Refused {
            rejection: Option<Rejection>,
        },
    }
}

impl<F, ResB, E> Future for ResponseFuture<F, ResB>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseProj::Called { inner, decision } => {
                let result = ready!(inner.poll(cx)).map_err(Into::into);
                let decision = decision.take().expect("polled after completion");
                Poll::Ready(with_fields(result, decision))
            }
            ResponseProj::Deciding { future } => future.as_mut().poll(cx),
            ResponseProj::Refused { rejection } => Poll::Ready(refused(rejection)),
        }
    }
}
