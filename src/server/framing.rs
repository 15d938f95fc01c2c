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
//! by hyper's own rules (its request-head rules, and its chunked decoder state
//! by state, bare LF in trailers included), and looks at every head before
//! hyper acts on it. It stays in step with hyper on every path: an `Upgrade`
//! header changes nothing (sluicegate never answers `101`, see
//! [`Forward`](crate::proxy::Forward)), a `CONNECT` is refused, a framing value
//! it cannot read is refused, and once hyper must fail a body (a malformed
//! chunk) nothing more reaches hyper. Only an HTTP/2 prior-knowledge preface at
//! the start of a connection is let through unfollowed: it is not HTTP/1.
//!
//! Bytes flow on as they arrive (so hyper's own head timeout and size limit
//! keep working); only the LF that would end a refused head is held back and
//! replaced by an invalid byte, which makes hyper answer `400 Bad Request` and
//! close the connection, after any response to a request pipelined before it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What hyper reads instead of the LF that would end a refused head: a NUL
/// where a header name must start, which hyper refuses with 400.
const POISON: &[u8] = b"\0\r\n\r\n";

/// Longest framing header value followed (`Content-Length` or
/// `Transfer-Encoding`); a longer one is refused.
const MAX_FRAMING_VALUE: usize = 1024;
/// Longest header name compared; longer names are no framing header.
const MAX_NAME: usize = 32;
/// Request-line bytes kept: enough for the method and the version.
const MAX_REQUEST_LINE: usize = 64;

/// Which header a line is, once its name is read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// Not read up to the colon yet.
    #[default]
    Name,
    ContentLength,
    TransferEncoding,
    Other,
}

/// A request head being read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Head {
    /// Lines completed, the request line included.
    lines: usize,
    /// Bytes of the current line, CR and LF excluded.
    line_len: usize,
    /// The request line's first bytes, or the current header's name or
    /// framing value (bounded).
    kept: Vec<u8>,
    /// The request line's last bytes (its version).
    tail: [u8; 8],
    field: Field,
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// Whether the last Transfer-Encoding line ends in `chunked`.
    chunked: bool,
    http10: bool,
    connect: bool,
    preface: bool,
    /// Whether the previous byte was a CR.
    after_cr: bool,
    /// Something seen that hyper would refuse, or this guard cannot follow.
    refuse: bool,
    /// The request target, for tests to compare with hyper's.
    #[cfg(test)]
    target: Vec<u8>,
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Head(Head),
    /// `Content-Length` body bytes to skip.
    Body(u64),
    /// In a chunked body: the decoder state and the current chunk's size (or
    /// what is left of its data).
    Chunked(Chunked, u64),
    /// HTTP/2 prior knowledge: not HTTP/1 framing.
    Pass,
    /// hyper has failed the body (a malformed chunk) and reads no further:
    /// nothing more is for it.
    Done,
    /// Refused: everything after the poisoned LF is dropped.
    Refused,
}

/// Why a byte stopped the guard.
enum Stop {
    /// A head to refuse: poison its last LF.
    Refuse,
    /// hyper fails the body at this byte and reads nothing after it.
    BodyError,
}

/// An I/O wrapper that follows HTTP/1 request framing and refuses ambiguous heads.
pub(super) struct FramingGuard<T> {
    inner: T,
    refused: Counter,
    state: State,
    /// Whether no head has completed yet (the HTTP/2 preface may only open a
    /// connection).
    first: bool,
    /// What is left of the poison when the caller's buffer could not hold it.
    poison_left: &'static [u8],
    /// The request lines of the heads let through, in order (tests compare
    /// them with what hyper parsed).
    #[cfg(test)]
    heads: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl<T> FramingGuard<T> {
    /// Guards the client connection `inner`.
    pub(super) fn new(inner: T, refused: Counter) -> Self {
        Self {
            inner,
            refused,
            state: State::Head(Head::default()),
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
                // Ordinary head bytes in one scan, up to the next byte that
                // changes the state (a line end, or the colon after a name);
                // only those go through `byte`.
                State::Head(head) if !head.after_cr => {
                    let n = head.span(&bytes[i..]);
                    if n > 0 {
                        head.take(&bytes[i..i + n]);
                        i += n;
                        continue;
                    }
                }
                State::Body(n) | State::Chunked(Chunked::Body, n) => {
                    let take = (*n).min((bytes.len() - i) as u64);
                    *n -= take;
                    i += take as usize;
                    if *n == 0 {
                        self.state = match self.state {
                            State::Body(_) => State::Head(Head::default()),
                            _ => State::Chunked(Chunked::BodyCr, 0),
                        };
                    }
                    continue;
                }
                _ => {}
            }
            if let Err(stop) = self.byte(bytes[i]) {
                return self.stop(stop, i);
            }
            i += 1;
        }
        None
    }

    /// Stops following at byte `at`: a refused head's LF is poisoned there.
    fn stop(&mut self, stop: Stop, at: usize) -> Option<usize> {
        match stop {
            Stop::Refuse => {
                tracing::warn!("refused a request head (400, connection closed)");
                self.refused.increment(1);
                self.state = State::Refused;
                Some(at)
            }
            Stop::BodyError => {
                // hyper reads this byte, fails the body and closes.
                self.state = State::Done;
                None
            }
        }
    }

