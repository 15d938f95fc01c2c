//! [`Forward`]: sends a request to the route's upstream over a pooled keep-alive
//! connection and streams both bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

use super::connector::Connector;
use super::headers;
use super::pool::{Conn, Pool, Pooled};
use super::read_timeout::ReadTimeout;
use super::retry::{self, Reclaim};
use crate::body::{BodyProgress, BoxError, Counted, boxed};
use crate::conn::ClientAddr;
use crate::error::Side;
use crate::error::{NotSent, Reason, Rejection};

/// Idle upstream connections kept per route; a bound on the pool's memory and on
/// the file descriptors it holds.
const POOL_MAX_IDLE: usize = 1024;

/// Requests hyper gives back unsent (their connection closed as it was
/// checked out) tried on the next connection, at most.
const UNSENT_ATTEMPTS: usize = 3;

/// Where and how a route forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSettings {
    /// The upstream's scheme.
    pub scheme: Scheme,
    /// The upstream's host and port.
    pub authority: Authority,
    /// Longest wait for a new upstream connection.
    pub connect_timeout: Duration,
    /// Idle upstream connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Longest pause between two reads of an upstream response body.
    pub read_timeout: Duration,
}

/// Builds the connection pool for one route.
fn pool(settings: &ForwardSettings) -> Pool {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let target = Uri::builder()
        .scheme(settings.scheme.clone())
        .authority(settings.authority.clone())
        .path_and_query("/")
        .build()
        .expect("a scheme and an authority make a URI");
    // Shorter than the application server's own idle timeout, so that the
    // proxy, not the server, closes an idle connection.
    Pool::new(
        Connector::new(http),
        target,
        settings.pool_idle_timeout,
        POOL_MAX_IDLE,
    )
}

/// The innermost service of a route: rewrites the request for the upstream, sends
/// it, and rewrites the response for the client.
///
/// Errors are [`Rejection`]s: `upstream_unavailable` (502) when the upstream
/// cannot be reached or breaks the connection, `body_too_large` (413) when the
/// request body passed the route's limit while it streamed.
#[derive(Clone)]
pub struct Forward {
    // One Arc: the stack is cloned for every request.
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    read_timeout: Duration,
    authority: Authority,
    /// The `Host` sent when the request has none (HTTP/2 clients send
    /// `:authority`, which is not forwarded): the upstream's, as hyper-util's
    /// client sets it.
    host: HeaderValue,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("upstream", &self.inner.authority)
            .finish_non_exhaustive()
    }
}

impl Forward {
    /// A forwarder to the upstream `settings` name.
    pub fn new(settings: &ForwardSettings) -> Self {
        let authority = &settings.authority;
        let default_port = match settings.scheme.as_str() {
            "https" => 443,
            _ => 80,
        };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => authority.as_str(),
            _ => authority.host(),
        };
        Self {
            inner: Arc::new(Inner {
                pool: pool(settings),
                read_timeout: settings.read_timeout,
                authority: authority.clone(),
                host: HeaderValue::from_str(host).expect("an authority is a valid Host"),
            }),
        }
    }
}

/// The request target as an HTTP/1.1 origin server takes it: path and query
/// (an HTTP/2 request, or an absolute-form one, carries scheme and authority).
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path)
}

/// Why a request got no response.
enum SendError {
    /// No connection to send it on, or every one tried gave it back unsent.
    Connect(BoxError),
    /// The connection failed it.
    Failed(hyper::Error, Arc<super::connector::Exchanges>),
}

impl Inner {
    /// Sends `request` on a pooled connection; a request hyper gives back
    /// unsent (its connection closed as it was checked out) goes on the next.
    async fn send(
        &self,
        mut request: Request<Reclaim>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        let mut attempt = 1;
        loop {
            let mut conn = self.pool.checkout().await.map_err(SendError::Connect)?;
            match conn.tx.try_send_request(request).await {
                Ok(res) => return Ok((res, conn)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if attempt < UNSENT_ATTEMPTS => request = unsent,
                    Some(_) => return Err(SendError::Connect(e.into_error().into())),
                    None => return Err(SendError::Failed(e.into_error(), conn.exchanges)),
                },
            }
            attempt += 1;
        }
    }

    /// Sends `request` on a new connection.
    async fn send_fresh(
        &self,
        request: Request<Reclaim>,
    ) -> Result<(Response<Incoming>, Conn), BoxError> {
        let mut conn = self.pool.connect().await?;
        let res = conn.tx.send_request(request).await?;
        Ok((res, conn))
    }
}

impl<B> Service<Request<B>> for Forward
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ReadTimeout<Pooled>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The pool opens connections on demand; readiness is admission's job.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let client = parts.extensions.get::<ClientAddr>();
        headers::prepare_request(&mut parts.headers, parts.version, &parts.uri, client);
        parts.uri = origin_form(std::mem::take(&mut parts.uri));
        if !parts.headers.contains_key(HOST) {
            parts.headers.insert(HOST, self.inner.host.clone());
        }
        parts.version = Version::HTTP_11;
        // Kept to send the request again if it loses the race with the
        // upstream closing an idle connection (see `retry`).
        let again = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        );
        // Told the bytes as they go, when admission re-weighs this body.
        let body = match parts.extensions.get::<BodyProgress>() {
            Some(progress) => boxed(Counted::new(body, progress.clone())),
            None => boxed(body),
        };
        let (body, reclaim) = Reclaim::new(body);
        let request = Request::from_parts(parts, body);
        let inner = self.inner.clone();
        Box::pin(async move {
            let (mut res, conn) = match inner.send(request).await {
                Ok(sent) => sent,
                Err(SendError::Failed(err, exchanges))
                    if retry::lost_the_idle_race(&err, &exchanges) =>
                {
                    let body = match reclaim {
                        None => Reclaim::empty(),
                        // Gone when too much was sent, or the body failed.
                        Some(back) => Reclaim::replay(back.await.map_err(|_| classify(err))?),
                    };
                    tracing::debug!(
                        "the upstream closed a reused connection before answering; \
                         sending the request again on a new one"
                    );
                    let (method, uri, headers) = again;
                    let mut request = Request::new(body);
                    *request.method_mut() = method;
                    *request.uri_mut() = uri;
                    *request.headers_mut() = headers;
                    inner.send_fresh(request).await.map_err(classify)?
                }
                Err(SendError::Failed(err, _)) => return Err(classify(err)),
                Err(SendError::Connect(err)) => return Err(classify(NotSent(err))),
            };
            if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                // Upgrade is stripped from requests, so the upstream was never
                // asked to switch; passing a 101 on would turn the client's
                // connection into an opaque tunnel.
                let err = Rejection::new(Reason::UpstreamUnavailable)
                    .with_cause("upstream answered 101 Switching Protocols unasked");
                return Err(err.into());
            }
            let version = res.version();
            headers::prepare_response(res.headers_mut(), version);
            let read_timeout = inner.read_timeout;
            let pool = inner.pool.clone();
            Ok(res.map(|body| {
                ReadTimeout::new(Pooled::new(body, conn, pool), read_timeout, Side::Upstream)
            }))
        })
    }
}

/// Turns a send error into the rejection the client gets. A request body cut
/// off at the route's limit also lands here; the rescue tells it apart (413).
fn classify(err: impl Into<BoxError>) -> BoxError {
    Rejection::new(Reason::UpstreamUnavailable)
        .with_cause(err)
        .into()
}
