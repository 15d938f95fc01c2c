//! Waiting for a slot: a place in the queue (highest class first, tenants in
//! turn, newest first while a CoDel queue stands), refused at once when the
//! predicted wait is beyond what the request may wait, and every refusal
//! counted with an honest `Retry-After`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::super::Priority;
use super::super::retry_after::retry_after_secs;
use super::super::tenants::everyone;
use super::permit::{Permit, QueuePlace, Waiter};
use super::{Controller, Locked, State, WAITER_IDS};
use crate::client_key::ClientKey;
use crate::deadline::Deadline;
use crate::error::{Reason, Rejection};
use crate::jitter::retry_factor;

impl Controller {
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
    pub(super) fn shed(
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
        let drain = state.rate.advise(work, now, state.limit.current());
        let secs = retry_after_secs(
            drain,
            retry_factor(),
            self.settings.retry_after_min_s,
            self.settings.retry_after_max_s,
        );
        Rejection::new(reason).with_retry_after(secs)
    }
}
