//! The replayer: one task per spool, delivering spooled requests oldest
//! first through the route's own circuit breaker and admission controller,
//! at the lowest priority (`batch`), so that live traffic goes first and the
//! upstream is never sent more than admission grants.
//!
//! - 2xx: delivered, gone from the spool.
//! - 408, 429, 5xx, no answer after sending (timeout, reset): tried again
//!   after a backoff (doubling from 100 ms to 10 s, at least the upstream's
//!   `Retry-After`), which pauses the whole route's replay: the upstream is
//!   pushing back, not this one request. At `max_attempts`: a dead letter.
//! - Any other status: a dead letter at once (the request itself is wrong).
//! - Held back by the proxy (circuit open, queue full) or never sent (no
//!   connection to the upstream): the same backoff, not counted as an
//!   attempt, so that an outage of any length dead-letters nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;
use tower::util::BoxCloneService;

use super::Spool;
use super::record::{Buried, Stored};
use super::store::{Next, now_ms};
use crate::admission::{Controller, Granted, Priority, everyone};
use crate::body::{BoxError, ProxyBody, find_cause};
use crate::circuit::{Circuit, CircuitState};
use crate::conn::ClientAddr;
use crate::error::{ErrorChain, NotSent, Reason, Rejection, client_fault};
use crate::jitter::Jitter;

/// Deliveries at once, at most, whatever admission would grant: each holds
/// its request's body in memory.
pub const MAX_INFLIGHT: usize = 32;

/// First backoff after a failed delivery.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest backoff of our own (an upstream's `Retry-After` may ask for more,
/// up to [`RETRY_AFTER_MAX`]): short enough that replay resumes soon after an
/// outage ends.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest `Retry-After` obeyed.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);
/// Pause when admission has no slot to give (its queue full).
const NO_SLOT_PAUSE: Duration = Duration::from_millis(20);
/// Bytes of a refusing answer kept with a dead letter.
const EXCERPT_BYTES: usize = 512;
/// Bytes of an answer read (to give its connection back) before dropping it.
const DRAIN_BYTES: usize = 1024 * 1024;

/// A replay request.
pub type ReplayRequest = Request<Full<Bytes>>;

/// The route's stack from the circuit breaker down, for replays.
pub type ReplayService = BoxCloneService<ReplayRequest, Response<ProxyBody>, BoxError>;

/// Where a spool's requests go: the route's current stack and protections.
pub struct Target {
    /// Circuit breaker → admission → upstream timeout → forward.
    pub service: ReplayService,
    /// The route's admission controller.
    pub admission: Arc<Controller>,
    /// The route's circuit breaker.
    pub circuit: Option<Arc<Circuit>>,
}

/// When replay may go on: a route-wide pause after failures.
#[derive(Debug)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
    jitter: Jitter,
}

impl Backoff {
    fn new() -> Self {
        Self {
            failures: 0,
            until: None,
            jitter: Jitter::from_entropy(),
        }
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.until = None;
    }

    /// Pauses replay for the next backoff step, and at least `at_least`.
    fn failed(&mut self, at_least: Option<Duration>) {
        let step = BACKOFF_MIN
            .saturating_mul(1 << self.failures.min(16))
            .min(BACKOFF_MAX);
        self.failures += 1;
        // Full jitter above half the step: replicas do not retry in step.
        let step = step.mul_f64(0.5 + self.jitter.unit() / 2.0);
        let wait = step.max(at_least.unwrap_or_default().min(RETRY_AFTER_MAX));
        let until = Instant::now() + wait;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }
}

/// How a delivery went.
enum Outcome {
    Delivered,
    /// Refused for now, by the upstream (an attempt) or by the proxy (not).
    Again {
        attempted: bool,
        retry_after: Option<Duration>,
        status: Option<u16>,
        excerpt: String,
    },
    /// Refused for good.
    Refused {
        status: u16,
        excerpt: String,
    },
}

