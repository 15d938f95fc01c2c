//! [`Controller`]: one route's in-flight limit, wait queue and completion rate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Priority;
use super::queue::WaitQueue;
use super::retry_after::{CompletionRate, retry_after_secs};
use super::tenants::{ShedCounts, TenantCount, everyone};
use crate::body::Growth;
use crate::classify::Load;
use crate::client_key::ClientKey;
use crate::deadline::Deadline;
use crate::error::{Reason, Rejection};
use crate::jitter::retry_factor;
use crate::latency::LatencySketch;
use crate::limit::{AlgorithmSettings, AlgorithmSnapshot, LimitAlgorithm, Sample, Throttle};
use crate::metrics::{
    CONCURRENCY_LIMIT, INFLIGHT, QUEUE_DEPTH, QUEUE_TIMEOUT, QUEUE_WAIT, Registry, SHED_TOTAL,
};

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

/// Prometheus handles of one route's admission.
#[derive(Debug, Clone)]
pub struct AdmissionMetrics {
    inflight: Gauge,
    queue_depth: Gauge,
    limit: Gauge,
    queue_timeout: Gauge,
    shed_full: Counter,
    shed_timeout: Counter,
    queue_wait: Histogram,
    /// The same waits, for the dashboard's per-second quantiles.
    queue_wait_sketch: Arc<LatencySketch>,
}

impl AdmissionMetrics {
    /// Registers the route's admission metrics.
    pub fn new(route: &str, registry: &Registry) -> Self {
        let r = [("route", route)];
        let shed = |reason: Reason| {
            registry.counter(SHED_TOTAL, &[("route", route), ("reason", reason.as_str())])
        };
        Self {
            inflight: registry.gauge(INFLIGHT, &r),
            queue_depth: registry.gauge(QUEUE_DEPTH, &r),
            limit: registry.gauge(CONCURRENCY_LIMIT, &r),
            queue_timeout: registry.gauge(QUEUE_TIMEOUT, &r),
            shed_full: shed(Reason::QueueFull),
            shed_timeout: shed(Reason::QueueTimeout),
            queue_wait: registry.histogram(QUEUE_WAIT, &r),
            queue_wait_sketch: Arc::default(),
        }
    }

    fn record_wait(&self, waited: Duration) {
        self.queue_wait.record(waited.as_secs_f64());
        self.queue_wait_sketch.record(waited);
    }

    fn noop() -> Self {
        Self {
            inflight: Gauge::noop(),
            queue_depth: Gauge::noop(),
            limit: Gauge::noop(),
            queue_timeout: Gauge::noop(),
            shed_full: Counter::noop(),
            shed_timeout: Counter::noop(),
            queue_wait: Histogram::noop(),
            queue_wait_sketch: Arc::default(),
        }
    }
}

/// The live state, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdmissionSnapshot {
    /// Requests admitted and not finished (response body included).
    pub inflight: usize,
    /// Requests waiting.
    pub queued: usize,
    /// The in-flight limit (absent: unlimited).
    pub limit: Option<usize>,
    /// Waiting capacity.
    pub queue_capacity: usize,
    /// Estimated completions per second while saturated: the drain rate
    /// (routes with admission only).
    pub completion_rate: Option<f64>,
    /// Requests shed because the queue was full or the wait predicted too long.
    pub shed_queue_full: u64,
    /// Requests shed after waiting `queue_timeout`.
    pub shed_queue_timeout: u64,
    /// The adaptive limit's algorithm, when `max_inflight = "adaptive"`.
    pub adaptive: Option<AlgorithmSnapshot>,
    /// The tenants, when the route has a `tenant_key`.
    pub tenants: Option<TenantsSnapshot>,
    /// Request body bytes admitted and not finished (with `max_inflight_bytes`).
    pub inflight_bytes: Option<u64>,
    /// `max_inflight_bytes`.
    pub bytes_limit: Option<u64>,
}

/// Tenants at a glance: how many wait, and which wait and shed most (the
/// top [`TOP_TENANTS`] of each; Prometheus gets no per-tenant series, as
/// tenants are whatever clients send).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantsSnapshot {
    /// Tenants with a request waiting.
    pub waiting: usize,
    /// Tenants holding a slot (counted when `max_inflight_per_tenant` is set).
    pub holding: Option<usize>,
    /// The tenants with the most requests waiting.
    pub top_queued: Vec<TenantCount>,
    /// The tenants shed most since start (approximate past the
    /// [`ShedCounts`] capacity: the heavy hitters stay exact).
    pub top_shed: Vec<TenantCount>,
}

/// Tenants listed in each of `/status`'s tenant tables.
pub const TOP_TENANTS: usize = 10;

struct State {
    inflight: usize,
    /// The limit in force: `max_inflight`, or less while a slow start ramps up.
    limit: usize,
    queue: WaitQueue<ClientKey, Waiter>,
    /// The admitted requests' weights, summed.
    inflight_bytes: u64,
    /// Since when the queue has not been empty.
    nonempty_since: Option<Instant>,
    /// Since when it has been empty.
    empty_since: Option<Instant>,
    /// Whether it stands (CoDel): entered when it has grown over an
    /// interval without emptying (or is full), left after an interval
    /// always empty.
    standing: bool,
    /// The streaming body allowed past the bytes budget, if one is (see
    /// `Controller::grow`).
    overrun: Option<Arc<Meter>>,
    /// The current interval's start and the queue's shortest length in it
    /// (CoDel's standing test).
    window: Option<(Instant, usize, usize)>,
    /// The shortest length in each of the last two intervals, oldest first.
    mins: [Option<usize>; 2],
    /// Slots held per tenant (kept only with `max_inflight_per_tenant`).
    holding: HashMap<ClientKey, usize>,
    shed_by_tenant: ShedCounts,
    rate: CompletionRate,
    /// Moves `limit` from the samples of answered requests (adaptive mode).
    algorithm: Option<Box<dyn LimitAlgorithm>>,
    /// While the algorithm probes: its number, and the requests admitted
    /// since it started still in flight (only they count against its limit).
    probe: Option<(u64, usize)>,
}

