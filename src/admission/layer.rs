//! [`AdmissionLayer`] and its service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderName, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::tenants::everyone;
use super::{AdmissionSettings, Controller, Permit, Priority, PriorityRule, Tenants};
use crate::body::{BoxError, BoxFuture, GuardedBody};
use crate::classify::{self, Load};
use crate::client_key::{ClientKey, KeyExtractor};
use crate::conn::PeerClosed;
use crate::deadline::Deadline;
use crate::error::{Reason, Rejection, refused};
use crate::exchange::{Granted, GrpcCall, QueueWait, UpstreamLatency};

/// Admission control for any `Service<http::Request<B>>`.
///
/// Refusals are [`Rejection`](crate::error::Rejection) errors (`queue_full`,
/// `queue_timeout`) with a `Retry-After`; put a
/// [`RescueLayer`](crate::respond::RescueLayer) above it to turn them into
/// `503` responses with the JSON body.
///
/// ```
/// use std::time::Duration;
/// use http::{Request, Response, StatusCode};
/// use sluicegate::admission::{AdmissionLayer, AdmissionSettings};
/// use sluicegate::body::{BoxError, full};
/// use sluicegate::respond::RescueLayer;
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let admission = AdmissionLayer::new(AdmissionSettings {
///     max_inflight: 16,
///     queue_capacity: 32,
///     queue_timeout: Duration::from_millis(100),
///     ..AdmissionSettings::DEFAULT
/// });
/// let controller = admission.controller().clone();
/// let app = ServiceBuilder::new()
///     .layer(RescueLayer::new("ingest")) // refusals -> 503 + Retry-After + JSON
///     .layer(admission)
///     .service_fn(|_req: Request<String>| async {
///         Ok::<_, BoxError>(Response::new(full("stored")))
///     });
///
/// let res = app.oneshot(Request::new(String::from("event"))).await.unwrap();
/// assert_eq!(res.status(), StatusCode::OK);
/// drop(res); // the slot is held until the response body is done
/// assert_eq!(controller.snapshot().inflight, 0);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    controller: Arc<Controller>,
    priority: Arc<PriorityRule>,
    tenants: Option<Arc<Tenants>>,
    clients: Option<Arc<KeyExtractor>>,
}

/// The header a request's priority class is read from unless configured.
pub const DEFAULT_PRIORITY_HEADER: HeaderName = HeaderName::from_static("x-priority");

impl AdmissionLayer {
    /// A layer with its own controller; priorities from anyone's `x-priority`
    /// (see [`AdmissionLayer::priority`] to say whom to believe).
    pub fn new(settings: AdmissionSettings) -> Self {
        Self::with_controller(Controller::new(settings))
    }

    /// A layer over an existing controller (shared, or with metrics).
    pub fn with_controller(controller: Arc<Controller>) -> Self {
        Self {
            controller,
            priority: Arc::new(PriorityRule::header(DEFAULT_PRIORITY_HEADER)),
            tenants: None,
            clients: None,
        }
    }

    /// Tells an adaptive limit who sent each request (its address as
    /// `keys` resolves it), so that one client's overload signals cannot
    /// lower everyone's limit. No effect on a static limit.
    pub fn clients(mut self, keys: KeyExtractor) -> Self {
        if self.controller.is_adaptive() {
            self.clients = Some(Arc::new(keys));
        }
        self
    }

    /// Reads the priority class from `header` instead of `x-priority`.
    pub fn priority_header(self, header: HeaderName) -> Self {
        self.priority(PriorityRule::header(header))
    }

    /// Decides each waiting request's class by `rule` (a header believed
    /// only from trusted peers, rate-limit tiers' classes).
    pub fn priority(mut self, rule: PriorityRule) -> Self {
        self.priority = Arc::new(rule);
        self
    }

    /// Gives each request the tenant `keys` finds (an address, an API key):
    /// tenants that wait are served in turn, a full queue refuses from the
    /// tenant with the most waiting, and the controller's
    /// `max_inflight_per_tenant` caps each one's slots.
    pub fn tenants(mut self, keys: KeyExtractor) -> Self {
        self.tenants = Some(Arc::new(Tenants::new(keys, None)));
        self
    }

    /// The same, each client address at most `per_client` tenants at once
    /// (see [`Tenants`]): names a client invents buy it no more turns.
    pub fn tenants_per_client(mut self, keys: KeyExtractor, per_client: usize) -> Self {
        self.tenants = Some(Arc::new(Tenants::new(keys, Some(per_client))));
        self
    }

    /// The controller, for its live state.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            controller: self.controller.clone(),
            priority: self.priority.clone(),
            tenants: self.tenants.clone(),
            clients: self.clients.clone(),
        }
    }
}

