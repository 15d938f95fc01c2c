//! The circuit breaker: fail fast while the upstream is down, probe it half-open
//! with a small share of traffic, close only after consecutive successes.
//!
//! [`Breaker`] is the state machine, with no I/O and an injected clock;
//! [`Circuit`] wraps it with metrics, logs, a fallback answer and the slow start
//! of the admission limit; [`CircuitBreakerLayer`] puts it in front of any
//! service. In the proxy it sits before admission: an open circuit never queues.

mod body;
mod breaker;
mod layer;
mod policy;
mod shared;
mod window;

pub use body::CircuitBody;
pub use breaker::{
    Breaker, CallOutcome, Cause, CircuitSettings, CircuitState, FailureRate, Ticket, Transition,
};
pub use layer::{CircuitBreaker, CircuitBreakerLayer, ResponseFuture};
pub use policy::FailurePolicy;
pub use shared::{Circuit, CircuitMetrics, CircuitSnapshot, SlowStart};
pub use window::FailureWindow;

#[cfg(test)]
mod tests;
