//! `x-request-id`: kept when the client sent one, otherwise generated, and
//! returned on the response (tower-http's request-id layers with our generator).

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

/// Generates ids `<process prefix>-<sequence>`: unique per process run without a
/// UUID dependency or a random number per request.
#[derive(Debug, Clone)]
pub struct SequentialIds {
    prefix: u32,
    next: Arc<AtomicU64>,
}

impl Default for SequentialIds {
    fn default() -> Self {
        // RandomState is seeded randomly per process; one hash gives a prefix that
        // differs between runs and between instances.
        let prefix = RandomState::new().hash_one(std::process::id()) as u32;
        Self {
            prefix,
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for SequentialIds {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // `{prefix:08x}-{n:x}`, written by hand: this runs for every request.
        let mut id = [0u8; 8 + 1 + 16];
        hex(u64::from(self.prefix), 8, &mut id[..8]);
        id[8] = b'-';
        let digits = (64 - (n | 1).leading_zeros()).div_ceil(4) as usize;
        hex(n, digits, &mut id[9..9 + digits]);
        HeaderValue::from_bytes(&id[..9 + digits])
            .ok()
            .map(RequestId::new)
    }
}

/// Writes the low `digits` hex digits of `n` into `out`, zero-padded.
fn hex(mut n: u64, digits: usize, out: &mut [u8]) {
    for slot in out[..digits].iter_mut().rev() {
        *slot = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct() {
        let mut ids = SequentialIds::default();
        let req = Request::new(());
        let a = ids.make_request_id(&req).unwrap();
        let b = ids.make_request_id(&req).unwrap();
        assert_ne!(a.header_value(), b.header_value());
    }

    #[test]
    fn ids_are_the_prefix_and_the_sequence_in_hex() {
        let counter = Arc::new(AtomicU64::new(0));
        let mut ids = SequentialIds {
            prefix: 0xab,
            next: counter.clone(),
        };
        let req = Request::new(());
        let mut next = || ids.make_request_id(&req).unwrap().into_header_value();
        assert_eq!(next(), "000000ab-0");
        assert_eq!(next(), "000000ab-1");
        counter.store(0x1f, Ordering::Relaxed);
        assert_eq!(next(), "000000ab-1f");
        counter.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(next(), "000000ab-ffffffffffffffff");
    }
}
