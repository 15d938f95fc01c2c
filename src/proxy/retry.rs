//! When a request that failed at the upstream may be sent again, at most
//! once (a second failure is the upstream's):
//!
//! - HTTP/1.1: the upstream closed or reset a reused keep-alive connection
//!   before any byte of an answer (the race with an upstream closing an idle
//!   connection, see [`super::connector`]). The request may have been read
//!   and executed before the close, so only a request that may run twice is
//!   sent again: an idempotent method (RFC 9110 §9.2.2), or one carrying an
//!   `Idempotency-Key` (the upstream deduplicates it). A request hyper gives
//!   back unwritten goes on the next connection whatever its method.
//! - HTTP/2: the upstream said it did not process the stream (RFC 9113
//!   §8.7): `REFUSED_STREAM`, or a stream above a graceful `GOAWAY`'s last
//!   stream id. Any method, on another connection (Envoy's
//!   `refused-stream`), and never the upstream's failure.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use super::connector::Exchanges;
use crate::body::{BoxError, ProxyBody, find_cause};
use crate::classify;

/// The header by which a client says that a request may be executed more
/// than once with one effect (IETF draft `Idempotency-Key`, Stripe's).
pub(super) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Whether a request may reach the upstream twice: an idempotent method, or
/// an `Idempotency-Key` that lets the upstream tell the repeat.
pub(super) fn may_run_twice(method: &Method, headers: &HeaderMap) -> bool {
    method.is_idempotent() || headers.contains_key(IDEMPOTENCY_KEY)
}

/// Whether `err`, from sending a request on a connection that has carried
/// `exchanges`, is the race with an upstream closing an idle connection: a
/// reused connection, closed or reset before any answer.
pub(super) fn lost_the_idle_race(err: &hyper::Error, exchanges: &Exchanges) -> bool {
    if classify::failure(err).clients_doing() || !exchanges.reused_and_unanswered() {
        return false;
    }
    let closed = err.is_incomplete_message();
    let reset = find_cause::<std::io::Error>(err).is_some_and(|e| {
        use std::io::ErrorKind::*;
        matches!(
            e.kind(),
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
        )
    });
    closed || reset
}

/// How an HTTP/2 upstream said it never processed a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unprocessed {
    /// `RST_STREAM(REFUSED_STREAM)`: the connection is fine.
    Refused,
    /// Above the last stream id of a graceful `GOAWAY`: the connection
    /// takes no new streams.
    GoingAway,
}

/// Whether `err` says the upstream did not process the stream. A `GOAWAY`
/// with an error code is not enough: h2 gives that error to every stream of
/// the connection, processed or not.
pub(super) fn unprocessed(err: &hyper::Error) -> Option<Unprocessed> {
    let h2 = find_cause::<h2::Error>(err)?;
    if !h2.is_remote() {
        return None;
    }
    match h2.reason()? {
        h2::Reason::REFUSED_STREAM if h2.is_reset() => Some(Unprocessed::Refused),
        h2::Reason::NO_ERROR if h2.is_go_away() => Some(Unprocessed::GoingAway),
        _ => None,
    }
}

/// Request body bytes kept, as references to the frames already sent, so that
/// a request losing the idle race can be sent again (Envoy's retry buffer,
/// HAProxy's L7 retries): enough for an ingestion batch, bounded per request.
/// A larger body that loses the race is not sent again.
pub(super) const REPLAY_LIMIT: usize = 64 * 1024;

/// A request body that remembers what was taken from it, up to
/// [`REPLAY_LIMIT`], and when dropped hands that and its rest back so that
/// the request can be sent again.
pub struct Reclaim {
    inner: Option<ProxyBody>,
    /// What replaying needs; boxed, and only for a body that is not empty, so
    /// that the request hyper moves about stays small.
    replay: Option<Box<ReplayState>>,
}

