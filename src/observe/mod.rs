//! Per-route observation: request counts by outcome, in-flight gauge, access log.
//!
//! [`ObserveLayer`] sits at the top of every route's stack, so it sees every
//! answer, the upstream's and the proxy's own (told apart by the
//! [`Rejected`](crate::respond::Rejected) extension). A request counts as in
//! flight until its response body has finished streaming or was dropped.

mod body;
mod layer;
mod stats;

pub use body::ObservedBody;
pub use layer::{Observe, ObserveFuture, ObserveLayer};
pub use stats::{Outcome, RouteStats};
