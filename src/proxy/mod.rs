//! Forwarding to the upstream: the innermost service of every route.

mod forward;
pub mod headers;

pub use forward::{ClientAddr, Forward, UpstreamClient};
