//! The error vocabulary every layer speaks: why the proxy answered a request
//! itself ([`Reason`], [`Rejection`]), and which failures are the client's own
//! doing ([`client_fault`]).
//!
//! A leaf: it knows HTTP and the body types, nothing of the layers, so that each
//! layer can refuse with a [`Rejection`] and the rescue layer
//! (`respond`) can answer every one of them without either importing
//! the other.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
pub use http_body_util::LengthLimitError;

use crate::body::{BoxError, ProxyBody, find_cause, full};

/// Why the proxy answered a request itself. The `as_str` codes are a contract
/// (README "Answers the proxy makes itself") used in bodies and metric labels.
///
/// The design contract's `draining` is not among them: like HAProxy's soft stop and
/// Envoy's drain, a drain closes connections after their current request
/// rather than refusing any (README "Shutdown").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The admission queue is full, or the predicted wait is beyond the timeout.
    QueueFull,
    /// The request waited in the admission queue for too long.
    QueueTimeout,
    /// The circuit breaker is open.
    CircuitOpen,
    /// The client is over its rate limit.
    RateLimited,
    /// The request body is larger than the route's `max_body_bytes`.
    BodyTooLarge,
    /// The upstream did not answer within the route's `timeout_ms`.
    UpstreamTimeout,
    /// The upstream could not be reached or broke the connection.
    UpstreamUnavailable,
    /// No route matches the request.
    NoRoute,
    /// The client paused sending its request body too long.
    RequestTimeout,
    /// The request is malformed: its body's framing, its path, its host.
    BadRequest,
    /// The client went away before its request was whole (nginx's 499).
    ClientClosed,
}

impl Reason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [Reason; 11] = [
        Reason::QueueFull,
        Reason::QueueTimeout,
        Reason::CircuitOpen,
        Reason::RateLimited,
        Reason::BodyTooLarge,
        Reason::UpstreamTimeout,
        Reason::UpstreamUnavailable,
        Reason::NoRoute,
        Reason::RequestTimeout,
        Reason::BadRequest,
        Reason::ClientClosed,
    ];

    /// The reason code, as in bodies and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::CircuitOpen => "circuit_open",
            Reason::RateLimited => "rate_limited",
            Reason::BodyTooLarge => "body_too_large",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::UpstreamUnavailable => "upstream_unavailable",
            Reason::NoRoute => "no_route",
            Reason::RequestTimeout => "request_timeout",
            Reason::BadRequest => "bad_request",
            Reason::ClientClosed => "client_closed",
        }
    }

    /// The status the client gets.
    pub const fn status(self) -> StatusCode {
        match self {
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            // Seldom read by anyone: the client is gone.
            Reason::BadRequest | Reason::ClientClosed => StatusCode::BAD_REQUEST,
            Reason::QueueFull | Reason::QueueTimeout | Reason::CircuitOpen => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A short human text for the body's `error` field.
    pub const fn message(self) -> &'static str {
        match self {
            Reason::QueueFull => "overloaded: admission queue full",
            Reason::QueueTimeout => "overloaded: waited too long in the admission queue",
            Reason::CircuitOpen => "upstream failing: circuit open",
            Reason::RateLimited => "too many requests",
            Reason::BodyTooLarge => "request body too large",
            Reason::UpstreamTimeout => "upstream timed out",
            Reason::UpstreamUnavailable => "upstream unavailable",
            Reason::NoRoute => "no route for this request",
            Reason::RequestTimeout => "request body not received in time",
            Reason::BadRequest => "malformed request",
            Reason::ClientClosed => "client closed the request",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request the proxy refused or could not forward, with an optional cause that
/// is logged but never shown to the client.
#[derive(Debug)]
pub struct Rejection {
    reason: Reason,
    retry_after_s: Option<u64>,
    cause: Option<BoxError>,
    fallback: Option<Arc<StaticAnswer>>,
    headers: Option<Box<http::HeaderMap>>,
}

/// A fixed answer served instead of a rejection (a circuit's `fallback`), for
/// clients that cannot retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticAnswer {
    /// Its status.
    pub status: StatusCode,
    /// Its `Content-Type`.
    pub content_type: HeaderValue,
    /// Its body.
    pub body: bytes::Bytes,
}

/// The output of a layer future's `Refused` state: the refusal it holds, once
/// (the decide-first layers refuse in `call` and answer at the first poll).
pub(crate) fn refused<T>(rejection: &mut Option<Rejection>) -> Result<T, BoxError> {
    Err(rejection.take().expect("polled after completion").into())
}

impl Rejection {
    /// A rejection for `reason`.
    pub const fn new(reason: Reason) -> Self {
        Self {
            reason,
            retry_after_s: None,
            cause: None,
            fallback: None,
            headers: None,
        }
    }

    /// Adds header fields to the response (the rate limit's `RateLimit`).
    pub fn with_headers(mut self, headers: http::HeaderMap) -> Self {
        match &mut self.headers {
            Some(all) => all.extend(headers),
            None => self.headers = Some(Box::new(headers)),
        }
        self
    }

    /// Answers with `answer` instead of the rejection's own response.
    pub fn with_fallback(mut self, answer: Arc<StaticAnswer>) -> Self {
        self.fallback = Some(answer);
        self
    }

    /// Adds a `Retry-After` (whole seconds).
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    /// Adds the underlying error, for the log.
    pub fn with_cause(mut self, cause: impl Into<BoxError>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    /// Why the request was refused.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The `Retry-After` it carries (whole seconds).
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after_s
    }

    /// The underlying error, for the log (never for the client).
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.cause.as_deref()
    }

    /// The header fields it adds to its response (the rate limit's).
    pub fn headers(&self) -> Option<&http::HeaderMap> {
        self.headers.as_deref()
    }

    /// The response an HTTP client gets (a gRPC call's is
    /// `grpc::refusal`'s; [`crate::respond::answer`] picks).
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut res = self.bare_response();
        if let Some(extra) = self.headers {
            res.headers_mut().extend(*extra);
        }
        res
    }

    fn bare_response(&self) -> Response<ProxyBody> {
        if let Some(answer) = &self.fallback {
            let mut res = Response::new(full(answer.body.clone()));
            *res.status_mut() = answer.status;
            let headers = res.headers_mut();
            headers.insert(header::CONTENT_TYPE, answer.content_type.clone());
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(
                http::HeaderName::from_static("x-sluicegate-fallback"),
                HeaderValue::from_static(self.reason.as_str()),
            );
            res.extensions_mut().insert(AnsweredByProxy(self.reason));
            return res;
        }
        let mut body = format!(
            r#"{{"error":"{}","reason":"{}""#,
            self.reason.message(),
            self.reason.as_str()
        );
        if let Some(s) = self.retry_after_s {
            body.push_str(&format!(r#","retry_after_s":{s}"#));
        }
        body.push('}');
        let mut res = Response::new(full(body));
        *res.status_mut() = self.reason.status();
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(s) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res.extensions_mut().insert(AnsweredByProxy(self.reason));
        res
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason.message())
    }
}

impl std::error::Error for Rejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|e| e as _)
    }
}

