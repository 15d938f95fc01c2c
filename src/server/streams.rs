//! [`StreamExecutor`]: the HTTP/2 listener's executor, which bounds each
//! client stream's response as `ClientIo` bounds an HTTP/1 connection's.
//!
//! A client that stops reading one HTTP/2 stream (never sends it a
//! WINDOW_UPDATE) while it reads the others keeps its connection's writes
//! flowing, so the connection's send bound never fires; the stream's
//! response waits for ever, holding its admission slot and its upstream
//! stream. Envoy resets such a stream after its `stream_idle_timeout`.
//! hyper runs every HTTP/2 stream as a future it hands to its executor, so
//! the executor wraps each one: while a stream's response body has handed
//! out a frame and has not been asked for the next, the stream is waiting
//! on its client, and those waits are held to `send_timeout_ms` each and to
//! `send_min_bytes_per_s` on the whole. Past them the stream's future is
//! dropped: hyper resets the stream (`CANCEL`), its slot is freed, and the
//! call counts as neither success nor failure (the client's doing).
//!
//! The response body ([`ResponseBody`]) finds its stream's pace through a
//! thread-local the wrapper sets while it polls the stream: the pace moves
//! in and out of it, so nothing is shared or counted.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::connection::StreamGuard;
use crate::body::ended;
use crate::pace::{Credit, MinRate};

thread_local! {
    /// The pace of the stream being polled on this thread, if any.
    static CURRENT: RefCell<Option<Box<Pace>>> = const { RefCell::new(None) };
}

/// How a stream's response has been taken by its client.
#[derive(Debug)]
struct Pace {
    /// When the last frame was handed out, while the next is not asked for.
    waiting: Option<Instant>,
    credit: Credit,
}

/// A response body is asked for a frame: the client's wait, if any, is over.
fn asked() {
    CURRENT.with_borrow_mut(|pace| {
        if let Some(pace) = pace
            && let Some(since) = pace.waiting.take()
        {
            pace.credit.waited(since.elapsed());
        }
    });
}

/// A response body hands out `bytes`: the client's turn.
fn handed(bytes: usize) {
    CURRENT.with_borrow_mut(|pace| {
        if let Some(pace) = pace {
            pace.credit.moved(bytes as u64);
            pace.waiting = Some(Instant::now());
        }
    });
}

/// The HTTP/2 listener's executor: each stream within its client's pace.
#[derive(Clone)]
pub(super) struct StreamExecutor {
    rate: MinRate,
    timed_out: metrics::Counter,
}

impl StreamExecutor {
    /// Streams held to `rate` (its grace: each wait); `timed_out` counts
    /// the streams reset for it.
    pub(super) fn new(rate: MinRate, timed_out: metrics::Counter) -> Self {
        Self { rate, timed_out }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Paced {
            inner: fut,
            pace: Some(Box::new(Pace {
                waiting: None,
                credit: Credit::new(self.rate),
            })),
            sleep: None,
            rate: self.rate,
            timed_out: self.timed_out.clone(),
        });
    }
}

pin_project! {
    /// A stream's future, dropped when its client falls behind.
    struct Paced<F> {
        #[pin]
        inner: F,
        pace: Option<Box<Pace>>,
        sleep: Option<Pin<Box<Sleep>>>,
        rate: MinRate,
        timed_out: metrics::Counter,
    }
}

impl<F: Future> Future for Paced<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let previous =
            CURRENT.with_borrow_mut(|current| std::mem::replace(current, this.pace.take()));
        let polled = this.inner.poll(cx);
        *this.pace = CURRENT.with_borrow_mut(|current| std::mem::replace(current, previous));
        if polled.is_ready() {
            return Poll::Ready(());
        }
        let Some(pace) = this.pace.as_deref() else {
            return Poll::Pending;
        };
        let Some(since) = pace.waiting else {
            return Poll::Pending;
        };
        let (deadline, _) = pace.credit.deadline(since, this.rate.grace);
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Re-armed lazily: each frame moves the deadline later, and a timer
        // reset per frame would touch the wheel for every WINDOW_UPDATE.
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if deadline < sleep.deadline() || sleep.deadline() <= now {
                sleep.as_mut().reset(deadline);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        this.timed_out.increment(1);
        tracing::debug!("client took no bytes of an HTTP/2 stream; stream reset");
        // Dropping the stream's future resets it and frees what it held.
        Poll::Ready(())
    }
}

// === ResponseBody ===

pin_project! {
    /// The body of every response to a client. For an HTTP/2 stream it
    /// holds the stream open in its connection's accounting until the body
    /// ends (or is dropped: a cancel when it had not ended), and tells the
    /// stream's pace ([`asked`], [`handed`]) as its client takes it.
    pub(super) struct ResponseBody<B> {
        #[pin]
        inner: B,
        guard: Option<StreamGuard>,
    }
}

impl<B: Body> ResponseBody<B> {
    pub(super) fn new(inner: B, mut guard: StreamGuard) -> Self {
        if !guard.is_stream() {
            return Self { inner, guard: None };
        }
        // hyper never polls a body already at its end (204, 304, HEAD,
        // Content-Length: 0): ended now, or dropping it would read as a
        // cancel.
        if inner.is_end_stream() {
            guard.ended();
        }
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body> Body for ResponseBody<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let stream = this.guard.is_some();
        if stream {
            asked();
        }
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if stream && let Some(Ok(frame)) = &frame {
            handed(frame.data_ref().map_or(0, |d| d.remaining()));
        }
        // Whole, or failed (the upstream's doing, not a cancel): ended.
        if ended(&frame, &*this.inner).is_some()
            && let Some(mut guard) = this.guard.take()
        {
            guard.ended();
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
