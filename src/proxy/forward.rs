//! [`Forward`]: sends a request to the route's upstream over a pooled keep-alive
//! client and streams both bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use super::connector::Connector;
use super::headers;
use super::read_timeout::ReadTimeout;
use super::retry::{self, Reclaim};
use crate::body::{BoxError, boxed};
use crate::conn::ClientAddr;
use crate::error::Side;
use crate::error::{Reason, Rejection};

/// Idle upstream connections kept per route; a bound on the pool's memory and on
/// the file descriptors it holds.
const POOL_MAX_IDLE: usize = 1024;

/// A pooled HTTP/1.1 keep-alive client to one upstream.
pub type UpstreamClient = Client<Connector, Reclaim>;

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

/// Builds the client for one route.
fn client(settings: &ForwardSettings) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        // Shorter than the application server's own idle timeout, so that the
        // proxy, not the server, closes an idle connection.
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .http1_writev(false)
        .build(Connector::new(http))
}

/// The innermost service of a route: rewrites the request for the upstream, sends
/// it, and rewrites the response for the client.
///
/// Errors are [`Rejection`]s: `upstream_unavailable` (502) when the upstream
/// cannot be reached or breaks the connection, `body_too_large` (413) when the
/// request body passed the route's limit while it streamed.
#[derive(Clone)]
pub struct Forward {
    // One Arc: the stack is cloned for every request, and the client alone is
    // several reference counts.
    inner: Arc<Inner>,
}

struct Inner {
    client: UpstreamClient,
    read_timeout: Duration,
    scheme: Scheme,
    authority: Authority,
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
        Self {
            inner: Arc::new(Inner {
                client: client(settings),
                read_timeout: settings.read_timeout,
                scheme: settings.scheme.clone(),
                authority: settings.authority.clone(),
            }),
        }
    }

    fn upstream_uri(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::builder()
            .scheme(self.inner.scheme.clone())
            .authority(self.inner.authority.clone())
            .path_and_query(path)
            .build()
    }
}

impl<B> Service<Request<B>> for Forward
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ReadTimeout<Incoming>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The pool opens connections on demand; readiness is admission's job.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let client = parts
            .extensions
            .get::<ClientAddr>()
            .map(ClientAddr::ip_header);
        headers::prepare_request(&mut parts.headers, parts.version, &parts.uri, client);
        let uri = match self.upstream_uri(&parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                let err = Rejection::new(Reason::UpstreamUnavailable).with_cause(e);
                return Box::pin(std::future::ready(Err(err.into())));
            }
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        // Kept to send the request again if it loses the race with the
        // upstream closing an idle connection (see `retry`).
        let again = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        );
        let (body, reclaim) = Reclaim::new(boxed(body));
        let request = Request::from_parts(parts, body);
        let response = self.inner.client.request(request);
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut res = match response.await {
                Ok(res) => res,
                Err(err) if retry::lost_the_idle_race(&err) => {
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
                    inner.client.request(request).await.map_err(classify)?
                }
                Err(err) => return Err(classify(err)),
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
            Ok(res.map(|body| ReadTimeout::new(body, read_timeout, Side::Upstream)))
        })
    }
}

/// Turns a client error into the rejection the client gets. A request body cut
/// off at the route's limit also lands here; the rescue tells it apart (413).
fn classify(err: hyper_util::client::legacy::Error) -> BoxError {
    Rejection::new(Reason::UpstreamUnavailable)
        .with_cause(err)
        .into()
}
