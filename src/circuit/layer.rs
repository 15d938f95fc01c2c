//! [`CircuitBreakerLayer`] and its service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::body::{CircuitBody, Undecided};
use super::breaker::{CallOutcome, CircuitSettings};
use super::policy::{FailurePolicy, upstream_time};
use super::shared::Circuit;
use crate::body::BoxError;
use crate::classify;
use crate::error::{Rejection, refused};
use crate::exchange::GrpcCall;

/// A circuit breaker for any `Service<http::Request<B>>`.
///
/// While open, requests are refused at once with a `circuit_open`
/// [`Rejection`](crate::error::Rejection) error carrying `Retry-After` (put a
/// [`RescueLayer`](crate::respond::RescueLayer) above it for the `503` + JSON);
/// the service below is not called.
///
/// ```
/// use std::time::Duration;
/// use http::{Request, Response, StatusCode};
/// use sluicegate::body::{BoxError, full};
/// use sluicegate::circuit::{CircuitBreakerLayer, CircuitSettings, CircuitState};
/// use sluicegate::respond::RescueLayer;
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let breaker = CircuitBreakerLayer::new(CircuitSettings {
///     failure_threshold: 2,
///     open: Duration::from_secs(5),
///     ..CircuitSettings::default()
/// });
/// let circuit = breaker.circuit().unwrap().clone();
/// let app = ServiceBuilder::new()
///     .layer(RescueLayer::new("ingest")) // refusals -> 503 + Retry-After + JSON
///     .layer(breaker)
///     .service_fn(|_req: Request<String>| async {
///         let mut res = Response::new(full("database down"));
///         *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
///         Ok::<_, BoxError>(res)
///     });
///
/// for _ in 0..2 {
///     let res = app.clone().oneshot(Request::new(String::new())).await.unwrap();
///     assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
/// }
/// assert_eq!(circuit.state(), CircuitState::Open);
/// let res = app.oneshot(Request::new(String::new())).await.unwrap();
/// assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
/// assert!(res.headers().contains_key("retry-after"));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    circuit: Option<Arc<Circuit>>,
}

impl CircuitBreakerLayer {
    /// A layer with its own circuit and the default failure policy (5xx
    /// statuses 500/502/503/504, errors, and upstream backpressure).
    pub fn new(settings: CircuitSettings) -> Self {
        Self::with_circuit(Arc::new(Circuit::new(settings, FailurePolicy::default())))
    }

    /// A layer over an existing circuit (shared, with metrics, a fallback, or a
    /// slow start).
    pub fn with_circuit(circuit: Arc<Circuit>) -> Self {
        Self {
            circuit: Some(circuit),
        }
    }

    /// A layer over `circuit` when there is one, and a pass-through when not,
    /// so that a stack has one type whether or not a route has a breaker.
    pub fn optional(circuit: Option<Arc<Circuit>>) -> Self {
        Self { circuit }
    }

    /// The circuit, for its live state.
    pub fn circuit(&self) -> Option<&Arc<Circuit>> {
        self.circuit.as_ref()
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            circuit: self.circuit.clone(),
        }
    }
}

/// Service of [`CircuitBreakerLayer`].
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    circuit: Option<Arc<Circuit>>,
}

impl<S, B, ResB> Service<Request<B>> for CircuitBreaker<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: http_body::Body,
{
    type Response = Response<CircuitBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The circuit decides per request in `call`: readiness must not depend
        // on a state that changes with time, or an open circuit would stall
        // the connection.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(circuit) = &self.circuit else {
            return ResponseFuture::Passthrough {
                inner: self.inner.call(req),
            };
        };
        let start = Instant::now();
        let client = circuit.client_of(req.headers(), req.extensions());
        match circuit.acquire_as(client, start) {
            Ok(ticket) => ResponseFuture::Called {
                grpc: req.extensions().get::<GrpcCall>().is_some(),
                inner: self.inner.call(req),
                pending: Some(Undecided::new(circuit.clone(), ticket)),
                start,
            },
            Err(rejection) => ResponseFuture::Refused {
                rejection: Some(rejection),
            },
        }
    }
}

pin_project! {
    /// Future of [`CircuitBreaker`].
    #[allow(missing_docs)] // pin-project-lite allows no docs on variant fields
    #[project = ResponseProj]
    pub enum ResponseFuture<F> {
        /// No circuit on this route.
        Passthrough {
            #[pin]
            inner: F,
        },
        /// Let through: the outcome is decided from the answer, or its body.
        Called {
            #[pin]
            inner: F,
            grpc: bool,
            pending: Option<Undecided>,
            start: Instant,
        },
        /// Refused: the circuit is open (or every probe slot is taken).
        Refused {
            rejection: Option<Rejection>,
        },
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
    ResB: http_body::Body,
{
    type Output = Result<Response<CircuitBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseProj::Passthrough { inner } => {
                let res = ready!(inner.poll(cx)).map_err(Into::into)?;
                Poll::Ready(Ok(res.map(CircuitBody::passthrough)))
            }
            ResponseProj::Called {
                inner,
                grpc,
                pending,
                start,
            } => {
                let result = ready!(inner.poll(cx)).map_err(Into::into);
                let pending = pending.take().expect("polled after completion");
                Poll::Ready(match result {
                    Ok(res) => {
                        let answer = classify::answer(&res, *grpc);
                        let took = upstream_time(&res, start.elapsed());
                        match pending.policy().judge(&answer, took) {
                            // A success is only one once its body has arrived;
                            // a trailers-only gRPC answer was decided by its head.
                            CallOutcome::Success => {
                                let trailers = answer.trailers_decide();
                                Ok(res.map(|body| CircuitBody::watch(body, pending, trailers)))
                            }
                            failure => {
                                pending.decide(Some(failure));
                                Ok(res.map(CircuitBody::passthrough))
                            }
                        }
                    }
                    Err(err) => {
                        let outcome = pending.policy().classify_error(&err);
                        pending.decide(outcome);
                        Err(err)
                    }
                })
            }
            ResponseProj::Refused { rejection } => Poll::Ready(refused(rejection)),
        }
    }
}
