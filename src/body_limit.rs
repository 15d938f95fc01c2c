//! Request body size limit: 413 for a declared `Content-Length` over the limit,
//! before anything is sent upstream; a streamed body is cut off as soon as it
//! passes the limit (the body then fails with [`LengthLimitError`](crate::error::LengthLimitError), which the
//! forwarder turns into 413).
//!
//! Unlike `tower_http::limit`, the refusal is a [`Rejection`] so that it gets the
//! proxy's JSON body and is counted like every other rejection.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, header};
use http_body_util::Limited;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::BoxError;
use crate::error::{Reason, Rejection};

/// Limits request bodies to `max` bytes.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    max: u64,
}

impl BodyLimitLayer {
    /// Bodies over `max` bytes are refused.
    pub const fn new(max: u64) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;
    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

/// Service of [`BodyLimitLayer`].
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: u64,
}

impl<S, B> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<Limited<B>>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BodyLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if declared_length(&req).is_some_and(|len| len > self.max) {
            return BodyLimitFuture::TooLarge {
                rejection: Some(Rejection::new(Reason::BodyTooLarge)),
            };
        }
        // usize::MAX on 32-bit targets is the most a body can be there anyway.
        let max = usize::try_from(self.max).unwrap_or(usize::MAX);
        let req = req.map(|body| Limited::new(body, max));
        BodyLimitFuture::Inner {
            inner: self.inner.call(req),
        }
    }
}

/// The `Content-Length` of a request, if it has one valid value.
fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pin_project! {
    /// Future of [`BodyLimit`].
    #[allow(missing_docs)] // pin-project-lite allows no docs on variant fields
    #[project = BodyLimitProj]
    pub enum BodyLimitFuture<F> {
        /// The body is within the limit so far; the inner service answers.
        Inner {
            #[pin]
            inner: F,
        },
        /// The declared length is over the limit.
        TooLarge {
            rejection: Option<Rejection>,
        },
    }
}

impl<F, T, E> Future for BodyLimitFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BodyLimitProj::Inner { inner } => inner.poll(cx).map_err(Into::into),
            // Taken once: a completed future is not polled again.
            BodyLimitProj::TooLarge { rejection } => Poll::Ready(Err(rejection
                .take()
                .expect("BodyLimitFuture polled after completion")
                .into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    async fn read_all(req: Request<Limited<Full<Bytes>>>) -> Result<usize, BoxError> {
        Ok(req.into_body().collect().await?.to_bytes().len())
    }

    fn service() -> impl Service<Request<Full<Bytes>>, Response = usize, Error = BoxError> {
        BodyLimitLayer::new(10).layer(tower::service_fn(read_all))
    }

    #[tokio::test]
    async fn declared_length_over_limit_is_refused_before_the_inner_service() {
        let req = Request::builder()
            .header(header::CONTENT_LENGTH, "11")
            .body(Full::new(Bytes::from_static(b"01234567890")))
            .unwrap();
        let err = service().oneshot(req).await.unwrap_err();
        let rejection = err.downcast_ref::<Rejection>().expect("a rejection");
        assert_eq!(rejection.reason(), Reason::BodyTooLarge);
    }

    #[tokio::test]
    async fn undeclared_body_is_cut_at_the_limit() {
        let req = Request::new(Full::new(Bytes::from_static(b"01234567890")));
        let err = service().oneshot(req).await.unwrap_err();
        assert!(crate::body::find_cause::<crate::error::LengthLimitError>(err.as_ref()).is_some());
    }

    #[tokio::test]
    async fn body_at_the_limit_passes() {
        let req = Request::new(Full::new(Bytes::from_static(b"0123456789")));
        assert_eq!(service().oneshot(req).await.unwrap(), 10);
    }
}
