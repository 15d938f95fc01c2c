//! One client connection from its first byte to its close, within bounds
//! that hyper does not keep by itself:
//!
//! - **The first request** must arrive within `header_read_timeout_ms` of the
//!   connection's start (after the TLS handshake, which has the same bound).
//!   hyper's own head timeout starts only once hyper-util's protocol
//!   detection has seen bytes, and HTTP/2 has none: without this, silent
//!   sockets hold every `max_connections` slot for as long as they like
//!   (HAProxy's `timeout http-request`, Envoy's `request_headers_timeout`).
//! - **An idle HTTP/2 connection** (no open stream) is closed with a GOAWAY
//!   after `http2_idle_timeout_ms` (nginx's `keepalive_timeout`, Envoy's
//!   `idle_timeout`): answering PINGs must not keep one for ever. HTTP/1's
//!   idle keep-alive is bounded by hyper's head timeout.
//! - **Premature resets**: an HTTP/2 client that cancels most of its streams
//!   within a second of opening them (a paced rapid reset: each request
//!   reaches the upstream, then its slot is freed at once) gets a GOAWAY
//!   once it has done so 100 times and for at least half of its streams, as
//!   Envoy's premature-reset rule. hyper cuts streams reset before they are
//!   accepted; these were accepted.
//! - **The drain**: closed gracefully when the proxy drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::body::BoxError;

/// A stream cancelled by its client sooner than this after it opened is a
/// premature reset (Envoy's `premature_reset_min_stream_lifetime_seconds`).
const PREMATURE: Duration = Duration::from_secs(1);

/// Premature resets a connection may make before its share is judged.
const PREMATURE_RESETS_ALLOWED: u64 = 100;

/// A connection's bounds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    /// The first request must arrive within this of the start.
    pub(super) first_request: Duration,
    /// An HTTP/2 connection without an open stream is closed after this.
    pub(super) http2_idle: Duration,
}

/// Why a connection was closed by one of its bounds (a metric label; the
/// discriminant is its place in [`Closed::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(super) enum Closed {
    /// No request within `header_read_timeout_ms` of the start.
    FirstRequestTimeout,
    /// HTTP/2, no open stream for `http2_idle_timeout_ms`.
    Idle,
    /// HTTP/2, most streams cancelled by the client at once.
    PrematureResets,
}

const _: () = assert!(Closed::PrematureResets as usize == Closed::ALL.len() - 1);

impl Closed {
    /// Every reason, for pre-registering metrics.
    pub(super) const ALL: [Closed; 3] = [
        Closed::FirstRequestTimeout,
        Closed::Idle,
        Closed::PrematureResets,
    ];

    /// The metric label.
    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Closed::FirstRequestTimeout => "first_request_timeout",
            Closed::Idle => "http2_idle",
            Closed::PrematureResets => "premature_resets",
        }
    }
}

/// What a connection's requests tell the loop that bounds it. Shared by the
/// connection's service (which opens and closes streams) and [`serve`].
#[derive(Debug)]
pub(super) struct Activity {
    start: Instant,
    /// Requests seen.
    requests: AtomicU64,
    /// Whether they are HTTP/2 streams.
    http2: AtomicBool,
    /// HTTP/2 streams open (request in, response not ended).
    open: AtomicUsize,
    /// Nanoseconds since `start` at which the last stream closed.
    idle_since: AtomicU64,
    /// HTTP/2 streams the client cancelled within [`PREMATURE`].
    premature: AtomicU64,
    /// HTTP/2 streams the proxy answered itself (a 404, a refusal): they
    /// reached no upstream, so they do not dilute the share of premature
    /// resets (a client padding its resets with them).
    local: AtomicU64,
    /// Wakes [`serve`] at the first request, and when premature resets pass
    /// the allowance.
    alarm: Notify,
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            requests: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            local: AtomicU64::new(0),
            alarm: Notify::new(),
        })
    }

    /// A request arrived. HTTP/2 ones are tracked until their response ends
    /// (the returned guard); HTTP/1's bounds are hyper's.
    pub(super) fn request(self: &Arc<Self>, http2: bool) -> StreamGuard {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
            self.open.fetch_add(1, Ordering::Relaxed);
        }
        if self.requests.fetch_add(1, Ordering::Release) == 0 {
            // The first-request bound is met: the loop moves on to the next.
            self.alarm.notify_one();
        }
        if !http2 {
            return StreamGuard(None);
        }
        StreamGuard(Some(Open {
            activity: self.clone(),
            opened: Instant::now(),
            ended: false,
        }))
    }

    fn closed(&self, opened: Instant, ended: bool) {
        let now = Instant::now();
        if !ended
            && now.duration_since(opened) < PREMATURE
            && self.premature.fetch_add(1, Ordering::Relaxed) + 1 >= PREMATURE_RESETS_ALLOWED
        {
            self.alarm.notify_one();
        }
        let nanos = u64::try_from(now.duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.store(nanos, Ordering::Relaxed);
        self.open.fetch_sub(1, Ordering::Release);
    }

    /// Whether the premature resets reached `times` the allowance.
    fn premature_beyond(&self, times: u64) -> bool {
        self.premature.load(Ordering::Relaxed) >= times * PREMATURE_RESETS_ALLOWED
    }

    /// What the bounds say at `now`: close, or look again at a moment.
    fn check(&self, now: Instant, bounds: Bounds) -> Check {
        let requests = self.requests.load(Ordering::Acquire);
        if requests == 0 {
            let until = self.start + bounds.first_request;
            return match now >= until {
                true => Check::Close(Closed::FirstRequestTimeout),
                false => Check::Later(until),
            };
        }
        if !self.http2.load(Ordering::Relaxed) {
            // HTTP/1: hyper bounds the rest.
            return Check::Done;
        }
        let premature = self.premature.load(Ordering::Relaxed);
        let forwarded = requests.saturating_sub(self.local.load(Ordering::Relaxed));
        if self.premature_beyond(1) && premature * 2 >= forwarded {
            return Check::Goaway(Closed::PrematureResets);
        }
        if self.open.load(Ordering::Acquire) > 0 {
            return Check::Later(now + bounds.http2_idle);
        }
        let since = self.start + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed));
        let until = since + bounds.http2_idle;
        match now >= until {
            true => Check::Goaway(Closed::Idle),
            false => Check::Later(until),
        }
    }
}

