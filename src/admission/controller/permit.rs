//! [`Permit`]: a slot at the upstream, given back when dropped; and a
//! waiter's place in the queue, left when dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::super::Priority;
use super::super::tenants::everyone;
use super::bytes::Meter;
use super::{Controller, Locked};
use crate::classify::Load;
use crate::client_key::ClientKey;
use crate::error::Reason;

/// A waiter's place in the queue; leaves it when dropped, so that a cancelled
/// request never stays queued.
pub(super) struct QueuePlace {
    pub(super) controller: Arc<Controller>,
    pub(super) id: u64,
    pub(super) priority: Priority,
    pub(super) tenant: ClientKey,
    pub(super) left: bool,
}

impl QueuePlace {
    /// Leaves the queue; the waiter's tenant.
    pub(super) fn leave(mut self) -> ClientKey {
        self.remove();
        std::mem::replace(&mut self.tenant, everyone())
    }

    pub(super) fn remove(&mut self) {
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
pub(super) type Grant = Result<Permit, Reason>;

/// A request waiting: how to wake it, and what it weighs.
pub(super) struct Waiter {
    pub(super) tx: oneshot::Sender<Grant>,
    pub(super) weight: u64,
}

/// A slot at the upstream; released (or handed to the next waiter) on drop.
#[derive(Debug)]
pub struct Permit {
    pub(super) controller: Arc<Controller>,
    pub(super) armed: bool,
    pub(super) sample: Option<(Duration, bool)>,
    /// Who holds it, when an adaptive limit asks (see [`Permit::from_client`]).
    pub(super) client: Option<std::net::IpAddr>,
    /// The tenant whose share it counts against (with
    /// `max_inflight_per_tenant`).
    pub(super) tenant: Option<ClientKey>,
    /// The bytes it holds (with `max_inflight_bytes`).
    pub(super) weight: u64,
    /// What its body weighs beyond `weight` as it streams (a body of
    /// unknown length, re-weighed).
    pub(super) meter: Option<Arc<Meter>>,
    /// The probe it was admitted during, if any.
    pub(super) probe: Option<u64>,
}

impl Permit {
    pub(super) fn new(controller: Arc<Controller>, tenant: Option<ClientKey>, weight: u64) -> Self {
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
