//! The spool's on-disk records, format version 2.
//!
//! Every file (a segment of the log, or a dead letter) starts with a header:
//! eight bytes of magic, then sixteen random bytes made for that file alone,
//! its key. Every record is then a frame:
//!
//! ```text
//! tag      8    the key's first half
//! kind     1    PUT, DONE or DEAD
//! len      4    LE, the payload's length
//! hcrc     4    LE, CRC-32 of key[8..16] ‖ kind ‖ len
//! payload  len
//! pcrc     4    LE, CRC-32 of key[8..16] ‖ payload
//! ```
//!
//! Payloads hold what clients sent, so a record boundary must be something
//! no client can write (issue 26): a version 1 log searched for its magic
//! after a torn write, and found records that a client had put in its body.
//! Here a frame whose header is intact is trusted for its length, and a
//! damaged payload is skipped whole, never searched. Only past a damaged
//! header does the scan search, for the file's tag: eight random bytes that
//! never leave the file; and what it finds must also carry a header CRC keyed
//! with the other eight. (CRCs are no MACs: what keeps a body from being
//! taken for a record is that no client ever sees the key.)
//!
//! The payload's CRC follows it so that a request's body, the last field of
//! a PUT, can be streamed to the file without being held ([`PutFrame`]).
//!
//! Version 1 files (`SGS1` frames, no file header) are still on disk after
//! an upgrade: they are read strictly, frame after frame from the start,
//! and the first damaged frame ends the file ([`v1`]).

use std::io;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use ring::rand::{SecureRandom, SystemRandom};

/// A version 2 file's first bytes (`\x02`: the version).
const FILE_MAGIC: [u8; 8] = *b"SGSEG\x00\x02\x00";
/// Magic and key.
pub(super) const FILE_HEADER: usize = 24;
/// Tag, kind, length, header CRC.
pub(super) const FRAME_HEADER: usize = 17;
/// The payload's CRC.
pub(super) const FRAME_TRAILER: usize = 4;
/// The longest payload: a whole frame's length fits the `u32` the store
/// keeps per record.
const MAX_PAYLOAD: usize = u32::MAX as usize - FRAME_HEADER - FRAME_TRAILER;

const PUT: u8 = 1;
const DONE: u8 = 2;
const DEAD: u8 = 3;

/// Whether `id` may be a spool id: it names a dead-letter file, so it is
/// lowercase hex only (no `/`, no `.`, no case that a case-insensitive file
/// system would fold), 1 to 64 characters. The store makes 20.
pub(super) fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "spool record larger than a frame holds (4 GiB)",
    )
}

// === impl FileKey ===

/// A file's random key: its first half tags every frame, its second keys
/// the frames' CRCs. Never logged, never sent: its secrecy is what makes a
/// frame boundary unforgeable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct FileKey([u8; 16]);

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(..)")
    }
}

impl FileKey {
    /// A fresh key from the system's randomness, for a new file.
    pub(super) fn generate() -> io::Result<Self> {
        let mut key = [0; 16];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| io::Error::other("no system randomness for a spool file key"))?;
        Ok(Self(key))
    }

    /// The file header: what a file under this key starts with.
    pub(super) fn header(&self) -> [u8; FILE_HEADER] {
        let mut out = [0; FILE_HEADER];
        out[..8].copy_from_slice(&FILE_MAGIC);
        out[8..].copy_from_slice(&self.0);
        out
    }

    /// The key of a version 2 file starting with `start` (at least its
    /// first [`FILE_HEADER`] bytes); `None` when they are not a header.
    pub(super) fn parse(start: &[u8]) -> Option<Self> {
        let (magic, rest) = start.split_first_chunk::<8>()?;
        let (key, _) = rest.split_first_chunk::<16>()?;
        (*magic == FILE_MAGIC).then_some(Self(*key))
    }

    fn tag(&self) -> &[u8] {
        &self.0[..8]
    }

    /// A CRC already fed the key's second half.
    fn crc(&self) -> crc32fast::Hasher {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.0[8..]);
        crc
    }

    fn header_crc(&self, kind: u8, len: u32) -> u32 {
        let mut crc = self.crc();
        crc.update(&[kind]);
        crc.update(&len.to_le_bytes());
        crc.finalize()
    }
}

// === impl Format ===

