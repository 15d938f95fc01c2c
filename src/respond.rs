//! The rescue layer (linkerd2-proxy's name): every error of the stack below
//! becomes the client's response here, through [`Rejection::into_response`]
//! for the proxy's own refusals; the cause is logged, never shown.
//!
//! Rejections the proxy makes itself are fast, carry `Cache-Control: no-store`
//! and a small JSON body `{"error": ..., "reason": ..., "retry_after_s": N}`, and
//! never leak internals: the cause (an upstream address, an OS error) goes to the
//! log, not to the client.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::{BoxError, ProxyBody, boxed};
use crate::classify::{self, Failure};
use crate::error::{ErrorChain, Reason, Rejection};
use crate::exchange::GrpcCall;

/// The client's answer to `rejection`, in its protocol: gRPC for a gRPC call
/// (`grpc`), else the JSON answer. Every refusal is rendered here, once.
pub fn answer(rejection: Rejection, grpc: bool) -> Response<ProxyBody> {
    if grpc {
        crate::grpc::refusal(rejection)
    } else {
        rejection.into_response()
    }
}

/// Turns a stack error into the client's response, logging the cause.
pub fn rescue(route: &str, err: BoxError) -> Response<ProxyBody> {
    rescue_as(route, err, false)
}

/// As [`rescue`], for a gRPC call when `grpc`.
pub fn rescue_as(route: &str, err: BoxError, grpc: bool) -> Response<ProxyBody> {
    let failure = classify::failure(err.as_ref());
    if let Failure::Client(reason) = failure {
        // The client's doing: worth a line when debugging, not a warning.
        tracing::debug!(
            route,
            reason = reason.as_str(),
            cause = %ErrorChain(err.as_ref()),
            "request refused: the client's fault"
        );
        return answer(Rejection::new(reason), grpc);
    }
    let rejection = match err.downcast::<Rejection>() {
        Ok(rejection) => *rejection,
        Err(err) => Rejection::new(failure.reason()).with_cause(err),
    };
    if let Some(cause) = rejection.cause() {
        tracing::warn!(
            route,
            reason = rejection.reason().as_str(),
            cause = %ErrorChain(cause),
            "request failed"
        );
    }
    answer(rejection, grpc)
}

// === impl RescueLayer ===

/// Layer that turns the errors of the services below into responses.
#[derive(Debug, Clone)]
pub struct RescueLayer {
    route: Arc<str>,
}

impl RescueLayer {
    /// `route` names the route in the logs.
    pub fn new(route: impl Into<Arc<str>>) -> Self {
        Self {
            route: route.into(),
        }
    }
}

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            route: self.route.clone(),
            not_ready: None,
        }
    }
}

/// Service that never fails: its inner service's errors become responses, and
/// its bodies the one boxed [`ProxyBody`] type.
#[derive(Debug, Clone)]
pub struct Rescue<S> {
    inner: S,
    route: Arc<str>,
    /// An error from `poll_ready`, answered on the next call instead of calling
    /// a service that is not ready.
    not_ready: Option<Arc<str>>,
}

impl<S, ReqB, B> Service<Request<ReqB>> for Rescue<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = RescueFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if let Err(e) = ready!(self.inner.poll_ready(cx)) {
            self.not_ready = Some(e.into().to_string().into());
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let grpc = req.extensions().get::<GrpcCall>().is_some();
        if let Some(error) = self.not_ready.take() {
            let err = Rejection::new(Reason::UpstreamUnavailable).with_cause(error.to_string());
            return RescueFuture::Failed {
                response: Some(rescue_as(&self.route, err.into(), grpc)),
            };
        }
        RescueFuture::Pending {
            inner: self.inner.call(req),
            route: self.route.clone(),
            grpc,
        }
    }
}

pin_project! {
    /// Future of [`Rescue`].
    #[allow(missing_docs)] // pin-project-lite allows no docs on variant fields
    #[project = RescueProj]
    pub enum RescueFuture<F> {
        /// Waiting for the inner service.
        Pending {
            #[pin]
            inner: F,
            route: Arc<str>,
            grpc: bool,
        },
        /// The inner service was not ready; this is the answer.
        Failed {
            response: Option<Response<ProxyBody>>,
        },
    }
}

impl<F, E, B> Future for RescueFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RescueProj::Pending { inner, route, grpc } => {
                Poll::Ready(Ok(match ready!(inner.poll(cx)) {
                    Ok(res) => res.map(boxed),
                    Err(err) => rescue_as(route, err.into(), *grpc),
                }))
            }
            RescueProj::Failed { response } => Poll::Ready(Ok(response
                .take()
                .expect("RescueFuture polled after completion"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{StatusCode, header};
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn rescue_hides_the_cause() {
        let cause = std::io::Error::other("connect to 10.1.2.3:9000 refused");
        let res = rescue("r", Box::new(cause));
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert!(res.headers().get(header::RETRY_AFTER).is_none());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(!text.contains("10.1.2.3"), "{text}");
        assert!(text.contains("upstream_unavailable"), "{text}");
    }

    #[tokio::test]
    async fn a_body_cut_at_its_limit_is_413_however_deep() {
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"xx"));
        let limit = http_body_util::Limited::new(body, 1)
            .collect()
            .await
            .expect_err("over the limit");
        let wrapped = Rejection::new(Reason::UpstreamUnavailable).with_cause(limit);
        let res = rescue("r", Box::new(wrapped));
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn timeout_is_504() {
        let res = rescue("r", Box::new(tower::timeout::error::Elapsed::new()));
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
