//! [`Deadline`]: the client's own deadline for a request (a gRPC client's
//! `grpc-timeout`), which admission and the upstream timeout honour.
//!
//! A proxy that knows when the client will give up should neither queue a
//! request past that moment nor keep the upstream working on it after: the
//! answer would reach nobody. Admission refuses at once when its predicted
//! wait exceeds what is left (deadline-aware refusal with the client's
//! deadline instead of `queue_timeout_ms`) and waits no longer than that;
//! the upstream call is cut when it passes.

use std::time::Duration;

use tokio::time::Instant;

/// Request extension: when the client stops waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Time left from `now` (zero once passed).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.0.saturating_duration_since(now)
    }
}

/// The error behind an upstream call cut by the client's deadline: the
/// client's budget ran out, which says nothing of the upstream's health, so
/// the circuit breaker counts it as neither success nor failure.
#[derive(Debug)]
pub struct ClientDeadline;

impl std::fmt::Display for ClientDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client's deadline (grpc-timeout) passed before the upstream answered")
    }
}

impl std::error::Error for ClientDeadline {}
