//! A worker pool whose size can change while requests wait for it.

use std::sync::Arc;
use std::sync::Mutex;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `size` workers; extra requests wait in the semaphore's FIFO queue, which is
/// unbounded on purpose: that is how a naive app server behaves under overload.
#[derive(Debug)]
pub(super) struct Workers {
    slots: Arc<Semaphore>,
    state: Mutex<Size>,
}

#[derive(Debug)]
struct Size {
    target: usize,
    /// Permits still to retire after a shrink, taken from workers as they finish.
    debt: usize,
}

/// A busy worker; returned to the pool (or retired) when dropped.
#[derive(Debug)]
pub(super) struct Busy<'a> {
    permit: Option<OwnedSemaphorePermit>,
    pool: &'a Workers,
}

impl Workers {
    pub(super) fn new(size: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(size)),
            state: Mutex::new(Size {
                target: size,
                debt: 0,
            }),
        }
    }

    pub(super) fn size(&self) -> usize {
        self.lock().target
    }

    /// Waits for a free worker.
    pub(super) async fn acquire(&self) -> Busy<'_> {
        // The semaphore is never closed, so acquiring cannot fail.
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        Busy {
            permit: Some(permit),
            pool: self,
        }
    }

    /// Grows or shrinks the pool. A shrink retires idle workers at once and busy
    /// ones as they finish; requests already in service are never cut short.
    pub(super) fn resize(&self, size: usize) {
        let mut state = self.lock();
        if size >= state.target {
            let grow = size - state.target;
            let repaid = grow.min(state.debt);
            state.debt -= repaid;
            self.slots.add_permits(grow - repaid);
        } else {
            let shrink = state.target - size;
            let retired = self.slots.forget_permits(shrink);
            state.debt += shrink - retired;
        }
        state.target = size;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Size> {
        // A panic while holding this lock leaves plain integers behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if state.debt > 0 {
            state.debt -= 1;
            if let Some(permit) = self.permit.take() {
                permit.forget();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shrink_waits_for_busy_workers_and_grow_repays_debt() {
        let pool = Workers::new(2);
        let a = pool.acquire().await;
        let b = pool.acquire().await;
        pool.resize(1);
        drop(a); // retired
        assert_eq!(pool.slots.available_permits(), 0);
        drop(b); // returned
        assert_eq!(pool.slots.available_permits(), 1);
        pool.resize(3);
        assert_eq!(pool.slots.available_permits(), 3);
    }

    #[tokio::test]
    async fn grow_during_shrink_cancels_the_debt() {
        let pool = Workers::new(2);
        let a = pool.acquire().await;
        let b = pool.acquire().await;
        pool.resize(0);
        pool.resize(2);
        drop(a);
        drop(b);
        assert_eq!(pool.slots.available_permits(), 2);
    }
}