struct ReplayState {
    /// Frames to send first: what a failed attempt had taken.
    queued: VecDeque<Bytes>,
    /// The data frames taken so far (references, not copies).
    taken: Vec<Bytes>,
    taken_len: usize,
    /// Where the body goes back; gone once it cannot be replayed.
    back: Option<oneshot::Sender<Replay>>,
}

/// A body handed back: what was taken, then what was not.
pub(super) struct Replay {
    taken: Vec<Bytes>,
    rest: Option<ProxyBody>,
}

impl Reclaim {
    /// `body`, and where it comes back when dropped while still replayable
    /// (`None` for a body already at its end: the retry sends an empty one).
    pub(super) fn new(body: ProxyBody) -> (Self, Option<oneshot::Receiver<Replay>>) {
        if body.is_end_stream() {
            return (Self::sent(body), None);
        }
        let (tx, rx) = oneshot::channel();
        let body = Self {
            inner: Some(body),
            replay: Some(Box::new(ReplayState {
                queued: VecDeque::new(),
                taken: Vec::new(),
                taken_len: 0,
                back: Some(tx),
            })),
        };
        (body, Some(rx))
    }

    /// A body that is never handed back.
    pub(super) fn sent(body: ProxyBody) -> Self {
        Self {
            inner: Some(body),
            replay: None,
        }
    }

    /// The body to send again: what was taken first, then the rest.
    pub(super) fn replay(replay: Replay) -> Self {
        Self {
            inner: replay.rest,
            replay: Some(Box::new(ReplayState {
                queued: replay.taken.into(),
                taken: Vec::new(),
                taken_len: 0,
                back: None,
            })),
        }
    }

    /// An empty body (the retry of a request without one).
    pub(super) fn empty() -> Self {
        Self::sent(crate::body::full(Bytes::new()))
    }
}

impl ReplayState {
    fn keep(&mut self, frame: &Frame<Bytes>) {
        match frame.data_ref() {
            Some(data) if self.taken_len + data.len() <= REPLAY_LIMIT => {
                self.taken_len += data.len();
                self.taken.push(data.clone());
            }
            // Too much to keep, or trailers: not replayable any more.
            _ => {
                self.back = None;
                self.taken = Vec::new();
            }
        }
    }
}

impl Body for Reclaim {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(data) = this.replay.as_mut().and_then(|r| r.queued.pop_front()) {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        if let Some(replay) = this.replay.as_mut().filter(|r| r.back.is_some()) {
            match &frame {
                Some(Ok(f)) => replay.keep(f),
                // The client's body failed: nothing to send again.
                Some(Err(_)) => replay.back = None,
                None => {}
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.replay.as_ref().is_none_or(|r| r.queued.is_empty())
            && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let queued =
            self.replay
                .as_ref()
                .map_or(0, |r| r.queued.iter().map(Bytes::len).sum::<usize>()) as u64;
        let inner = self
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + queued);
        }
        hint.set_lower(inner.lower() + queued);
        hint
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        if let Some(replay) = self.replay.as_mut()
            && let Some(back) = replay.back.take()
        {
            let _ = back.send(Replay {
                taken: std::mem::take(&mut replay.taken),
                rest: self.inner.take(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn frames(chunks: &[&'static [u8]]) -> ProxyBody {
        let chunks: Vec<Bytes> = chunks.iter().map(|c| Bytes::from_static(c)).collect();
        crate::body::boxed(Chunks(chunks.into()))
    }

    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_body_dropped_part_sent_comes_back_whole() {
        let (mut body, back) = Reclaim::new(frames(&[b"ab", b"cd", b"ef"]));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ab");
        drop(body);
        let again = Reclaim::replay(back.unwrap().await.unwrap());
        let all = again.collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcdef");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_not_handed_back() {
        static BIG: [u8; REPLAY_LIMIT + 1] = [0; REPLAY_LIMIT + 1];
        let (mut body, back) = Reclaim::new(frames(&[&BIG]));
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert!(back.unwrap().await.is_err());
    }
}
