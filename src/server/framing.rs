//! [`FramingGuard`]: refuses, with `400` and a closed connection, the HTTP/1
//! request heads that hyper would otherwise repair or that it cannot follow:
//! `Content-Length` together with `Transfer-Encoding`, lines ended by a bare
//! LF, `CONNECT`.
//!
//! hyper follows RFC 9112 §6.1 for the first (Transfer-Encoding wins, the length
//! is dropped, the connection closes after the response) and accepts bare-LF
//! line ends. Both are what request-smuggling attacks are built from, and a
//! front proxy had better refuse them outright. hyper does not expose what it
//! repaired, so this wrapper follows the byte stream's message framing itself,
//! by hyper's own rules, and looks at every head before hyper acts on it: heads
//! are parsed by `httparse` with hyper's configuration (the parser hyper itself
//! calls, so guard and hyper agree on where a head ends by construction), and
//! chunked bodies are followed by hyper's chunked decoder state by state (bare
//! LF in trailers included). It stays in step with hyper on every path: an
//! `Upgrade` header changes nothing (sluicegate never answers `101`, see
//! [`Forward`](crate::proxy::Forward)), a `CONNECT` is refused, and once hyper
//! must fail (a malformed chunk, a head past its buffer) nothing more reaches
//! hyper. Only an HTTP/2 prior-knowledge preface at the start of a connection
//! is let through unfollowed: it is not HTTP/1.
//!
//! Bytes flow on as they arrive (so hyper's own head timeout and size limit
//! keep working); only the LF that would end a refused head is held back and
//! replaced by an invalid byte, which makes hyper answer `400 Bad Request` and
//! close the connection, after any response to a request pipelined before it.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What hyper reads instead of the LF that would end a refused head: a NUL
/// where a header name must start, which hyper refuses with 400.
const POISON: &[u8] = b"\0\r\n\r\n";

/// hyper's header count limit (`DEFAULT_MAX_HEADERS`, `proto/h1/role.rs`):
/// past it both hyper and the guard refuse the head.
const MAX_HEADERS: usize = 100;

/// What opens an HTTP/2 prior-knowledge connection, up to its empty line.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// hyper's chunked decoder states (`proto/h1/decode.rs`), one for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Gathering a request head.
    Head,
    /// `Content-Length` body bytes to skip.
    Body(u64),
    /// In a chunked body: the decoder state and the current chunk's size (or
    /// what is left of its data).
    Chunked(Chunked, u64),
    /// HTTP/2 prior knowledge: not HTTP/1 framing.
    Pass,
    /// hyper fails here (a malformed chunk, a head longer than its buffer)
    /// and reads no further: nothing more is for it.
    Done,
    /// Refused: everything after the poisoned LF is dropped.
    Refused,
}

/// What a complete head means for the bytes after it.
enum HeadMeaning {
    /// Let through; the framing that follows.
    Next(State),
    /// Ambiguous or unfollowable: refuse it (and count it).
    Refuse,
    /// Malformed: hyper refuses it itself; poisoned all the same, not counted.
    Malformed,
}

/// An I/O wrapper that follows HTTP/1 request framing and refuses ambiguous heads.
pub(super) struct FramingGuard<T> {
    inner: T,
    refused: Counter,
    state: State,
    /// The current head's bytes so far (kept for the connection, so its
    /// capacity is reused from head to head).
    head: Vec<u8>,
    /// hyper's read buffer limit: a head this long that is not complete is
    /// one hyper refuses (431).
    max_head: usize,
    /// Whether no head has completed yet (the HTTP/2 preface may only open a
    /// connection).
    first: bool,
    /// What is left of the poison when the caller's buffer could not hold it.
    poison_left: &'static [u8],
    /// The heads let through, in order (tests compare them with what hyper
    /// parsed).
    #[cfg(test)]
    heads: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl<T> FramingGuard<T> {
    /// Guards the client connection `inner`, whose HTTP/1 server reads heads
    /// of at most `max_head` bytes (hyper's `max_buf_size`).
    pub(super) fn new(inner: T, max_head: usize, refused: Counter) -> Self {
        Self {
            inner,
            refused,
            state: State::Head,
            head: Vec::new(),
            max_head,
            first: true,
            poison_left: &[],
            #[cfg(test)]
            heads: Default::default(),
        }
    }

    /// Follows bytes the client sent; returns the offset of the LF that
    /// completes a refused head (it and everything after are not for hyper).
    fn follow(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.state {
                State::Refused | State::Pass | State::Done => return None,
                State::Head => match self.gather(&bytes[i..]) {
                    Gathered::More => return None,
                    Gathered::Head(n) => i += n,
                    Gathered::Refused(at) => return Some(i + at),
                },
                State::Body(n) | State::Chunked(Chunked::Body, n) => {
                    let take = (*n).min((bytes.len() - i) as u64);
                    *n -= take;
                    i += take as usize;
                    if *n == 0 {
                        self.state = match self.state {
                            State::Body(_) => State::Head,
                            _ => State::Chunked(Chunked::BodyCr, 0),
                        };
                    }
                }
                State::Chunked(state, size) => {
                    self.state = match chunked(*state, *size, bytes[i]) {
                        Some((Some(next), size)) => State::Chunked(next, size),
                        Some((None, _)) => State::Head,
                        // hyper reads this byte, fails the body and closes.
                        None => State::Done,
                    };
                    i += 1;
                }
            }
        }
        None
    }

