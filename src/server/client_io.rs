//! [`ClientIo`]: a client connection's socket as hyper reads and writes it,
//! shared with the [`PeerClosed`](crate::conn::PeerClosed) watcher, and with a
//! bound on how long the client may keep the proxy waiting to take bytes.
//!
//! A client that asks for a large response and stops reading would otherwise
//! hold its admission slot (or the only half-open probe slot) for as long as
//! its TCP connection lives. Like nginx's `send_timeout`, `send_timeout_ms`
//! bounds each wait for the client to accept more response bytes; past it the
//! connection is closed, the response body dropped (so the slot is freed and
//! the circuit counts the call as neither success nor failure: the client's
//! doing, not the upstream's).
//!
//! A bound on each wait does not bound a client that takes a few bytes just
//! before every timeout. So the waits also draw on a credit the client's pace
//! keeps ([`crate::pace`], `send_min_bytes_per_s`: the response side of
//! Apache's `MinRate`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::pace::{Credit, MinRate};

/// The socket of one client connection.
pub(super) struct ClientIo {
    stream: Arc<TcpStream>,
    /// Each wait is bounded by `send_timeout_ms`, all of them by the credit
    /// the client's pace keeps ([`crate::pace`]).
    send_timeout: Duration,
    credit: Credit,
    /// Armed when a write would block, for that wait's deadline; made on the
    /// first wait and reused.
    stall: Option<Pin<Box<Sleep>>>,
    /// When the current wait began, while the client takes no bytes.
    blocked: Option<Instant>,
    timed_out: Counter,
}

impl ClientIo {
    pub(super) fn new(stream: Arc<TcpStream>, rate: MinRate, timed_out: Counter) -> Self {
        Self {
            stream,
            send_timeout: rate.grace,
            credit: Credit::new(rate),
            stall: None,
            blocked: None,
            timed_out,
        }
    }

    /// The client takes no bytes: the wait's deadline is `send_timeout_ms`
    /// from its start, or sooner what is left of the waiting the client's
    /// pace has earned; past it the write fails.
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let since = *self.blocked.get_or_insert_with(Instant::now);
        let (deadline, why) = self.credit.deadline(since, self.send_timeout);
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Lazily: a later deadline is left to the armed sleep.
            if deadline < stall.deadline() || stall.deadline() <= now {
                stall.as_mut().reset(deadline);
            }
            ready!(stall.as_mut().poll(cx));
        }
        self.timed_out.increment(1);
        tracing::debug!(stall = %why, "client took no response bytes; connection closed");
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client took response bytes too slowly: {why}"),
        )))
    }

    /// The client took `n` bytes: its wait, if any, is over.
    fn took(&mut self, n: usize) {
        if let Some(since) = self.blocked.take() {
            self.credit.waited(since.elapsed());
        }
        self.credit.moved(n as u64);
    }

    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => match write(&self.stream) {
                    Ok(n) => {
                        self.took(n);
                        return Poll::Ready(Ok(n));
                    }
                    // Readiness was stale; it is cleared now: ask again.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                },
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return self.poll_stalled(cx),
            }
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let wanted = buf.remaining();
        if wanted == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            // As tokio's own TcpStream does: a read shorter than asked drained
            // the socket, so its readiness is cleared now rather than found
            // out by one more read that would block. Cleared inside `try_io`,
            // with the readiness seen before the read, so data that arrived
            // meanwhile still wakes the connection.
            let mut got = None;
            let result = self.stream.try_io(Interest::READABLE, || {
                let n = self.stream.try_read_buf(buf)?;
                got = Some(n);
                if n > 0 && n < wanted {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match (got, result) {
                (Some(_), _) => return Poll::Ready(Ok(())),
                (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (None, Err(e)) => return Poll::Ready(Err(e)),
                (None, Ok(())) => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |stream| stream.try_write(data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |stream| stream.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP has nothing of its own to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.stream).shutdown(std::net::Shutdown::Write))
    }
}
