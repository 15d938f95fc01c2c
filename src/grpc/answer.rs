//! [`GrpcAnswersLayer`]: the proxy's refusals of gRPC calls as gRPC statuses.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::details;
use super::status::{Code, GRPC_MESSAGE, GRPC_TIMEOUT, encode_message, parse_timeout};
use crate::body::{ProxyBody, full};
use crate::classify::{GRPC_RETRY_PUSHBACK_MS, GRPC_STATUS, is_grpc_content};
use crate::deadline::Deadline;
use crate::error::AnsweredByProxy;
use crate::exchange::GrpcCall;

/// Whether `req` is a gRPC call (`application/grpc`, `application/grpc+proto`,
/// `application/grpc-web`...).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    is_grpc_content(req.headers())
}

/// Layer rewriting the proxy's own answers to gRPC calls (see the module).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcAnswersLayer;

impl<S> Layer<S> for GrpcAnswersLayer {
    type Service = GrpcAnswers<S>;
    fn layer(&self, inner: S) -> GrpcAnswers<S> {
        GrpcAnswers { inner }
    }
}

/// Service of [`GrpcAnswersLayer`].
#[derive(Debug, Clone)]
pub struct GrpcAnswers<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for GrpcAnswers<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = GrpcAnswersFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let grpc = is_grpc(&req);
        if grpc {
            req.extensions_mut().insert(GrpcCall);
        }
        if grpc && let Some(timeout) = req.headers().get(&GRPC_TIMEOUT).and_then(parse_timeout) {
            let deadline = Deadline(tokio::time::Instant::now() + timeout);
            req.extensions_mut().insert(deadline);
        }
        GrpcAnswersFuture {
            grpc,
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Future of [`GrpcAnswers`].
    pub struct GrpcAnswersFuture<F> {
        #[pin]
        inner: F,
        grpc: bool,
    }
}

impl<F, E> Future for GrpcAnswersFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, E>>,
{
    type Output = Result<Response<ProxyBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(if *this.grpc { as_grpc(res) } else { res }))
    }
}

/// A refusal the proxy made, as a trailers-only gRPC response; the
/// upstream's own answers pass untouched.
fn as_grpc(res: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(&AnsweredByProxy(reason)) = res.extensions().get::<AnsweredByProxy>() else {
        return res;
    };
    let (mut parts, _json) = res.into_parts();
    let pushback_ms = parts
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| s.saturating_mul(1000));
    parts.status = StatusCode::OK;
    let headers = &mut parts.headers;
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        GRPC_STATUS.clone(),
        HeaderValue::from_static(Code::of(reason).as_str()),
    );
    let text = format!("sluicegate: {} ({reason})", reason.message());
    if let Ok(v) = HeaderValue::try_from(encode_message(&text)) {
        headers.insert(GRPC_MESSAGE.clone(), v);
    }
    if let Some(ms) = pushback_ms {
        headers.insert(GRPC_RETRY_PUSHBACK_MS.clone(), HeaderValue::from(ms));
        let code = Code::of(reason) as u8;
        let delay = std::time::Duration::from_millis(ms);
        headers.insert(
            details::GRPC_STATUS_DETAILS.clone(),
            details::retry_info(code, &text, delay),
        );
    }
    // An empty body ends the stream with the headers: trailers-only.
    Response::from_parts(parts, full(bytes::Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Reason, Rejection};
    use tower::ServiceExt;

    /// `answer` as the stack below answered a call with `content_type`.
    async fn call(content_type: &str, answer: Response<ProxyBody>) -> Response<ProxyBody> {
        let mut answer = Some(answer);
        let svc = GrpcAnswersLayer.layer(tower::service_fn(move |_req: Request<()>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(answer.take().unwrap()))
        }));
        let req = Request::post("/pkg.Svc/Method")
            .header("content-type", content_type)
            .body(())
            .unwrap();
        svc.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn a_refused_grpc_call_gets_a_grpc_status_and_pushback() {
        let refusal = Rejection::new(Reason::QueueFull)
            .with_retry_after(3)
            .into_response();
        let res = call("application/grpc+proto", refusal).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "8");
        assert_eq!(res.headers()["grpc-retry-pushback-ms"], "3000");
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert!(
            res.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("queue_full")
        );
        assert!(res.headers().get("content-length").is_none());
        // Observe still sees what the proxy did.
        assert_eq!(
            res.extensions().get::<AnsweredByProxy>(),
            Some(&AnsweredByProxy(Reason::QueueFull))
        );
    }

    #[tokio::test]
    async fn other_answers_pass_untouched() {
        // Not gRPC: the JSON refusal stays.
        let refusal = Rejection::new(Reason::CircuitOpen).into_response();
        let res = call("application/json", refusal).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        // The upstream's own answer to a gRPC call: its business.
        let upstream = Response::builder()
            .status(StatusCode::OK)
            .header("grpc-status", "3")
            .body(full(bytes::Bytes::new()))
            .unwrap();
        let res = call("application/grpc", upstream).await;
        assert_eq!(res.headers()["grpc-status"], "3");
        assert!(res.headers().get("grpc-retry-pushback-ms").is_none());
    }
}