/// How a file's frames are read, as its first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// Version 1: `SGS1` frames from offset 0, read strictly.
    Legacy,
    /// Version 2: a file header, then frames under this key.
    Keyed(FileKey),
}

impl Format {
    /// The format of a file starting with `start` (its first
    /// [`FILE_HEADER`] bytes, or all of it when shorter); `None`: neither.
    pub(super) fn of(start: &[u8]) -> Option<Self> {
        if v1::starts(start) {
            Some(Format::Legacy)
        } else {
            FileKey::parse(start).map(Format::Keyed)
        }
    }

    /// The frame at the start of `buf`, read back at an offset a scan
    /// found, when it is whole and intact.
    pub(super) fn frame_at(&self, buf: &[u8]) -> Option<(usize, Entry)> {
        match self {
            Format::Legacy => v1::frame_at(buf),
            Format::Keyed(key) => frame_at(buf, key),
        }
    }
}

// === impl Stored ===

/// A request as it was accepted, whole: its head and its body. Reads of
/// the head's fields go through to it (`stored.id`).
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Everything but the body.
    pub head: StoredHead,
    /// Its body.
    pub body: Bytes,
}

impl std::ops::Deref for Stored {
    type Target = StoredHead;
    fn deref(&self) -> &StoredHead {
        &self.head
    }
}

/// A [`Stored`] without its body: what is written ahead of a body streamed
/// to the file ([`PutFrame`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredHead {
    /// The spool's id for it (and its generated idempotency key).
    pub id: String,
    /// When it was accepted, in Unix milliseconds.
    pub created_ms: u64,
    /// The client's address, for `X-Forwarded-For` on replay.
    pub client: Option<String>,
    /// Whether the client came over HTTPS, for `X-Forwarded-Proto` on
    /// replay.
    pub tls: bool,
    /// Its method.
    pub method: Method,
    /// Its path and query.
    pub uri: String,
    /// Its end-to-end header fields, the idempotency key among them.
    pub headers: HeaderMap,
}

impl Stored {
    /// The request from its head and body.
    pub fn from_parts(head: StoredHead, body: Bytes) -> Self {
        Self { head, body }
    }

    /// The request's head and body.
    pub fn into_parts(self) -> (StoredHead, Bytes) {
        (self.head, self.body)
    }
}

impl StoredHead {
    /// The length of the PUT frame of this head with a body of `body_len`
    /// bytes: what the store reserves before the body is read.
    pub(super) fn frame_len(&self, body_len: u64) -> io::Result<u64> {
        let mut fields = Vec::new();
        put_head(&mut fields, self)?;
        Ok((FRAME_HEADER + fields.len() + 4 + FRAME_TRAILER) as u64 + body_len)
    }
}

/// A request that will not be delivered, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Buried {
    /// The request.
    pub request: Stored,
    /// The upstream's last status (none: it never answered).
    pub status: Option<u16>,
    /// The start of the upstream's last answer, or what went wrong.
    pub excerpt: String,
    /// Deliveries tried.
    pub attempts: u16,
    /// When it was dead-lettered, in Unix milliseconds.
    pub buried_ms: u64,
}

// === impl Entry ===

/// What a frame records.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry {
    /// A request accepted.
    Put(Stored),
    /// The request with this id is gone from the log (delivered, or buried).
    Done(String),
    /// A dead letter (its own file).
    Dead(Buried),
}

