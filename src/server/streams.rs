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
//! The response body ([`Tracked`](super::connection::Tracked)) finds its
//! stream's pace through a thread-local the wrapper sets while it polls the
//! stream: the pace moves in and out of it, so nothing is shared or counted.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::proxy::MinRate;

thread_local! {
    /// The pace of the stream being polled on this thread, if any.
    static CURRENT: RefCell<Option<Box<Pace>>> = const { RefCell::new(None) };
}

/// How a stream's response has been taken by its client.
#[derive(Debug)]
struct Pace {
    /// When the last frame was handed out, while the next is not asked for.
    waiting: Option<Instant>,
    /// Waits ended so far, and the bytes handed out.
    waited: Duration,
    bytes: u64,
}

/// Called by a response body as it is asked for a frame: the client's wait,
/// if any, is over.
pub(super) fn asked() {
    CURRENT.with_borrow_mut(|pace| {
        if let Some(pace) = pace
            && let Some(since) = pace.waiting.take()
        {
            pace.waited += since.elapsed();
        }
    });
}

/// Called by a response body as it hands out `bytes`: the client's turn.
pub(super) fn handed(bytes: usize) {
    CURRENT.with_borrow_mut(|pace| {
        if let Some(pace) = pace {
            pace.bytes += bytes as u64;
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
                waited: Duration::ZERO,
                bytes: 0,
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
        let left = this.rate.allowance(pace.bytes).saturating_sub(pace.waited);
        let deadline = since + left.min(this.rate.grace);
        if Instant::now() < deadline {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
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