impl State {
    /// The slots taken, as the limit counts them: while a probe runs, only
    /// those of requests admitted during it.
    fn busy(&self) -> usize {
        self.probe.map_or(self.inflight, |(_, n)| n)
    }

    /// Follows the algorithm into or out of a probe.
    fn sync_probe(&mut self) {
        let id = self.algorithm.as_ref().and_then(|a| a.probe());
        if id != self.probe.map(|(id, _)| id) {
            self.probe = id.map(|id| (id, 0));
        }
    }
}

/// One route's admission: at most `max_inflight` requests hold a [`Permit`];
/// up to `queue_capacity` more wait (highest priority class first, FIFO within
/// a class) for at most `queue_timeout`; the rest are refused with a
/// [`Rejection`] carrying an honest `Retry-After`.
pub struct Controller {
    settings: AdmissionSettings,
    /// The adaptive algorithm's settings, when adaptive.
    adaptive: Option<Box<dyn AlgorithmSettings>>,
    mode: Mode,
    metrics: AdmissionMetrics,
    shed_full: AtomicU64,
    shed_timeout: AtomicU64,
    /// The controller a reload built for the route's new settings: it has
    /// taken this one's requests (in flight and queued) and takes every
    /// call made here since, so that the two never admit side by side.
    successor: OnceLock<Arc<Controller>>,
    /// Told when bytes come back, for bodies waiting to grow.
    bytes_freed: Arc<tokio::sync::Notify>,
}

/// Waiters' ids, unique across controllers: a waiter handed to a reload's
/// controller keeps its id, by which it leaves the queue.
static WAITER_IDS: AtomicU64 = AtomicU64::new(0);

/// What a controller hands to the one a reload built in its place.
#[derive(Default)]
struct Adopted {
    inflight: usize,
    bytes: u64,
    holding: HashMap<ClientKey, usize>,
    queue: WaitQueue<ClientKey, Waiter>,
    algorithm: Option<Box<dyn LimitAlgorithm>>,
    overrun: Option<Arc<Meter>>,
}

