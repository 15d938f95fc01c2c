//! The bounded wait queue: highest priority class first; within a class,
//! tenants in turn (round robin), each tenant's waiters oldest first.
//!
//! One FIFO per class let one tenant flooding the route take every place
//! and every freed slot from the others (envoy#14550). Serving the tenants
//! that wait in turn gives each its share of the slots whatever the others
//! send (deficit round robin with a quantum of one request, the scheme of
//! nginx's and HAProxy's fair queues), and a full queue makes room by
//! refusing the heaviest tenant's newest waiter rather than a quiet tenant's
//! newcomer. With one tenant it is the FIFO it was.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use tokio::time::Instant;

use super::Priority;

/// Waiters by class and tenant. `K` names a tenant; `T` is what a waiter is
/// woken with; ids let a waiter that gives up remove itself; each waiter's
/// arrival time lets the ones that waited too long be found (CoDel).
#[derive(Debug)]
pub(crate) struct WaitQueue<K, T> {
    classes: [Class<K, T>; 3],
    len: usize,
}

/// One priority class.
#[derive(Debug)]
struct Class<K, T> {
    /// Each waiting tenant's waiters, oldest first.
    waiters: HashMap<K, VecDeque<Entry<T>>>,
    /// The tenants with waiters, in the order they are served.
    turns: VecDeque<K>,
}

/// One waiter: its id, when it arrived, and what wakes it.
#[derive(Debug)]
struct Entry<T> {
    id: u64,
    since: Instant,
    item: T,
}

impl<K, T> Default for Class<K, T> {
    fn default() -> Self {
        Self {
            waiters: HashMap::new(),
            turns: VecDeque::new(),
        }
    }
}

impl<K, T> Default for WaitQueue<K, T> {
    fn default() -> Self {
        Self {
            classes: Default::default(),
            len: 0,
        }
    }
}

impl<K: Clone + Eq + Hash, T> Class<K, T> {
    fn queued(&self, tenant: &K) -> usize {
        self.waiters.get(tenant).map_or(0, VecDeque::len)
    }

    fn len(&self) -> usize {
        self.turns.iter().map(|t| self.queued(t)).sum()
    }

    /// Takes a waiter of `tenant`, the oldest or the newest; forgets the
    /// tenant when it has none left.
    fn take(&mut self, tenant: &K, newest: bool) -> Option<(u64, T)> {
        let waiters = self.waiters.get_mut(tenant)?;
        let taken = if newest {
            waiters.pop_back()
        } else {
            waiters.pop_front()
        };
        if waiters.is_empty() {
            self.forget(tenant);
        }
        taken.map(|e| (e.id, e.item))
    }

    fn forget(&mut self, tenant: &K) {
        self.waiters.remove(tenant);
        if let Some(at) = self.turns.iter().position(|t| t == tenant) {
            self.turns.remove(at);
        }
    }

    /// The tenant with the most waiters (the one that came first to the turn
    /// order on a tie), and how many.
    fn heaviest(&self) -> Option<(&K, usize)> {
        self.turns
            .iter()
            .map(|t| (t, self.queued(t)))
            .reduce(|best, next| if next.1 > best.1 { next } else { best })
    }
}