/// Waits for a slot in the queue; leaves it when the client goes away.
fn wait(
    controller: Arc<Controller>,
    priority: Priority,
    tenant: ClientKey,
    weight: u64,
    peer: Option<PeerClosed>,
    deadline: Option<Deadline>,
) -> BoxFuture<Permit> {
    Box::pin(async move {
        let acquire = controller.acquire_before(priority, tenant, weight, deadline);
        let Some(peer) = peer else {
            return Ok(acquire.await?);
        };
        tokio::select! {
            biased;
            permit = acquire => Ok(permit?),
            () = peer.closed() => {
                // Dropping the acquire future left the queue.
                Err(Rejection::new(Reason::ClientClosed)
                    .with_cause("client closed its connection while queued")
                    .into())
            }
        }
    })
}

/// Service of [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    controller: Arc<Controller>,
    // Shared: the stack is cloned for every request.
    priority: Arc<PriorityRule>,
    tenants: Option<Arc<Tenants>>,
    clients: Option<Arc<KeyExtractor>>,
}

impl<S> Admission<S> {
    fn tenant_of<B>(&self, req: &Request<B>) -> ClientKey {
        self.tenants
            .as_ref()
            .map_or_else(everyone, |t| t.of(req.headers(), req.extensions()))
    }
}

impl<S, B, ResB> Service<Request<B>> for Admission<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
{
    type Response = Response<GuardedBody<ResB, Permit>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Waiting for a slot happens per request in `call`: the queue needs
        // the request's priority, which readiness cannot see.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let grpc = req.extensions().get::<GrpcCall>().is_some();
        let priority = self.priority.decide(&mut req);
        // Adaptive limits only: who sent it, for its overload signals.
        let client = self
            .clients
            .as_ref()
            .map(|keys| keys.address(req.headers(), req.extensions()));
        if let Some(mut permit) = req
            .extensions_mut()
            .remove::<Granted<Permit>>()
            .and_then(|g| g.take())
        {
            if let Some(client) = client {
                permit.from_client(client);
            }
            return ResponseFuture::Admitted {
                inner: self.inner.call(req),
                admitted: Some((permit, Instant::now())),
                grpc,
            };
        }
        // What the body weighs (bytes counted only): its declared length,
        // none without a body; one of unknown length is re-weighed as it
        // streams.
        let (weight, reweigh) = if self.controller.weighs_bytes() {
            let body = req.body();
            let length = if body.is_end_stream() {
                Some(0)
            } else {
                body.size_hint().exact()
            };
            (self.controller.weight(length), length.is_none())
        } else {
            (0, false)
        };
        if self.controller.too_heavy(weight) {
            let refusal = Rejection::new(Reason::BodyTooLarge)
                .with_cause("the request body outweighs max_inflight_bytes");
            return ResponseFuture::Refused {
                rejection: Some(refusal),
            };
        }
        // A tenant is needed up front only when its share is capped.
        let tenant = self.controller.caps_tenants().then(|| self.tenant_of(&req));
        let free = match &tenant {
            Some(tenant) => self.controller.try_acquire_as(tenant, weight),
            None => self.controller.try_acquire_as(&everyone(), weight),
        };
        if let Some(mut permit) = free {
            if let Some(client) = client {
                permit.from_client(client);
            }
            if reweigh {
                req.extensions_mut()
                    .insert(self.controller.progress(&mut permit));
            }
            // The common path: a slot at once, no future of our own to box.
            return ResponseFuture::Admitted {
                inner: self.inner.call(req),
                admitted: Some((permit, Instant::now())),
                grpc,
            };
        }
        let tenant = tenant.unwrap_or_else(|| self.tenant_of(&req));
        let peer = req.extensions().get::<PeerClosed>().cloned();
        let deadline = req.extensions().get::<Deadline>().copied();
        let controller = self.controller.clone();
        // The service made ready goes with the request; this one keeps a clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::Queued {
            future: Box::pin(async move {
                let start = Instant::now();
                let mut permit =
                    wait(controller.clone(), priority, tenant, weight, peer, deadline).await?;
                if let Some(client) = client {
                    permit.from_client(client);
                }
                if reweigh {
                    req.extensions_mut()
                        .insert(controller.progress(&mut permit));
                }
                let admitted = Instant::now();
                let result = inner.oneshot(req).await;
                finish(result, permit, admitted, admitted - start, grpc)
            }),
        }
    }
}

