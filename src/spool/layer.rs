//! [`SpoolLayer`]: in the request path between the rate limit and the
//! circuit breaker, so that it sees the circuit's, admission's and the
//! forwarder's refusals and none of the client's own (README "Store and
//! forward").
//!
//! An eligible request's body is not buffered: it waits in a slot until the
//! stack below first reads it. A refusal that came before any read (an open
//! circuit, a full queue, an upstream that could not be reached) finds the
//! body still there, reads it whole and spools it; a request whose body was
//! read has reached the upstream and keeps its refusal.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::Spool;
use super::intake::{self, NotTaken};
use super::record::StoredHead;
use super::store::now_ms;
use crate::body::{BoxError, BoxFuture, ProxyBody, full};
use crate::conn::ClientAddr;
use crate::error::{Reason, Rejection};
use crate::exchange::SpoolReceipt;

/// Layer of [`Spooling`]; a pass-through without a spool.
#[derive(Debug, Clone)]
pub struct SpoolLayer {
    spool: Option<Arc<Spool>>,
    deliverable: Option<u64>,
}

impl SpoolLayer {
    /// Spools into `spool`.
    pub fn new(spool: Arc<Spool>) -> Self {
        Self::optional(Some(spool))
    }

    /// Spools into `spool` when there is one; passes requests on otherwise.
    pub fn optional(spool: Option<Arc<Spool>>) -> Self {
        Self {
            spool,
            deliverable: None,
        }
    }

    /// Bodies heavier than `bytes` can never be delivered (the route's
    /// `max_inflight_bytes`: admission would never take them): they get
    /// `413` instead of a `202` for a request that would only block replay.
    pub fn deliverable_up_to(mut self, bytes: Option<u64>) -> Self {
        self.deliverable = bytes;
        self
    }
}

impl<S> Layer<S> for SpoolLayer {
    type Service = Spooling<S>;
    fn layer(&self, inner: S) -> Spooling<S> {
        Spooling {
            inner,
            spool: self.spool.clone(),
            deliverable: self.deliverable,
        }
    }
}

/// Service of [`SpoolLayer`].
#[derive(Debug, Clone)]
pub struct Spooling<S> {
    inner: S,
    spool: Option<Arc<Spool>>,
    deliverable: Option<u64>,
}

/// What a spooled request keeps of its head (the stack below takes the
/// request itself).
struct Head {
    method: Method,
    uri: String,
    headers: HeaderMap,
    client: Option<String>,
    tls: bool,
    /// The heaviest body that could ever be delivered.
    deliverable: Option<u64>,
}

type Slot<B> = Arc<Mutex<Option<B>>>;

fn take<B>(slot: &Slot<B>) -> Option<B> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

impl<S, B, ResB> Service<Request<B>> for Spooling<S>
where
    S: Service<Request<SpoolBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Either<ResB, ProxyBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let spool = match &self.spool {
            // A gRPC call needs its response message, which a 202 cannot
            // carry: it keeps its refusal (as a gRPC status).
            Some(spool)
                if spool.takes(req.method())
                    && !crate::classify::is_grpc_content(req.headers()) =>
            {
                spool.clone()
            }
            _ => {
                return ResponseFuture::Plain {
                    inner: self.inner.call(req.map(|body| SpoolBody::Live { body })),
                };
            }
        };
        let (parts, body) = req.into_parts();
        let head = Head {
            method: parts.method.clone(),
            uri: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            headers: parts.headers.clone(),
            client: parts
                .extensions
                .get::<ClientAddr>()
                .map(|c| c.addr().ip().to_string()),
            tls: parts
                .extensions
                .get::<ClientAddr>()
                .is_some_and(ClientAddr::is_tls),
            deliverable: self.deliverable,
        };
        let slot: Slot<B> = Arc::new(Mutex::new(Some(body)));
        let body = SpoolBody::Waiting {
            slot: slot.clone(),
            body: None,
        };
        ResponseFuture::Watching {
            inner: self.inner.call(Request::from_parts(parts, body)),
            rescue: Some((spool, slot, head)),
        }
    }
}

pin_project! {
    /// Future of [`Spooling`].
    #[allow(missing_docs)] // pin-project-lite allows no docs on variant fields
    #[project = ResponseProj]
    pub enum ResponseFuture<F, B> {
        /// Not spoolable: the inner answer as it is.
        Plain {
            #[pin]
            inner: F,
        },
        /// Spoolable if refused before its body was read.
        Watching {
            #[pin]
            inner: F,
            rescue: Option<(Arc<Spool>, Slot<B>, Head)>,
        },
        /// Refused: being read and written to the spool.
        Storing {
            future: BoxFuture<Response<ProxyBody>>,
        },
    }
}

