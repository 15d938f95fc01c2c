//! [`ReadTimeout`]: cuts a body whose sender stalls or trickles.
//!
//! `timeout_ms` bounds the wait for the upstream's response headers; once they
//! are in, an upstream that hangs mid-body would otherwise hold the client, the
//! in-flight slot and a connection for as long as the client waits. Like
//! nginx's `proxy_read_timeout`, this bounds each wait for the next bytes. The
//! same holds the other way (nginx's `client_body_timeout`): a client that
//! trickles its request body must not hold an admission slot.
//!
//! A wait is counted from the moment the reader asks and the body has
//! nothing, not from the last frame: the time between a frame and the next
//! ask is the reader's (a client slow to take a response is not the
//! upstream stalling).
//!
//! A bound on each pause does not bound a body that sends one byte just
//! before every timeout. A client's body can also be held to a minimum rate
//! ([`crate::pace`], Apache's `mod_reqtimeout` `MinRate`).

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;
use crate::error::{ClientBodyError, ReadTimedOut, Side, Stall};
use crate::pace::{Credit, MinRate};

pin_project! {
    /// A body whose every wait for the next frame must end within `timeout`,
    /// and, with a [`MinRate`], whose waits must add up to no more than the
    /// rate allows.
    pub struct ReadTimeout<B> {
        #[pin]
        inner: B,
        // Re-armed lazily: a wait only records when it began, and the sleep,
        // when it fires early, is pushed to the wait's deadline. A reset per
        // frame would touch the timer wheel for every chunk of every body.
        #[pin]
        sleep: Sleep,
        // When the current wait began (`None`: not waiting).
        waiting: Option<Instant>,
        timeout: Duration,
        side: Side,
        pace: Option<Credit>,
    }
}

impl<B> ReadTimeout<B> {
    /// Wraps `side`'s body `inner`.
    pub fn new(inner: B, timeout: Duration, side: Side) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep(timeout),
            waiting: None,
            timeout,
            side,
            pace: None,
        }
    }

    /// Also holds the body to `min` on average over the time it is waited on.
    pub fn min_rate(mut self, min: MinRate) -> Self {
        self.pace = Some(Credit::new(min));
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
            if let Some(pace) = this.pace.as_mut() {
                if let Some(since) = *this.waiting {
                    pace.waited(since.elapsed());
                }
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))
                    && let Some(data) = data
                {
                    pace.moved(bytes::Buf::remaining(data) as u64);
                }
            }
            *this.waiting = None;
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
        let since = *this.waiting.get_or_insert_with(Instant::now);
        let stall = loop {
            // The wait's deadline: its pause timeout, or sooner the rest of
            // the waiting the body has earned.
            let (deadline, stall) = match this.pace.as_ref() {
                Some(pace) => pace.deadline(since, *this.timeout),
                None => (since + *this.timeout, Stall::Pause(*this.timeout)),
            };
            let now = Instant::now();
            if now >= deadline {
                break stall;
            }
            // Lazily: a later deadline is left to the armed sleep, which
            // fires early and comes back here.
            if deadline < this.sleep.deadline() || this.sleep.deadline() <= now {
                this.sleep.as_mut().reset(deadline);
            }
            ready!(this.sleep.as_mut().poll(cx));
        };
        match this.side {
            Side::Upstream => tracing::warn!(%stall, "upstream response body stalled; cut off"),
            Side::Client => {
                tracing::debug!(%stall, "client request body stalled; refused with 408")
            }
        }
        let err = ReadTimedOut {
            side: *this.side,
            stall,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::testing::Trickle;
    use http_body_util::BodyExt;

    fn stall_of(err: &BoxError) -> Stall {
        err.downcast_ref::<ReadTimedOut>().expect("timed out").stall
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_is_counted_from_the_ask_not_from_the_last_frame() {
        // A reader that takes 5 s between asks (a slow client) while the
        // sender answers each ask within 100 ms: never cut for a 1 s timeout.
        let mut body = Box::pin(ReadTimeout::new(
            Trickle::new(3, Duration::from_millis(100)),
            Duration::from_secs(1),
            Side::Upstream,
        ));
        while let Some(frame) = body.frame().await {
            frame.expect("not stalled");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_past_the_timeout_is_cut() {
        let start = Instant::now();
        let mut body = Box::pin(ReadTimeout::new(
            Trickle::new(3, Duration::from_secs(2)),
            Duration::from_secs(1),
            Side::Client,
        ));
        let err = body.frame().await.unwrap().expect_err("stalled");
        assert_eq!(stall_of(&err), Stall::Pause(Duration::from_secs(1)));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_under_the_minimum_rate_is_cut() {
        // One byte just inside every pause timeout, for ever: the pause
        // bound alone never fires; the rate does, once the waits add up to
        // the grace and the earned time.
        let start = Instant::now();
        let min = MinRate {
            per_s: 100,
            grace: Duration::from_secs(10),
        };
        let mut body = Box::pin(
            ReadTimeout::new(
                Trickle::new(10_000, Duration::from_millis(900)),
                Duration::from_secs(1),
                Side::Client,
            )
            .min_rate(min),
        );
        let err = loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("the trickle should have been cut"),
            }
        };
        assert_eq!(stall_of(&err), Stall::Rate(100));
        // 10 s of grace, and 0.01 s per byte of the ~11 bytes by then.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_millis(10_300),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_is_never_cut() {
        // 200 bytes/s against a minimum of 100: earns twice what it waits.
        let min = MinRate {
            per_s: 100,
            grace: Duration::from_secs(1),
        };
        let mut body = Box::pin(
            ReadTimeout::new(
                Trickle::new(2_000, Duration::from_millis(5)),
                Duration::from_secs(1),
                Side::Client,
            )
            .min_rate(min),
        );
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            frame.expect("fast enough");
            n += 1;
        }
        assert_eq!(n, 2_000);
    }
}