/// A controller's mode at hand: the unlimited count, or the limited state
/// under its lock.
enum Locked<'a> {
    Unlimited(&'a AtomicUsize),
    Limited(MutexGuard<'a, State>),
}

/// The two kinds of controller.
enum Mode {
    /// No limit (a route without `[route.admission]`): requests are only
    /// counted, with no lock: two atomic operations per request, nothing more.
    Unlimited { inflight: AtomicUsize },
    /// A limit, a queue beyond it, and the completion rate behind
    /// `Retry-After`.
    Limited(Box<Mutex<State>>),
}

impl Throttle for Controller {
    fn full_limit(&self) -> usize {
        self.settings.max_inflight
    }

    fn limit(&self) -> usize {
        Controller::limit(self)
    }

    fn set_limit(self: Arc<Self>, limit: usize) {
        Controller::set_limit(&self, limit);
    }
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller with no metrics (embedders can read [`Controller::snapshot`]).
    pub fn new(settings: AdmissionSettings) -> Arc<Self> {
        Self::with_metrics(settings, AdmissionMetrics::noop())
    }

    /// A controller that exports to `metrics`.
    pub fn with_metrics(settings: AdmissionSettings, metrics: AdmissionMetrics) -> Arc<Self> {
        Self::build(settings, metrics, None)
    }

    /// A controller whose limit `adaptive` moves, between its bounds (its upper
    /// bound replaces `settings.max_inflight`).
    pub fn adaptive(
        settings: AdmissionSettings,
        adaptive: impl AlgorithmSettings,
        metrics: AdmissionMetrics,
    ) -> Arc<Self> {
        let settings = AdmissionSettings {
            max_inflight: adaptive.upper_bound(),
            ..settings
        };
        Self::build(settings, metrics, Some(Box::new(adaptive)))
    }

    fn build(
        settings: AdmissionSettings,
        metrics: AdmissionMetrics,
        adaptive: Option<Box<dyn AlgorithmSettings>>,
    ) -> Arc<Self> {
        let algorithm = adaptive.as_ref().map(|a| a.build(Instant::now()));
        let limit = algorithm
            .as_ref()
            .map_or(settings.max_inflight, |a| a.limit());
        if limit != usize::MAX {
            metrics.limit.set(limit as f64);
            metrics
                .queue_timeout
                .set(settings.queue_timeout.as_secs_f64());
        }
        metrics.inflight.set(0.0);
        metrics.queue_depth.set(0.0);
        let mode = if settings.max_inflight == usize::MAX {
            Mode::Unlimited {
                inflight: AtomicUsize::new(0),
            }
        } else {
            Mode::Limited(Box::new(Mutex::new(State {
                inflight: 0,
                limit,
                queue: WaitQueue::default(),
                inflight_bytes: 0,
                nonempty_since: None,
                empty_since: None,
                standing: false,
                window: None,
                mins: [None, None],
                overrun: None,
                holding: HashMap::new(),
                shed_by_tenant: ShedCounts::default(),
                rate: CompletionRate::for_limit(settings.max_inflight),
                algorithm,
                probe: None,
            })))
        };
        Arc::new(Self {
            settings,
            adaptive,
            mode,
            metrics,
            shed_full: AtomicU64::new(0),
            shed_timeout: AtomicU64::new(0),
            successor: OnceLock::new(),
            bytes_freed: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Hands this controller's requests to `next`, built by a reload for the
    /// route's new settings: the requests in flight count against `next`'s
    /// limit (a changed limit applies to the same count), the queue keeps
    /// its order there, the adaptive limit carries on when its settings did
    /// not change, and every call on this controller from now on is
    /// `next`'s. Without it, requests admitted by the old limit and by the
    /// new one would be at the upstream side by side.
    pub fn hand_over(self: &Arc<Self>, next: &Arc<Controller>) {
        if Arc::ptr_eq(self, next) || self.successor.get().is_some() {
            return;
        }
        match self.lock() {
            Locked::Unlimited(inflight) => {
                let _ = self.successor.set(next.clone());
                let n = inflight.swap(0, Ordering::SeqCst);
                next.adopt(Adopted {
                    inflight: n,
                    ..Adopted::default()
                });
            }
            Locked::Limited(mut state) => {
                let _ = self.successor.set(next.clone());
                let algorithm =
                    state
                        .algorithm
                        .take()
                        .filter(|_| match (&self.adaptive, &next.adaptive) {
                            (Some(this), Some(next)) => this.same_as(next.as_ref()),
                            _ => false,
                        });
                state.probe = None;
                let adopted = Adopted {
                    inflight: std::mem::take(&mut state.inflight),
                    bytes: std::mem::take(&mut state.inflight_bytes),
                    holding: std::mem::take(&mut state.holding),
                    queue: std::mem::take(&mut state.queue),
                    algorithm,
                    overrun: state.overrun.take(),
                };
                // Locks `next` under this one's lock: a controller with no
                // successor never locks another, so the order is one way.
                next.adopt(adopted);
                // Bodies waiting to grow here ask the successor now.
                self.bytes_freed.notify_waiters();
            }
        }
    }

    /// Takes in what a predecessor handed over.
    fn adopt(self: &Arc<Self>, adopted: Adopted) {
        let Adopted {
            inflight: n,
            bytes,
            holding,
            mut queue,
            algorithm,
            overrun,
        } = adopted;
        match self.lock() {
            Locked::Unlimited(inflight) => {
                inflight.fetch_add(n, Ordering::SeqCst);
                self.metrics.inflight.increment(n as f64);
                // No limit any more: every waiter goes now.
                while let Some((_, _, waiter)) = queue.pop_next(|_| true, |_| true, false) {
                    let permit = self.count_unlimited(inflight);
                    let _ = waiter.tx.send(Ok(permit));
                }
            }
            Locked::Limited(mut state) => {
                state.inflight += n;
                state.inflight_bytes += bytes;
                if state.overrun.is_none() {
                    state.overrun = overrun;
                }
                if self.caps_tenants() {
                    for (tenant, held) in holding {
                        *state.holding.entry(tenant).or_default() += held;
                    }
                }
                if state.queue.len() == 0 {
                    state.queue = queue;
                }
                if let Some(algorithm) = algorithm {
                    state.limit = algorithm.limit().min(self.settings.max_inflight).max(1);
                    self.metrics.limit.set(state.limit as f64);
                    state.algorithm = Some(algorithm);
                }
                self.fill(&mut state);
                self.publish(&mut state);
            }
        }
    }

    /// The controller that took over, if a reload replaced this one.
    fn successor(&self) -> Option<&Arc<Controller>> {
        self.successor.get()
    }

    /// The limits.
    pub fn settings(&self) -> &AdmissionSettings {
        &self.settings
    }

    /// The mode, with the limited state locked.
    fn lock(&self) -> Locked<'_> {
        match &self.mode {
            // The state holds counters and channel ends only; a panic
            // elsewhere while it was locked leaves it usable, so a poisoned
            // lock is taken as is.
            Mode::Limited(state) => {
                Locked::Limited(state.lock().unwrap_or_else(|e| e.into_inner()))
            }
            Mode::Unlimited { inflight } => Locked::Unlimited(inflight),
        }
    }

    fn publish(&self, state: &mut State) {
        if let Discipline::Codel { interval, .. } = self.settings.discipline {
            Self::observe(state, interval, Instant::now());
        }
        if state.queue.len() == 0 {
            state.nonempty_since = None;
            state.empty_since.get_or_insert_with(Instant::now);
        } else {
            state.empty_since = None;
            state.nonempty_since.get_or_insert_with(Instant::now);
        }
        self.metrics.inflight.set(state.inflight as f64);
        self.metrics.queue_depth.set(state.queue.len() as f64);
    }

    /// A slot now, if one is free and nobody waits for one.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.try_acquire_as(&everyone(), 0)
    }

    /// A slot now for a request of `tenant` weighing `weight` bytes, if one
    /// is free, nobody who may run waits for one, the tenant is below its
    /// share and the weight fits.
    pub fn try_acquire_as(self: &Arc<Self>, tenant: &ClientKey, weight: u64) -> Option<Permit> {
        if let Some(next) = self.successor() {
            return next.try_acquire_as(tenant, weight);
        }
        match self.lock() {
            Locked::Unlimited(inflight) => Some(self.count_unlimited(inflight)),
            Locked::Limited(state) if self.successor().is_some() => {
                drop(state);
                self.try_acquire_as(tenant, weight)
            }
            Locked::Limited(mut state) => {
                self.take_free_slot(&mut state, tenant, weight, Instant::now())
            }
        }
    }

    /// What a request whose body's length is `length` (`None`: unknown)
    /// weighs: 0 unless bytes are counted.
    pub fn weight(&self, length: Option<u64>) -> u64 {
        match self.settings.max_inflight_bytes {
            None => 0,
            Some(_) => length.unwrap_or(self.settings.unknown_length_bytes),
        }
    }

    /// Whether `weight` could never fit: heavier than `max_inflight_bytes`.
    pub fn too_heavy(&self, weight: u64) -> bool {
        self.settings
            .max_inflight_bytes
            .is_some_and(|max| weight > max)
    }

    /// Whether an adaptive algorithm moves the limit.
    pub fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    /// Whether request bytes are counted (`max_inflight_bytes`).
    pub fn weighs_bytes(&self) -> bool {
        self.settings.max_inflight_bytes.is_some()
    }

    /// Re-weighs `permit` as its body streams: the returned progress, told
    /// the body's running total, adds what passes the estimate to the bytes
    /// in flight (an admitted request is never cut short; later ones wait),
    /// and all of it comes back with the slot.
    pub fn progress(self: &Arc<Self>, permit: &mut Permit) -> crate::body::BodyProgress {
        let meter = permit.meter.get_or_insert_with(Default::default).clone();
        let base = permit.weight;
        let controller = self.clone();
        crate::body::BodyProgress(Arc::new(move |total| controller.grow(&meter, base, total)))
    }

    /// A streaming body has reached `total` bytes: its weight grows to
    /// cover them when the bytes left allow, and it waits for them when not
    /// (the upload is held back, not the budget overrun). One body at a
    /// time may grow past the budget, so that bodies all waiting for each
    /// other's bytes never wedge: it finishes and gives them back. It keeps
    /// that right until its slot is back, as its bytes stay counted until
    /// then: handing it on at the body's end would let every upload past
    /// the budget in turn.
    fn grow(&self, meter: &Arc<Meter>, base: u64, total: u64) -> Growth {
        if total <= base + meter.extra.load(Ordering::Relaxed) {
            return Growth::Go;
        }
        let Locked::Limited(mut state) = self.lock() else {
            return Growth::Go;
        };
        if let Some(next) = self.successor() {
            drop(state);
            return next.grow(meter, base, total);
        }
        let extra = meter.extra.load(Ordering::Relaxed);
        if meter.released.load(Ordering::Relaxed) || total <= base + extra {
            return Growth::Go;
        }
        let wanted = (total - base).div_ceil(REWEIGH_STEP) * REWEIGH_STEP;
        let more = wanted - extra;
        let fits = self.fits(&state, more);
        let overrunning = state
            .overrun
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, meter));
        if !fits && !overrunning {
            if state.overrun.is_some() {
                // Wait for bytes to come back; registered before the lock is
                // let go, so that no release is missed.
                let mut freed = Box::pin(self.bytes_freed.clone().notified_owned());
                freed.as_mut().enable();
                return Growth::Wait(freed);
            }
            state.overrun = Some(meter.clone());
        }
        state.inflight_bytes += more;
        meter.extra.store(wanted, Ordering::Relaxed);
        Growth::Go
    }

    fn fits(&self, state: &State, weight: u64) -> bool {
        self.settings
            .max_inflight_bytes
            .is_none_or(|max| state.inflight_bytes + weight <= max)
    }

    /// Whether requests must say their tenant before [`Self::try_acquire_as`]
    /// (a per-tenant share is enforced).
    pub fn caps_tenants(&self) -> bool {
        self.settings.max_inflight_per_tenant.is_some()
    }

    /// One more in flight on an unlimited controller.
    fn count_unlimited(self: &Arc<Self>, inflight: &AtomicUsize) -> Permit {
        // Increments, not a set from the count: two requests setting the
        // gauge from their own reads race, and an idle route could keep
        // showing one in flight.
        inflight.fetch_add(1, Ordering::Relaxed);
        self.metrics.inflight.increment(1.0);
        Permit::new(self.clone(), None, 0)
    }

    fn take_free_slot(
        self: &Arc<Self>,
        state: &mut State,
        tenant: &ClientKey,
        weight: u64,
        now: Instant,
    ) -> Option<Permit> {
        self.tick(state, now);
        if state.busy() >= state.limit || !self.fits(state, weight) {
            return None;
        }
        let cap = self.settings.max_inflight_per_tenant;
        if cap.is_none() && self.settings.max_inflight_bytes.is_none() && state.queue.len() > 0 {
            // Nobody jumps the queue.
            return None;
        }
        // With shares or bytes, waiters left while a slot is free are all of
        // tenants at their share or too heavy for the bytes left (`fill`
        // runs at every release): the slot is this one's if its tenant is
        // below its share (and it fits, above).
        if let Some(cap) = cap
            && state.holding.get(tenant).copied().unwrap_or(0) >= cap
        {
            return None;
        }
        let permit = self.grant(state, tenant, weight);
        if state.busy() >= state.limit {
            state.rate.saturated(now);
        }
        self.publish(state);
        Some(permit)
    }

    /// Lets the algorithm see time pass (a probe's deadline) without a sample.
    fn tick(self: &Arc<Self>, state: &mut State, now: Instant) {
        let Some(limit) = state.algorithm.as_mut().and_then(|a| a.tick(now)) else {
            return;
        };
        state.limit = limit;
        self.metrics.limit.set(limit as f64);
        state.sync_probe();
        self.fill(state);
    }

    /// Takes a slot, and `weight` bytes, for `tenant`.
    fn grant(self: &Arc<Self>, state: &mut State, tenant: &ClientKey, weight: u64) -> Permit {
        state.inflight += 1;
        state.inflight_bytes += weight;
        let tenant = self.settings.max_inflight_per_tenant.map(|_| {
            *state.holding.entry(tenant.clone()).or_default() += 1;
            tenant.clone()
        });
        let mut permit = Permit::new(self.clone(), tenant, weight);
        if let Some((id, n)) = &mut state.probe {
            *n += 1;
            permit.probe = Some(*id);
        }
        permit
    }

    /// Gives back a slot `tenant` held, and its `weight`.
    fn ungrant(state: &mut State, tenant: Option<&ClientKey>, weight: u64, probe: Option<u64>) {
        if let (Some(id), Some((current, n))) = (probe, &mut state.probe)
            && id == *current
        {
            *n -= 1;
        }
        state.inflight -= 1;
        state.inflight_bytes -= weight;
        if let Some(tenant) = tenant
            && let Some(n) = state.holding.get_mut(tenant)
        {
            *n -= 1;
            if *n == 0 {
                state.holding.remove(tenant);
            }
        }
    }

    /// Waits for a slot. Cancel-safe: dropping the future leaves the queue at once
    /// and never leaks a slot.
    pub async fn acquire(self: &Arc<Self>, priority: Priority) -> Result<Permit, Rejection> {
        self.acquire_as(priority, everyone(), 0).await
    }

    /// Waits for a slot for a request of `tenant` weighing `weight` bytes:
    /// tenants that wait are served in turn within each class. A request
    /// heavier than `max_inflight_bytes` is refused at once (`413`).
    pub async fn acquire_as(
        self: &Arc<Self>,
        priority: Priority,
        tenant: ClientKey,
        weight: u64,
    ) -> Result<Permit, Rejection> {
        self.acquire_before(priority, tenant, weight, None).await
    }

    /// As [`acquire_as`](Self::acquire_as), for a client that stops waiting
    /// at `deadline`: a predicted wait beyond it is refused at once, and no
    /// wait outlasts it.
    pub async fn acquire_before(
        self: &Arc<Self>,
        priority: Priority,
        tenant: ClientKey,
        weight: u64,
        deadline: Option<Deadline>,
    ) -> Result<Permit, Rejection> {
        if self.too_heavy(weight) {
            return Err(Rejection::new(Reason::BodyTooLarge)
                .with_cause("the request outweighs max_inflight_bytes"));
        }
        if let Some(next) = self.successor() {
            return Box::pin(next.acquire_before(priority, tenant, weight, deadline)).await;
        }
        let now = Instant::now();
        let (id, mut rx) = {
            let mut state = match self.lock() {
                Locked::Unlimited(inflight) => return Ok(self.count_unlimited(inflight)),
                Locked::Limited(state) => state,
            };
            if let Some(next) = self.successor() {
                drop(state);
                return Box::pin(next.acquire_before(priority, tenant, weight, deadline)).await;
            }
            if let Some(permit) = self.take_free_slot(&mut state, &tenant, weight, now) {
                return Ok(permit);
            }
            state.rate.saturated(now);
            if self.settings.queue_capacity == 0 {
                return Err(self.shed(&mut state, Reason::QueueFull, &tenant, now));
            }
            let standing = self.standing(&mut state, now);
            // Deadline-aware: refuse now what would only time out later. A
            // standing queue serves the newest first: only higher classes
            // are ahead of an arrival (it takes the next slot of its class).
            let ahead = match standing {
                Some(_) => state.queue.above(priority),
                None => state.queue.ahead_of(priority, &tenant),
            };
            let allowed = self.settings.queue_timeout;
            // The client's own deadline, when sooner, is the wait allowed.
            let allowed = deadline.map_or(allowed, |d| allowed.min(d.remaining(now)));
            if let Some(wait) = state.rate.time_for(ahead + 1, now)
                && wait > allowed
            {
                return Err(self.shed(&mut state, Reason::QueueFull, &tenant, now));
            }
            // A standing queue holds what drains within the target: the
            // oldest of the lowest class makes room (it would expire first).
            if let Some(target) = standing
                && state.queue.len() >= self.standing_depth(&state, target, now)
                && let Some(oldest) = state.queue.pop_oldest_up_to(priority)
            {
                let _ = oldest.tx.send(Err(Reason::QueueFull));
                Self::count_shed(&mut state, 1);
            }
            if state.queue.len() >= self.settings.queue_capacity {
                match state.queue.evict_for(priority, &tenant) {
                    // Dropping its sender wakes the evicted waiter with a refusal.
                    Some((_, evicted)) => drop(evicted.tx),
                    None => return Err(self.shed(&mut state, Reason::QueueFull, &tenant, now)),
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = WAITER_IDS.fetch_add(1, Ordering::Relaxed);
            state
                .queue
                .push(id, priority, &tenant, Waiter { tx, weight });
            self.publish(&mut state);
            (id, rx)
        };
        let place = QueuePlace {
            controller: self.clone(),
            id,
            priority,
            tenant,
            left: false,
        };
        let patience = deadline.map_or(self.settings.queue_timeout, |d| {
            self.settings.queue_timeout.min(d.remaining(now))
        });
        let outcome = tokio::time::timeout(patience, &mut rx).await;
        // Out of the queue in every case below (a granted waiter already is).
        let tenant = place.leave();
        let reason = match outcome {
            Ok(Ok(Ok(permit))) => {
                self.metrics.record_wait(now.elapsed());
                return Ok(permit);
            }
            // Shed by the queue (a standing queue's target, or room made).
            Ok(Ok(Err(reason))) => reason,
            Ok(Err(_)) => Reason::QueueFull, // evicted by a higher class
            Err(_) => match rx.try_recv() {
                // A slot granted at the last moment is still taken.
                Ok(Ok(permit)) => {
                    self.metrics.record_wait(now.elapsed());
                    return Ok(permit);
                }
                Ok(Err(reason)) => reason,
                Err(_) => Reason::QueueTimeout,
            },
        };
        let Locked::Limited(mut state) = self.lock() else {
            // Only a limited controller queues.
            return Err(Rejection::new(reason));
        };
        Err(self.shed(&mut state, reason, &tenant, Instant::now()))
    }

    /// Counts a refusal and builds it with its `Retry-After`: the time to drain
    /// the work ahead (queued + in flight) at the recent completion rate.
    fn shed(
        &self,
        state: &mut State,
        reason: Reason,
        tenant: &ClientKey,
        now: Instant,
    ) -> Rejection {
        let (counter, count) = match reason {
            Reason::QueueTimeout => (&self.metrics.shed_timeout, &self.shed_timeout),
            _ => (&self.metrics.shed_full, &self.shed_full),
        };
        counter.increment(1);
        count.fetch_add(1, Ordering::Relaxed);
        if self.settings.by_tenant {
            state.shed_by_tenant.count(tenant);
        }
        let work = state.queue.len() + state.inflight;
        let drain = state.rate.advise(work, now, state.limit);
        let secs = retry_after_secs(
            drain,
            retry_factor(),
            self.settings.retry_after_min_s,
            self.settings.retry_after_max_s,
        );
        Rejection::new(reason).with_retry_after(secs)
    }

    /// A permit ended: feed its sample to the algorithm, then hand its slot
    /// (and any the limit gained) to the next waiters, or free it.
    fn release(
        self: &Arc<Self>,
        sample: Option<(Duration, bool, Option<std::net::IpAddr>)>,
        tenant: Option<ClientKey>,
        weight: u64,
        meter: Option<Arc<Meter>>,
        probe: Option<u64>,
    ) {
        let mut state = match self.lock() {
            Locked::Unlimited(inflight) => {
                // Zero: the count went to the controller that took over.
                if inflight
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    self.metrics.inflight.decrement(1.0);
                } else if let Some(next) = self.successor() {
                    next.release(sample, tenant, weight, meter, None);
                }
                return;
            }
            Locked::Limited(state) => state,
        };
        if let Some(next) = self.successor() {
            drop(state);
            return next.release(sample, tenant, weight, meter, None);
        }
        let now = Instant::now();
        self.tick(&mut state, now);
        let saturated = state.busy() >= state.limit || state.queue.len() > 0;
        // While a probe runs, it learns only from the requests it admitted,
        // at the concurrency they were admitted at.
        let inflight = state.busy();
        let sample = sample.filter(|_| state.probe.is_none_or(|(id, _)| probe == Some(id)));
        if let (Some(algorithm), Some((rtt, dropped, client))) = (state.algorithm.as_mut(), sample)
        {
            let sample = Sample {
                rtt,
                inflight,
                dropped,
                limited: saturated,
                client,
            };
            if let Some(limit) = algorithm.sample(sample, now) {
                state.limit = limit;
                self.metrics.limit.set(limit as f64);
            }
            state.sync_probe();
        }
        let extra = meter.map_or(0, |m| {
            m.released.store(true, Ordering::Relaxed);
            if state.overrun.as_ref().is_some_and(|o| Arc::ptr_eq(o, &m)) {
                state.overrun = None;
            }
            m.extra.load(Ordering::Relaxed)
        });
        if weight + extra > 0 {
            // Bodies waiting to grow look again.
            self.bytes_freed.notify_waiters();
        }
        Self::ungrant(&mut state, tenant.as_ref(), weight + extra, probe);
        self.fill(&mut state);
        let still = state.busy() >= state.limit || state.queue.len() > 0;
        state.rate.record(now, saturated, still);
        self.publish(&mut state);
    }

    /// The target while the queue stands: from the moment it has not been
    /// empty for a whole interval (CoDel's test) or is full, until it has been
    /// empty for one (an upstream's workers finishing together empty a short
    /// queue for an instant without the overload being over).
    fn standing(&self, state: &mut State, now: Instant) -> Option<Duration> {
        let Discipline::Codel { interval, target } = self.settings.discipline else {
            return None;
        };
        let lasted =
            |since: Option<Instant>| since.is_some_and(|t| now.duration_since(t) >= interval);
        Self::observe(state, interval, now);
        // Never empty over the last two intervals, and not draining:
        // arrivals outpace the upstream. A burst that drains, however long
        // it takes, only shrinks: shedding it would lose what a FIFO serves;
        // and once arrivals fall behind the upstream (the queue shrinks from
        // one interval to the next) what is left is served, not shed.
        let (grown, draining) = match state.mins {
            [Some(before), Some(last)] => (before > 0 && last >= before, last < before),
            _ => (false, false),
        };
        let full = state.queue.len() >= self.settings.queue_capacity;
        if state.standing && !full && (lasted(state.empty_since) || draining) {
            state.standing = false;
        } else if !state.standing && (grown || full) {
            state.standing = true;
        }
        state.standing.then_some(target)
    }

    /// Notes the queue's length for the standing test: the shortest it was
    /// in each interval, for the last two.
    fn observe(state: &mut State, interval: Duration, now: Instant) {
        let len = state.queue.len();
        match &mut state.window {
            Some((start, min, _)) if now.duration_since(*start) < interval => {
                *min = (*min).min(len);
            }
            window => {
                // What the queue's own shedding took counts as still there:
                // a standing queue that sheds is not draining.
                if let Some((_, min, shed)) = *window {
                    state.mins = [state.mins[1], Some(min + shed)];
                }
                *window = Some((now, len, 0));
            }
        }
    }

    /// Counts waiters a standing queue shed, for the standing test.
    fn count_shed(state: &mut State, n: usize) {
        if let Some((_, _, shed)) = &mut state.window {
            *shed += n;
        }
    }

    /// Sheds the waiters that have waited past `target`.
    fn expire(&self, state: &mut State, target: Duration, now: Instant) {
        let Some(cutoff) = now.checked_sub(target) else {
            return;
        };
        let expired = state.queue.older_than(cutoff);
        if !expired.is_empty() {
            Self::count_shed(state, expired.len());
            for waiter in expired {
                let _ = waiter.tx.send(Err(Reason::QueueTimeout));
            }
            self.publish(state);
        }
    }

    /// Waiters a standing queue keeps: what drains within `target` at the
    /// completion rate, never more than the capacity.
    ///
    /// At least the limit: an upstream's workers often finish together, and
    /// a queue shorter than the slots they free at once would leave slots
    /// idle until the next arrivals.
    fn standing_depth(&self, state: &State, target: Duration, now: Instant) -> usize {
        state
            .rate
            .warm_per_second(now)
            .map_or(self.settings.queue_capacity, |rate| {
                (rate * target.as_secs_f64()).ceil() as usize
            })
            .max(state.limit)
            .clamp(1, self.settings.queue_capacity)
    }

    /// Grants waiters slots while the limit allows, each tenant within its
    /// share; newest first while the queue stands.
    fn fill(self: &Arc<Self>, state: &mut State) {
        let cap = self.settings.max_inflight_per_tenant;
        if matches!(self.settings.discipline, Discipline::Fifo) {
            self.grant_waiters(state, cap, false);
            return;
        }
        let now = Instant::now();
        let standing = self.standing(state, now);
        // Newest first, and only then are the waiters left past the target
        // shed: a slot is better given to an older waiter than left idle.
        self.grant_waiters(state, cap, standing.is_some());
        if let Some(target) = standing {
            self.expire(state, target, now);
        }
    }

    fn grant_waiters(self: &Arc<Self>, state: &mut State, cap: Option<usize>, newest: bool) {
        while state.busy() < state.limit {
            let holding = &state.holding;
            let may_run =
                |t: &ClientKey| cap.is_none_or(|cap| holding.get(t).copied().unwrap_or(0) < cap);
            let left = self
                .settings
                .max_inflight_bytes
                .map(|max| max.saturating_sub(state.inflight_bytes));
            let fits = |w: &Waiter| left.is_none_or(|left| w.weight <= left);
            let Some((_, tenant, waiter)) = state.queue.pop_next(may_run, fits, newest) else {
                return;
            };
            let permit = self.grant(state, &tenant, waiter.weight);
            if let Err(Ok(mut permit)) = waiter.tx.send(Ok(permit)) {
                // The waiter is gone and the permit came back. It must not
                // release (the lock is held): the slot is simply still free.
                permit.armed = false;
                Self::ungrant(state, permit.tenant.as_ref(), permit.weight, permit.probe);
            }
        }
    }

    /// Changes the limit in force (a slow start after the circuit closed; an
    /// adaptive limit). Requests already in flight are never cut short: a lower
    /// limit takes effect as they finish. A higher one admits waiters at once.
    /// No effect on an unlimited controller.
    pub fn set_limit(self: &Arc<Self>, limit: usize) {
        if let Some(next) = self.successor() {
            return next.set_limit(limit);
        }
        let Locked::Limited(mut state) = self.lock() else {
            return;
        };
        let limit = limit.max(1);
        if state.limit == limit {
            return;
        }
        state.limit = limit;
        self.metrics.limit.set(limit as f64);
        self.fill(&mut state);
        self.publish(&mut state);
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        match self.lock() {
            Locked::Unlimited(_) => usize::MAX,
            Locked::Limited(state) => state.limit,
        }
    }

    /// The queue waits of admitted requests recorded so far.
    pub fn queue_wait(&self) -> &LatencySketch {
        &self.metrics.queue_wait_sketch
    }

    /// The live state.
    pub fn snapshot(&self) -> AdmissionSnapshot {
        let now = Instant::now();
        let mut snapshot = AdmissionSnapshot {
            inflight: 0,
            queued: 0,
            limit: None,
            queue_capacity: self.settings.queue_capacity,
            completion_rate: None,
            shed_queue_full: self.shed_full.load(Ordering::Relaxed),
            shed_queue_timeout: self.shed_timeout.load(Ordering::Relaxed),
            adaptive: None,
            tenants: None,
            inflight_bytes: None,
            bytes_limit: self.settings.max_inflight_bytes,
        };
        match self.lock() {
            Locked::Unlimited(inflight) => snapshot.inflight = inflight.load(Ordering::Relaxed),
            Locked::Limited(state) => {
                snapshot.inflight = state.inflight;
                snapshot.queued = state.queue.len();
                snapshot.limit = Some(state.limit);
                snapshot.completion_rate = state.rate.per_second(now);
                snapshot.adaptive = state.algorithm.as_ref().map(|a| a.snapshot(now));
                snapshot.inflight_bytes = self
                    .settings
                    .max_inflight_bytes
                    .map(|_| state.inflight_bytes);
                snapshot.tenants = self.settings.by_tenant.then(|| TenantsSnapshot {
                    waiting: state.queue.tenants(),
                    holding: self
                        .settings
                        .max_inflight_per_tenant
                        .map(|_| state.holding.len()),
                    top_queued: state
                        .queue
                        .top(TOP_TENANTS)
                        .into_iter()
                        .map(|(t, n)| TenantCount::new(&t, n as u64))
                        .collect(),
                    top_shed: state.shed_by_tenant.top(TOP_TENANTS),
                });
            }
        }
        snapshot
    }
}

/// A waiter's place in the queue; leaves it when dropped, so that a cancelled
/// request never stays queued.
struct QueuePlace {
    controller: Arc<Controller>,
    id: u64,
    priority: Priority,
    tenant: ClientKey,
    left: bool,
}

impl QueuePlace {
    /// Leaves the queue; the waiter's tenant.
    fn leave(mut self) -> ClientKey {
        self.remove();
        std::mem::replace(&mut self.tenant, everyone())
    }

    fn remove(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        // Handed to a reload's controller, the waiter is in its queue now.
        let mut controller = &self.controller;
        loop {
            if let Locked::Limited(mut state) = controller.lock()
                && state
                    .queue
                    .remove(self.id, self.priority, &self.tenant)
                    .is_some()
            {
                controller.publish(&mut state);
                return;
            }
            match controller.successor() {
                Some(next) => controller = next,
                None => return,
            }
        }
    }
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.remove();
    }
}

