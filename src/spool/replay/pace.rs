//! How fast a spool replays: a doubling backoff for the whole route after an
//! outage or the upstream's backpressure ([`Pause`]), and how many requests
//! (and bytes) may be on their way at once, grown on success and halved on
//! failure ([`Pace`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{BACKOFF_MIN, MAX_INFLIGHT, MAX_INFLIGHT_BYTES, RETRY_AFTER_MAX};
use crate::jitter::Jitter;

// === Backoff ===

/// A doubling backoff with jitter: `BACKOFF_MIN << failures`, capped.
pub(super) fn backoff_step(failures: u32, cap: Duration, jitter: &mut Jitter) -> Duration {
    let step = BACKOFF_MIN.saturating_mul(1 << failures.min(16)).min(cap);
    // Full jitter above half the step: replicas do not retry in step.
    step.mul_f64(0.5 + jitter.unit() / 2.0)
}

/// When the whole route may go on: after an outage, the upstream's
/// route-wide backpressure, or dead letters that cannot be written.
#[derive(Debug)]
pub(super) struct Pause {
    pub(super) failures: u32,
    pub(super) until: Option<Instant>,
    pub(super) jitter: Jitter,
}

impl Pause {
    pub(super) fn new() -> Self {
        Self {
            failures: 0,
            until: None,
            jitter: Jitter::from_entropy(),
        }
    }

    /// A delivery succeeded: the next pause starts small again. A pause in
    /// force (another delivery's `Retry-After`) still runs out by itself.
    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Pauses for the next step (up to `cap`), and at least `at_least`.
    pub(super) fn extend(&mut self, cap: Duration, at_least: Option<Duration>) {
        let step = backoff_step(self.failures, cap, &mut self.jitter);
        self.failures += 1;
        let wait = step.max(at_least.unwrap_or_default().min(RETRY_AFTER_MAX));
        let until = Instant::now() + wait;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    pub(super) fn until(&self) -> Option<Instant> {
        self.until.filter(|u| *u > Instant::now())
    }
}

// === The pace ===

/// How many deliveries may run at once: TCP's slow start and congestion
/// avoidance, in deliveries. It starts at one, grows by one per delivery
/// (doubling per round), halves on a failed attempt and starts again from
/// one after an outage, so an upstream that has just come back is never
/// sent a burst.
#[derive(Debug)]
pub(super) struct Pace {
    pub(super) window: usize,
    pub(super) running: usize,
    pub(super) bytes: u64,
}

impl Pace {
    pub(super) fn room(&self, bytes: u64) -> bool {
        self.running < self.window
            && (self.running == 0 || self.bytes + bytes <= MAX_INFLIGHT_BYTES)
    }
}

/// What the deliveries share with the loop that starts them.
pub(super) struct Shared {
    pub(super) pace: Mutex<Pace>,
    pub(super) pause: Mutex<Pause>,
    /// Told when a delivery ends (room, and perhaps a new pause).
    pub(super) ended: Notify,
    /// Whether replay is paused because dead letters cannot be written.
    pub(super) burying_fails: Mutex<bool>,
}

impl Shared {
    pub(super) fn pace(&self) -> std::sync::MutexGuard<'_, Pace> {
        self.pace.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn pause(&self) -> std::sync::MutexGuard<'_, Pause> {
        self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A delivery of `bytes` starts: counted until its guard is dropped.
    pub(super) fn start(self: &Arc<Self>, bytes: u64) -> InFlight {
        let mut pace = self.pace();
        pace.running += 1;
        pace.bytes += bytes;
        InFlight {
            shared: self.clone(),
            bytes,
            change: restart,
        }
    }
}

/// A delivery in flight, counted in the pace until dropped, however it ends
/// (a panic, an abort): `change` then moves the window (a delivery that
/// never said how it went starts it again).
pub(super) struct InFlight {
    pub(super) shared: Arc<Shared>,
    pub(super) bytes: u64,
    pub(super) change: fn(&mut Pace),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut pace = self.shared.pace();
        pace.running -= 1;
        pace.bytes -= self.bytes;
        (self.change)(&mut pace);
        drop(pace);
        self.shared.ended.notify_one();
    }
}

pub(super) fn grow(pace: &mut Pace) {
    pace.window = (pace.window + 1).min(MAX_INFLIGHT);
}

pub(super) fn halve(pace: &mut Pace) {
    pace.window = (pace.window / 2).max(1);
}

pub(super) fn restart(pace: &mut Pace) {
    pace.window = 1;
}

pub(super) fn keep(_: &mut Pace) {}
