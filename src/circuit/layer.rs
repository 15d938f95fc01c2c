//! [`CircuitBreakerLayer`] and its service.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::breaker::{CallOutcome, CircuitSettings, Ticket};
use super::policy::FailurePolicy;
use super::shared::Circuit;
use crate::body::{BoxError, BoxFuture};
use crate::proxy::{BodyObserver, BodyOutcomeHook};

/// A circuit breaker for any `Service<http::Request<B>>`.
///
/// While open, requests are refused at once with a `circuit_open`
/// [`Rejection`](crate::respond::Rejection) error carrying `Retry-After` (put a
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
/// let circuit = breaker.circuit().clone();
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
    circuit: Arc<Circuit>,
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
        Self { circuit }
    }

    /// The circuit, for its live state.
    pub fn circuit(&self) -> &Arc<Circuit> {
        &self.circuit
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
    circuit: Arc<Circuit>,
}

/// Holds a call's ticket until its outcome is known: at the headers, or at the
/// end of the response body when a forwarder reports it. Dropped undecided
/// (the client went away, before or during the body) it answers "neither",
/// so that a probe slot never leaks.
struct BodyWatch {
    circuit: Arc<Circuit>,
    ticket: Ticket,
    state: AtomicU8,
}

const FRESH: u8 = 0;
const ATTACHED: u8 = 1;
const DONE: u8 = 2;

impl BodyWatch {
    fn new(circuit: Arc<Circuit>, ticket: Ticket) -> Self {
        Self {
            circuit,
            ticket,
            state: AtomicU8::new(FRESH),
        }
    }

    fn attached(&self) -> bool {
        self.state.load(Ordering::Acquire) == ATTACHED
    }

    /// Decides the outcome now, at the headers; the body has no say.
    fn decide(&self, outcome: Option<CallOutcome>) {
        if self.state.swap(DONE, Ordering::AcqRel) != DONE {
            self.circuit.finish(self.ticket, outcome, Instant::now());
        }
    }
}

impl BodyObserver for BodyWatch {
    fn attach(&self) {
        let _ = self
            .state
            .compare_exchange(FRESH, ATTACHED, Ordering::AcqRel, Ordering::Acquire);
    }

    fn finished(&self, ok: bool) {
        if self.state.swap(DONE, Ordering::AcqRel) != ATTACHED {
            return;
        }
        let outcome = if ok {
            CallOutcome::Success
        } else {
            CallOutcome::Failure { retry_after: None }
        };
        self.circuit
            .finish(self.ticket, Some(outcome), Instant::now());
    }
}

impl Drop for BodyWatch {
    fn drop(&mut self) {
        if *self.state.get_mut() != DONE {
            self.circuit.finish(self.ticket, None, Instant::now());
        }
    }
}

impl<S, B, ResB> Service<Request<B>> for CircuitBreaker<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Decided per request in `call`: readiness must not depend on a state
        // that changes with time, or an open circuit would stall the connection.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let circuit = self.circuit.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let start = Instant::now();
            let ticket = circuit.acquire(start)?;
            // A call succeeds only once its body has: a forwarder that reports
            // the body's end decides the outcome of a good response.
            let watch = Arc::new(BodyWatch::new(circuit.clone(), ticket));
            req.extensions_mut().insert(BodyOutcomeHook(watch.clone()));
            let result = inner.oneshot(req).await.map_err(Into::into);
            let outcome = match &result {
                Ok(res) => Some(circuit.policy().classify(res, start.elapsed())),
                Err(err) => circuit.policy().classify_error(err),
            };
            if outcome != Some(CallOutcome::Success) || !watch.attached() {
                watch.decide(outcome);
            } // else the body will tell
            result
        })
    }
}
