//! [`ResponseFuture`]: one exchange with the upstream, bounded in each of
//! its phases: the upload (the upstream must keep taking bytes), the wait
//! for the response headers (from the body's end), and the client's own
//! deadline throughout.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::body::{Progress, Upload};
use crate::body::BoxError;
use crate::classify;
use crate::conn::PeerClosed;
use crate::deadline::ClientDeadline;
use crate::error::{ErrorChain, Reason, Rejection};
use crate::exchange::UpstreamLatency;

/// How long an upload may run before the client's connection is watched for
/// the client going away. hyper notices a client that leaves while it reads
/// the body, or once it has read all of it; in between, while the upstream
/// is slow to take the body, hyper reads nothing and would not notice.
/// Watching costs a descriptor and a registration, so short uploads (almost
/// all of them) never pay it.
pub(super) const WATCH_CLIENT_AFTER: Duration = Duration::from_secs(1);

/// Why an upload was cut: the upstream took no request bytes for the route's
/// `write_timeout_ms` (HAProxy's `timeout server`, nginx's
/// `proxy_send_timeout`). The upstream's failure.
#[derive(Debug)]
pub struct WriteTimedOut {
    /// The timeout.
    pub after: Duration,
}

impl std::fmt::Display for WriteTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the upstream took no request bytes for {} ms",
            self.after.as_millis()
        )
    }
}

impl std::error::Error for WriteTimedOut {}

/// The upload's bounds, while it lasts.
pub(super) struct Uploading {
    pub(super) progress: Arc<Progress>,
    pub(super) write_timeout: Duration,
    /// The client connection, watched once the upload has run
    /// [`WATCH_CLIENT_AFTER`] (HTTP/1 requests with a body).
    pub(super) peer: Option<PeerClosed>,
    pub(super) watching: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

pin_project! {
    /// Future of [`UpstreamTimeout`](super::UpstreamTimeout).
    pub struct ResponseFuture<F> {
        #[pin]
        pub(super) inner: F,
        // While uploading: the next check of the upload; then the response
        // deadline.
        #[pin]
        pub(super) sleep: Sleep,
        // Until the request body has been sent (boxed: most requests have
        // no body).
        pub(super) uploading: Option<Box<Uploading>>,
        // When the clock started (the call, then the end of the body).
        pub(super) started: Instant,
        pub(super) timeout: Duration,
        // The client's deadline: never waited past, in any phase.
        pub(super) deadline: Option<Instant>,
    }
}

/// The earlier of the route's timeout and the client's deadline.
pub(super) fn cut_at(timeout: Instant, deadline: Option<Instant>) -> Instant {
    deadline.map_or(timeout, |d| d.min(timeout))
}

/// What an upload check found.
enum Check {
    /// Sent: the response deadline starts.
    Sent,
    /// Still going: check again at this moment.
    Later(Instant),
    /// Cut: the exchange ends with this.
    Cut(Rejection),
}

impl Uploading {
    /// Where the upload stands at `now`, `started` being the call.
    fn check(&mut self, now: Instant, started: Instant, cx: &mut Context<'_>) -> Check {
        let upload = self.progress.upload();
        let next = match upload {
            Upload::Done => return Check::Sent,
            Upload::AwaitingClient(_) => now + self.write_timeout,
            Upload::AwaitingUpstream(at) if now >= at + self.write_timeout => {
                tracing::warn!(
                    after_ms = self.write_timeout.as_millis() as u64,
                    "upstream took no request bytes; exchange cut"
                );
                let cause = WriteTimedOut {
                    after: self.write_timeout,
                };
                return Check::Cut(Rejection::new(Reason::UpstreamTimeout).with_cause(cause));
            }
            Upload::AwaitingUpstream(at) => at + self.write_timeout,
        };
        let watch_at = started + WATCH_CLIENT_AFTER;
        if self.watching.is_none()
            && now >= watch_at
            && let Some(peer) = self.peer.take()
        {
            self.watching = Some(Box::pin(async move { peer.closed().await }));
        }
        if let Some(watching) = &mut self.watching
            && watching.as_mut().poll(cx).is_ready()
        {
            tracing::debug!("client went away while its request was forwarded; exchange cut");
            let rejection = Rejection::new(Reason::ClientClosed)
                .with_cause("the client closed its connection during the upload");
            return Check::Cut(rejection);
        }
        match self.peer {
            Some(_) => Check::Later(next.min(watch_at.max(now))),
            None => Check::Later(next),
        }
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            let mut res = match result {
                Ok(res) => res,
                Err(e) => return Poll::Ready(Err(blame(e.into(), this.uploading.as_deref()))),
            };
            // An upstream that answers before the body is in has taken no time
            // of its own beyond the upload; measured from the call then.
            res.extensions_mut()
                .insert(UpstreamLatency(this.started.elapsed()));
            return Poll::Ready(Ok(res));
        }
        if let Some(uploading) = this.uploading {
            // Woken when the body is done; the checks are lazy: the sleep
            // fires at the next moment something could have run out.
            uploading.progress.register(cx.waker());
            loop {
                let now = Instant::now();
                if let Some(d) = *this.deadline
                    && d <= now
                {
                    return Poll::Ready(Err(deadline_passed()));
                }
                match uploading.check(now, *this.started, cx) {
                    Check::Sent => break,
                    Check::Cut(rejection) => return Poll::Ready(Err(rejection.into())),
                    Check::Later(at) => {
                        // Lazily: a later check is left to the armed sleep,
                        // which fires early and comes back here.
                        let at = cut_at(at, *this.deadline);
                        if at < this.sleep.deadline() || this.sleep.deadline() <= now {
                            this.sleep.as_mut().reset(at);
                        }
                        ready!(this.sleep.as_mut().poll(cx));
                    }
                }
            }
            *this.uploading = None;
            let now = Instant::now();
            *this.started = now;
            this.sleep
                .as_mut()
                .reset(cut_at(now + *this.timeout, *this.deadline));
        }
        ready!(this.sleep.poll(cx));
        let rejection = match *this.deadline {
            // The client's budget, not the upstream's: see ClientDeadline.
            Some(d) if d <= Instant::now() && d < *this.started + *this.timeout => {
                deadline_passed()
            }
            _ => Rejection::new(Reason::UpstreamTimeout)
                .with_cause(format!(
                    "no response headers within {} ms of the request's end",
                    this.timeout.as_millis()
                ))
                .into(),
        };
        Poll::Ready(Err(rejection))
    }
}

