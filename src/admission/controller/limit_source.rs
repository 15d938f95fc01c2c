//! [`LimitSource`]: the one writer of a controller's limit. The limit is
//! static (`max_inflight`), moved by an adaptive algorithm's samples, or held
//! down by the circuit's slow start; each change goes through here, so that
//! two writers never disagree behind each other's back (config refuses a
//! slow start on an adaptive route: the algorithm's ramp is its own).

use tokio::time::Instant;

use crate::limit::{AlgorithmSnapshot, LimitAlgorithm, Sample};

/// The limit in force and what moves it.
pub(super) struct LimitSource {
    /// The limit in force.
    current: usize,
    /// Moves it from the samples of answered requests (adaptive mode).
    algorithm: Option<Box<dyn LimitAlgorithm>>,
    /// While the algorithm probes: its number, and the requests admitted
    /// since it started still in flight (only they count against its limit).
    probe: Option<(u64, usize)>,
}

impl LimitSource {
    /// `fixed`, or what `algorithm` starts at.
    pub(super) fn new(fixed: usize, algorithm: Option<Box<dyn LimitAlgorithm>>) -> Self {
        Self {
            current: algorithm.as_ref().map_or(fixed, |a| a.limit()),
            algorithm,
            probe: None,
        }
    }

    /// The limit in force.
    pub(super) fn current(&self) -> usize {
        self.current
    }

    /// The slots taken of `inflight`, as the limit counts them: while a
    /// probe runs, only those of requests admitted during it.
    pub(super) fn busy(&self, inflight: usize) -> usize {
        self.probe.map_or(inflight, |(_, n)| n)
    }

    /// A request was admitted: the probe it counts against, if one runs.
    pub(super) fn admitted(&mut self) -> Option<u64> {
        let (id, n) = self.probe.as_mut()?;
        *n += 1;
        Some(*id)
    }

    /// A request admitted during `probe` ended.
    pub(super) fn released(&mut self, probe: Option<u64>) {
        if let (Some(id), Some((current, n))) = (probe, &mut self.probe)
            && id == *current
        {
            *n -= 1;
        }
    }

    /// Feeds `sample` (of a request admitted during `probe`) to the
    /// algorithm: while a probe runs, it learns only from the requests it
    /// admitted. The new limit, when it changed.
    pub(super) fn sample(
        &mut self,
        sample: Sample,
        probe: Option<u64>,
        now: Instant,
    ) -> Option<usize> {
        if self.probe.is_some_and(|(id, _)| probe != Some(id)) {
            return None;
        }
        let limit = self.algorithm.as_mut()?.sample(sample, now);
        self.sync_probe();
        self.current = limit.unwrap_or(self.current);
        limit
    }

    /// Lets the algorithm see time pass (a probe's deadline) without a
    /// sample. The new limit, when it changed.
    pub(super) fn tick(&mut self, now: Instant) -> Option<usize> {
        let limit = self.algorithm.as_mut()?.tick(now)?;
        self.sync_probe();
        self.current = limit;
        Some(limit)
    }

    /// Holds the limit at `limit` (at least 1): a slow start's ramp. The new
    /// limit, when it changed.
    pub(super) fn hold(&mut self, limit: usize) -> Option<usize> {
        let limit = limit.max(1);
        if limit == self.current {
            return None;
        }
        self.current = limit;
        Some(limit)
    }

    /// Gives the algorithm up to a reload's controller; any probe ends.
    pub(super) fn hand_over(&mut self) -> Option<Box<dyn LimitAlgorithm>> {
        self.probe = None;
        self.algorithm.take()
    }

    /// Carries on with a predecessor's algorithm, within `max`. The new
    /// limit.
    pub(super) fn adopt(&mut self, algorithm: Box<dyn LimitAlgorithm>, max: usize) -> usize {
        self.current = algorithm.limit().min(max).max(1);
        self.algorithm = Some(algorithm);
        self.current
    }

    /// What `/status` shows of the algorithm.
    pub(super) fn snapshot(&self, now: Instant) -> Option<AlgorithmSnapshot> {
        self.algorithm.as_ref().map(|a| a.snapshot(now))
    }

    /// Follows the algorithm into or out of a probe.
    fn sync_probe(&mut self) {
        let id = self.algorithm.as_ref().and_then(|a| a.probe());
        if id != self.probe.map(|(id, _)| id) {
            self.probe = id.map(|id| (id, 0));
        }
    }
}