/// The admitted request's answer: its sample for the limit, its queue wait,
/// and a body that holds the slot until it ends.
fn finish<ResB, E: Into<BoxError>>(
    result: Result<Response<ResB>, E>,
    mut permit: Permit,
    admitted: Instant,
    waited: Duration,
    grpc_call: bool,
) -> Result<Response<GuardedBody<ResB, Permit>>, BoxError> {
    match result.map_err(Into::into) {
        Ok(mut res) => {
            // The upstream's own time when measured (uploads excluded).
            let rtt = res
                .extensions()
                .get::<UpstreamLatency>()
                .map_or_else(|| admitted.elapsed(), |l| l.0);
            // The classifier says what the answer says of load; a gRPC
            // call's status in its trailers is read as they pass.
            let answer = classify::answer(&res, grpc_call);
            record(&mut permit, rtt, answer.load());
            res.extensions_mut().insert(QueueWait(waited));
            let trailed = answer.trailers_decide();
            Ok(res.map(|body| {
                let body = GuardedBody::new(body, permit);
                if trailed {
                    body.on_trailers(|permit, trailers| {
                        if let Some(verdict) = classify::grpc_verdict(trailers) {
                            permit.correct(verdict.load());
                        }
                    })
                } else {
                    body
                }
            }))
        }
        Err(err) => {
            // A body over its limit, stalled, cut short or malformed, or a
            // client deadline that ran out, is the client's doing, not load:
            // no sample.
            let load = classify::failure(err.as_ref()).load();
            record(&mut permit, admitted.elapsed(), load);
            Err(err)
        }
    }
}

/// Gives the adaptive limit its sample, if the exchange is one.
fn record(permit: &mut Permit, rtt: Duration, load: Load) {
    match load {
        Load::Normal => permit.record(rtt, false),
        Load::Overload => permit.record(rtt, true),
        Load::Unrelated => {}
    }
}

pin_project! {
    /// Future of [`Admission`].
    #[allow(missing_docs)] // pin-project-lite allows no docs on variant fields
    #[project = ResponseProj]
    pub enum ResponseFuture<F, ResB> {
        /// A slot was free: the inner service was called at once.
        Admitted {
            #[pin]
            inner: F,
            admitted: Option<(Permit, Instant)>,
            grpc: bool,
        },
        /// Waiting in the queue, then called: boxed, so that only a request
        /// that waits pays for the waiting state.
        Queued {
            future: BoxFuture<Response<GuardedBody<ResB, Permit>>>,
        },
        /// Heavier than every byte admission may hold: refused at once.
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
    type Output = Result<Response<GuardedBody<ResB, Permit>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseProj::Admitted {
                inner,
                admitted,
                grpc,
            } => {
                let result = ready!(inner.poll(cx));
                let (permit, at) = admitted.take().expect("polled after completion");
                Poll::Ready(finish(result, permit, at, Duration::ZERO, *grpc))
            }
            ResponseProj::Queued { future } => future.as_mut().poll(cx),
            ResponseProj::Refused { rejection } => Poll::Ready(refused(rejection)),
        }
    }
}