/// Delivers `spool`'s requests to `target()` (looked up each time, so that a
/// reloaded route's new stack is used) until `stop` turns true. Deliveries in
/// flight then finish; the rest stays on disk.
pub async fn run(
    spool: Arc<Spool>,
    mut target: impl FnMut() -> Option<Target> + Send,
    mut stop: watch::Receiver<bool>,
) {
    let backoff = Arc::new(Mutex::new(Backoff::new()));
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let store = spool.store().clone();
    // The oldest request's age moves with the clock, not with the spool.
    let refresher = tokio::spawn({
        let store = store.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                store.refresh();
            }
        }
    });
    let (ahead_tx, mut ahead) = tokio::sync::mpsc::channel(READ_AHEAD);
    let reader = tokio::spawn(read_ahead(spool.clone(), ahead_tx));
    let paused = |backoff: &Mutex<Backoff>| {
        let until = backoff.lock().unwrap_or_else(|e| e.into_inner()).until;
        until.filter(|u| *u > Instant::now())
    };
    'requests: loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            _ = stopped(&mut stop) => break,
        };
        // Read ahead of the grant, so that a freed slot is used at once.
        let (next, stored) = tokio::select! {
            read = ahead.recv() => read.expect("the reader lives as long as the loop"),
            _ = stopped(&mut stop) => break,
        };
        // Until this request may go: no backoff in force, the route there,
        // its circuit not open, a slot granted.
        let (target, permit) = loop {
            let wait = match (paused(&backoff), target()) {
                (Some(until), _) => until,
                // The route is gone (a reload removed it): its spool waits.
                (None, None) => Instant::now() + Duration::from_secs(1),
                (None, Some(target))
                    if target
                        .circuit
                        .as_ref()
                        .is_some_and(|c| c.state() == CircuitState::Open) =>
                {
                    Instant::now() + Duration::from_millis(100)
                }
                (None, Some(target)) => {
                    let weight = target.admission.weight(Some(stored.body.len() as u64));
                    let acquire = target
                        .admission
                        .acquire_as(Priority::Batch, everyone(), weight);
                    let permit = tokio::select! {
                        permit = acquire => permit,
                        _ = stopped(&mut stop) => {
                            store.retry(&next, false);
                            break 'requests;
                        }
                    };
                    match permit {
                        // Another delivery may have failed while this one
                        // waited: then it waits too.
                        Ok(permit) if paused(&backoff).is_none() => break (target, permit),
                        Ok(_) => continue,
                        // No slot, not even a place in the queue: live
                        // traffic has them.
                        Err(_) => Instant::now() + NO_SLOT_PAUSE,
                    }
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(wait) => {}
                _ = stopped(&mut stop) => {
                    store.retry(&next, false);
                    break 'requests;
                }
            }
        };
        let request = replay_request(stored.clone(), Granted::new(permit));
        let spool = spool.clone();
        let backoff = backoff.clone();
        tokio::spawn(async move {
            let outcome = deliver(target.service, request).await;
            settle(&spool, &next, stored, outcome, &backoff).await;
            drop(slot);
        });
    }
    reader.abort();
    ahead.close();
    while let Ok((next, _)) = ahead.try_recv() {
        store.retry(&next, false);
    }
    // Let deliveries in flight finish (each within the route's timeout).
    let _ = slots.acquire_many(MAX_INFLIGHT as u32).await;
    refresher.abort();
    store.refresh();
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Requests read from disk ahead of their grant, at most.
const READ_AHEAD: usize = 4;

/// Reads the oldest requests not being delivered into `ahead`, in order.
async fn read_ahead(spool: Arc<Spool>, ahead: tokio::sync::mpsc::Sender<(Next, Stored)>) {
    let store = spool.store();
    loop {
        let Ok(room) = ahead.reserve().await else {
            return;
        };
        let next = loop {
            match store.next() {
                Some(next) => break next,
                None => store.ready().await,
            }
        };
        match store.read(&next).await {
            Ok(stored) => room.send((next, stored)),
            Err(e) => {
                // Cannot be read back: nothing left to deliver or to bury.
                tracing::error!(route = spool.route(), error = %e, "spool: a record cannot be read back; dropped");
                store.metrics().damaged.increment(1);
                store.delivered(&next);
            }
        }
    }
}

/// The spooled request as it is sent again.
fn replay_request(stored: Stored, granted: Granted) -> ReplayRequest {
    let mut request = Request::new(Full::new(stored.body));
    *request.method_mut() = stored.method;
    *request.uri_mut() = stored
        .uri
        .parse()
        .unwrap_or_else(|_| "/".parse().expect("a path"));
    *request.headers_mut() = stored.headers;
    let extensions = request.extensions_mut();
    extensions.insert(granted);
    if let Some(ip) = stored.client.and_then(|c| c.parse::<IpAddr>().ok()) {
        extensions.insert(ClientAddr::new(SocketAddr::new(ip, 0)));
    }
    request
}

async fn deliver(service: ReplayService, request: ReplayRequest) -> Outcome {
    match service.oneshot(request).await {
        Ok(res) => answered(res).await,
        Err(err) => failed(err),
    }
}

