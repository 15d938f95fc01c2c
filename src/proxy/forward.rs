//! [`Forward`]: sends a request to the route's upstream over a pooled keep-alive
//! connection and streams both bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HOST, TE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

use super::connector::Connector;
use super::h2::{H2Pool, NoStream, Stream};
use super::headers;
use super::pool::{Conn, Pool, Pooled};
use super::read_timeout::ReadTimeout;
use super::retry::{self, Reclaim};
use super::upstream::{UpstreamClientTls, UpstreamProtocol};
use crate::body::{BoxError, boxed};
use crate::conn::ClientAddr;
use crate::dispatch::Dispatch;
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
    /// HTTP/1.1 or HTTP/2.
    pub protocol: UpstreamProtocol,
    /// The client TLS, for an `https://` upstream.
    pub tls: Option<UpstreamClientTls>,
}

/// The connections of one route, by protocol.
enum Upstream {
    Http1(Pool),
    Http2(H2Pool),
}

/// Builds the connection pool for one route.
fn pool(settings: &ForwardSettings) -> Upstream {
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
    let connector = match &settings.tls {
        Some(tls) => Connector::with_tls(http, tls, settings.connect_timeout),
        None => Connector::new(http),
    };
    match settings.protocol {
        // Shorter than the application server's own idle timeout, so that
        // the proxy, not the server, closes an idle connection.
        UpstreamProtocol::Http1 => Upstream::Http1(Pool::new(
            connector,
            target,
            settings.pool_idle_timeout,
            POOL_MAX_IDLE,
        )),
        UpstreamProtocol::Http2 => Upstream::Http2(H2Pool::new(connector, target)),
    }
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
    upstream: Upstream,
    scheme: Scheme,
    read_timeout: Duration,
    /// Also the longest wait for an HTTP/2 stream under the upstream's
    /// stream limit (a way to the upstream, as a connection is).
    connect_timeout: Duration,
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
                upstream: pool(settings),
                scheme: settings.scheme.clone(),
                read_timeout: settings.read_timeout,
                connect_timeout: settings.connect_timeout,
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

/// Sends `request` on a pooled connection; a request hyper gives back
/// unsent (its connection closed as it was checked out) goes on the next.
async fn send(
    pool: &Pool,
    mut request: Request<Reclaim>,
) -> Result<(Response<Incoming>, Conn), SendError> {
    let mut attempt = 1;
    loop {
        let mut conn = pool.checkout().await.map_err(SendError::Connect)?;
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
    pool: &Pool,
    request: Request<Reclaim>,
) -> Result<(Response<Incoming>, Conn), BoxError> {
    let mut conn = pool.connect().await?;
    let res = conn.tx.send_request(request).await?;
    Ok((res, conn))
}

impl<B> Service<Request<B>> for Forward
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ReadTimeout<Pooled>>;
    type Error = BoxError;
    type Future = ForwardFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The pool opens connections on demand; readiness is admission's job.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let client = parts.extensions.get::<ClientAddr>();
        // gRPC needs `te: trailers` end to end; it is hop-by-hop otherwise
        // (looked up only where it can travel).
        let h2 = matches!(self.inner.upstream, Upstream::Http2(_));
        let te_trailers = h2 && parts.headers.get(TE).is_some_and(|v| v == "trailers");
        headers::prepare_request(&mut parts.headers, parts.version, &parts.uri, client);
        let body = boxed(body);
        match &self.inner.upstream {
            Upstream::Http1(pool) => self.call_http1(pool.clone(), parts, body),
            Upstream::Http2(pool) => {
                if te_trailers {
                    parts
                        .headers
                        .insert(TE, HeaderValue::from_static("trailers"));
                }
                self.call_http2(pool.clone(), parts, body)
            }
        }
    }
}

impl Forward {
    fn call_http1(
        &self,
        pool: Pool,
        mut parts: http::request::Parts,
        body: crate::body::ProxyBody,
    ) -> ForwardFuture {
        parts.uri = origin_form(std::mem::take(&mut parts.uri));
        if !parts.headers.contains_key(HOST) {
            parts.headers.insert(HOST, self.inner.host.clone());
        }
        parts.version = Version::HTTP_11;
        // Kept to send the request again if it loses the race with the
        // upstream closing an idle connection, when it may run twice (see
        // `retry`).
        let again = retry::may_run_twice(&parts.method, &parts.headers).then(|| Again::of(&parts));
        let (body, reclaim) = match again {
            Some(_) => Reclaim::new(body),
            None => (Reclaim::sent(body), None),
        };
        let request = Request::from_parts(parts, body);
        let read_timeout = self.inner.read_timeout;
        Box::pin(async move {
            let (res, conn) = match send(&pool, request).await {
                Ok(sent) => sent,
                Err(SendError::Failed(err, exchanges))
                    if again.is_some() && retry::lost_the_idle_race(&err, &exchanges) =>
                {
                    let request = again
                        .expect("checked")
                        .with(reclaim)
                        .await
                        .ok_or_else(|| classify(err))?;
                    tracing::debug!(
                        "the upstream closed a reused connection before answering; \
                         sending the request again on a new one"
                    );
                    send_fresh(&pool, request).await.map_err(classify)?
                }
                Err(SendError::Failed(err, _)) => return Err(classify(err)),
                Err(SendError::Connect(err)) => return Err(classify(NotSent(err))),
            };
            let (head, body) = res.into_parts();
            answer(head, Pooled::new(body, conn, pool), read_timeout)
        })
    }

