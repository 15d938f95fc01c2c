//! The bytes budget (`max_inflight_bytes`): what a request weighs, whether it
//! fits, and a streaming body's weight growing as it arrives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::permit::Permit;
use super::{Controller, Locked, State};
use crate::body::Growth;

impl Controller {
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
    pub(super) fn grow(&self, meter: &Arc<Meter>, base: u64, total: u64) -> Growth {
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

    pub(super) fn fits(&self, state: &State, weight: u64) -> bool {
        self.settings
            .max_inflight_bytes
            .is_none_or(|max| state.inflight_bytes + weight <= max)
    }
}

/// A permit's weight beyond its estimate, as its body streams. Both fields
/// change only under the controller's lock.
#[derive(Debug, Default)]
pub struct Meter {
    pub(super) extra: AtomicU64,
    pub(super) released: std::sync::atomic::AtomicBool,
}

/// A body of unknown length is re-weighed in steps of this many bytes: a
/// lock every 64 KiB streamed, not every frame.
const REWEIGH_STEP: u64 = 64 * 1024;