impl Entry {
    /// The entry as a frame under `key`: byte for byte what [`PutFrame`]
    /// writes for a PUT. Fails on an id that is not [`valid_id`] (it would
    /// be read back as damaged) and on a record too large for a frame.
    pub(super) fn encode(&self, key: &FileKey) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode_into(key, &mut out)?;
        Ok(out)
    }

    /// The length of [`Entry::encode`]'s frame, whatever the key: what the
    /// store reserves before the writer, which holds the key, encodes it.
    pub(super) fn frame_len(&self) -> io::Result<u64> {
        let parts = self.parts()?;
        let body = parts.body.map_or(0, |b| 4 + b.len());
        Ok((FRAME_HEADER + parts.fields.len() + body + FRAME_TRAILER) as u64)
    }

    fn encode_into(&self, key: &FileKey, out: &mut Vec<u8>) -> io::Result<()> {
        let parts = self.parts()?;
        let body_len = parts.body.map(|b| b.len() as u64);
        let (head, mut frame) = PutFrame::start(key, parts.kind, &parts.fields, body_len)?;
        let body = parts.body.unwrap_or_default();
        frame.update(body);
        let trailer = frame.finish()?;
        out.reserve(head.len() + body.len() + FRAME_TRAILER);
        out.extend_from_slice(&head);
        out.extend_from_slice(body);
        out.extend_from_slice(&trailer);
        Ok(())
    }

    fn parts(&self) -> io::Result<Parts<'_>> {
        let mut fields = Vec::new();
        let (kind, body) = match self {
            Entry::Put(stored) => {
                let head = &stored.head;
                check_id(&head.id)?;
                put_head(&mut fields, head)?;
                (PUT, Some(&stored.body[..]))
            }
            Entry::Done(id) => {
                check_id(id)?;
                put_bytes(&mut fields, id.as_bytes())?;
                (DONE, None)
            }
            Entry::Dead(buried) => {
                let head = &buried.request.head;
                check_id(&head.id)?;
                let w = &mut fields;
                w.extend_from_slice(&buried.status.unwrap_or(0).to_le_bytes());
                put_bytes(w, buried.excerpt.as_bytes())?;
                w.extend_from_slice(&buried.attempts.to_le_bytes());
                w.extend_from_slice(&buried.buried_ms.to_le_bytes());
                put_head(w, head)?;
                (DEAD, Some(&buried.request.body[..]))
            }
        };
        Ok(Parts { kind, fields, body })
    }

    /// A version 2 payload of `kind`; `None` when it is malformed, has an
    /// invalid id, or has bytes left over.
    fn decode(kind: u8, payload: &[u8]) -> Option<Self> {
        let mut r = Reader(payload);
        let entry = match kind {
            PUT => Entry::Put(r.stored(true)?),
            DONE => Entry::Done(r.id()?),
            DEAD => {
                let status = Some(r.u16()?).filter(|s| *s != 0);
                let excerpt = r.string()?;
                let attempts = r.u16()?;
                let buried_ms = r.u64()?;
                Entry::Dead(Buried {
                    request: r.stored(true)?,
                    status,
                    excerpt,
                    attempts,
                    buried_ms,
                })
            }
            _ => return None,
        };
        r.0.is_empty().then_some(entry)
    }
}

/// An entry taken apart for framing.
struct Parts<'a> {
    kind: u8,
    /// The payload up to the body (all of it when there is none).
    fields: Vec<u8>,
    /// The body, last in the payload after its length, if the kind has one.
    body: Option<&'a [u8]>,
}

fn check_id(id: &str) -> io::Result<()> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "spool id is not lowercase hex",
        ))
    }
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) -> io::Result<()> {
    let len = u32::try_from(b.len()).map_err(|_| too_large())?;
    w.extend_from_slice(&len.to_le_bytes());
    w.extend_from_slice(b);
    Ok(())
}

/// The head's fields, in the order [`Reader::head`] reads them. The id is
/// not checked here (the callers do), so that tests can forge records.
fn put_head(w: &mut Vec<u8>, h: &StoredHead) -> io::Result<()> {
    put_bytes(w, h.id.as_bytes())?;
    w.extend_from_slice(&h.created_ms.to_le_bytes());
    put_bytes(w, h.client.as_deref().unwrap_or("").as_bytes())?;
    w.push(u8::from(h.tls));
    put_bytes(w, h.method.as_str().as_bytes())?;
    put_bytes(w, h.uri.as_bytes())?;
    let count = u32::try_from(h.headers.len()).map_err(|_| too_large())?;
    w.extend_from_slice(&count.to_le_bytes());
    for (name, value) in &h.headers {
        put_bytes(w, name.as_str().as_bytes())?;
        put_bytes(w, value.as_bytes())?;
    }
    Ok(())
}

// === impl PutFrame ===

/// A frame written in pieces: its header and the payload up to the body,
/// then the body in chunks, then the CRC. A request's body can go from a
/// temporary file to the log without ever being in memory.
#[derive(Debug)]
pub(super) struct PutFrame {
    crc: crc32fast::Hasher,
    /// The body's length, as the frame declares it.
    body_len: u64,
    /// Body bytes given so far.
    written: u64,
}

