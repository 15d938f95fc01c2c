//! [`Controller`]: one route's in-flight limit, wait queue and completion
//! rate, behind one lock. Its parts, each in its own file: the slots and the
//! queue here; the bytes budget (`bytes`); CoDel's standing-queue test
//! (`standing`); the limit's one source, static, adaptive or held by a slow
//! start (`limit_source`); a reload's hand-over (`handover`); permits and
//! queue places (`permit`); metrics and the `/status` snapshot (`snapshot`).

mod bytes;
mod handover;
mod limit_source;
mod permit;
mod snapshot;
mod standing;
mod wait;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::queue::WaitQueue;
use super::retry_after::CompletionRate;
use super::settings::{AdmissionSettings, Discipline};
use super::tenants::{ShedCounts, everyone};
use crate::client_key::ClientKey;
use crate::limit::{AlgorithmSettings, Sample, Throttle};

pub use bytes::Meter;
use limit_source::LimitSource;
pub use permit::Permit;
use permit::Waiter;
pub use snapshot::{AdmissionMetrics, AdmissionSnapshot, TOP_TENANTS, TenantsSnapshot};
use standing::QueueState;

struct State {
    inflight: usize,
    /// The limit in force, and what moves it.
    limit: LimitSource,
    queue: WaitQueue<ClientKey, Waiter>,
    /// The admitted requests' weights, summed.
    inflight_bytes: u64,
    /// The queue's history, for CoDel's standing test.
    queue_state: QueueState,
    /// The streaming body allowed past the bytes budget, if one is (see
    /// `Controller::grow`).
    overrun: Option<Arc<Meter>>,
    /// Slots held per tenant (kept only with `max_inflight_per_tenant`).
    holding: HashMap<ClientKey, usize>,
    shed_by_tenant: ShedCounts,
    rate: CompletionRate,
}

impl State {
    /// The slots taken, as the limit counts them: while a probe runs, only
    /// those of requests admitted during it.
    fn busy(&self) -> usize {
        self.limit.busy(self.inflight)
    }

    /// Whether every slot the limit allows is taken.
    fn full(&self) -> bool {
        self.busy() >= self.limit.current()
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
        let limit = LimitSource::new(settings.max_inflight, algorithm);
        if limit.current() != usize::MAX {
            metrics.limit.set(limit.current() as f64);
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
                queue_state: QueueState::default(),
                overrun: None,
                holding: HashMap::new(),
                shed_by_tenant: ShedCounts::default(),
                rate: CompletionRate::for_limit(settings.max_inflight),
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
        state
            .queue_state
            .emptied(state.queue.len() == 0, Instant::now());
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

    /// Whether an adaptive algorithm moves the limit.
    pub fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    /// Whether request bytes are counted (`max_inflight_bytes`).
    pub fn weighs_bytes(&self) -> bool {
        self.settings.max_inflight_bytes.is_some()
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
        if state.full() || !self.fits(state, weight) {
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
        if state.full() {
            state.rate.saturated(now);
        }
        self.publish(state);
        Some(permit)
    }

    /// Lets the algorithm see time pass (a probe's deadline) without a sample.
    fn tick(self: &Arc<Self>, state: &mut State, now: Instant) {
        let Some(limit) = state.limit.tick(now) else {
            return;
        };
        self.metrics.limit.set(limit as f64);
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
        permit.probe = state.limit.admitted();
        permit
    }

    /// Gives back a slot `tenant` held, and its `weight`.
    fn ungrant(state: &mut State, tenant: Option<&ClientKey>, weight: u64, probe: Option<u64>) {
        state.limit.released(probe);
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
        let saturated = state.full() || state.queue.len() > 0;
        // While a probe runs, it learns only from the requests it admitted,
        // at the concurrency they were admitted at.
        let inflight = state.busy();
        if let Some((rtt, dropped, client)) = sample {
            let sample = Sample {
                rtt,
                inflight,
                dropped,
                limited: saturated,
                client,
            };
            if let Some(limit) = state.limit.sample(sample, probe, now) {
                self.metrics.limit.set(limit as f64);
            }
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
        let still = state.full() || state.queue.len() > 0;
        state.rate.record(now, saturated, still);
        self.publish(&mut state);
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
        while !state.full() {
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
        let Some(limit) = state.limit.hold(limit) else {
            return;
        };
        self.metrics.limit.set(limit as f64);
        self.fill(&mut state);
        self.publish(&mut state);
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        match self.lock() {
            Locked::Unlimited(_) => usize::MAX,
            Locked::Limited(state) => state.limit.current(),
        }
    }
}

#[cfg(test)]
mod tests;
