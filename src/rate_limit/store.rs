//! [`CappedStore`]: governor's keyed state, bounded.
//!
//! governor keeps one GCRA state (a theoretical arrival time, `u64` nanoseconds)
//! per key in a map that grows with every new key. A proxy facing the internet
//! cannot allow that: past `max_keys`, new keys share one overflow bucket
//! (they are limited together, never let through unlimited), and a counter says
//! so. Stale keys — whose bucket has refilled, so that forgetting them changes
//! nothing — are dropped by `retain_recent`, which the proxy runs on a timer.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use metrics::{Counter, Gauge};

/// Shards, so that concurrent requests from different clients rarely contend.
const SHARDS: usize = 16;

/// A sharded map of GCRA states with a cap on the number of keys. Cheap to
/// clone: the limiter keeps a handle to ask whether a key fits
/// ([`CappedStore::takes`]) while governor owns the store.
#[derive(Debug)]
pub struct CappedStore<K>(Arc<Inner<K>>);

impl<K> Clone for CappedStore<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K> std::ops::Deref for CappedStore<K> {
    type Target = Inner<K>;
    fn deref(&self) -> &Inner<K> {
        &self.0
    }
}

/// The store's state.
#[derive(Debug)]
pub struct Inner<K> {
    shards: Box<[Mutex<HashMap<K, u64>>]>,
    hasher: RandomState,
    len: AtomicUsize,
    max_keys: usize,
    overflow: Mutex<Option<u64>>,
    overflowed: Counter,
    keys: Gauge,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain integers inside: a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<K: Hash + Eq + Clone> CappedStore<K> {
    /// At most `max_keys` keys; `overflowed` counts requests that used the
    /// shared bucket, `keys` shows how many are tracked.
    pub fn new(max_keys: usize, overflowed: Counter, keys: Gauge) -> Self {
        keys.set(0.0);
        Self(Arc::new(Inner {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            len: AtomicUsize::new(0),
            max_keys,
            overflow: Mutex::new(None),
            overflowed,
            keys,
        }))
    }

    /// The most keys it tracks.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Whether `key` has (or can have) a bucket of its own: it is tracked,
    /// or there is room for it.
    pub fn takes(&self, key: &K) -> bool {
        self.len.load(Ordering::Acquire) < self.max_keys || lock(self.shard(key)).contains_key(key)
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, u64>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Takes a place for a new key, unless the store is full.
    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_keys).then_some(n + 1)
            })
            .is_ok()
    }
}

impl<K: Hash + Eq + Clone> StateStore for CappedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut shard = lock(self.shard(key));
        if let Some(tat) = shard.get_mut(key) {
            let (out, new) = f(Some(Nanos::from(*tat)))?;
            *tat = new.into();
            return Ok(out);
        }
        if self.reserve() {
            match f(None) {
                Ok((out, new)) => {
                    shard.insert(key.clone(), new.into());
                    self.keys.set(self.len.load(Ordering::Relaxed) as f64);
                    return Ok(out);
                }
                Err(e) => {
                    self.len.fetch_sub(1, Ordering::AcqRel);
                    return Err(e);
                }
            }
        }
        drop(shard);
        self.overflowed.increment(1);
        let mut overflow = lock(&self.overflow);
        let (out, new) = f(overflow.map(Nanos::from))?;
        *overflow = Some(new.into());
        Ok(out)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for CappedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below: u64 = drop_below.into();
        for shard in self.shards.iter() {
            let mut map = lock(shard);
            let before = map.len();
            map.retain(|_, tat| *tat > drop_below);
            self.len.fetch_sub(before - map.len(), Ordering::AcqRel);
        }
        let mut overflow = lock(&self.overflow);
        if overflow.is_some_and(|tat| tat <= drop_below) {
            *overflow = None;
        }
        self.keys.set(self.len.load(Ordering::Relaxed) as f64);
    }

    fn shrink_to_fit(&self) {
        for shard in self.shards.iter() {
            lock(shard).shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