impl PutFrame {
    /// A PUT of `head` with a body of `body_len` bytes: returns the bytes
    /// to write first (frame header, then the payload up to and including
    /// the body's length), and the writer to feed the body through.
    pub(super) fn begin(
        key: &FileKey,
        head: &StoredHead,
        body_len: u64,
    ) -> io::Result<(Vec<u8>, Self)> {
        check_id(&head.id)?;
        let mut fields = Vec::new();
        put_head(&mut fields, head)?;
        Self::start(key, PUT, &fields, Some(body_len))
    }

    /// Counts `chunk` of the body (to be written after what `begin` gave).
    pub(super) fn update(&mut self, chunk: &[u8]) {
        self.crc.update(chunk);
        self.written = self.written.saturating_add(chunk.len() as u64);
    }

    /// The frame's last 4 bytes, once the whole body went through
    /// [`PutFrame::update`]; an error when it was longer or shorter than
    /// declared (the frame written would be read as damaged).
    pub(super) fn finish(self) -> io::Result<[u8; FRAME_TRAILER]> {
        if self.written != self.body_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "spool body of {} bytes where {} were declared",
                    self.written, self.body_len
                ),
            ));
        }
        Ok(self.crc.finalize().to_le_bytes())
    }

    /// A frame of `kind` whose payload is `fields`, then a body of
    /// `body_len` bytes after its length when there is one.
    fn start(
        key: &FileKey,
        kind: u8,
        fields: &[u8],
        body_len: Option<u64>,
    ) -> io::Result<(Vec<u8>, Self)> {
        let mut head = Vec::with_capacity(FRAME_HEADER + fields.len() + 4);
        head.extend_from_slice(key.tag());
        head.push(kind);
        // Length and CRC, filled in below.
        head.extend_from_slice(&[0; 8]);
        head.extend_from_slice(fields);
        if let Some(body_len) = body_len {
            let prefix = u32::try_from(body_len).map_err(|_| too_large())?;
            head.extend_from_slice(&prefix.to_le_bytes());
        }
        let len = ((head.len() - FRAME_HEADER) as u64)
            .checked_add(body_len.unwrap_or(0))
            .filter(|len| *len <= MAX_PAYLOAD as u64)
            .and_then(|len| u32::try_from(len).ok())
            .ok_or_else(too_large)?;
        head[9..13].copy_from_slice(&len.to_le_bytes());
        head[13..17].copy_from_slice(&key.header_crc(kind, len).to_le_bytes());
        let mut crc = key.crc();
        crc.update(&head[FRAME_HEADER..]);
        let frame = Self {
            crc,
            body_len: body_len.unwrap_or(0),
            written: 0,
        };
        Ok((head, frame))
    }
}

// === impl Reader ===

/// Reads fields off a payload; `None` when it is short or malformed.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }

    /// An id, refused unless [`valid_id`]: a record with another is damaged.
    fn id(&mut self) -> Option<String> {
        self.string().filter(|id| valid_id(id))
    }

    /// A head as [`put_head`] writes it; version 1 has no `tls` byte.
    fn head(&mut self, with_tls: bool) -> Option<StoredHead> {
        let id = self.id()?;
        let created_ms = self.u64()?;
        let client = Some(self.string()?).filter(|c| !c.is_empty());
        let tls = if with_tls {
            match self.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            }
        } else {
            false
        };
        let method = Method::from_bytes(self.bytes()?).ok()?;
        let uri = self.string()?;
        let count = self.u32()?;
        let mut headers = HeaderMap::new();
        for _ in 0..count {
            let name = HeaderName::from_bytes(self.bytes()?).ok()?;
            let value = HeaderValue::from_bytes(self.bytes()?).ok()?;
            headers.append(name, value);
        }
        Some(StoredHead {
            id,
            created_ms,
            client,
            tls,
            method,
            uri,
            headers,
        })
    }

    fn stored(&mut self, with_tls: bool) -> Option<Stored> {
        let head = self.head(with_tls)?;
        let body = Bytes::copy_from_slice(self.bytes()?);
        Some(Stored::from_parts(head, body))
    }
}

mod scan;
mod v1;

pub(super) use scan::{encode_file, frame_at, read_file, scan};

#[cfg(test)]
mod tests;
