//! The bounded wait queue: FIFO within each priority class, highest class first.

use std::collections::VecDeque;

use super::Priority;

/// Waiters by class, each class in arrival order. `T` is what a waiter is woken
/// with; ids let a waiter that gives up remove itself.
#[derive(Debug)]
pub(crate) struct WaitQueue<T> {
    classes: [VecDeque<(u64, T)>; 3],
    len: usize,
}

impl<T> Default for WaitQueue<T> {
    fn default() -> Self {
        Self {
            classes: Default::default(),
            len: 0,
        }
    }
}

impl<T> WaitQueue<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, id: u64, priority: Priority, item: T) {
        self.classes[priority.index()].push_back((id, item));
        self.len += 1;
    }

    /// The oldest waiter of the highest class present.
    pub(crate) fn pop_next(&mut self) -> Option<(u64, T)> {
        let next = self.classes.iter_mut().rev().find_map(VecDeque::pop_front);
        if next.is_some() {
            self.len -= 1;
        }
        next
    }

    /// Waiters that a new arrival of `priority` would wait behind.
    pub(crate) fn ahead_of(&self, priority: Priority) -> usize {
        self.classes[priority.index()..]
            .iter()
            .map(VecDeque::len)
            .sum()
    }

    /// Makes room for an arrival of `priority`: removes the newest waiter of the
    /// lowest class below it, if any.
    pub(crate) fn evict_for(&mut self, priority: Priority) -> Option<(u64, T)> {
        let evicted = self.classes[..priority.index()]
            .iter_mut()
            .find_map(VecDeque::pop_back);
        if evicted.is_some() {
            self.len -= 1;
        }
        evicted
    }

    /// Removes waiter `id` of class `priority`, if it is still waiting.
    pub(crate) fn remove(&mut self, id: u64, priority: Priority) -> Option<T> {
        let class = &mut self.classes[priority.index()];
        let at = class.iter().position(|(i, _)| *i == id)?;
        self.len -= 1;
        class.remove(at).map(|(_, item)| item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Priority::*;

    #[test]
    fn highest_class_first_fifo_within() {
        let mut q = WaitQueue::default();
        q.push(1, Batch, "b1");
        q.push(2, Normal, "n1");
        q.push(3, Critical, "c1");
        q.push(4, Normal, "n2");
        q.push(5, Critical, "c2");
        let order: Vec<_> = std::iter::from_fn(|| q.pop_next().map(|(_, t)| t)).collect();
        assert_eq!(order, ["c1", "c2", "n1", "n2", "b1"]);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn eviction_takes_the_newest_of_the_lowest_class_below() {
        let mut q = WaitQueue::default();
        q.push(1, Normal, "n1");
        q.push(2, Batch, "b1");
        q.push(3, Batch, "b2");
        assert_eq!(q.evict_for(Critical), Some((3, "b2")));
        assert_eq!(q.evict_for(Normal), Some((2, "b1")));
        assert_eq!(q.evict_for(Normal), None); // only equals left
        assert_eq!(q.evict_for(Critical), Some((1, "n1")));
        assert_eq!(q.evict_for(Batch), None);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn ahead_and_remove() {
        let mut q = WaitQueue::default();
        q.push(1, Batch, ());
        q.push(2, Normal, ());
        q.push(3, Critical, ());
        assert_eq!(q.ahead_of(Critical), 1);
        assert_eq!(q.ahead_of(Normal), 2);
        assert_eq!(q.ahead_of(Batch), 3);
        assert_eq!(q.remove(2, Normal), Some(()));
        assert_eq!(q.remove(2, Normal), None);
        assert_eq!(q.len(), 2);
    }
}