impl<K: Clone + Eq + Hash, T> WaitQueue<K, T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, id: u64, priority: Priority, tenant: &K, item: T) {
        let class = &mut self.classes[priority.index()];
        let waiters = class.waiters.entry(tenant.clone()).or_default();
        if waiters.is_empty() {
            class.turns.push_back(tenant.clone());
        }
        waiters.push_back(Entry {
            id,
            since: Instant::now(),
            item,
        });
        self.len += 1;
    }

    /// The next waiter to serve: of the highest class with one that `fits`
    /// and whose tenant `may_run`, the first such tenant in turn's oldest
    /// waiter (its newest when `newest`: adaptive LIFO); that tenant's turn
    /// then goes to the back. A waiter that does not fit (too heavy for the
    /// bytes left) is passed over, not waited for.
    pub(crate) fn pop_next(
        &mut self,
        may_run: impl Fn(&K) -> bool,
        fits: impl Fn(&T) -> bool,
        newest: bool,
    ) -> Option<(u64, K, T)> {
        for class in self.classes.iter_mut().rev() {
            let waiters = &class.waiters;
            let candidate = |t: &K| {
                let w = waiters.get(t)?;
                if newest { w.back() } else { w.front() }
            };
            let Some(at) = class
                .turns
                .iter()
                .position(|t| may_run(t) && candidate(t).is_some_and(|e| fits(&e.item)))
            else {
                continue;
            };
            let tenant = class.turns.remove(at).expect("position is in range");
            let waiters = class.waiters.get_mut(&tenant).expect("a turn has waiters");
            let entry = if newest {
                waiters.pop_back()
            } else {
                waiters.pop_front()
            };
            let Entry { id, item, .. } = entry.expect("a turn has waiters");
            if waiters.is_empty() {
                class.waiters.remove(&tenant);
            } else {
                class.turns.push_back(tenant.clone());
            }
            self.len -= 1;
            return Some((id, tenant, item));
        }
        None
    }

    /// About how many waiters a new arrival of `priority` from `tenant` would
    /// be served after: every waiter of a higher class, its tenant's own, and
    /// of each other tenant of its class as many as get a turn before it.
    pub(crate) fn ahead_of(&self, priority: Priority, tenant: &K) -> usize {
        let higher = self.above(priority);
        let class = &self.classes[priority.index()];
        let own = class.queued(tenant);
        let others: usize = class
            .turns
            .iter()
            .filter(|t| *t != tenant)
            .map(|t| class.queued(t).min(own + 1))
            .sum();
        higher + own + others
    }

    /// Makes room for an arrival of `priority` from `tenant`: refuses the
    /// heaviest tenant's newest waiter of the lowest class below the
    /// arrival's; else, in its own class, that of a tenant with at least two
    /// more waiters than the arrival's would have (so that refusing it
    /// evens the shares, never the other way round). `None`: the arrival
    /// itself is the one to refuse.
    pub(crate) fn evict_for(&mut self, priority: Priority, tenant: &K) -> Option<(u64, T)> {
        let below = self.classes[..priority.index()]
            .iter_mut()
            .find(|class| !class.turns.is_empty());
        let evicted = match below {
            Some(class) => {
                let heaviest = class.heaviest().map(|(t, _)| t.clone());
                heaviest.and_then(|t| class.take(&t, true))
            }
            None => {
                let class = &mut self.classes[priority.index()];
                let own = class.queued(tenant);
                let heaviest = class
                    .heaviest()
                    .filter(|&(t, n)| t != tenant && n > own + 1)
                    .map(|(t, _)| t.clone());
                heaviest.and_then(|t| class.take(&t, true))
            }
        };
        if evicted.is_some() {
            self.len -= 1;
        }
        evicted
    }

    /// Removes waiter `id` of `tenant` in class `priority`, if it is still
    /// waiting.
    pub(crate) fn remove(&mut self, id: u64, priority: Priority, tenant: &K) -> Option<T> {
        let class = &mut self.classes[priority.index()];
        let waiters = class.waiters.get_mut(tenant)?;
        let at = waiters.iter().position(|e| e.id == id)?;
        let item = waiters.remove(at)?.item;
        if waiters.is_empty() {
            class.forget(tenant);
        }
        self.len -= 1;
        Some(item)
    }

    /// Removes every waiter that arrived before `cutoff`.
    pub(crate) fn older_than(&mut self, cutoff: Instant) -> Vec<T> {
        let mut out = Vec::new();
        for class in &mut self.classes {
            let mut emptied = Vec::new();
            for (tenant, waiters) in &mut class.waiters {
                while waiters.front().is_some_and(|e| e.since < cutoff) {
                    out.extend(waiters.pop_front().map(|e| e.item));
                }
                if waiters.is_empty() {
                    emptied.push(tenant.clone());
                }
            }
            for tenant in emptied {
                class.forget(&tenant);
            }
        }
        self.len -= out.len();
        out
    }

    /// Removes the oldest waiter of the lowest class present, if that class
    /// is not above `priority`.
    pub(crate) fn pop_oldest_up_to(&mut self, priority: Priority) -> Option<T> {
        let class = self.classes[..=priority.index()]
            .iter_mut()
            .find(|class| !class.turns.is_empty())?;
        let oldest = class
            .waiters
            .iter()
            .filter_map(|(t, w)| w.front().map(|e| (e.since, e.id, t)))
            .min_by_key(|&(since, id, _)| (since, id))
            .map(|(_, _, t)| t.clone())?;
        let taken = class.take(&oldest, false).map(|(_, item)| item);
        if taken.is_some() {
            self.len -= 1;
        }
        taken
    }

    /// Waiters of classes above `priority`.
    pub(crate) fn above(&self, priority: Priority) -> usize {
        self.classes[priority.index() + 1..]
            .iter()
            .map(Class::len)
            .sum()
    }

    /// Waiters per tenant, all classes together, most first (at most `n`).
    pub(crate) fn top(&self, n: usize) -> Vec<(K, usize)> {
        let mut counts: HashMap<&K, usize> = HashMap::new();
        for class in &self.classes {
            for (tenant, waiters) in &class.waiters {
                *counts.entry(tenant).or_default() += waiters.len();
            }
        }
        let mut top: Vec<(K, usize)> = counts.into_iter().map(|(t, n)| (t.clone(), n)).collect();
        top.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        top.truncate(n);
        top
    }

    /// Tenants with a waiter.
    pub(crate) fn tenants(&self) -> usize {
        let seen: std::collections::HashSet<&K> =
            self.classes.iter().flat_map(|c| c.waiters.keys()).collect();
        seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Priority::*;

    fn drain(q: &mut WaitQueue<&'static str, &'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| q.pop_next(|_| true, |_| true, false).map(|(_, _, t)| t)).collect()
    }

    #[test]
    fn highest_class_first_fifo_within_one_tenant() {
        let mut q = WaitQueue::default();
        q.push(1, Batch, &"a", "b1");
        q.push(2, Normal, &"a", "n1");
        q.push(3, Critical, &"a", "c1");
        q.push(4, Normal, &"a", "n2");
        q.push(5, Critical, &"a", "c2");
        assert_eq!(drain(&mut q), ["c1", "c2", "n1", "n2", "b1"]);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn tenants_are_served_in_turn() {
        let mut q = WaitQueue::default();
        for (i, item) in ["a1", "a2", "a3", "a4"].into_iter().enumerate() {
            q.push(i as u64, Normal, &"a", item);
        }
        q.push(10, Normal, &"b", "b1");
        q.push(11, Normal, &"c", "c1");
        q.push(12, Normal, &"b", "b2");
        assert_eq!(drain(&mut q), ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]);
    }

    #[test]
    fn a_tenant_that_may_not_run_keeps_its_waiters_and_others_go_first() {
        let mut q = WaitQueue::default();
        q.push(1, Normal, &"a", "a1");
        q.push(2, Normal, &"b", "b1");
        let next = q
            .pop_next(|t| *t != "a", |_| true, false)
            .map(|(_, t, item)| (t, item));
        assert_eq!(next, Some(("b", "b1")));
        assert!(q.pop_next(|t| *t != "a", |_| true, false).is_none());
        assert_eq!(drain(&mut q), ["a1"]);
    }

    #[test]
    fn a_waiter_that_does_not_fit_is_passed_over() {
        let mut q = WaitQueue::default();
        q.push(1, Normal, &"a", 1000);
        q.push(2, Normal, &"b", 10);
        q.push(3, Critical, &"c", 2000);
        let next = q.pop_next(|_| true, |w| *w <= 100, false);
        assert_eq!(
            next,
            Some((2, "b", 10)),
            "the critical and the first are too heavy"
        );
        assert!(q.pop_next(|_| true, |w| *w <= 100, false).is_none());
        assert_eq!(q.pop_next(|_| true, |_| true, false), Some((3, "c", 2000)));
    }

    #[test]
    fn eviction_takes_the_heaviest_tenants_newest_of_the_lowest_class_below() {
        let mut q = WaitQueue::default();
        q.push(1, Normal, &"a", "n1");
        q.push(2, Batch, &"a", "b1");
        q.push(3, Batch, &"b", "b2");
        q.push(4, Batch, &"b", "b3");
        assert_eq!(q.evict_for(Critical, &"c"), Some((4, "b3")));
        assert_eq!(
            q.evict_for(Normal, &"c"),
            Some((2, "b1")),
            "a tie: first in turn"
        );
        assert_eq!(q.evict_for(Normal, &"c"), Some((3, "b2")));
        assert_eq!(
            q.evict_for(Normal, &"c"),
            None,
            "only equals left, all even"
        );
        assert_eq!(q.evict_for(Critical, &"c"), Some((1, "n1")));
        assert_eq!(q.evict_for(Batch, &"c"), None);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_full_class_refuses_the_flooding_tenant_not_the_quiet_newcomer() {
        let mut q = WaitQueue::default();
        for i in 0..4 {
            q.push(i, Normal, &"flood", "f");
        }
        q.push(9, Normal, &"quiet", "q");
        // The quiet tenant's second arrival: 4 against its 2: room is made.
        assert_eq!(q.evict_for(Normal, &"quiet"), Some((3, "f")));
        // The flooding tenant's own arrival is the one refused.
        assert_eq!(q.evict_for(Normal, &"flood"), None);
        // 3 against the quiet tenant's 1 + 1: no gain in refusing either.
        q.push(10, Normal, &"quiet", "q");
        assert_eq!(q.evict_for(Normal, &"quiet"), None);
    }

    #[test]
    fn ahead_counts_the_turns_before_an_arrival() {
        let mut q = WaitQueue::default();
        for i in 0..10 {
            q.push(i, Normal, &"flood", ());
        }
        q.push(20, Critical, &"x", ());
        q.push(21, Batch, &"x", ());
        // A quiet tenant waits behind the critical one and one turn of the flood.
        assert_eq!(q.ahead_of(Normal, &"quiet"), 2);
        // The flood's next waits behind all of its own.
        assert_eq!(q.ahead_of(Normal, &"flood"), 11);
        assert_eq!(q.ahead_of(Batch, &"quiet"), 12);
    }

    #[test]
    fn removal_and_counts() {
        let mut q = WaitQueue::default();
        q.push(1, Batch, &"a", ());
        q.push(2, Normal, &"a", ());
        q.push(3, Critical, &"b", ());
        assert_eq!(q.tenants(), 2);
        assert_eq!(q.top(1), [("a", 2)]);
        assert_eq!(q.remove(2, Normal, &"a"), Some(()));
        assert_eq!(q.remove(2, Normal, &"a"), None);
        assert_eq!(q.remove(3, Critical, &"a"), None, "another tenant's id");
        assert_eq!(q.len(), 2);
        assert_eq!(q.remove(3, Critical, &"b"), Some(()));
        assert_eq!(q.tenants(), 1);
        assert!(q.pop_next(|_| true, |_| true, false).is_some());
        assert_eq!((q.len(), q.tenants()), (0, 0));
    }
}
