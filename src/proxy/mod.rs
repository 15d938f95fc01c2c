//! Forwarding to the upstream: the innermost service of every route.

mod forward;
pub mod headers;
mod read_timeout;

pub use forward::{Forward, UpstreamClient};
pub use read_timeout::{ClientBodyError, ReadTimedOut, ReadTimeout, Side};
