//! [`ReadTimeout`]: cuts an upstream response body that stalls.
//!
//! `timeout_ms` bounds the wait for the upstream's response headers; once they
//! are in, an upstream that hangs mid-body would otherwise hold the client, the
//! in-flight slot and a connection for as long as the client waits. Like
//! nginx's `proxy_read_timeout`, this bounds the pause between two reads. The
//! same holds the other way (nginx's `client_body_timeout`): a client that
//! trickles its request body must not hold an admission slot.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;
use crate::error::{ClientBodyError, ReadTimedOut, Side};

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
        }
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
            let side = *this.side;
            let frame = frame.map(|f| {
                f.map_err(|e| match side {
                    Side::Client => ClientBodyError::new(e.into()).into(),
                    Side::Upstream => {
                        let e: BoxError = e.into();
                        tracing::warn!(error = %e, "upstream response body failed; cut off");
                        e
                    }
                })
            });
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
        match this.side {
            Side::Upstream => tracing::warn!(
                after_ms = this.timeout.as_millis() as u64,
                "upstream response body stalled; cut off"
            ),
            Side::Client => tracing::debug!(
                after_ms = this.timeout.as_millis() as u64,
                "client request body stalled; refused with 408"
            ),
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