    /// Adds the head bytes at the start of `rest` to the head being gathered,
    /// up to the LF that completes it. A head that arrives whole in one read
    /// (the usual case) is judged where it lies, without a copy.
    fn gather(&mut self, rest: &[u8]) -> Gathered {
        let old = self.head.len();
        // How many bytes of `rest` are in `self.head`.
        let mut copied = 0;
        let mut from = 0;
        while let Some(end) = blank_line_end(&self.head[..old], rest, from) {
            let head: &[u8] = if old == 0 {
                &rest[..=end]
            } else {
                self.head.extend_from_slice(&rest[copied..=end]);
                copied = end + 1;
                &self.head
            };
            let Some(verdict) = judge(head, self.first) else {
                // Only empty lines before a request line so far.
                from = end + 1;
                continue;
            };
            #[cfg(test)]
            if matches!(verdict, HeadMeaning::Next(_)) {
                self.heads.lock().unwrap().push(head.to_vec());
            }
            self.head.clear();
            self.first = false;
            return match verdict {
                HeadMeaning::Next(next) => {
                    self.state = next;
                    Gathered::Head(end + 1)
                }
                HeadMeaning::Refuse | HeadMeaning::Malformed => {
                    if matches!(verdict, HeadMeaning::Refuse) {
                        tracing::warn!("refused a request head (400, connection closed)");
                        self.refused.increment(1);
                    }
                    self.state = State::Refused;
                    Gathered::Refused(end)
                }
            };
        }
        // Bounded: below `max_head` before, plus one read into hyper's
        // buffer (which hyper bounds by the same limit).
        self.head.extend_from_slice(&rest[copied..]);
        if self.head.len() >= self.max_head {
            // hyper's buffer holds this much of an incomplete head: it
            // answers 431 and reads no more.
            self.head = Vec::new();
            self.state = State::Done;
        }
        Gathered::More
    }
}

/// The verdict on a head that ends with an empty line; `None` when it is only
/// empty lines (httparse skips those before a request line).
fn judge(head: &[u8], first: bool) -> Option<HeadMeaning> {
    if first && head == PREFACE {
        return Some(HeadMeaning::Next(State::Pass));
    }
    let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => Some(framing(&req, has_bare_lf(head))),
        Ok(httparse::Status::Partial) => None,
        Err(e) => {
            tracing::debug!(error = %e, "malformed request head");
            Some(HeadMeaning::Malformed)
        }
    }
}

/// How far [`FramingGuard::gather`] got.
enum Gathered {
    /// The head is not complete: every byte given is part of it.
    More,
    /// The head is complete and let through after this many bytes.
    Head(usize),
    /// The head is refused; its last LF is at this offset.
    Refused(usize),
}

/// The first LF in `bytes` at or after `from` that ends an empty line (`\n\n`
/// or `\n\r\n`), where httparse sees the end of a head; `before` is what
/// came before `bytes` in the head.
fn blank_line_end(before: &[u8], bytes: &[u8], from: usize) -> Option<usize> {
    // The byte `back` places before `bytes[i]`.
    let at = |i: usize, back: usize| match i.checked_sub(back) {
        Some(j) => Some(bytes[j]),
        None => before.len().checked_sub(back - i).map(|j| before[j]),
    };
    memchr::memchr_iter(b'\n', &bytes[from..])
        .map(|p| from + p)
        .find(|&e| match at(e, 1) {
            Some(b'\n') => true,
            Some(b'\r') => at(e, 2) == Some(b'\n'),
            _ => false,
        })
}

