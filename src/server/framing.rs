//! [`FramingGuard`]: refuses, with `400` and a closed connection, the HTTP/1
//! request heads that hyper would otherwise repair: `Content-Length` together
//! with `Transfer-Encoding`, and lines ended by a bare LF.
//!
//! hyper follows RFC 9112 §6.1 for the first (Transfer-Encoding wins, the length
//! is dropped, the connection closes after the response) and accepts bare-LF
//! line ends. Both are what request-smuggling attacks are built from, and a
//! front proxy had better refuse them outright. hyper does not expose what it
//! repaired, so this wrapper follows the byte stream's message framing itself
//! (heads, `Content-Length` bodies, chunked bodies) and looks at every head
//! before hyper acts on it. Bytes flow on as they arrive (so hyper's own head
//! timeout and size limit keep working); only the LF that would end an
//! ambiguous head or a bare-LF line is held back and replaced by an invalid
//! byte, which makes hyper answer `400 Bad Request` and close the connection,
//! after any response to a request pipelined before it. It only ever refuses:
//! anything it does not follow (HTTP/2, upgrades, a malformed length or chunk)
//! turns it into a pass-through, and hyper decides as before.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What hyper reads instead of the LF that would end a refused head: a NUL
/// where a header name must start, which hyper refuses with 400.
const POISON: &[u8] = b"\0\r\n\r\n";

/// Longest head line followed; hyper's own head limit refuses longer heads.
const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Head {
    /// The current line so far (bounded).
    line: Vec<u8>,
    /// Bytes of this head seen (0: not begun).
    seen: usize,
    /// Lines completed, the request line included.
    lines: usize,
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// Something this guard does not follow (an upgrade, CONNECT, a bad length).
    opaque: bool,
    /// The HTTP/2 prior-knowledge preface (`PRI * HTTP/2.0`).
    preface: bool,
    /// Whether the previous byte was a CR.
    after_cr: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Head(Head),
    /// Body bytes to skip.
    Body(u64),
    /// In a chunked body, reading a size line: its value, whether it had a
    /// digit, whether an extension began.
    ChunkSize {
        size: u64,
        digits: bool,
        ext: bool,
    },
    /// Chunk data to skip.
    ChunkData(u64),
    /// The CRLF after chunk data: bytes left.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk: the current line's length.
    Trailers(usize),
    /// Not following any more.
    Pass,
    /// Refused: everything after the poisoned LF is dropped.
    Refused,
}

/// An I/O wrapper that follows HTTP/1 request framing and refuses ambiguous heads.
pub(super) struct FramingGuard<T> {
    inner: T,
    refused: Counter,
    state: State,
    /// What is left of the poison when the caller's buffer could not hold it.
    poison_left: &'static [u8],
}

impl<T> FramingGuard<T> {
    /// Guards the client connection `inner`.
    pub(super) fn new(inner: T, refused: Counter) -> Self {
        Self {
            inner,
            refused,
            state: State::Head(Head::default()),
            poison_left: &[],
        }
    }

