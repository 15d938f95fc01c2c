//! Forwarding to the upstream: the innermost service of every route.

mod forward;
pub mod headers;
mod read_timeout;

pub use forward::{ClientAddr, Forward, UpstreamClient};
pub use read_timeout::{BodyObserver, BodyOutcomeHook, ReadTimedOut, ReadTimeout, Side};
