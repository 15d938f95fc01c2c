//! [`Dispatch`]: a request's word that it is on its way to the upstream.
//!
//! A leaf, so that the forwarder (which knows when a request without a body
//! has a way to the upstream: an HTTP/2 stream under the upstream's stream
//! limit) and the upstream timeout (whose response deadline starts then)
//! need not know each other.

use std::sync::Arc;

/// What is told when a request is dispatched.
pub trait Sent: Send + Sync {
    /// The request has been handed to the upstream.
    fn sent(&self);
}

/// Request extension: tell it once the request (without a body) has been
/// handed to the upstream; its response deadline starts then.
#[derive(Clone)]
pub struct Dispatch(pub Arc<dyn Sent>);

impl Dispatch {
    /// The request has been handed to the upstream.
    pub fn sent(&self) {
        self.0.sent();
    }
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dispatch")
    }
}
