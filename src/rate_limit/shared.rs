//! A limiter's buckets on the cluster's Redis (`scope = "cluster"`): tokens
//! taken in batches, spent here for up to `sync_ms`, and a fallback while
//! Redis cannot answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;

use super::settings::{ClusterFallback, Rate};
use crate::client_key::ClientKey;
use crate::cluster::Cluster;

/// A limiter's buckets on the cluster's Redis.
#[derive(Debug)]
pub(super) struct SharedBuckets {
    pub(super) cluster: Arc<Cluster>,
    pub(super) route: String,
    pub(super) fallback: ClusterFallback,
    pub(super) fallbacks: Counter,
    /// `sync_ms`: tokens taken from Redis in a batch, spent here until
    /// they run out or the time is up. At most `max_keys` clients.
    pub(super) sync: Option<Duration>,
    /// By client: a key is in one bucket only (its tier's, or the default).
    pub(super) batches: std::sync::Mutex<HashMap<ClientKey, Batch>>,
    pub(super) max_batches: usize,
}

/// What this replica knows of one client without asking Redis: tokens it
/// took in a batch and has not spent (`sync_ms`), or that Redis refused it
/// until a time (no token can appear sooner: exact, and a client hammering
/// past its quota costs no round trips); and how many to ask for next.
#[derive(Debug, Clone, Copy)]
pub(super) struct Batch {
    pub(super) state: Held,
    /// The next batch's size: doubled when one was spent in time, halved
    /// when one ran out of time unspent, so that a replica asks for about
    /// what it spends in `sync_ms` (its share of the client's traffic) and
    /// the tokens it takes and loses stay few.
    pub(super) size: u32,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Held {
    Tokens {
        left: u32,
        until: tokio::time::Instant,
    },
    Refused {
        until: tokio::time::Instant,
    },
    /// A request is asking Redis for the next batch: the others ask for one
    /// token each meanwhile, so that concurrent misses do not each take a
    /// batch (and lose all but one).
    Fetching {
        since: tokio::time::Instant,
    },
    Nothing,
}

/// How long a fetch may stay unanswered before another request fetches.
pub(super) const FETCH_STALE: Duration = Duration::from_secs(1);

/// What to ask Redis for when the batch does not decide.
#[derive(Debug)]
pub struct Ask {
    pub(super) tokens: u32,
    /// This request fetches the batch (and keeps what it gets).
    pub(super) fetcher: bool,
}

/// A decision made here from a [`Batch`].
pub(super) enum Spent {
    /// A token spent; this many left.
    Allowed(u32),
    /// Still refused for this long.
    Refused(Duration),
}

impl SharedBuckets {
    /// Decides from `key`'s batch if it still holds; else what to ask Redis
    /// for (at most `cap` tokens).
    pub(super) fn spend(&self, key: &ClientKey, cap: u32) -> Result<Spent, Ask> {
        let mut batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let Some(batch) = batches.get_mut(key) else {
            drop(batches);
            // First sight: one token, and a batch entry to grow from.
            self.keep(key, Held::Fetching { since: now }, 1);
            return Err(Ask {
                tokens: 1,
                fetcher: true,
            });
        };
        match batch.state {
            Held::Fetching { since } if now - since < FETCH_STALE => {
                return Err(Ask {
                    tokens: 1,
                    fetcher: false,
                });
            }
            Held::Tokens { left, until } if left > 0 && until > now => {
                batch.state = Held::Tokens {
                    left: left - 1,
                    until,
                };
                return Ok(Spent::Allowed(left - 1));
            }
            Held::Refused { until } if until > now => return Ok(Spent::Refused(until - now)),
            Held::Tokens { left: 0, .. } => batch.size = batch.size.saturating_mul(2).min(cap),
            Held::Tokens { .. } => batch.size = (batch.size / 2).max(1),
            Held::Refused { .. } | Held::Fetching { .. } | Held::Nothing => {}
        }
        batch.state = Held::Fetching { since: now };
        Err(Ask {
            tokens: batch.size.min(cap).max(1),
            fetcher: true,
        })
    }

    /// Remembers what `key` holds now, asked with `size`.
    pub(super) fn keep(&self, key: &ClientKey, state: Held, size: u32) {
        let mut batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(batch) = batches.get_mut(key) {
            batch.state = state;
            return;
        }
        if batches.len() >= self.max_batches {
            let now = tokio::time::Instant::now();
            batches.retain(|_, b| match b.state {
                Held::Tokens { left, until } => left > 0 && until > now,
                Held::Refused { until } => until > now,
                Held::Fetching { since } => now - since < FETCH_STALE,
                Held::Nothing => false,
            });
            if batches.len() >= self.max_batches {
                // Full of live batches: unspent tokens are lost (the fleet
                // admits less, never more), a refusal is asked again.
                return;
            }
        }
        batches.insert(key.clone(), Batch { state, size });
    }
}

/// The largest batch a replica takes: what the rate makes in `sync`, at
/// least 1, at most the burst.
pub(super) fn batch_cap(rate: &Rate, sync: Duration) -> u32 {
    let made = (rate.per_second * sync.as_secs_f64()).ceil();
    made.clamp(1.0, f64::from(rate.burst())) as u32
}