    /// Follows bytes the client sent; returns the offset of the LF that
    /// completes a refused head (it and everything after are not for hyper).
    fn follow(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.state {
                State::Refused | State::Pass => return None,
                State::Body(n) | State::ChunkData(n) => {
                    let take = (*n).min((bytes.len() - i) as u64);
                    *n -= take;
                    i += take as usize;
                    if *n == 0 {
                        self.state = match self.state {
                            State::Body(_) => State::Head(Head::default()),
                            _ => State::ChunkEnd(2),
                        };
                    }
                    continue;
                }
                _ => {}
            }
            if !self.byte(bytes[i]) {
                tracing::warn!("refused an ambiguous request head (400, connection closed)");
                self.refused.increment(1);
                self.state = State::Refused;
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// Takes one byte outside bodies; `false` refuses the head.
    fn byte(&mut self, b: u8) -> bool {
        match &mut self.state {
            State::Head(head) => {
                head.seen += 1;
                let after_cr = std::mem::replace(&mut head.after_cr, b == b'\r');
                if b != b'\n' {
                    if head.line.len() < MAX_LINE && b != b'\r' {
                        head.line.push(b);
                    }
                    return true;
                }
                if !after_cr {
                    // hyper skips empty lines before a request line.
                    if head.lines == 0 && head.line.is_empty() {
                        head.seen = 0;
                        return true;
                    }
                    return false; // a line ended by a bare LF
                }
                if head.lines == 0 && head.line.is_empty() {
                    head.seen = 0; // a CRLF between messages
                    return true;
                }
                if !head.line.is_empty() {
                    inspect(head);
                    head.lines += 1;
                    head.line.clear();
                    return true;
                }
                // The empty line: the head is complete.
                if head.content_length.is_some() && head.transfer_encoding {
                    return false;
                }
                self.state = if head.opaque || head.preface {
                    State::Pass
                } else if head.transfer_encoding {
                    State::ChunkSize {
                        size: 0,
                        digits: false,
                        ext: false,
                    }
                } else {
                    match head.content_length {
                        Some(n) if n > 0 => State::Body(n),
                        _ => State::Head(Head::default()),
                    }
                };
                true
            }
            State::ChunkSize { size, digits, ext } => {
                match b {
                    b'\n' if *digits && *size == 0 => self.state = State::Trailers(0),
                    b'\n' if *digits => self.state = State::ChunkData(*size),
                    b'\n' => self.state = State::Pass,
                    b'\r' => {}
                    _ if *ext => {}
                    b';' | b' ' | b'\t' => *ext = true,
                    _ => match (b as char).to_digit(16) {
                        Some(d) if *size < (1 << 56) => {
                            *size = *size * 16 + u64::from(d);
                            *digits = true;
                        }
                        _ => self.state = State::Pass,
                    },
                }
                true
            }
            State::ChunkEnd(left) => {
                *left -= 1;
                if *left == 0 {
                    self.state = State::ChunkSize {
                        size: 0,
                        digits: false,
                        ext: false,
                    };
                }
                true
            }
            State::Trailers(len) => {
                match b {
                    b'\n' if *len == 0 => self.state = State::Head(Head::default()),
                    b'\n' => *len = 0,
                    b'\r' => {}
                    _ => *len += 1,
                }
                true
            }
            State::Body(_) | State::ChunkData(_) | State::Pass | State::Refused => true,
        }
    }
}

/// Notes what a completed head line says about framing.
fn inspect(head: &mut Head) {
    let line = &head.line;
    if head.lines == 0 {
        // The request line: CONNECT tunnels and HTTP/2 are not HTTP/1 framing.
        head.opaque |= line.starts_with(b"CONNECT ");
        head.preface |= line.as_slice() == b"PRI * HTTP/2.0";
        return;
    }
    let Some(colon) = line.iter().position(|&c| c == b':') else {
        return; // hyper refuses it
    };
    let name = &line[..colon];
    let value = String::from_utf8_lossy(&line[colon + 1..]);
    let value = value.trim();
    if name.eq_ignore_ascii_case(b"content-length") {
        match value.parse::<u64>() {
            Ok(n) if head.content_length.is_none_or(|m| m == n) => head.content_length = Some(n),
            // Differing or unreadable lengths: hyper refuses them itself.
            _ => head.opaque = true,
        }
    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
        head.transfer_encoding = true;
    } else if name.eq_ignore_ascii_case(b"upgrade") {
        head.opaque = true;
    }
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
        if this.state == State::Refused {
            // What follows a refused head is dropped; keep reading so that a
            // client hanging up is still seen.
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
mod tests {
    use super::*;

    /// What hyper would read, fed in `chunks`; and whether a head was refused.
    fn through(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut guard = FramingGuard::new((), Counter::noop());
        let mut out = Vec::new();
        for c in chunks {
            if guard.state == State::Refused {
                break;
            }
            match guard.follow(c) {
                Some(at) => out.extend_from_slice(&[&c[..at], POISON].concat()),
                None => out.extend_from_slice(c),
            }
        }
        (out, guard.state == State::Refused)
    }

    #[test]
    fn follows_bodies_and_refuses_only_ambiguous_heads() {
        let ok: &[u8] = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello\
                   POST /b HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n\
                   5;ext=1\r\nhel\r\n\r\n0\r\nx-trailer: 1\r\n\r\n\
                   GET /c HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(through(&[ok]), (ok.to_vec(), false));
        // The same, one byte at a time.
        let bytes: Vec<&[u8]> = ok.chunks(1).collect();
        assert_eq!(through(&bytes), (ok.to_vec(), false));
        // A body that looks like a smuggled head is only a body.
        let body: &[u8] = b"POST /a HTTP/1.1\r\ncontent-length: 45\r\n\r\n\
                     GET /x HTTP/1.1\r\ncontent-length: 1\r\nx: y\n\r\n\r\n";
        assert_eq!(through(&[body]), (body.to_vec(), false));
        // A refused head's last LF is poisoned; nothing after it goes on.
        let first: &[u8] = b"GET /ok HTTP/1.1\r\n\r\n";
        let both: &[u8] = b"POST /a HTTP/1.1\r\ncontent-length: 3\r\n\
                     transfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        let cut = first.len() + both.len() - "\n0\r\n\r\n".len();
        let all = [first, both].concat();
        let expected = [&all[..cut], POISON].concat();
        assert_eq!(through(&[first, both]), (expected.clone(), true));
        let split: Vec<&[u8]> = all.chunks(7).collect();
        assert_eq!(through(&split), (expected, true));
        let bare_lf: &[u8] = b"GET / HTTP/1.1\nhost: x\n\n";
        assert_eq!(
            through(&[bare_lf]),
            ([&b"GET / HTTP/1.1"[..], POISON].concat(), true)
        );
        // A line longer than what is kept still ends properly.
        let long = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(40_000));
        assert_eq!(
            through(&[long.as_bytes()]),
            (long.clone().into_bytes(), false)
        );
        // HTTP/2 prior knowledge is passed through untouched.
        let h2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\n\x04";
        assert_eq!(through(&[h2]), (h2.to_vec(), false));
    }
}