/// What [`serve`] watches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// The bounds: the first request, HTTP/2 idleness, premature resets.
    Bounds,
    /// A GOAWAY was sent: the connection's grace to finish.
    Leaving,
    /// Nothing more (HTTP/1, whose bounds are hyper's).
    Nothing,
}

/// What [`Activity::check`] found.
enum Check {
    /// Close now, without a goodbye (nothing was ever asked on it).
    Close(Closed),
    /// Say goodbye (GOAWAY), let what is open finish.
    Goaway(Closed),
    /// Look again then.
    Later(Instant),
    /// Nothing more to watch.
    Done,
}

/// An open HTTP/2 stream, until its response has ended or is dropped.
#[derive(Debug)]
pub(super) struct StreamGuard(Option<Open>);

#[derive(Debug)]
struct Open {
    activity: Arc<Activity>,
    opened: Instant,
    ended: bool,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.activity.closed(self.opened, self.ended);
    }
}

impl StreamGuard {
    /// Whether this is an HTTP/2 stream's (HTTP/1's are not tracked).
    pub(super) fn is_stream(&self) -> bool {
        self.0.is_some()
    }

    /// The proxy answered it itself: it reached no upstream.
    pub(super) fn answered_locally(&self) {
        if let Some(open) = &self.0 {
            open.activity.local.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The response ended, whole or cut by the upstream: not a cancel.
    pub(super) fn ended(&mut self) {
        if let Some(open) = &mut self.0 {
            open.ended = true;
        }
    }
}

/// Serves `conn` to its end within `bounds`, its requests reporting to
/// `activity`; `closed` counts the connections a bound closed.
pub(super) async fn serve<C>(
    conn: C,
    activity: Arc<Activity>,
    bounds: Bounds,
    mut drain: watch::Receiver<()>,
    closed: impl Fn(Closed),
) -> Result<(), BoxError>
where
    C: GracefulConnection<Error = BoxError>,
{
    let mut conn = std::pin::pin!(conn);
    let sleep = tokio::time::sleep_until(activity.start + bounds.first_request);
    let mut sleep = std::pin::pin!(sleep);
    let mut state = Watch::Bounds;
    let mut draining = false;
    loop {
        let verdict = tokio::select! {
            result = conn.as_mut() => return result,
            changed = drain.changed(), if !draining => {
                draining = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
                continue;
            }
            () = &mut sleep, if state != Watch::Nothing => match state {
                // Told to go away and still here: closed.
                Watch::Leaving => return Ok(()),
                _ => activity.check(Instant::now(), bounds),
            },
            // The first request, and premature resets, are acted on at once.
            () = activity.alarm.notified(), if state != Watch::Nothing => match state {
                // Still resetting streams after the GOAWAY: closed now.
                Watch::Leaving if activity.premature_beyond(2) => return Ok(()),
                Watch::Leaving => continue,
                _ => activity.check(Instant::now(), bounds),
            },
        };
        match verdict {
            Check::Close(why) => {
                closed(why);
                tracing::debug!(reason = why.as_str(), "client connection closed");
                return Ok(());
            }
            Check::Goaway(why) => {
                closed(why);
                tracing::debug!(reason = why.as_str(), "client connection told to go away");
                conn.as_mut().graceful_shutdown();
                // What is open may finish; a client that ignores the GOAWAY
                // (or never acknowledges its PING) is closed.
                state = Watch::Leaving;
                sleep.as_mut().reset(Instant::now() + bounds.first_request);
            }
            Check::Later(at) => sleep.as_mut().reset(at),
            Check::Done => state = Watch::Nothing,
        }
    }
}
