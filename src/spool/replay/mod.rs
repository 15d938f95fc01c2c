//! The replayer: one task per spool, delivering spooled requests oldest
//! first through the route's own circuit breaker and admission controller,
//! at the lowest priority (`batch`), so that live traffic goes first and the
//! upstream is never sent more than admission grants. It needs no live
//! traffic to make progress: it asks the circuit itself (a replay may be the
//! half-open probe), and its own pace grows from one delivery at a time.
//!
//! How an attempt ends decides who waits (README "Store and forward"):
//!
//! - 2xx: delivered, gone from the spool; the pace grows (slow start).
//! - 408, 429, 5xx, no answer after sending (timeout, reset): this request
//!   waits a backoff of its own (doubling from 100 ms to 10 s, at least its
//!   `Retry-After`), counted as an attempt, and the pace halves; the others
//!   go on (a client's 429 is its own quota). At `max_attempts`: a dead
//!   letter. An upstream `503` with `Retry-After` (its `backpressure
//!   statuses`) is the upstream pushing back on everyone: the whole route
//!   waits that long.
//! - Any other status: a dead letter at once (the request itself is wrong);
//!   so is a request admission could never take (heavier than
//!   `max_inflight_bytes`).
//! - Held back by the proxy (circuit open, queue full) or never sent (no
//!   connection to the upstream): the route waits a backoff, not counted as
//!   an attempt, so that an outage of any length dead-letters nothing, and
//!   the pace starts again from one delivery.
//! - A dead letter that cannot be written (disk full, I/O error): the attempt
//!   counts, and the route's replay pauses (doubling to a minute) with
//!   `sluicegate_spool_replay_paused` at 1, logged once when it starts and
//!   once when it ends: never a storm of retries.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Extensions, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tower::ServiceExt;
use tower::util::BoxCloneService;

use super::Spool;
use super::record::{Buried, Stored};
use super::store::{Next, now_ms};
use crate::body::{BoxError, ProxyBody};
use crate::classify::{self, Delivery};
use crate::conn::ClientAddr;
use crate::error::ErrorChain;
use crate::jitter::Jitter;

/// Deliveries at once, at most, whatever admission would grant.
pub const MAX_INFLIGHT: usize = 32;

/// Request bytes held in memory by deliveries at once (a single larger
/// request still goes, alone).
const MAX_INFLIGHT_BYTES: u64 = 32 * 1024 * 1024;

/// First backoff after a failed delivery.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest backoff of our own (an upstream's `Retry-After` may ask for more,
/// up to [`RETRY_AFTER_MAX`]): short enough that replay resumes soon after an
/// outage ends.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest `Retry-After` obeyed.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);
/// Longest pause while dead letters cannot be written.
const DEAD_LETTER_PAUSE_MAX: Duration = Duration::from_secs(60);
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
    /// The route's circuit breaker and admission, asked before a request
    /// is read from disk.
    pub gate: Arc<dyn Gate>,
    /// Upstream statuses that, with a `Retry-After`, hold the whole route
    /// back (the circuit's `backpressure_statuses`; `[503]` without one).
    pub backpressure: Vec<u16>,
}

/// What the replayer asks of the route's protections before it sends: the
/// stack wires the route's circuit breaker and admission controller to it,
/// so that the spool imports neither.
pub trait Gate: Send + Sync {
    /// Whether admission could never take a request of `bytes`
    /// (`max_inflight_bytes` lowered since it was spooled).
    fn too_heavy(&self, bytes: u64) -> bool;

    /// How long the route's circuit stays open from `now`, when it is.
    fn open_remaining(&self, now: Instant) -> Option<Duration>;

    /// Waits for an admission slot for a request of `bytes` at the lowest
    /// priority: the request extensions that carry it to the admission
    /// layer, or `None` when there is no slot, not even a place in the
    /// queue (live traffic has them).
    fn admit(&self, bytes: u64) -> Pin<Box<dyn Future<Output = Option<Extensions>> + Send>>;
}

mod pace;

use pace::{InFlight, Pace, Pause, Shared, backoff_step, grow, halve, keep, restart};

// === The loop ===

