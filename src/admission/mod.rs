//! Admission control: at most `max_inflight` requests at the upstream, a bounded
//! priority queue for a bounded time, and an honest `503` + `Retry-After` for
//! everything beyond.
//!
//! The slot a request takes is held until its response body has finished (or was
//! dropped), not just until the headers arrive: a streaming response still
//! occupies the upstream. A request whose predicted wait (its place in the queue
//! over the recent completion rate) is already beyond the queue timeout is
//! refused at once instead of waiting the timeout out.

mod controller;
mod layer;
mod priority;
mod queue;
pub mod retry_after;
mod settings;
mod tenants;

pub use controller::{
    AdmissionMetrics, AdmissionSnapshot, Controller, Meter, Permit, TOP_TENANTS, TenantsSnapshot,
};
pub use layer::{Admission, AdmissionLayer, DEFAULT_PRIORITY_HEADER, ResponseFuture};
pub use priority::{Priority, PriorityRule, Trust};
pub use settings::{AdmissionSettings, Discipline};
pub use tenants::{NAMES_KEPT_FOR, Tenants, everyone};
pub use tenants::{SHED_TENANTS, TenantCount};

#[cfg(test)]
mod tests;
