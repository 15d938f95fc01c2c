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
        let id = format!("{:08x}-{n:x}", self.prefix);
        HeaderValue::from_str(&id).ok().map(RequestId::new)
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
}
