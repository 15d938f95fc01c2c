//! [`ReadTimeout`]: cuts an upstream response body that stalls.
//!
//! `timeout_ms` bounds the wait for the upstream's response headers; once they
//! are in, an upstream that hangs mid-body would otherwise hold the client, the
//! in-flight slot and a connection for as long as the client waits. Like
//! nginx's `proxy_read_timeout`, this bounds the pause between two reads.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

/// The upstream paused longer than the read timeout mid-body.
#[derive(Debug)]
pub struct ReadTimedOut(pub Duration);

impl fmt::Display for ReadTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "upstream sent no body data for {} ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for ReadTimedOut {}

pin_project! {
    /// A body whose every frame must come within `timeout` of the previous one.
    pub struct ReadTimeout<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        timeout: Duration,
    }
}

impl<B> ReadTimeout<B> {
    /// Wraps `inner`; the clock starts now.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep(timeout),
            timeout,
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
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            this.sleep.as_mut().reset(Instant::now() + *this.timeout);
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(this.sleep.poll(cx));
        Poll::Ready(Some(Err(ReadTimedOut(*this.timeout).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