/// Whether a line of a complete head ends with a bare LF (httparse accepts
/// it; the empty lines it skips before a request line do not count).
fn has_bare_lf(head: &[u8]) -> bool {
    let mut start = 0;
    loop {
        match head[start..] {
            [b'\n', ..] => start += 1,
            [b'\r', b'\n', ..] => start += 2,
            _ => break,
        }
    }
    memchr::memchr_iter(b'\n', &head[start..]).any(|p| p == 0 || head[start + p - 1] != b'\r')
}

/// The framing a parsed head sets, by hyper's rules, or a refusal.
fn framing(req: &httparse::Request<'_, '_>, bare_lf: bool) -> HeadMeaning {
    let mut refuse = bare_lf || req.method == Some("CONNECT");
    let mut content_length = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    for header in req.headers.iter() {
        let value = header.value.trim_ascii();
        if header.name.eq_ignore_ascii_case("content-length") {
            // hyper: digits only; several lines must agree.
            match digits(value) {
                Some(n) if content_length.is_none_or(|m| m == n) => content_length = Some(n),
                _ => refuse = true,
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // hyper: the last line decides; `chunked` must be last in it.
            transfer_encoding = true;
            chunked = value.is_ascii()
                && value
                    .rsplit(|&c| c == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    let ambiguous = transfer_encoding && content_length.is_some();
    let bad_te = transfer_encoding && (!chunked || req.version == Some(0));
    if refuse || ambiguous || bad_te {
        return HeadMeaning::Refuse;
    }
    HeadMeaning::Next(if transfer_encoding {
        State::Chunked(Chunked::Start, 0)
    } else {
        match content_length {
            Some(n) if n > 0 => State::Body(n),
            _ => State::Head,
        }
    })
}

/// hyper's `Content-Length` parse: one or more digits, nothing else, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &c| {
        let d = (c as char).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// One step of hyper's chunked decoder outside chunk data: the next state
/// (`None`: the body is over) and chunk size, or `None` where hyper fails.
#[allow(clippy::option_option)]
fn chunked(state: Chunked, size: u64, b: u8) -> Option<(Option<Chunked>, u64)> {
    use Chunked::*;
    let hex = (b as char).to_digit(16).map(u64::from);
    let next = match (state, b) {
        (Start, _) => return Some((Some(Size), hex?)),
        (Size, _) if hex.is_some() => {
            return Some((Some(Size), size.checked_mul(16)?.checked_add(hex?)?));
        }
        (Size | SizeLws, b'\t' | b' ') => SizeLws,
        (Size | SizeLws, b';') => Extension,
        (Size | SizeLws | Extension, b'\r') => SizeLf,
        (Extension, b'\n') => return None,
        (Extension, _) => Extension,
        (SizeLf, b'\n') if size == 0 => EndCr,
        (SizeLf, b'\n') => Body,
        (BodyCr, b'\r') => BodyLf,
        (BodyLf, b'\n') => Start,
        // Trailer lines end with CRLF only; a bare LF is part of the line.
        (EndCr, b'\r') => EndLf,
        (Trailer, b'\r') => TrailerLf,
        (EndCr | Trailer, _) => Trailer,
        (TrailerLf, b'\n') => EndCr,
        (EndLf, b'\n') => return Some((None, 0)),
        _ => return None,
    };
    Some((Some(next), size))
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.poison_left.is_empty() {
            let n = this.poison_left.len().min(buf.remaining());
            buf.put_slice(&this.poison_left[..n]);
            this.poison_left = &this.poison_left[n..];
            return Poll::Ready(Ok(()));
        }
        if matches!(this.state, State::Refused | State::Done) {
            // What follows a refused head or a failed body is not for hyper;
            // keep reading so that a client hanging up is still seen.
            let mut scratch = [0u8; 4096];
            loop {
                let mut discard = ReadBuf::new(&mut scratch);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut discard))?;
                if discard.filled().is_empty() {
                    return Poll::Ready(Ok(())); // end of input
                }
            }
        }
        // Read straight into hyper's buffer and follow what arrived there.
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(at) = this.follow(&buf.filled()[before..]) {
            buf.set_filled(before + at);
            let n = POISON.len().min(buf.remaining());
            buf.put_slice(&POISON[..n]);
            this.poison_left = &POISON[n..];
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests;
