//! Per-route observation: request counts by outcome, access log.
//!
//! [`ObserveLayer`] sits at the top of every route's stack, so it sees every
//! answer, the upstream's and the proxy's own (told apart by the
//! [`AnsweredByProxy`](crate::error::AnsweredByProxy) extension). In-flight and queue
//! gauges belong to admission, which knows when a slot is taken and freed.

mod layer;
mod process;
mod stats;

pub use layer::{Observe, ObserveFuture, ObserveLayer};
pub use process::ProcessMetrics;
pub use stats::{Outcome, RouteStats, RouteStatsSnapshot};