/// What a waiter is woken with: its slot, or why it was shed.
type Grant = Result<Permit, Reason>;

/// A request waiting: how to wake it, and what it weighs.
struct Waiter {
    tx: oneshot::Sender<Grant>,
    weight: u64,
}

/// A slot at the upstream; released (or handed to the next waiter) on drop.
#[derive(Debug)]
pub struct Permit {
    controller: Arc<Controller>,
    armed: bool,
    sample: Option<(Duration, bool)>,
    /// Who holds it, when an adaptive limit asks (see [`Permit::from_client`]).
    client: Option<std::net::IpAddr>,
    /// The tenant whose share it counts against (with
    /// `max_inflight_per_tenant`).
    tenant: Option<ClientKey>,
    /// The bytes it holds (with `max_inflight_bytes`).
    weight: u64,
    /// What its body weighs beyond `weight` as it streams (a body of
    /// unknown length, re-weighed).
    meter: Option<Arc<Meter>>,
    /// The probe it was admitted during, if any.
    probe: Option<u64>,
}

/// A permit's weight beyond its estimate, as its body streams. Both fields
/// change only under the controller's lock.
#[derive(Debug, Default)]
pub struct Meter {
    extra: AtomicU64,
    released: std::sync::atomic::AtomicBool,
}

/// A body of unknown length is re-weighed in steps of this many bytes: a
/// lock every 64 KiB streamed, not every frame.
const REWEIGH_STEP: u64 = 64 * 1024;