/// Delivers `spool`'s requests to `target()` (looked up each time, so that a
/// reloaded route's new stack is used) until `stop` turns true. Deliveries in
/// flight then finish; the rest stays on disk.
pub async fn run(
    spool: Arc<Spool>,
    mut target: impl FnMut() -> Option<Target> + Send,
    mut stop: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        pace: Mutex::new(Pace {
            window: 1,
            running: 0,
            bytes: 0,
        }),
        pause: Mutex::new(Pause::new()),
        ended: Notify::new(),
        burying_fails: Mutex::new(false),
    });
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
    'requests: loop {
        // The oldest request that may go now (none in its own backoff).
        let next = loop {
            if let Some(next) = store.next() {
                break next;
            }
            tokio::select! {
                () = store.ready() => {}
                _ = stopped(&mut stop) => break 'requests,
            }
        };
        let Some(stored) = read(&spool, &next, &shared).await else {
            continue;
        };
        let bytes = stored.body.len() as u64;
        // Until it may go: room in the pace, no pause in force, the route
        // there, its circuit not open, a slot granted.
        let (target, permit) = loop {
            let wait = match ready_to_go(&shared, bytes, &mut target) {
                Ok(target) => {
                    if target.gate.too_heavy(bytes) {
                        // Admission can never take it (max_inflight_bytes
                        // lowered since it was spooled): it must not hold up
                        // the rest.
                        let excerpt = "heavier than the route's max_inflight_bytes".to_string();
                        let outcome = Attempt::Refused {
                            status: StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
                            excerpt,
                        };
                        let mut flight = shared.start(bytes);
                        let backpressure = &target.backpressure;
                        settle(&spool, &next, stored, outcome, backpressure, &mut flight).await;
                        continue 'requests;
                    }
                    let acquire = target.gate.admit(bytes);
                    let permit = tokio::select! {
                        permit = acquire => permit,
                        _ = stopped(&mut stop) => {
                            store.retry(&next, false, None);
                            break 'requests;
                        }
                    };
                    match permit {
                        Some(permit) => break (target, permit),
                        // No slot, not even a place in the queue: live
                        // traffic has them.
                        None => Instant::now() + NO_SLOT_PAUSE,
                    }
                }
                Err(Wait::Until(at)) => at,
                Err(Wait::Room) => {
                    tokio::select! {
                        () = shared.ended.notified() => {}
                        _ = stopped(&mut stop) => {
                            store.retry(&next, false, None);
                            break 'requests;
                        }
                    }
                    continue;
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(wait) => {}
                () = shared.ended.notified() => {}
                _ = stopped(&mut stop) => {
                    store.retry(&next, false, None);
                    break 'requests;
                }
            }
        };
        let mut flight = shared.start(bytes);
        let request = replay_request(stored.clone(), permit);
        let spool = spool.clone();
        let Target {
            service,
            backpressure,
            ..
        } = target;
        tokio::spawn(async move {
            let outcome = deliver(service, request).await;
            settle(&spool, &next, stored, outcome, &backpressure, &mut flight).await;
        });
    }
    // Let deliveries in flight finish (each within the route's timeouts).
    while shared.pace().running > 0 {
        shared.ended.notified().await;
    }
    refresher.abort();
    store.refresh();
}

/// Why a request may not go yet.
enum Wait {
    /// The pace has no room: wait for a delivery to end.
    Room,
    /// A pause, the route's absence or its open circuit: until then.
    Until(Instant),
}

/// The route's target, when a request of `bytes` may go now.
fn ready_to_go(
    shared: &Shared,
    bytes: u64,
    target: &mut impl FnMut() -> Option<Target>,
) -> Result<Target, Wait> {
    if !shared.pace().room(bytes) {
        return Err(Wait::Room);
    }
    if let Some(until) = shared.pause().until() {
        return Err(Wait::Until(until));
    }
    // The route is gone (a reload removed it): its spool waits.
    let target = target().ok_or(Wait::Until(Instant::now() + Duration::from_secs(1)))?;
    // An open circuit: until its half-open window, then this request asks
    // for the probe itself (no live request needs to come first).
    if let Some(left) = target
        .gate
        .open_remaining(Instant::now())
        .filter(|left| !left.is_zero())
    {
        return Err(Wait::Until(Instant::now() + left));
    }
    Ok(target)
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Reads `next` back from disk. A record found damaged has nothing left to
/// deliver or to bury; any other failure (out of descriptors, an I/O error)
/// is the disk's, not the record's: it stays, and the route waits a pause.
async fn read(spool: &Spool, next: &Next, shared: &Shared) -> Option<Stored> {
    let store = spool.store();
    match store.read(next).await {
        Ok(stored) => Some(stored),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            tracing::error!(route = spool.route(), error = %e, "spool: a record is damaged; dropped");
            store.metrics().damaged.increment(1);
            store.delivered(next);
            None
        }
        Err(e) => {
            tracing::warn!(route = spool.route(), error = %e, "spool: cannot read a record; trying later");
            shared.pause().extend(BACKOFF_MAX, None);
            store.retry(next, false, None);
            None
        }
    }
}

/// The spooled request as it is sent again: what the live request carried,
/// and the client it came from (its address and whether it used TLS), so
/// that the forwarding headers are the ones the live request would have had.
fn replay_request(stored: Stored, granted: Extensions) -> ReplayRequest {
    let (stored, body) = stored.into_parts();
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = stored.method;
    *request.uri_mut() = stored
        .uri
        .parse()
        .unwrap_or_else(|_| "/".parse().expect("a path"));
    *request.headers_mut() = stored.headers;
    let extensions = request.extensions_mut();
    extensions.extend(granted);
    if let Some(ip) = stored.client.and_then(|c| c.parse::<IpAddr>().ok()) {
        let addr = SocketAddr::new(ip, 0);
        extensions.insert(match stored.tls {
            true => ClientAddr::tls(addr),
            false => ClientAddr::new(addr),
        });
    }
    request
}