/// Response extension marking a response the proxy made itself, so that outer
/// layers (metrics, logs) can tell a proxy 502 from an upstream 502.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnsweredByProxy(pub Reason);

/// The client's own doing, found anywhere in an error's chain (the upstream
/// client wraps a failing request body in its own error): a body over its
/// limit, one the client stopped sending, cut short or malformed, or a client
/// gone while its request waited. Not an upstream failure, nor an overload.
pub fn client_fault(err: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    if find_cause::<LengthLimitError>(err).is_some() {
        return Some(Reason::BodyTooLarge);
    }
    if let Some(body) = find_cause::<ClientBodyError>(err) {
        return Some(if body.malformed() {
            Reason::BadRequest
        } else {
            Reason::ClientClosed
        });
    }
    if let Some(rejection) = find_cause::<Rejection>(err)
        && matches!(
            rejection.reason,
            Reason::ClientClosed | Reason::RequestTimeout
        )
    {
        return Some(rejection.reason);
    }
    find_cause::<ReadTimedOut>(err)
        .filter(|t| t.side == Side::Client)
        .map(|_| Reason::RequestTimeout)
}

/// Displays an error and its sources, `a: b: c` (for logs).
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// Nothing of the request reached the upstream: no connection could be
/// opened, or every connection tried gave the request back unsent. Such a
/// request may be spooled without risk of a second delivery.
#[derive(Debug)]
pub struct NotSent(pub BoxError);

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not sent to the upstream")
    }
}

impl std::error::Error for NotSent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// Whose body stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's request body (`[server] body_read_timeout_ms`): 408.
    Client,
    /// The upstream's response body (`read_timeout_ms`): cut off.
    Upstream,
}

/// How a body stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// One wait for its next bytes passed this timeout.
    Pause(Duration),
    /// Its waits added up to more than this rate (bytes per second) allows.
    Rate(u64),
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stall::Pause(after) => write!(f, "no data for {} ms", after.as_millis()),
            Stall::Rate(per_s) => write!(f, "slower than {per_s} bytes/s"),
        }
    }
}

/// A body that stalled past its bound.
#[derive(Debug)]
pub struct ReadTimedOut {
    /// Whose body.
    pub side: Side,
    /// How.
    pub stall: Stall,
}

impl fmt::Display for ReadTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match self.side {
            Side::Client => "client",
            Side::Upstream => "upstream",
        };
        write!(f, "{who} body stalled: {}", self.stall)
    }
}

impl std::error::Error for ReadTimedOut {}

/// A client's request body failed on the client's side: its framing was
/// malformed (a bad chunk size line, extensions over hyper's limit), or the
/// client went away mid-upload (FIN or RST before the body's end). Neither
/// says anything of the upstream.
#[derive(Debug)]
pub struct ClientBodyError {
    malformed: bool,
    cause: BoxError,
}

impl ClientBodyError {
    /// Classifies a failure of the client's body as hyper reports it.
    pub(crate) fn new(cause: BoxError) -> Self {
        // hyper reports framing it cannot parse as InvalidInput/InvalidData,
        // a body that ended early as UnexpectedEof, a reset as ConnectionReset.
        let malformed = find_cause::<std::io::Error>(cause.as_ref()).is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            )
        });
        Self { malformed, cause }
    }

    /// Whether the framing was malformed (else the client went away).
    pub fn malformed(&self) -> bool {
        self.malformed
    }
}

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.malformed {
            f.write_str("malformed request body")
        } else {
            f.write_str("client went away during its request body")
        }
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.cause.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn rejection_body_and_headers() {
        let res = Rejection::new(Reason::QueueFull)
            .with_retry_after(3)
            .into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "3");
        assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(
            res.extensions().get(),
            Some(&AnsweredByProxy(Reason::QueueFull))
        );
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["reason"], "queue_full");
        assert_eq!(json["retry_after_s"], 3);
    }
}
