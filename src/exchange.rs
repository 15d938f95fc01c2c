//! What the layers of one exchange leave for each other in its request and
//! response extensions: the only things one protection tells another, so
//! that none of them imports another (tower-http's middlewares share no more
//! than this either).
//!
//! A leaf: plain values, nothing of the layers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Request extension on a gRPC call (set by the gRPC answers layer), so that
/// the layers below tell one by an extension lookup instead of matching the
/// content type again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcCall;

/// Response extension: how long the request waited for admission, so that
/// outer layers can tell the upstream's time from the queue's (the circuit
/// breaker's slow-call rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueWait(pub Duration);

/// Response extension: the upstream's own time, from the end of the request
/// body to the response headers (queue waits and uploads excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamLatency(pub Duration);

/// Response extension: the request was stored for later delivery (`202`)
/// under this id, not answered by the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolReceipt(pub Arc<str>);

/// Request extension: an admission slot granted before the request was made
/// (the spool's replayer waits for its slot at the lowest priority before it
/// reads a request from disk). The admission layer takes it instead of
/// waiting; `P` is its permit.
#[derive(Debug)]
pub struct Granted<P>(Arc<Mutex<Option<P>>>);

impl<P> Clone for Granted<P> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<P> Granted<P> {
    /// Carries `permit` to the admission layer.
    pub fn new(permit: P) -> Self {
        Self(Arc::new(Mutex::new(Some(permit))))
    }

    /// The permit, once.
    pub fn take(&self) -> Option<P> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}
