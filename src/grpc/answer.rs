//! [`GrpcAnswersLayer`]: a gRPC call marked as one, with its deadline; and
//! [`refusal`], the proxy's refusal of it as a gRPC status.

use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Request, Response};
use tower::{Layer, Service};

use super::details;
use super::status::{Code, GRPC_MESSAGE, GRPC_TIMEOUT, encode_message, parse_timeout};
use crate::body::{ProxyBody, full};
use crate::classify::{GRPC_RETRY_PUSHBACK_MS, GRPC_STATUS, is_grpc_content};
use crate::deadline::Deadline;
use crate::error::{AnsweredByProxy, Rejection};
use crate::exchange::GrpcCall;

/// Whether `req` is a gRPC call (`application/grpc`, `application/grpc+proto`,
/// `application/grpc-web`...).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    is_grpc_content(req.headers())
}

/// Layer marking gRPC calls ([`GrpcCall`]) and their deadlines, so that the
/// rescue layer answers their refusals in gRPC (see the module).
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
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if is_grpc(&req) {
            // Marked once: the rescue layer answers a refusal of it in gRPC,
            // the layers below judge its answer by its status.
            req.extensions_mut().insert(GrpcCall);
            if let Some(timeout) = req.headers().get(&GRPC_TIMEOUT).and_then(parse_timeout) {
                let deadline = Deadline(tokio::time::Instant::now() + timeout);
                req.extensions_mut().insert(deadline);
            }
        }
        self.inner.call(req)
    }
}

/// A refusal the proxy made, as a gRPC client understands it: HTTP 200,
/// trailers-only, `grpc-status` for its reason, `grpc-message`, and with a
/// `Retry-After` the same delay as `grpc-retry-pushback-ms` and a
/// `RetryInfo` in `grpc-status-details-bin`. `Retry-After` and the
/// rate limit's fields stay for anyone reading them. Rendered once, from the
/// refusal itself (a circuit's fallback answer is for HTTP clients).
pub fn refusal(rejection: Rejection) -> Response<ProxyBody> {
    let reason = rejection.reason();
    let mut res = Response::new(full(bytes::Bytes::new()));
    let headers = res.headers_mut();
    if let Some(extra) = rejection.headers() {
        headers.extend(extra.clone());
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        GRPC_STATUS.clone(),
        HeaderValue::from_static(Code::of(reason).as_str()),
    );
    let text = format!("sluicegate: {} ({reason})", reason.message());
    if let Ok(v) = HeaderValue::try_from(encode_message(&text)) {
        headers.insert(GRPC_MESSAGE.clone(), v);
    }
    if let Some(secs) = rejection.retry_after() {
        let ms = secs.saturating_mul(1000);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        headers.insert(GRPC_RETRY_PUSHBACK_MS.clone(), HeaderValue::from(ms));
        let code = Code::of(reason) as u8;
        headers.insert(
            details::GRPC_STATUS_DETAILS.clone(),
            details::retry_info(code, &text, std::time::Duration::from_millis(ms)),
        );
    }
    // An empty body ends the stream with the headers: trailers-only.
    res.extensions_mut().insert(AnsweredByProxy(reason));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::BoxError;
    use crate::error::Reason;
    use crate::respond::RescueLayer;
    use http::StatusCode;
    use tower::ServiceExt;

    /// A call with `content_type` through the gRPC layer and the rescue
    /// layer, over a service that answers `outcome`.
    async fn call(
        content_type: &str,
        outcome: Result<Response<ProxyBody>, Rejection>,
    ) -> Response<ProxyBody> {
        let mut outcome = Some(outcome);
        let inner = tower::service_fn(move |_req: Request<()>| {
            let outcome = outcome.take().unwrap().map_err(BoxError::from);
            std::future::ready(outcome)
        });
        let svc = GrpcAnswersLayer.layer(RescueLayer::new("r").layer(inner));
        let req = Request::post("/pkg.Svc/Method")
            .header("content-type", content_type)
            .body(())
            .unwrap();
        svc.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn a_refused_grpc_call_gets_a_grpc_status_and_pushback() {
        let refusal = Rejection::new(Reason::QueueFull).with_retry_after(3);
        let res = call("application/grpc+proto", Err(refusal)).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "8");
        assert_eq!(res.headers()["grpc-retry-pushback-ms"], "3000");
        assert_eq!(res.headers()["retry-after"], "3");
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
        // Not gRPC: the JSON refusal.
        let res = call("application/json", Err(Rejection::new(Reason::CircuitOpen))).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()["content-type"], "application/json");
        // The upstream's own answer to a gRPC call: its business.
        let upstream = Response::builder()
            .status(StatusCode::OK)
            .header("grpc-status", "3")
            .body(full(bytes::Bytes::new()))
            .unwrap();
        let res = call("application/grpc", Ok(upstream)).await;
        assert_eq!(res.headers()["grpc-status"], "3");
        assert!(res.headers().get("grpc-retry-pushback-ms").is_none());
    }
}