/// How long an upload must have waited on its client for a failure of the
/// upstream's connection to be taken for the upstream giving up on it:
/// far above the gaps between a live client's segments, far below any
/// application server's body timeout.
pub(super) const CLIENT_PAUSE: Duration = Duration::from_millis(200);

/// An upstream that breaks the connection while the upload has waited on
/// its client for a while gave up on the client's pace (its own body
/// timeout, as uWSGI's or gunicorn's): the client's `408`, not the
/// upstream's failure, or pausing clients could open the circuit.
fn blame(err: BoxError, uploading: Option<&Uploading>) -> BoxError {
    let paused = uploading
        .and_then(|u| u.progress.client_paused_since())
        .is_some_and(|since| since.elapsed() >= CLIENT_PAUSE);
    if !paused || classify::failure(err.as_ref()).clients_doing() {
        return err;
    }
    tracing::debug!(error = %ErrorChain(err.as_ref()), "the upstream gave up on a paused upload");
    Rejection::new(Reason::RequestTimeout)
        .with_cause(UpstreamGaveUp(err))
        .into()
}

/// The upstream broke off an upload its client had paused.
#[derive(Debug)]
pub struct UpstreamGaveUp(pub BoxError);

impl std::fmt::Display for UpstreamGaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream gave up on a request body its client had paused")
    }
}

impl std::error::Error for UpstreamGaveUp {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

fn deadline_passed() -> BoxError {
    Rejection::new(Reason::UpstreamTimeout)
        .with_cause(ClientDeadline)
        .into()
}