impl Permit {
    fn new(controller: Arc<Controller>, tenant: Option<ClientKey>, weight: u64) -> Self {
        Self {
            controller,
            armed: true,
            sample: None,
            client: None,
            tenant,
            weight,
            meter: None,
            probe: None,
        }
    }

    /// Records how the upstream answered: after `rtt`, and whether that was an
    /// overload signal (a timeout, a failure, a 5xx). An adaptive limit learns
    /// from it when the permit is released; a permit without one (the client
    /// went away) teaches nothing.
    pub fn record(&mut self, rtt: Duration, overloaded: bool) {
        self.sample = Some((rtt, overloaded));
    }

    /// Says who holds it (its address), so that its overload signals count
    /// as one client's (an adaptive limit backs off only when enough of its
    /// clients see overload).
    pub fn from_client(&mut self, client: std::net::IpAddr) {
        self.client = Some(client);
    }

    /// Corrects the recorded sample by what the end of the exchange said
    /// (a gRPC status in the trailers): an overload signal after all, or no
    /// sample at all.
    pub fn correct(&mut self, load: Load) {
        match load {
            Load::Normal => {}
            Load::Overload => {
                if let Some((_, overloaded)) = &mut self.sample {
                    *overloaded = true;
                }
            }
            Load::Unrelated => self.sample = None,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.armed {
            self.controller.release(
                self.sample.take().map(|(rtt, d)| (rtt, d, self.client)),
                self.tenant.take(),
                self.weight,
                self.meter.take(),
                self.probe,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use metrics::GaugeFn;

    use super::*;

    /// A gauge whose next update, once held, waits for a go.
    #[derive(Default)]
    struct HeldGauge {
        value: Mutex<f64>,
        hold: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
    }

    impl HeldGauge {
        fn update(&self, f: impl FnOnce(&mut f64)) {
            let hold = self.hold.lock().unwrap().take();
            if let Some((held, go)) = hold {
                held.send(()).unwrap();
                go.recv().unwrap();
            }
            f(&mut self.value.lock().unwrap());
        }
    }

    impl GaugeFn for HeldGauge {
        fn increment(&self, v: f64) {
            self.update(|x| *x += v);
        }
        fn decrement(&self, v: f64) {
            self.update(|x| *x -= v);
        }
        fn set(&self, v: f64) {
            self.update(|x| *x = v);
        }
    }

    /// Two requests on a route without admission finish at once, and the
    /// first one's gauge update lands last: the gauge must still say 0.
    #[test]
    fn an_idle_route_without_admission_shows_nothing_in_flight() {
        let gauge = Arc::new(HeldGauge::default());
        let metrics = AdmissionMetrics {
            inflight: Gauge::from_arc(gauge.clone()),
            ..AdmissionMetrics::noop()
        };
        let c = Controller::with_metrics(AdmissionSettings::UNLIMITED, metrics);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let a = rt.block_on(c.acquire(Priority::Normal)).unwrap();
        let b = rt.block_on(c.acquire(Priority::Normal)).unwrap();
        let (held, is_held) = mpsc::channel();
        let (go, release) = mpsc::channel();
        *gauge.hold.lock().unwrap() = Some((held, release));
        let first = std::thread::spawn(move || drop(a));
        is_held.recv().unwrap(); // a's update is on its way, not applied
        drop(b);
        go.send(()).unwrap();
        first.join().unwrap();
        assert_eq!(c.snapshot().inflight, 0);
        assert_eq!(*gauge.value.lock().unwrap(), 0.0);
    }
}