async fn answered(res: Response<ProxyBody>) -> Outcome {
    let status = res.status();
    let retry_after = retry_after(res.headers());
    let excerpt = if status.is_success() {
        drain(res.into_body(), 0).await;
        String::new()
    } else {
        drain(res.into_body(), EXCERPT_BYTES).await
    };
    if status.is_success() {
        Outcome::Delivered
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Outcome::Again {
            attempted: true,
            retry_after,
            status: Some(status.as_u16()),
            excerpt,
        }
    } else {
        Outcome::Refused {
            status: status.as_u16(),
            excerpt,
        }
    }
}

fn failed(err: BoxError) -> Outcome {
    let text = ErrorChain(err.as_ref()).to_string();
    if let Some(rejection) = err.downcast_ref::<Rejection>()
        && client_fault(err.as_ref()).is_none()
    {
        // Not this request's attempt: the proxy held it back, or the
        // upstream could not be reached at all. An outage of any length
        // leaves the spool as it was.
        let held_back = matches!(
            rejection.reason(),
            Reason::CircuitOpen | Reason::QueueFull | Reason::QueueTimeout
        ) || find_cause::<NotSent>(err.as_ref()).is_some();
        return Outcome::Again {
            attempted: !held_back,
            retry_after: rejection.retry_after().map(Duration::from_secs),
            status: None,
            excerpt: text,
        };
    }
    // Timed out, or the upstream broke the connection.
    Outcome::Again {
        attempted: true,
        retry_after: None,
        status: None,
        excerpt: text,
    }
}

/// Reads `body` to its end (up to [`DRAIN_BYTES`]), keeping its first `keep`
/// bytes as text.
async fn drain(mut body: ProxyBody, keep: usize) -> String {
    let mut kept = Vec::new();
    let mut read = 0;
    while read < DRAIN_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len();
                    let room = keep.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..room.min(data.len())]);
                }
            }
            Some(Err(e)) => {
                kept.extend_from_slice(format!(" (answer cut off: {e})").as_bytes());
                break;
            }
            None => break,
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    at.duration_since(std::time::SystemTime::now()).ok()
}

async fn settle(
    spool: &Spool,
    next: &Next,
    stored: Stored,
    outcome: Outcome,
    backoff: &Mutex<Backoff>,
) {
    let store = spool.store();
    let metrics = store.metrics();
    let lock = || backoff.lock().unwrap_or_else(|e| e.into_inner());
    let (status, excerpt, attempts) = match outcome {
        Outcome::Delivered => {
            lock().succeeded();
            metrics.delivered.increment(1);
            store.delivered(next);
            return;
        }
        Outcome::Again {
            attempted,
            retry_after,
            status,
            excerpt,
        } => {
            lock().failed(retry_after);
            let attempts = next.attempts + u16::from(attempted);
            if attempts < spool.settings().max_attempts {
                metrics.retried.increment(1);
                store.retry(next, attempted);
                return;
            }
            (status, excerpt, attempts)
        }
        Outcome::Refused { status, excerpt } => (Some(status), excerpt, next.attempts + 1),
    };
    tracing::warn!(
        route = spool.route(),
        id = stored.id,
        status,
        attempts,
        "spool: request dead-lettered"
    );
    let buried = Buried {
        request: stored,
        status,
        excerpt,
        attempts,
        buried_ms: now_ms(),
    };
    if let Err(e) = store.bury(next, buried).await {
        tracing::error!(route = spool.route(), error = %e, "spool: cannot write a dead letter; kept for delivery");
        store.retry(next, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_honours_retry_after_and_resets() {
        let mut b = Backoff::new();
        let start = Instant::now();
        let waits: Vec<Duration> = (0..12)
            .map(|_| {
                b.until = None;
                b.failed(None);
                b.until.unwrap() - start
            })
            .collect();
        // Each step within [step/2, step], doubling to the cap.
        for (i, wait) in waits.iter().enumerate() {
            let step = BACKOFF_MIN.saturating_mul(1 << i).min(BACKOFF_MAX);
            assert!(*wait >= step / 2 && *wait <= step, "{i}: {wait:?}");
        }
        b.until = None;
        b.failed(Some(Duration::from_secs(70)));
        assert!(b.until.unwrap() - start >= Duration::from_secs(70));
        b.succeeded();
        assert_eq!(b.failures, 0);
        assert!(b.until.is_none());
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(60);
        h.insert(
            http::header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(50) && d <= Duration::from_secs(60));
    }
}
