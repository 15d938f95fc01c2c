//! The body type the proxy answers with, and small helpers around it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use pin_project_lite::pin_project;

/// The error type of every service in the stack, as in tower: nested error enums
/// would change whenever layers are reordered.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response or forwarded-request body: streamed, type-erased.
///
/// Boxing costs one small allocation per message; it lets upstream bodies, JSON
/// rejections and observed bodies share one type.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body that is one chunk of bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts to [`BoxError`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// The future of the protection layers' services (admission, circuit, rate
/// limit): boxed, because each awaits its inner service between its own steps.
pub type BoxFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, BoxError>> + Send>>;

/// Walks an error's `source()` chain looking for a `T`.
pub(crate) fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// How a body stands after yielding `frame`: `Some(true)` ended whole (its
/// end, its trailers, or its last data frame, after which hyper drops it
/// without asking for the end), `Some(false)` failed, `None` more to come.
pub(crate) fn ended<D, E, B: Body>(frame: &Option<Result<Frame<D>, E>>, body: &B) -> Option<bool> {
    match frame {
        None => Some(true),
        Some(Err(_)) => Some(false),
        Some(Ok(f)) if f.is_trailers() || body.is_end_stream() => Some(true),
        Some(Ok(_)) => None,
    }
}

pin_project! {
    /// A body that holds `guard` until it has ended (end of stream or error) or
    /// is dropped, whichever comes first: a streaming response keeps its
    /// in-flight slot until its last byte.
    #[derive(Debug)]
    pub struct GuardedBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
        on_trailers: Option<fn(&mut G, &http::HeaderMap)>,
    }
}

impl<B, G> GuardedBody<B, G> {
    /// Holds `guard` for the life of `inner`.
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
            on_trailers: None,
        }
    }

    /// Shows the body's trailers, if it has some, to the guard before it is
    /// let go (a gRPC status arrives there).
    pub fn on_trailers(mut self, f: fn(&mut G, &http::HeaderMap)) -> Self {
        self.on_trailers = Some(f);
        self
    }
}

impl<B: Body, G> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if ended(&frame, &*this.inner).is_some() {
            if let (Some(f), Some(guard), Some(Ok(frame))) =
                (this.on_trailers, this.guard.as_mut(), &frame)
                && let Some(trailers) = frame.trailers_ref()
            {
                f(guard, trailers);
            }
            // Done now (the last byte is read), not at the next poll or when the
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

/// Request extension: told the running total of the request body's bytes as
/// they are sent upstream, by whoever sends them
/// ([`Forward`](crate::proxy::Forward)). Admission re-weighs a body of
/// unknown length with it, and may answer [`Growth::Wait`]: the bytes are
/// not there yet, and the body must not go on until they are (backpressure
/// on the client's upload, not an overrun of the budget).
#[derive(Clone)]
pub struct BodyProgress(pub std::sync::Arc<dyn Fn(u64) -> Growth + Send + Sync>);

/// What a [`BodyProgress`] says of the bytes read so far.
pub enum Growth {
    /// They fit: send them on.
    Go,
    /// Hold them until this resolves, then ask again.
    Wait(Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
}

impl std::fmt::Debug for BodyProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodyProgress")
    }
}

pin_project! {
    /// A body that tells a [`BodyProgress`] its running byte total, and
    /// holds a frame back while it says to wait (one frame in memory: the
    /// client is not read meanwhile). Without a progress, the body as is.
    /// The upstream timeout wraps it, so that a frame held here reads as
    /// waiting on the client, never on the upstream.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        seen: u64,
        progress: Option<BodyProgress>,
        held: Option<Frame<Bytes>>,
        waiting: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    }
}

impl<B> std::fmt::Debug for Counted<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted").field("seen", &self.seen).finish()
    }
}

impl<B> Counted<B> {
    /// Counts `inner`'s data bytes for `progress`, if any.
    pub fn new(inner: B, progress: Option<BodyProgress>) -> Self {
        Self {
            inner,
            seen: 0,
            progress,
            held: None,
            waiting: None,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let Some(progress) = this.progress.as_ref() else {
            return this.inner.poll_frame(cx);
        };
        loop {
            if let Some(wait) = this.waiting.as_mut() {
                ready!(wait.as_mut().poll(cx));
                *this.waiting = None;
                match (progress.0)(*this.seen) {
                    Growth::Go => return Poll::Ready(this.held.take().map(Ok)),
                    Growth::Wait(wait) => {
                        *this.waiting = Some(wait);
                        continue;
                    }
                }
            }
            let frame = ready!(this.inner.as_mut().poll_frame(cx));
            let Some(Ok(frame)) = frame else {
                return Poll::Ready(frame);
            };
            let Some(data) = frame.data_ref() else {
                return Poll::Ready(Some(Ok(frame)));
            };
            *this.seen += data.len() as u64;
            match (progress.0)(*this.seen) {
                Growth::Go => return Poll::Ready(Some(Ok(frame))),
                Growth::Wait(wait) => {
                    *this.held = Some(frame);
                    *this.waiting = Some(wait);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Bodies for the crate's own tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body::{Body, Frame};
    use tokio::time::{Instant, Sleep};

    use super::BoxError;

    /// `chunks` one-byte frames, one every `every` (on tokio's clock): a
    /// slow uplink, or a trickle.
    pub(crate) struct Trickle {
        chunks: u32,
        every: Duration,
        sleep: Pin<Box<Sleep>>,
    }

    impl Trickle {
        pub(crate) fn new(chunks: u32, every: Duration) -> Self {
            Self {
                chunks,
                every,
                sleep: Box::pin(tokio::time::sleep(every)),
            }
        }
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.chunks == 0 {
                return Poll::Ready(None);
            }
            ready!(self.sleep.as_mut().poll(cx));
            self.chunks -= 1;
            let next = Instant::now() + self.every;
            self.sleep.as_mut().reset(next);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }
}
