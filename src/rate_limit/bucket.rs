//! [`Bucket`]: one policy's GCRA buckets (governor) and the `RateLimit`
//! fields that tell a client where it stands; [`Decision`]: the answer to one
//! request.

use std::sync::Arc;

use governor::RateLimiter as Governor;
use http::HeaderValue;
use metrics::{Counter, Gauge};

use crate::client_key::ClientKey;

use super::clock::TokioClock;
use super::limiter::Keyed;
use super::settings::Rate;
use super::store::CappedStore;

/// One policy: a rate, its buckets, and its `RateLimit-Policy` field.
#[derive(Debug)]
pub(super) struct Bucket {
    pub(super) name: String,
    /// The tier's name as the `ClientTier` extension carries it (`None`:
    /// the route's default rate).
    pub(super) tier: Option<Arc<str>>,
    pub(super) rate: Rate,
    pub(super) governor: Keyed,
    /// The governor's store, to ask whether a key fits.
    pub(super) store: CappedStore<ClientKey>,
    pub(super) policy: HeaderValue,
}

impl Bucket {
    pub(super) fn new(
        name: String,
        tier: bool,
        rate: Rate,
        max_keys: usize,
        overflowed: Counter,
        keys: Gauge,
    ) -> Self {
        let burst = rate.burst();
        let window = (f64::from(burst) / rate.per_second).ceil().max(1.0) as u64;
        // Validated names are plain; quote what a client would need escaped.
        let quoted = name.replace(['"', '\\'], "");
        let policy = HeaderValue::from_str(&format!("\"{quoted}\";q={burst};w={window}"))
            .unwrap_or_else(|_| HeaderValue::from_static("\"default\""));
        let store = CappedStore::new(max_keys, overflowed, keys);
        let governor: Keyed = Governor::new(rate.quota(), store.clone(), TokioClock::default());
        Self {
            tier: tier.then(|| Arc::from(name.as_str())),
            name: quoted,
            rate,
            governor,
            store,
            policy,
        }
    }

    /// Counts on in `old`'s buckets (a reload): clients keep what they have
    /// spent, at this bucket's rate. Not when the table's size changed.
    pub(super) fn carry(&mut self, old: &Bucket) {
        if self.store.max_keys() != old.store.max_keys() {
            return;
        }
        let clock = old.governor.clock().continuing();
        self.governor = Governor::new(self.rate.quota(), old.store.clone(), clock);
        self.store = old.store.clone();
    }

    /// The `RateLimit` field: `"name";r=<remaining>;t=<reset>`, written
    /// without the formatting machinery (it is on every response).
    pub(super) fn state(&self, remaining: u32, reset: u64) -> HeaderValue {
        let (mut r, mut t) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (r, t) = (r.format(remaining), t.format(reset));
        let mut value = Vec::with_capacity(self.name.len() + r.len() + t.len() + 8);
        value.push(b'"');
        value.extend_from_slice(self.name.as_bytes());
        value.extend_from_slice(b"\";r=");
        value.extend_from_slice(r.as_bytes());
        value.extend_from_slice(b";t=");
        value.extend_from_slice(t.as_bytes());
        // The name was stripped of quotes and checked as a header value with
        // the policy; digits cannot make it invalid.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The answer: refused for `retry_after_s`, or allowed with `remaining`.
    pub(super) fn decide(&self, retry_after_s: Option<u64>, remaining: u32) -> Decision {
        let reset = match retry_after_s {
            // Until a token is back, then the rest of the burst.
            Some(s) => s + self.reset_after(1),
            None => self.reset_after(remaining),
        };
        Decision {
            retry_after_s,
            policy: self.policy.clone(),
            state: self.state(remaining, reset),
            tier: self.tier.clone(),
        }
    }

    /// Seconds until `remaining` (of the burst) is back to the full burst.
    pub(super) fn reset_after(&self, remaining: u32) -> u64 {
        let missing = f64::from(self.rate.burst().saturating_sub(remaining));
        (missing / self.rate.per_second).ceil() as u64
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `None`: allowed. `Some(s)`: refused; come back in `s` seconds.
    pub retry_after_s: Option<u64>,
    /// `RateLimit-Policy` field value.
    pub policy: HeaderValue,
    /// `RateLimit` field value.
    pub state: HeaderValue,
    /// The client's tier, when its key is in one.
    pub tier: Option<Arc<str>>,
}
