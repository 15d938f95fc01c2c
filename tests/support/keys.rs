//! An ingestion upstream that counts what it received by idempotency key,
//! for the spool's tests: it can start late on an address reserved up front
//! (the proxy sees it down until then), and it refuses `/poison...` with 400
//! until told otherwise.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;

/// What the upstream received.
#[derive(Default)]
pub struct Keys {
    /// Deliveries by idempotency key, with the last body.
    pub seen: Mutex<HashMap<String, (u32, Bytes)>>,
    /// Answer `/poison...` with 200 too.
    pub poison_ok: AtomicBool,
    /// How long each answer takes (after the key is counted).
    pub delay: Mutex<std::time::Duration>,
    /// Answer this status (with `Retry-After: 1`) instead, when not 0.
    pub refuse_with: std::sync::atomic::AtomicU16,
    /// When each refusal was answered.
    pub refused_at: Mutex<Vec<tokio::time::Instant>>,
}

impl Keys {
    /// Distinct keys received.
    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// A copy of the counts.
    pub fn counts(&self) -> HashMap<String, u32> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(k, (n, _))| (k.clone(), *n))
            .collect()
    }
}

/// A loopback address nobody listens on (yet).
pub fn reserve_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Serves on `addr` from now on.
pub async fn serve_keys(addr: SocketAddr) -> Arc<Keys> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let keys = Arc::new(Keys::default());
    super::serve_http1(listener, keys.clone(), handle);
    keys
}

async fn handle(
    keys: Arc<Keys>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let poison = req.uri().path().starts_with("/poison");
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Ok(Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::from_static(b"broken body")))
            .unwrap());
    };
    let refuse = keys.refuse_with.load(Ordering::SeqCst);
    if refuse != 0 {
        keys.refused_at
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        return Ok(Response::builder()
            .status(refuse)
            .header("retry-after", "1")
            .body(Full::new(Bytes::from_static(b"not now")))
            .unwrap());
    }
    if poison && !keys.poison_ok.load(Ordering::SeqCst) {
        return Ok(Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::from_static(b"bad event")))
            .unwrap());
    }
    if let Some(key) = key {
        let mut seen = keys.seen.lock().unwrap();
        let entry = seen.entry(key).or_insert((0, Bytes::new()));
        entry.0 += 1;
        entry.1 = body;
    }
    let delay = *keys.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(Response::new(Full::new(Bytes::from_static(
        b"{\"ok\":true}",
    ))))
}
