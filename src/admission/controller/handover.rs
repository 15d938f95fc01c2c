//! A reload's hand-over: a controller built for a route's new settings
//! takes the old one's requests (in flight and queued), its bytes and, when
//! its settings are the same, its adaptive algorithm; both never admit side by
//! side.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::super::queue::WaitQueue;
use super::bytes::Meter;
use super::permit::Waiter;
use super::{Controller, Locked};
use crate::client_key::ClientKey;
use crate::limit::LimitAlgorithm;

/// What a controller hands to the one a reload built in its place.
#[derive(Default)]
pub(super) struct Adopted {
    pub(super) inflight: usize,
    pub(super) bytes: u64,
    pub(super) holding: HashMap<ClientKey, usize>,
    pub(super) queue: WaitQueue<ClientKey, Waiter>,
    pub(super) algorithm: Option<Box<dyn LimitAlgorithm>>,
    pub(super) overrun: Option<Arc<Meter>>,
}

impl Controller {
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
                        .limit
                        .hand_over()
                        .filter(|_| match (&self.adaptive, &next.adaptive) {
                            (Some(this), Some(next)) => this.same_as(next.as_ref()),
                            _ => false,
                        });
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
    pub(super) fn adopt(self: &Arc<Self>, adopted: Adopted) {
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
                    let limit = state.limit.adopt(algorithm, self.settings.max_inflight);
                    self.metrics.limit.set(limit as f64);
                }
                self.fill(&mut state);
                self.publish(&mut state);
            }
        }
    }
}
