//! [`ObservedBody`]: keeps a request counted as in flight until its response body
//! has finished streaming or was dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::RouteStats;

/// RAII in-flight count: added when created, removed when dropped, so a
/// cancelled future or a dropped body can never leak one.
#[derive(Debug)]
pub(super) struct InflightGuard {
    stats: Arc<RouteStats>,
}

impl InflightGuard {
    pub(super) fn new(stats: Arc<RouteStats>) -> Self {
        stats.inflight_add();
        Self { stats }
    }

    pub(super) fn stats(&self) -> &Arc<RouteStats> {
        &self.stats
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.stats.inflight_sub();
    }
}

pin_project! {
    /// A response body that holds the request's in-flight count until its end.
    #[derive(Debug)]
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        guard: Option<InflightGuard>,
    }
}

impl<B> ObservedBody<B> {
    pub(super) fn new(inner: B, guard: InflightGuard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            // End of stream or an error: the request is done now, not when the
            // connection gets around to dropping the body.
            this.guard.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