    fn call_http2(
        &self,
        pool: H2Pool,
        mut parts: http::request::Parts,
        body: crate::body::ProxyBody,
    ) -> ForwardFuture {
        // The name the client asked for travels as `:authority`, as Host does
        // over HTTP/1.1.
        let authority = parts
            .headers
            .remove(HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| self.inner.authority.clone());
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from_parts({
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(self.inner.scheme.clone());
            uri.authority = Some(authority);
            uri.path_and_query = Some(path);
            uri
        })
        .expect("a scheme, an authority and a path make a URI");
        parts.version = Version::HTTP_2;
        let dispatch = parts.extensions.remove::<Dispatch>();
        // Kept to send the request again if the upstream says it did not
        // process it (see `retry`).
        let again = Again::of(&parts);
        let (body, reclaim) = Reclaim::new(body);
        let request = Request::from_parts(parts, body);
        let read_timeout = self.inner.read_timeout;
        let until = tokio::time::Instant::now() + self.inner.connect_timeout;
        Box::pin(async move {
            let stream = pool.stream(until).await.map_err(no_stream)?;
            if let Some(dispatch) = dispatch {
                // On its way: the response deadline starts now.
                dispatch.sent();
            }
            let err = match send_h2(&stream, request).await? {
                Ok(res) => return answer_h2(res, stream, read_timeout),
                Err(err) => err,
            };
            let Some(unprocessed) = retry::unprocessed(&err) else {
                return Err(classify(err));
            };
            if unprocessed == retry::Unprocessed::GoingAway {
                stream.going_away();
            }
            // Never processed: not the upstream's failure, whatever comes.
            let refused = || {
                Rejection::new(Reason::QueueTimeout)
                    .with_retry_after(1)
                    .with_cause(NotSent(err.to_string().into()))
            };
            let Some(request) = again.with(reclaim).await else {
                return Err(refused().into());
            };
            tracing::debug!(
                ?unprocessed,
                "the upstream did not process an HTTP/2 stream; sending it again"
            );
            // The refused stream's place goes back before another is asked
            // for: on a full pool it may be the one to have.
            let avoid = stream.connection();
            drop(stream);
            let retry = pool
                .stream_avoiding(until, Some(&avoid))
                .await
                .map_err(no_stream)?;
            match send_h2(&retry, request).await? {
                Ok(res) => answer_h2(res, retry, read_timeout),
                Err(e) if retry::unprocessed(&e).is_some() => Err(refused().into()),
                Err(e) => Err(classify(e)),
            }
        })
    }
}

/// What sending a request again needs besides its body.
struct Again {
    method: http::Method,
    uri: Uri,
    headers: http::HeaderMap,
}

impl Again {
    fn of(parts: &http::request::Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        }
    }

    /// The request again, with its body handed back by the failed attempt;
    /// `None` when the body cannot be sent again (too much of it was sent,
    /// or it failed).
    async fn with(
        self,
        reclaim: Option<tokio::sync::oneshot::Receiver<retry::Replay>>,
    ) -> Option<Request<Reclaim>> {
        let body = match reclaim {
            None => Reclaim::empty(),
            Some(back) => Reclaim::replay(back.await.ok()?),
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        Some(request)
    }
}

/// Sends `request` on `stream`'s connection: a connection that is gone
/// before the request could start is [`NotSent`] (as the answer says), a
/// failure after that is given back to look at.
async fn send_h2(
    stream: &Stream,
    request: Request<Reclaim>,
) -> Result<Result<Response<Incoming>, hyper::Error>, BoxError> {
    let mut tx = stream.sender();
    tx.ready().await.map_err(|e| classify(NotSent(e.into())))?;
    Ok(tx.send_request(request).await)
}

fn answer_h2(
    res: Response<Incoming>,
    stream: Stream,
    read_timeout: Duration,
) -> Result<Response<ReadTimeout<Pooled>>, BoxError> {
    let (head, body) = res.into_parts();
    answer(head, Pooled::multiplexed(body, stream), read_timeout)
}

/// No stream to be had: the upstream's own limit, every connection full, is
/// saturation, not failure (503, like a full queue).
fn no_stream(e: BoxError) -> BoxError {
    match e.is::<NoStream>() {
        true => Rejection::new(Reason::QueueTimeout)
            .with_retry_after(1)
            .with_cause(NotSent(e))
            .into(),
        false => classify(NotSent(e)),
    }
}

type ForwardFuture =
    Pin<Box<dyn Future<Output = Result<Response<ReadTimeout<Pooled>>, BoxError>> + Send>>;

/// The upstream's response, checked and rewritten for the client, its body
/// bounded by `read_timeout` between reads.
fn answer(
    mut head: http::response::Parts,
    body: Pooled,
    read_timeout: Duration,
) -> Result<Response<ReadTimeout<Pooled>>, BoxError> {
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        // Upgrade is stripped from requests, so the upstream was never
        // asked to switch; passing a 101 on would turn the client's
        // connection into an opaque tunnel.
        let err = Rejection::new(Reason::UpstreamUnavailable)
            .with_cause("upstream answered 101 Switching Protocols unasked");
        return Err(err.into());
    }
    headers::prepare_response(&mut head.headers, head.version);
    Ok(Response::from_parts(
        head,
        ReadTimeout::new(body, read_timeout, Side::Upstream),
    ))
}

/// Turns a send error into the rejection the client gets. A request body cut
/// off at the route's limit also lands here; the rescue tells it apart (413).
fn classify(err: impl Into<BoxError>) -> BoxError {
    Rejection::new(Reason::UpstreamUnavailable)
        .with_cause(err)
        .into()
}