impl<F, B, ResB, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Either<ResB, ProxyBody>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let err = match self.as_mut().project() {
                ResponseProj::Plain { inner } => {
                    let res = ready!(inner.poll(cx)).map_err(Into::into)?;
                    return Poll::Ready(Ok(res.map(Either::Left)));
                }
                ResponseProj::Watching { inner, rescue } => match ready!(inner.poll(cx)) {
                    Ok(res) => return Poll::Ready(Ok(res.map(Either::Left))),
                    Err(err) => {
                        let err = err.into();
                        let (spool, slot, head) = rescue.take().expect("polled after completion");
                        if !spool.takes_over(&err) {
                            return Poll::Ready(Err(err));
                        }
                        (spool, slot, head, err)
                    }
                },
                ResponseProj::Storing { future } => {
                    let res = ready!(future.as_mut().poll(cx))?;
                    return Poll::Ready(Ok(res.map(Either::Right)));
                }
            };
            // Drops the stack's future, and with it the request.
            let (spool, slot, head, refusal) = err;
            self.set(ResponseFuture::Storing {
                future: Box::pin(store(spool, slot, head, refusal)),
            });
        }
    }
}

/// Reads the refused request's body and spools the request; the refusal
/// stands when the body was read already or the spool cannot keep it.
async fn store<B>(
    spool: Arc<Spool>,
    slot: Slot<B>,
    head: Head,
    refusal: BoxError,
) -> Result<Response<ProxyBody>, BoxError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let Some(body) = take(&slot) else {
        return Err(refusal);
    };
    let store = spool.store();
    let id = store.new_id();
    let mut headers = head.headers;
    // The body will be whole: a replay has nothing to wait for.
    headers.remove(http::header::EXPECT);
    let key = &spool.settings().idempotency_header;
    if !headers.contains_key(key) {
        headers.insert(
            key.clone(),
            HeaderValue::from_str(&id).expect("ids are hex"),
        );
    }
    let stored = StoredHead {
        id: id.clone(),
        created_ms: now_ms(),
        client: head.client,
        tls: head.tls,
        method: head.method,
        uri: head.uri,
        headers,
    };
    match intake::take_in(&spool, stored, body, head.deliverable).await {
        Ok(()) => Ok(accepted(id)),
        // A body over the route's limit, stalled or cut short is the
        // client's answer (413, 408, 400), as without a spool.
        Err(NotTaken::Client(e)) => Err(e),
        // Admission would refuse it as it refuses a live one: spooling it
        // would only park it at the head of the spool.
        Err(NotTaken::Undeliverable) => Err(Rejection::new(Reason::BodyTooLarge)
            .with_cause("the request body outweighs max_inflight_bytes: never deliverable")
            .into()),
        Err(NotTaken::CannotKeep(e)) => {
            tracing::warn!(route = spool.route(), error = %e, "cannot spool; the refusal stands");
            Err(refusal)
        }
        Err(NotTaken::Busy) => {
            tracing::warn!(
                route = spool.route(),
                "too many requests being spooled at once; the refusal stands"
            );
            Err(refusal)
        }
    }
}

/// `202 Accepted`: on disk, to be delivered.
fn accepted(id: String) -> Response<ProxyBody> {
    let value = HeaderValue::from_str(&id).expect("ids are hex");
    let mut res = Response::new(full(format!(r#"{{"status":"spooled","id":"{id}"}}"#)));
    *res.status_mut() = StatusCode::ACCEPTED;
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-sluicegate-spooled", value);
    res.extensions_mut().insert(SpoolReceipt(id.into()));
    res
}

pin_project! {
    /// The request body the stack below a [`SpoolLayer`] reads: the client's
    /// as it is, or one that stays in its slot, spoolable, until first read.
    #[allow(missing_docs)] // pin-project-lite allows no docs on variant fields
    #[project = SpoolBodyProj]
    pub enum SpoolBody<B> {
        /// Not spoolable.
        Live {
            #[pin]
            body: B,
        },
        /// Taken from `slot` at the first read.
        Waiting {
            slot: Slot<B>,
            #[pin]
            body: Option<B>,
        },
    }
}

impl<B: Body> SpoolBody<B> {
    /// `f` of the body, wherever it is now (`gone` once the spool took it).
    fn with_body<T>(&self, f: impl FnOnce(&B) -> T, gone: impl FnOnce() -> T) -> T {
        match self {
            SpoolBody::Live { body }
            | SpoolBody::Waiting {
                body: Some(body), ..
            } => f(body),
            SpoolBody::Waiting { slot, body: None } => {
                match slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    Some(body) => f(body),
                    None => gone(),
                }
            }
        }
    }
}

impl<B> Body for SpoolBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            SpoolBodyProj::Live { body } => body.poll_frame(cx).map_err(Into::into),
            SpoolBodyProj::Waiting { slot, mut body } => {
                if body.is_none() {
                    body.set(take(slot));
                }
                match body.as_pin_mut() {
                    Some(body) => body.poll_frame(cx).map_err(Into::into),
                    // Only the spool takes it, after the stack let go.
                    None => Poll::Ready(Some(Err("request body already taken".into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.with_body(B::is_end_stream, || true)
    }

    fn size_hint(&self) -> SizeHint {
        self.with_body(B::size_hint, || SizeHint::with_exact(0))
    }
}