    /// Takes one byte outside body data.
    fn byte(&mut self, b: u8) -> Result<(), Stop> {
        match &mut self.state {
            State::Head(head) => {
                if !head.byte(b)? {
                    return Ok(());
                }
                // The empty line: the head is complete.
                let next = head.framing(self.first)?;
                #[cfg(test)]
                self.heads.lock().unwrap().push(head.target.clone());
                self.first = false;
                self.state = next;
                Ok(())
            }
            State::Chunked(state, size) => {
                let (next, size) = chunked(*state, *size, b).ok_or(Stop::BodyError)?;
                self.state = match next {
                    None => State::Head(Head::default()),
                    Some(next) => State::Chunked(next, size),
                };
                Ok(())
            }
            State::Body(_) | State::Pass | State::Done | State::Refused => Ok(()),
        }
    }
}

impl Head {
    /// How many of `bytes` are ordinary: up to a CR or LF, or in a header
    /// name up to its colon.
    fn span(&self, bytes: &[u8]) -> usize {
        let stop = if self.lines > 0 && self.field == Field::Name {
            bytes
                .iter()
                .position(|&b| matches!(b, b'\r' | b'\n' | b':'))
        } else {
            bytes.iter().position(|&b| matches!(b, b'\r' | b'\n'))
        };
        stop.unwrap_or(bytes.len())
    }

    /// Takes one head byte; `Ok(true)` when it ends the head.
    fn byte(&mut self, b: u8) -> Result<bool, Stop> {
        let after_cr = std::mem::replace(&mut self.after_cr, b == b'\r');
        if after_cr && b != b'\n' {
            return Err(Stop::Refuse); // a bare CR: hyper refuses it too
        }
        match b {
            b'\r' => Ok(false),
            b'\n' if self.lines == 0 && self.line_len == 0 => {
                // httparse skips empty lines before a request line.
                Ok(false)
            }
            b'\n' if !after_cr => Err(Stop::Refuse), // a line ended by a bare LF
            b'\n' if self.line_len == 0 => Ok(true),
            b'\n' => {
                self.end_line();
                Ok(false)
            }
            b':' if self.lines > 0 && self.field == Field::Name => {
                self.line_len += 1;
                self.field = match self.kept.as_slice() {
                    b"content-length" => Field::ContentLength,
                    b"transfer-encoding" => Field::TransferEncoding,
                    _ => Field::Other,
                };
                self.kept.clear();
                Ok(false)
            }
            _ => {
                self.take(&[b]);
                Ok(false)
            }
        }
    }

    /// Keeps what the current line's framing needs of `span` (no line end,
    /// no name-ending colon in it).
    fn take(&mut self, span: &[u8]) {
        self.line_len += span.len();
        if self.lines == 0 {
            let room = MAX_REQUEST_LINE - self.kept.len();
            self.kept.extend_from_slice(&span[..room.min(span.len())]);
            // The line's last 8 bytes, for its version.
            let n = span.len().min(8);
            self.tail.rotate_left(n);
            self.tail[8 - n..].copy_from_slice(&span[span.len() - n..]);
            return;
        }
        match self.field {
            Field::Name if self.kept.len() + span.len() <= MAX_NAME => {
                self.kept.extend(span.iter().map(u8::to_ascii_lowercase));
            }
            // Too long for a framing header's name.
            Field::Name => self.field = Field::Other,
            Field::ContentLength | Field::TransferEncoding => {
                if self.kept.len() + span.len() <= MAX_FRAMING_VALUE {
                    self.kept.extend_from_slice(span);
                } else {
                    self.refuse = true; // a value this guard cannot keep
                }
            }
            Field::Other => {}
        }
    }

    fn end_line(&mut self) {
        if self.lines == 0 {
            self.http10 = self.line_len >= 8 && &self.tail == b"HTTP/1.0";
            self.connect = self.kept.starts_with(b"CONNECT ");
            self.preface = self.kept == b"PRI * HTTP/2.0";
            #[cfg(test)]
            {
                self.target = request_target(&self.kept).to_vec();
            }
        } else {
            let value = trim(&self.kept);
            match self.field {
                // hyper: digits only; several lines must agree.
                Field::ContentLength => match digits(value) {
                    Some(n) if self.content_length.is_none_or(|m| m == n) => {
                        self.content_length = Some(n);
                    }
                    _ => self.refuse = true,
                },
                // hyper: the last line decides; `chunked` must be last in it.
                Field::TransferEncoding => {
                    self.transfer_encoding = true;
                    self.chunked = value.is_ascii()
                        && value
                            .rsplit(|&c| c == b',')
                            .next()
                            .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
                }
                Field::Other => {}
                // A header line without a colon: hyper refuses it.
                Field::Name => self.refuse = true,
            }
        }
        self.kept.clear();
        self.lines += 1;
        self.line_len = 0;
        self.field = Field::Name;
    }

    /// The state after this complete head, or a refusal.
    fn framing(&self, first: bool) -> Result<State, Stop> {
        if self.preface && first {
            return Ok(State::Pass);
        }
        let ambiguous = self.transfer_encoding && self.content_length.is_some();
        let bad_te = self.transfer_encoding && (!self.chunked || self.http10);
        if self.refuse || self.connect || ambiguous || bad_te {
            return Err(Stop::Refuse);
        }
        Ok(if self.transfer_encoding {
            State::Chunked(Chunked::Start, 0)
        } else {
            match self.content_length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head(Head::default()),
            }
        })
    }
}

/// A header value without the white space httparse trims around it.
fn trim(value: &[u8]) -> &[u8] {
    let ws = |c: &u8| *c == b' ' || *c == b'\t';
    let start = value.iter().position(|c| !ws(c)).unwrap_or(value.len());
    let end = value.iter().rposition(|c| !ws(c)).map_or(start, |e| e + 1);
    &value[start..end]
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

/// The request target of a kept request line (`GET /x HTTP/1.1` → `/x`).
#[cfg(test)]
fn request_target(line: &[u8]) -> &[u8] {
    line.split(|&c| c == b' ').nth(1).unwrap_or_default()
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
