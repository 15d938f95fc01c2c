//! [`CircuitBody`]: the one owner of "did this call succeed" once the headers
//! said yes (linkerd2-proxy's `classify/channel.rs` does the same).
//!
//! A `200` is a success only once its body has arrived whole: one cut off,
//! reset or stalled by the upstream is a failure. The outcome is decided when
//! the body ends, fails, or is dropped; and at once when it is already at its
//! end (`204`, `304`, an answer to `HEAD`, `Content-Length: 0`), because hyper
//! drops such a body without ever polling it. Dropped before its end, the body
//! says nothing of the upstream (the client went away, or stopped reading past
//! `send_timeout_ms`): neither success nor failure, and a half-open probe slot
//! is handed back.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::breaker::{CallOutcome, Ticket};
use super::policy::FailurePolicy;
use super::shared::Circuit;
use crate::body::ended;
use crate::classify;

/// A call let through by the circuit whose outcome is not decided yet. Dropped
/// undecided, it counts as neither success nor failure.
pub(super) struct Undecided {
    circuit: Option<Arc<Circuit>>,
    ticket: Ticket,
}

impl Undecided {
    pub(super) fn new(circuit: Arc<Circuit>, ticket: Ticket) -> Self {
        Self {
            circuit: Some(circuit),
            ticket,
        }
    }

    /// The circuit's classification rules.
    pub(super) fn policy(&self) -> &FailurePolicy {
        // Only taken by `finish`, which consumes or drops `self`.
        self.circuit.as_ref().expect("undecided").policy()
    }

    /// Records the outcome (`None`: neither).
    pub(super) fn decide(mut self, outcome: Option<CallOutcome>) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Option<CallOutcome>) {
        if let Some(circuit) = self.circuit.take() {
            circuit.finish(self.ticket, outcome, Instant::now());
        }
    }
}

impl Drop for Undecided {
    fn drop(&mut self) {
        self.finish(None);
    }
}

pin_project! {
    /// A response body that reports its end to the circuit.
    pub struct CircuitBody<B> {
        #[pin]
        inner: B,
        pending: Option<Undecided>,
        // A gRPC response: its trailers' grpc-status decides, and an end
        // without one is the upstream breaking the protocol.
        grpc: bool,
    }
}

impl<B> CircuitBody<B> {
    /// A body with nothing to report (no circuit, or already decided).
    pub fn passthrough(inner: B) -> Self {
        Self {
            inner,
            pending: None,
            grpc: false,
        }
    }
}

impl<B: Body> CircuitBody<B> {
    /// Reports to `pending` how `inner` ends: at once when it already has.
    /// `grpc`: a gRPC response whose status is still to come in trailers.
    pub(super) fn watch(inner: B, pending: Undecided, grpc: bool) -> Self {
        if inner.is_end_stream() {
            pending.decide(Some(CallOutcome::Success));
            return Self::passthrough(inner);
        }
        Self {
            inner,
            pending: Some(pending),
            grpc,
        }
    }
}

impl<B: Body> Body for CircuitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(whole) = ended(&frame, &*this.inner)
            && let Some(pending) = this.pending.take()
        {
            let trailers = match &frame {
                Some(Ok(f)) => f.trailers_ref(),
                _ => None,
            };
            let end = classify::body_end(whole, trailers, *this.grpc);
            pending.decide(Some(FailurePolicy::of_body_end(end)));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> std::fmt::Debug for CircuitBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBody")
            .field("undecided", &self.pending.is_some())
            .finish_non_exhaustive()
    }
}
