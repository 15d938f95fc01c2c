//! Forwarding to the upstream: the innermost service of every route.

mod connector;
mod forward;
mod h2;
pub mod headers;
mod pool;
mod read_timeout;
mod retry;
mod upstream;

pub use connector::{Connector, TrackedStream};
pub use forward::{Forward, ForwardSettings};
pub use pool::Pooled;
pub use read_timeout::ReadTimeout;
pub use retry::Reclaim;
pub use upstream::{UpstreamClientTls, UpstreamProtocol};
