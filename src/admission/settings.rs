//! [`AdmissionSettings`]: the limits a route's admission enforces, and how
//! its queue is served ([`Discipline`]).

use std::time::Duration;

/// The limits a controller enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionSettings {
    /// Requests admitted at once.
    pub max_inflight: usize,
    /// Requests that may wait beyond that.
    pub queue_capacity: usize,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// Clamp of `Retry-After`, in seconds.
    pub retry_after_min_s: u64,
    /// Clamp of `Retry-After`, in seconds.
    pub retry_after_max_s: u64,
    /// Whether requests carry tenants (`tenant_key`): `/status` then lists
    /// the tenants that wait and shed most.
    pub by_tenant: bool,
    /// Slots one tenant may hold at once (`None`: any number).
    pub max_inflight_per_tenant: Option<usize>,
    /// How the queue is served.
    pub discipline: Discipline,
    /// Request body bytes admitted at once (`None`: not counted): each
    /// request weighs its body's declared length.
    pub max_inflight_bytes: Option<u64>,
    /// What a body of unknown length (chunked) weighs.
    pub unknown_length_bytes: u64,
}

/// How waiters are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discipline {
    /// Oldest first; a waiter may wait `queue_timeout`.
    Fifo,
    /// Facebook's adaptive LIFO with CoDel's standing-queue test: once the
    /// queue has not been empty for `interval` (or is full), it stands
    /// (arrivals outpace the upstream), and until it has been empty for an
    /// interval the newest waiter is served first, the waiters left past
    /// `target` once the freed slots are given are shed, and no more wait
    /// than drain within `target` (or the limit, if more): admitted requests
    /// see the service time, not two of them.
    Codel {
        /// How long the queue must have been non-empty to count as standing.
        interval: Duration,
        /// The longest wait while it stands.
        target: Duration,
    },
}

impl Discipline {
    /// CoDel's default interval (RFC 8289's), the queue's standing test.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
    /// CoDel's default target (RFC 8289's), the longest wait while it stands.
    pub const DEFAULT_TARGET: Duration = Duration::from_millis(5);
}

impl AdmissionSettings {
    /// The defaults of `[route.admission]`: 16 at once, 64 more waiting for
    /// up to 200 ms, `Retry-After` between 1 and 60 s.
    pub const DEFAULT: Self = Self {
        max_inflight: 16,
        queue_capacity: 64,
        queue_timeout: Duration::from_millis(200),
        retry_after_min_s: 1,
        retry_after_max_s: 60,
        by_tenant: false,
        max_inflight_per_tenant: None,
        discipline: Discipline::Fifo,
        max_inflight_bytes: None,
        unknown_length_bytes: 64 * 1024,
    };

    /// No limit: every request is admitted at once, and only counted.
    pub const UNLIMITED: Self = Self {
        max_inflight: usize::MAX,
        queue_capacity: 0,
        queue_timeout: Duration::ZERO,
        ..Self::DEFAULT
    };
}