// === Outcomes ===

/// How a delivery went.
enum Attempt {
    Delivered,
    /// Refused for now.
    Again {
        /// By the upstream (an attempt), or held back by the proxy or never
        /// sent (not one: the route waits).
        attempted: bool,
        /// The upstream pushed back on the whole route.
        route_wide: bool,
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

async fn deliver(service: ReplayService, request: ReplayRequest) -> Attempt {
    match service.oneshot(request).await {
        Ok(res) => answered(res).await,
        Err(err) => failed(err),
    }
}

async fn answered(res: Response<ProxyBody>) -> Attempt {
    let answer = classify::answer(&res, false);
    let delivery = answer.delivery();
    let excerpt = match delivery {
        Delivery::Delivered => {
            drain(res.into_body(), 0).await;
            String::new()
        }
        _ => drain(res.into_body(), EXCERPT_BYTES).await,
    };
    let status = answer.status.as_u16();
    match delivery {
        Delivery::Delivered => Attempt::Delivered,
        Delivery::Again => Attempt::Again {
            attempted: true,
            route_wide: false,
            retry_after: answer.retry_after,
            status: Some(status),
            excerpt,
        },
        Delivery::Refused => Attempt::Refused { status, excerpt },
    }
}

fn failed(err: BoxError) -> Attempt {
    // Held back by the proxy, or the upstream could not be reached at all:
    // not this request's attempt, and an outage of any length leaves the
    // spool as it was. Otherwise timed out, or the upstream broke the
    // connection.
    let failure = classify::failure(err.as_ref());
    Attempt::Again {
        attempted: !failure.held_back(),
        route_wide: failure.held_back(),
        retry_after: failure.retry_after(),
        status: None,
        excerpt: ErrorChain(err.as_ref()).to_string(),
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

/// What follows from `outcome` for `next` (read as `stored`), the route's
/// pause and the pace.
async fn settle(
    spool: &Spool,
    next: &Next,
    stored: Stored,
    outcome: Attempt,
    backpressure: &[u16],
    flight: &mut InFlight,
) {
    let store = spool.store();
    let metrics = store.metrics();
    let shared = &*flight.shared.clone();
    let (status, excerpt, attempts) = match outcome {
        Attempt::Delivered => {
            shared.pause().succeeded();
            metrics.delivered.increment(1);
            store.delivered(next);
            flight.change = grow;
            return;
        }
        Attempt::Again {
            attempted,
            route_wide,
            retry_after,
            status,
            excerpt,
        } => {
            let backpressure = status.is_some_and(|s| backpressure.contains(&s));
            if route_wide || (backpressure && retry_after.is_some()) {
                // An outage, or the upstream asking everyone to wait.
                shared.pause().extend(BACKOFF_MAX, retry_after);
            }
            let attempts = next.attempts + u16::from(attempted);
            if attempts < spool.settings().max_attempts {
                metrics.retried.increment(1);
                let after = attempted.then(|| {
                    let mut jitter = Jitter::from_entropy();
                    let own = backoff_step(u32::from(attempts), BACKOFF_MAX, &mut jitter);
                    Instant::now() + own.max(retry_after.unwrap_or_default().min(RETRY_AFTER_MAX))
                });
                store.retry(next, attempted, after);
                flight.change = if attempted { halve } else { restart };
                return;
            }
            (status, excerpt, attempts)
        }
        Attempt::Refused { status, excerpt } => (Some(status), excerpt, next.attempts + 1),
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
    match store.bury(next, buried).await {
        Ok(()) => {
            burying(spool, shared, true);
            flight.change = keep;
        }
        Err(e) => {
            // The attempt counts and the route pauses: a disk that cannot
            // take dead letters must not turn into a storm of deliveries.
            if burying(spool, shared, false) {
                tracing::error!(route = spool.route(), error = %e, "spool: cannot write a dead letter; replay paused");
            }
            shared.pause().extend(DEAD_LETTER_PAUSE_MAX, None);
            store.retry(next, true, shared.pause().until());
            flight.change = restart;
        }
    }
}

/// Records whether dead letters can be written; returns whether that
/// changed (one log line, and the gauge, per change).
fn burying(spool: &Spool, shared: &Shared, works: bool) -> bool {
    let mut failing = shared
        .burying_fails
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let was_failing = std::mem::replace(&mut *failing, !works);
    if was_failing != works {
        // No change: failing still, or working still.
        return false;
    }
    spool
        .store()
        .metrics()
        .replay_paused
        .set(f64::from(u8::from(!works)));
    if works {
        tracing::info!(
            route = spool.route(),
            "spool: dead letters written again; replay resumed"
        );
    }
    true
}

#[cfg(test)]
mod tests;
