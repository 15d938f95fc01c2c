//! [`ReadTimeout`]: cuts an upstream response body that stalls.
//!
//! `timeout_ms` bounds the wait for the upstream's response headers; once they
//! are in, an upstream that hangs mid-body would otherwise hold the client, the
//! in-flight slot and a connection for as long as the client waits. Like
//! nginx's `proxy_read_timeout`, this bounds the pause between two reads. The
//! same holds the other way (nginx's `client_body_timeout`): a client that
//! trickles its request body must not hold an admission slot.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

/// Whose body stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's request body (`[server] body_read_timeout_ms`): 408.
    Client,
    /// The upstream's response body (`read_timeout_ms`): cut off.
    Upstream,
}

/// A body paused longer than its read timeout.
#[derive(Debug)]
pub struct ReadTimedOut {
    /// Whose body.
    pub side: Side,
    /// The timeout.
    pub after: Duration,
}

impl fmt::Display for ReadTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match self.side {
            Side::Client => "client",
            Side::Upstream => "upstream",
        };
        write!(
            f,
            "{who} sent no body data for {} ms",
            self.after.as_millis()
        )
    }
}

impl std::error::Error for ReadTimedOut {}

/// Told how an upstream response body ended, for outcomes the headers cannot
/// show (a body cut off, reset or stalled after a `200`).
pub trait BodyObserver: Send + Sync {
    /// The forwarder will report this call's body.
    fn attach(&self);
    /// The body ended: whole (`true`) or failed (`false`). Called at most once;
    /// never when the client went away first.
    fn finished(&self, ok: bool);
}

/// Request extension carrying a [`BodyObserver`] to the forwarder (the circuit
/// breaker puts it there).
#[derive(Clone)]
pub struct BodyOutcomeHook(pub std::sync::Arc<dyn BodyObserver>);

impl fmt::Debug for BodyOutcomeHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BodyOutcomeHook")
    }
}

pin_project! {
    /// A body whose every frame must come within `timeout` of the previous one.
    pub struct ReadTimeout<B> {
        #[pin]
        inner: B,
        // Re-armed lazily: a frame only records `last`, and the sleep, when it
        // fires early, is pushed to `last + timeout`. A reset per frame would
        // touch the timer wheel for every chunk of every body.
        #[pin]
        sleep: Sleep,
        last: Instant,
        timeout: Duration,
        side: Side,
        observer: Option<BodyOutcomeHook>,
    }
}

impl<B> ReadTimeout<B> {
    /// Wraps `side`'s body `inner`; the clock starts now.
    pub fn new(inner: B, timeout: Duration, side: Side) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep(timeout),
            last: Instant::now(),
            timeout,
            side,
            observer: None,
        }
    }

    /// Reports the body's end to `hook`.
    pub fn observed_by(mut self, hook: Option<BodyOutcomeHook>) -> Self {
        if let Some(h) = &hook {
            h.0.attach();
        }
        self.observer = hook;
        self
    }
}

impl<B> Body for ReadTimeout<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
            *this.last = Instant::now();
            let frame: Option<Result<Frame<B::Data>, BoxError>> =
                frame.map(|f| f.map_err(Into::into));
            let ended = match &frame {
                Some(Err(e)) => {
                    if *this.side == Side::Upstream {
                        tracing::warn!(error = %e, "upstream response body failed; cut off");
                    }
                    Some(false)
                }
                None => Some(true),
                Some(Ok(_)) => this.inner.is_end_stream().then_some(true),
            };
            if let Some(ok) = ended
                && let Some(hook) = this.observer.take()
            {
                hook.0.finished(ok);
            }
            return Poll::Ready(frame);
        }
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            let deadline = *this.last + *this.timeout;
            if Instant::now() >= deadline {
                break;
            }
            this.sleep.as_mut().reset(deadline);
        }
        tracing::warn!(side = ?this.side, after_ms = this.timeout.as_millis() as u64, "body stalled; cut off");
        if let Some(hook) = this.observer.take() {
            hook.0.finished(false);
        }
        let err = ReadTimedOut {
            side: *this.side,
            after: *this.timeout,
        };
        Poll::Ready(Some(Err(err.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
