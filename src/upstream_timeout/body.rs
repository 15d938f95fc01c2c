//! [`SentBody`]: a request body that tells its exchange where the upload
//! stands, so that an upstream that stops taking bytes is told apart from a
//! client that is slow to send them.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use bytes::Bytes;

use crate::body::{BodyProgress, Counted, ended};
use crate::dispatch::Sent;

/// Where a request body's upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Upload {
    /// The next frame is awaited from the client since this moment: its
    /// pace, not the upstream's.
    AwaitingClient(Instant),
    /// A frame was handed to the upstream connection at this moment (or the
    /// request was, before any frame), and the connection has not asked for
    /// the next since: the upstream is not taking bytes.
    AwaitingUpstream(Instant),
    /// The body has been sent in full, or dropped unsent.
    Done,
}

/// Set in the state while the client is awaited (the rest: since when).
const AWAITING_CLIENT: u64 = 1 << 62;
/// Set once the body was dropped unsent (the call is failing): done, and
/// the rest says what it was waiting on then.
const DROPPED: u64 = 1 << 61;
const DONE: u64 = u64::MAX;
/// The latest moment the state can hold.
const LATEST: u64 = DROPPED - 2;

/// Shared by a [`SentBody`] and its exchange's future. One allocation per
/// request with a body; frames touch one atomic (and the clock).
#[derive(Debug)]
pub(super) struct Progress {
    /// `DONE`; `AWAITING_CLIENT` | nanoseconds since `base` it has been; or
    /// 1 + nanoseconds since `base` of the last hand-off to the upstream.
    state: AtomicU64,
    base: Instant,
    /// The exchange's future, woken when the body is done.
    waker: Mutex<Option<Waker>>,
}

impl Progress {
    /// A body not yet asked for: awaiting the upstream connection since `now`.
    pub(super) fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU64::new(1),
            base: now,
            waker: Mutex::new(None),
        })
    }

    pub(super) fn upload(&self) -> Upload {
        let at = |nanos: u64| self.base + std::time::Duration::from_nanos(nanos);
        match self.state.load(Ordering::Acquire) {
            s if s == DONE || s & DROPPED != 0 => Upload::Done,
            s if s & AWAITING_CLIENT != 0 => Upload::AwaitingClient(at(s & !AWAITING_CLIENT)),
            s => Upload::AwaitingUpstream(at(s - 1)),
        }
    }

    /// Wakes `waker` when the body is done.
    pub(super) fn register(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *slot {
            Some(w) if w.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
    }

    fn now(&self) -> u64 {
        let nanos = Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos();
        u64::try_from(nanos).unwrap_or(LATEST).min(LATEST)
    }

    fn handed(&self) {
        self.state.store(self.now() + 1, Ordering::Release);
    }

    /// Since when the client was awaited, if it was when the body was last
    /// polled (or dropped).
    pub(super) fn client_paused_since(&self) -> Option<Instant> {
        let s = self.state.load(Ordering::Acquire);
        (s != DONE && s & AWAITING_CLIENT != 0).then(|| {
            let nanos = s & !(AWAITING_CLIENT | DROPPED);
            self.base + std::time::Duration::from_nanos(nanos)
        })
    }

    /// Dropped unsent: done, keeping what it waited on.
    fn dropped(&self) {
        if self.state.fetch_or(DROPPED, Ordering::AcqRel) != DONE {
            self.wake();
        }
    }

    /// The client is awaited: from now, unless it was already.
    fn awaiting_client(&self) {
        if self.state.load(Ordering::Relaxed) & AWAITING_CLIENT == 0 {
            self.state
                .store(AWAITING_CLIENT | self.now(), Ordering::Release);
        }
    }

    pub(super) fn done(&self) {
        if self.state.swap(DONE, Ordering::AcqRel) != DONE {
            self.wake();
        }
    }

    fn wake(&self) {
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A request without a body is on its way: the response deadline starts.
impl Sent for Progress {
    fn sent(&self) {
        self.done();
    }
}

pin_project! {
    /// A request body that tells its exchange ([`super::UpstreamTimeout`])
    /// how its upload stands: when its end has been handed to the upstream
    /// connection (the response deadline starts), and whether the next frame
    /// waits on the client or on the upstream taking the last one.
    pub struct SentBody<B> {
        // Counted inside: a frame held for admission's bytes budget is a
        // wait on the client's side, never the upstream's.
        #[pin]
        inner: Counted<B>,
        progress: Option<Arc<Progress>>,
    }

    impl<B> PinnedDrop for SentBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped unsent (the call is failing): the deadline runs from
            // here, so that nothing waits for ever.
            if let Some(progress) = this.project().progress.take() {
                progress.dropped();
            }
        }
    }
}

impl<B> SentBody<B> {
    /// `inner`, telling `progress` how its upload stands, and `budget`
    /// (admission re-weighing a body of unknown length) its running total.
    pub(super) fn new(
        inner: B,
        progress: Option<Arc<Progress>>,
        budget: Option<BodyProgress>,
    ) -> Self {
        Self {
            inner: Counted::new(inner, budget),
            progress,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for SentBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let Some(progress) = this.progress.as_ref() else {
            return this.inner.poll_frame(cx);
        };
        let frame = match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                progress.awaiting_client();
                return Poll::Pending;
            }
        };
        match ended(&frame, &*this.inner) {
            // Whole, or failed (the failure ends the exchange).
            Some(_) => {
                if let Some(progress) = this.progress.take() {
                    progress.done();
                }
            }
            None => progress.handed(),
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
