//! CoDel's standing-queue test (`queue_discipline = "codel"`): when the queue
//! stands, how many it keeps, and who is shed past the target.

use std::time::Duration;

use tokio::time::Instant;

use super::super::settings::Discipline;
use super::{Controller, State};
use crate::error::Reason;

/// What the standing test remembers of the queue.
#[derive(Debug, Default)]
pub(super) struct QueueState {
    /// Since when the queue has not been empty.
    nonempty_since: Option<Instant>,
    /// Since when it has been empty.
    empty_since: Option<Instant>,
    /// Whether it stands (CoDel): entered when it has grown over an
    /// interval without emptying (or is full), left after an interval
    /// always empty.
    standing: bool,
    /// The current interval's start, the queue's shortest length in it and
    /// the waiters it shed (CoDel's standing test).
    window: Option<(Instant, usize, usize)>,
    /// The shortest length in each of the last two intervals, oldest first.
    mins: [Option<usize>; 2],
}

impl QueueState {
    /// Notes whether the queue is `empty` now.
    pub(super) fn emptied(&mut self, empty: bool, now: Instant) {
        if empty {
            self.nonempty_since = None;
            self.empty_since.get_or_insert(now);
        } else {
            self.empty_since = None;
            self.nonempty_since.get_or_insert(now);
        }
    }
}

impl Controller {
    /// The target while the queue stands: from the moment it has not been
    /// empty for a whole interval (CoDel's test) or is full, until it has been
    /// empty for one (an upstream's workers finishing together empty a short
    /// queue for an instant without the overload being over).
    pub(super) fn standing(&self, state: &mut State, now: Instant) -> Option<Duration> {
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
        let (grown, draining) = match state.queue_state.mins {
            [Some(before), Some(last)] => (before > 0 && last >= before, last < before),
            _ => (false, false),
        };
        let full = state.queue.len() >= self.settings.queue_capacity;
        if state.queue_state.standing
            && !full
            && (lasted(state.queue_state.empty_since) || draining)
        {
            state.queue_state.standing = false;
        } else if !state.queue_state.standing && (grown || full) {
            state.queue_state.standing = true;
        }
        state.queue_state.standing.then_some(target)
    }

    /// Notes the queue's length for the standing test: the shortest it was
    /// in each interval, for the last two.
    pub(super) fn observe(state: &mut State, interval: Duration, now: Instant) {
        let len = state.queue.len();
        match &mut state.queue_state.window {
            Some((start, min, _)) if now.duration_since(*start) < interval => {
                *min = (*min).min(len);
            }
            window => {
                // What the queue's own shedding took counts as still there:
                // a standing queue that sheds is not draining.
                if let Some((_, min, shed)) = *window {
                    state.queue_state.mins = [state.queue_state.mins[1], Some(min + shed)];
                }
                *window = Some((now, len, 0));
            }
        }
    }

    /// Counts waiters a standing queue shed, for the standing test.
    pub(super) fn count_shed(state: &mut State, n: usize) {
        if let Some((_, _, shed)) = &mut state.queue_state.window {
            *shed += n;
        }
    }

    /// Sheds the waiters that have waited past `target`.
    pub(super) fn expire(&self, state: &mut State, target: Duration, now: Instant) {
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
    pub(super) fn standing_depth(&self, state: &State, target: Duration, now: Instant) -> usize {
        state
            .rate
            .warm_per_second(now)
            .map_or(self.settings.queue_capacity, |rate| {
                (rate * target.as_secs_f64()).ceil() as usize
            })
            .max(state.limit.current())
            .clamp(1, self.settings.queue_capacity)
    }
}
