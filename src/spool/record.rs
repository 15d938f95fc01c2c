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

// === impl Scan ===

/// A frame found in a file.
#[derive(Debug)]
pub(super) struct Found {
    /// Where its frame starts in the file.
    pub(super) offset: u64,
    /// Its frame's length, header and trailer included.
    pub(super) len: u32,
    pub(super) entry: Entry,
}

/// What a scan found: every intact frame, and how many damaged stretches
/// (torn or corrupted records) it skipped.
#[derive(Debug, Default)]
pub(super) struct Scan {
    pub(super) found: Vec<Found>,
    pub(super) damaged: u64,
}

impl Scan {
    fn found(&mut self, offset: usize, len: usize, entry: Entry) {
        self.found.push(Found {
            offset: offset as u64,
            // Both readers refuse frames longer than a u32.
            len: len as u32,
            entry,
        });
    }
}

/// Counts damage once per stretch: consecutive damaged frames are one.
#[derive(Default)]
struct Stretch(bool);

impl Stretch {
    fn damaged(&mut self, scan: &mut Scan) {
        if !self.0 {
            scan.damaged += 1;
            self.0 = true;
        }
    }

    fn intact(&mut self) {
        self.0 = false;
    }
}

/// Every intact frame of a whole file, version 2 or version 1.
///
/// A file that is neither (a header damaged, or torn before it was whole)
/// is one damaged stretch with nothing in it; an empty file is nothing.
pub(super) fn scan(buf: &[u8]) -> Scan {
    if buf.is_empty() {
        return Scan::default();
    }
    match Format::of(buf) {
        Some(Format::Legacy) => v1::scan(buf),
        Some(Format::Keyed(key)) => scan_keyed(buf, key),
        None => Scan {
            damaged: 1,
            ..Scan::default()
        },
    }
}

/// Why there is no intact frame at a frame's place.
enum Miss {
    /// An intact header whose payload fails its CRC or does not decode:
    /// a damaged record of this length, skipped whole.
    Damaged(usize),
    /// An intact header whose frame runs past the end: a torn write.
    Torn,
    /// No intact header.
    NoHeader,
}

/// The kind and payload length of the frame header at the start of `buf`,
/// when it is whole and intact under `key`.
fn header(buf: &[u8], key: &FileKey) -> Option<(u8, usize)> {
    let (tag, rest) = buf.split_first_chunk::<8>()?;
    let (&kind, rest) = rest.split_first()?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let (hcrc, _) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len);
    let intact = tag[..] == *key.tag()
        && u32::from_le_bytes(*hcrc) == key.header_crc(kind, len)
        && len as usize <= MAX_PAYLOAD;
    intact.then_some((kind, len as usize))
}

/// The whole, intact frame at the start of `buf`: its length and entry.
fn read(buf: &[u8], key: &FileKey) -> Result<(usize, Entry), Miss> {
    let (kind, len) = header(buf, key).ok_or(Miss::NoHeader)?;
    let total = FRAME_HEADER + len + FRAME_TRAILER;
    let Some(frame) = buf.get(..total) else {
        return Err(Miss::Torn);
    };
    let (payload, pcrc) = frame[FRAME_HEADER..].split_at(len);
    let mut crc = key.crc();
    crc.update(payload);
    if pcrc != crc.finalize().to_le_bytes() {
        return Err(Miss::Damaged(total));
    }
    match Entry::decode(kind, payload) {
        Some(entry) => Ok((total, entry)),
        None => Err(Miss::Damaged(total)),
    }
}

/// The version 2 frame at the start of `buf` (read back by offset and
/// length), when it is whole and intact: its length and entry.
pub(super) fn frame_at(buf: &[u8], key: &FileKey) -> Option<(usize, Entry)> {
    read(buf, key).ok()
}

/// Walks a version 2 file. An intact header is trusted for its length: a
/// payload that fails its CRC or does not decode is skipped whole, and one
/// cut off by the end of the file ends it. Only after a damaged header does
/// the walk search, for the next occurrence of the file's tag.
fn scan_keyed(buf: &[u8], key: FileKey) -> Scan {
    let mut scan = Scan::default();
    let mut stretch = Stretch::default();
    let tag = memchr::memmem::Finder::new(key.tag());
    let mut at = FILE_HEADER;
    while let Some(rest) = buf.get(at..).filter(|rest| !rest.is_empty()) {
        match read(rest, &key) {
            Ok((len, entry)) => {
                scan.found(at, len, entry);
                stretch.intact();
                at += len;
            }
            Err(Miss::Damaged(len)) => {
                stretch.damaged(&mut scan);
                at += len;
            }
            Err(Miss::Torn) => {
                stretch.damaged(&mut scan);
                break;
            }
            Err(Miss::NoHeader) => {
                stretch.damaged(&mut scan);
                match tag.find(&rest[1..]) {
                    Some(next) => at += 1 + next,
                    None => break,
                }
            }
        }
    }
    scan
}

/// The entry of a one-frame file (a dead letter): a version 2 header and
/// frame, or a version 1 frame; `None` when damaged or followed by more.
pub(super) fn read_file(bytes: &[u8]) -> Option<Entry> {
    let (len, entry) = match Format::of(bytes)? {
        Format::Legacy => v1::frame_at(bytes)?,
        Format::Keyed(key) => {
            let (len, entry) = frame_at(bytes.get(FILE_HEADER..)?, &key)?;
            (FILE_HEADER + len, entry)
        }
    };
    (len == bytes.len()).then_some(entry)
}

/// A one-frame file holding `entry` (a dead letter) under a key of its own:
/// what [`read_file`] reads.
pub(super) fn encode_file(entry: &Entry) -> io::Result<Vec<u8>> {
    let key = FileKey::generate()?;
    let mut out = key.header().to_vec();
    entry.encode_into(&key, &mut out)?;
    Ok(out)
}

/// Version 1, read only: `SGS1`, payload length, CRC-32 of the payload,
/// payload (a kind byte, then the fields; no `tls`).
///
/// Its magic is no secret and a client could write it in a body, so a
/// version 1 file is never searched: it is read from offset 0, and the
/// first damaged frame ends it (what follows is one damaged stretch).
mod v1 {
    use super::{Buried, DEAD, DONE, Entry, PUT, Reader, Scan};

    const MAGIC: [u8; 4] = *b"SGS1";
    /// Magic, length, CRC.
    const FRAME_HEADER: usize = 12;

    /// Whether a file starting with `start` is version 1.
    pub(super) fn starts(start: &[u8]) -> bool {
        start.starts_with(&MAGIC)
    }

    /// The frame at the start of `buf`, when it is whole and intact.
    pub(super) fn frame_at(buf: &[u8]) -> Option<(usize, Entry)> {
        let (magic, rest) = buf.split_first_chunk::<4>()?;
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let (crc, rest) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
        if *magic != MAGIC || len > u32::MAX as usize - FRAME_HEADER {
            return None;
        }
        let payload = rest.get(..len)?;
        if crc32fast::hash(payload) != u32::from_le_bytes(*crc) {
            return None;
        }
        Some((FRAME_HEADER + len, decode(payload)?))
    }

    /// Frames one after another from offset 0, up to the first damaged one.
    pub(super) fn scan(buf: &[u8]) -> Scan {
        let mut scan = Scan::default();
        let mut at = 0;
        while let Some(rest) = buf.get(at..).filter(|rest| !rest.is_empty()) {
            let Some((len, entry)) = frame_at(rest) else {
                scan.damaged += 1;
                break;
            };
            scan.found(at, len, entry);
            at += len;
        }
        scan
    }

    fn decode(payload: &[u8]) -> Option<Entry> {
        let mut r = Reader(payload);
        let entry = match r.u8()? {
            PUT => Entry::Put(r.stored(false)?),
            DONE => Entry::Done(r.id()?),
            DEAD => {
                let request = r.stored(false)?;
                let status = Some(r.u16()?).filter(|s| *s != 0);
                Entry::Dead(Buried {
                    request,
                    status,
                    excerpt: r.string()?,
                    attempts: r.u16()?,
                    buried_ms: r.u64()?,
                })
            }
            _ => return None,
        };
        r.0.is_empty().then_some(entry)
    }

    /// Version 1 as the previous release wrote it (ids unchecked, so that
    /// tests can forge what a client might have planted).
    #[cfg(test)]
    pub(super) fn encode(entry: &Entry) -> Vec<u8> {
        use super::{Stored, put_bytes};

        fn put_stored(w: &mut Vec<u8>, s: &Stored) {
            put_bytes(w, s.id.as_bytes()).expect("small");
            w.extend_from_slice(&s.created_ms.to_le_bytes());
            put_bytes(w, s.client.as_deref().unwrap_or("").as_bytes()).expect("small");
            put_bytes(w, s.method.as_str().as_bytes()).expect("small");
            put_bytes(w, s.uri.as_bytes()).expect("small");
            w.extend_from_slice(&(s.headers.len() as u32).to_le_bytes());
            for (name, value) in &s.headers {
                put_bytes(w, name.as_str().as_bytes()).expect("small");
                put_bytes(w, value.as_bytes()).expect("small");
            }
            put_bytes(w, &s.body).expect("small");
        }

        let mut w = Vec::new();
        match entry {
            Entry::Put(stored) => {
                w.push(PUT);
                put_stored(&mut w, stored);
            }
            Entry::Done(id) => {
                w.push(DONE);
                put_bytes(&mut w, id.as_bytes()).expect("small");
            }
            Entry::Dead(buried) => {
                w.push(DEAD);
                put_stored(&mut w, &buried.request);
                w.extend_from_slice(&buried.status.unwrap_or(0).to_le_bytes());
                put_bytes(&mut w, buried.excerpt.as_bytes()).expect("small");
                w.extend_from_slice(&buried.attempts.to_le_bytes());
                w.extend_from_slice(&buried.buried_ms.to_le_bytes());
            }
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(w.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&w).to_le_bytes());
        out.extend_from_slice(&w);
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    /// A fixed key, so that failures reproduce.
    const KEY: FileKey = FileKey(*b"0123456789abcdef");

    fn stored(id: &str, body: &[u8]) -> Stored {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-tag", HeaderValue::from_static("a"));
        headers.append("x-tag", HeaderValue::from_static("b"));
        Stored {
            head: StoredHead {
                id: id.into(),
                created_ms: 1_700_000_000_000,
                client: Some("10.0.0.1".into()),
                tls: true,
                method: Method::POST,
                uri: "/ingest?batch=1".into(),
                headers,
            },
            body: Bytes::copy_from_slice(body),
        }
    }

    fn put(id: &str, body: &[u8]) -> Entry {
        Entry::Put(stored(id, body))
    }

    /// A version 2 file of `entries` under `key`, and where each frame is.
    fn file(key: &FileKey, entries: &[Entry]) -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut out = key.header().to_vec();
        let mut spans = Vec::new();
        for entry in entries {
            let frame = entry.encode(key).expect("encodes");
            spans.push((out.len(), frame.len()));
            out.extend_from_slice(&frame);
        }
        (out, spans)
    }

    /// A version 1 file of `entries`, and where each frame is.
    fn legacy_file(entries: &[Entry]) -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut out = Vec::new();
        let mut spans = Vec::new();
        for entry in entries {
            let frame = v1::encode(entry);
            spans.push((out.len(), frame.len()));
            out.extend_from_slice(&frame);
        }
        (out, spans)
    }

    fn entries(scan: &Scan) -> Vec<Entry> {
        scan.found.iter().map(|f| f.entry.clone()).collect()
    }

    /// A version 2 PUT of `stored` under `key` without the id check: what a
    /// client would plant in a body if it could guess a key.
    fn forged_frame(key: &FileKey, stored: &Stored) -> Vec<u8> {
        let mut fields = Vec::new();
        put_head(&mut fields, &stored.head).expect("small");
        let body_len = stored.body.len() as u64;
        let (mut out, mut frame) =
            PutFrame::start(key, PUT, &fields, Some(body_len)).expect("small");
        frame.update(&stored.body);
        out.extend_from_slice(&stored.body);
        out.extend_from_slice(&frame.finish().expect("whole"));
        out
    }

    #[test]
    fn every_entry_comes_back_as_written() {
        let mut plain = stored("0b", b"");
        plain.head.tls = false;
        plain.head.client = None;
        let written = [
            put("0a", b"{\"n\":1}"),
            Entry::Put(plain),
            Entry::Done("0a".into()),
            Entry::Dead(Buried {
                request: stored("0c", b"dead body"),
                status: Some(400),
                excerpt: "bad".into(),
                attempts: 1,
                buried_ms: 5,
            }),
        ];
        let (log, spans) = file(&KEY, &written);
        let scan = scan(&log);
        assert_eq!(scan.damaged, 0);
        assert_eq!(Format::of(&log), Some(Format::Keyed(KEY)));
        assert_eq!(entries(&scan), written);
        for ((found, (offset, len)), entry) in scan.found.iter().zip(spans).zip(&written) {
            assert_eq!((found.offset, found.len as usize), (offset as u64, len));
            assert_eq!(entry.frame_len().expect("sized"), len as u64);
            // Read back by offset, as the replayer does.
            let frame = &log[offset..offset + len];
            assert_eq!(frame_at(frame, &KEY), Some((len, entry.clone())));
            let format = Format::of(&log[..FILE_HEADER]).expect("a header");
            assert_eq!(format.frame_at(frame), Some((len, entry.clone())));
        }
    }

    #[test]
    fn a_streamed_put_is_the_encoded_put_byte_for_byte() {
        let request = stored("0123456789abcdef0123", &[7; 1000]);
        let (head, body) = request.clone().into_parts();
        let (mut out, mut frame) = PutFrame::begin(&KEY, &head, body.len() as u64).expect("begins");
        for chunk in body.chunks(97) {
            frame.update(chunk);
            out.extend_from_slice(chunk);
        }
        out.extend_from_slice(&frame.finish().expect("whole"));
        assert_eq!(out, Entry::Put(request).encode(&KEY).expect("encodes"));

        // A body shorter or longer than declared is refused, not framed.
        let (_, mut short) = PutFrame::begin(&KEY, &head, 10).expect("begins");
        short.update(b"123456789");
        assert!(short.finish().is_err());
        let (_, mut long) = PutFrame::begin(&KEY, &head, 1).expect("begins");
        long.update(b"12");
        assert!(long.finish().is_err());
    }

    #[test]
    fn keys_are_random_and_only_a_whole_header_is_one() {
        let (a, b) = (FileKey::generate().unwrap(), FileKey::generate().unwrap());
        assert_ne!(a, b);
        assert_eq!(FileKey::parse(&a.header()), Some(a));
        assert_eq!(FileKey::parse(&a.header()[..FILE_HEADER - 1]), None);
        let mut other = a.header();
        other[6] = 1;
        assert_eq!(FileKey::parse(&other), None);
        // The key stays out of logs.
        assert_eq!(format!("{a:?}"), "FileKey(..)");
    }

    #[test]
    fn a_damaged_payload_costs_its_record_alone_and_is_never_searched() {
        // The third body holds a whole frame under the file's own key (as
        // if the key had leaked): skipped with its record, never read.
        let planted = put("ffff", b"planted").encode(&KEY).expect("encodes");
        let written: Vec<Entry> = (0..5)
            .map(|i| match i {
                2 => put("02", &[b"xx".as_slice(), &planted].concat()),
                i => put(&format!("0{i}"), b"payload"),
            })
            .collect();
        let (mut log, spans) = file(&KEY, &written);
        let (offset, _) = spans[2];
        log[offset + FRAME_HEADER + 3] ^= 0x40;
        let scan = scan(&log);
        assert_eq!(scan.damaged, 1);
        let expected: Vec<Entry> = [0, 1, 3, 4].map(|i| written[i].clone()).to_vec();
        assert_eq!(entries(&scan), expected);
    }

    #[test]
    fn past_a_damaged_header_the_scan_finds_the_next_tag() {
        let written: Vec<Entry> = (0..5).map(|i| put(&format!("0{i}"), b"x")).collect();
        let (log, spans) = file(&KEY, &written);
        for byte in 0..FRAME_HEADER {
            let mut log = log.clone();
            log[spans[2].0 + byte] ^= 0x01;
            let scan = scan(&log);
            assert_eq!(scan.damaged, 1, "byte {byte}");
            let expected: Vec<Entry> = [0, 1, 3, 4].map(|i| written[i].clone()).to_vec();
            assert_eq!(entries(&scan), expected, "byte {byte}");
        }
    }

    #[test]
    fn a_torn_tail_ends_the_file() {
        let written: Vec<Entry> = (0..3).map(|i| put(&format!("0{i}"), b"body")).collect();
        let (log, spans) = file(&KEY, &written);
        let (last, _) = spans[2];
        for cut in last + 1..log.len() {
            let scan = scan(&log[..cut]);
            assert_eq!(entries(&scan), written[..2], "cut at {cut}");
            assert_eq!(scan.damaged, 1, "cut at {cut}");
        }
    }

    #[test]
    fn a_file_without_a_whole_header_holds_nothing() {
        assert_eq!(scan(b"").damaged, 0);
        assert_eq!(Format::of(b""), None);
        // A header alone: a segment made and never written to.
        let empty = scan(&KEY.header());
        assert_eq!((empty.found.len(), empty.damaged), (0, 0));
        let (log, _) = file(&KEY, &[put("0a", b"x")]);
        for bad in [&log[..10], &log[..FILE_HEADER - 1], &log[1..]] {
            let scan = scan(bad);
            assert_eq!((scan.found.len(), scan.damaged), (0, 1));
        }
        let mut other = log.clone();
        other[7] ^= 1;
        assert_eq!(scan(&other).found.len(), 0);
    }

    #[test]
    fn ids_that_are_not_lowercase_hex_are_neither_written_nor_read() {
        for id in ["0123456789abcdef0123", "a", &"f".repeat(64)] {
            assert!(valid_id(id), "{id}");
        }
        for id in ["", "../../x", "0A", "a/b", "a.b", &"f".repeat(65), "ab\0"] {
            assert!(!valid_id(id), "{id}");
            assert!(put(id, b"").encode(&KEY).is_err(), "{id}");
            assert!(Entry::Done(id.into()).encode(&KEY).is_err(), "{id}");
            let (head, _) = stored(id, b"").into_parts();
            assert!(PutFrame::begin(&KEY, &head, 0).is_err(), "{id}");
            // Framed all the same (as a forger would): damaged, skipped.
            let mut log = KEY.header().to_vec();
            log.extend(put("0a", b"1").encode(&KEY).unwrap());
            log.extend(forged_frame(&KEY, &stored(id, b"2")));
            log.extend(put("0b", b"3").encode(&KEY).unwrap());
            let scan = scan(&log);
            assert_eq!(entries(&scan), [put("0a", b"1"), put("0b", b"3")], "{id}");
            assert_eq!(scan.damaged, 1);
        }
    }

    #[test]
    fn a_legacy_file_is_read_to_its_first_damaged_frame_and_no_further() {
        let mut old = stored("0a", b"old");
        old.head.tls = false;
        let written: Vec<Entry> = (0..4)
            .map(|i| {
                let mut s = old.clone();
                s.head.id = format!("0{i}");
                Entry::Put(s)
            })
            .chain([Entry::Done("01".into())])
            .collect();
        let (log, spans) = legacy_file(&written);
        let whole = scan(&log);
        assert_eq!(Format::of(&log), Some(Format::Legacy));
        assert_eq!((entries(&whole), whole.damaged), (written.clone(), 0));
        for (found, (offset, len)) in whole.found.iter().zip(&spans) {
            assert_eq!((found.offset, found.len as usize), (*offset as u64, *len));
            let frame = &log[*offset..*offset + *len];
            assert_eq!(Format::Legacy.frame_at(frame).map(|(l, _)| l), Some(*len));
        }
        let mut damaged = log.clone();
        damaged[spans[1].0 + 20] ^= 0x01;
        let scan = scan(&damaged);
        assert_eq!((entries(&scan), scan.damaged), (written[..1].to_vec(), 1));
    }

    #[test]
    fn a_dead_letter_file_is_one_frame_in_either_version() {
        let dead = Entry::Dead(Buried {
            request: stored("0abc", b"{}"),
            status: None,
            excerpt: "connection refused".into(),
            attempts: 5,
            buried_ms: 9,
        });
        let bytes = encode_file(&dead).expect("encodes");
        assert_eq!(read_file(&bytes), Some(dead.clone()));
        // Each file its own key.
        assert_ne!(
            bytes[..FILE_HEADER],
            encode_file(&dead).unwrap()[..FILE_HEADER]
        );
        assert_eq!(read_file(&bytes[..bytes.len() - 1]), None);
        assert_eq!(read_file(&[bytes.as_slice(), b"x"].concat()), None);
        assert_eq!(read_file(&bytes[..FILE_HEADER]), None);
        // The previous release's dead letters (no tls field: false).
        let Entry::Dead(mut old) = dead else {
            unreachable!()
        };
        old.request.head.tls = false;
        let old = Entry::Dead(old);
        assert_eq!(read_file(&v1::encode(&old)), Some(old));
    }

    // === the attack of issue 26 ===

    /// The request a client wants the upstream to receive from the proxy.
    fn forged(id: &str) -> Stored {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer admin"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("127.0.0.1"));
        Stored {
            head: StoredHead {
                id: id.into(),
                created_ms: 1,
                client: Some("127.0.0.1".into()),
                tls: true,
                method: Method::DELETE,
                uri: "/admin/users/all".into(),
                headers,
            },
            body: Bytes::new(),
        }
    }

    /// A body planting the forged request every way a client could: as a
    /// version 1 frame, as a version 2 frame under a guessed key, and under
    /// the file's real tag with a guessed CRC key; with a path for an id,
    /// and with an id the store could have made.
    fn planted(key: &FileKey) -> Vec<u8> {
        let guessed = FileKey(*b"guessed the key!");
        let mut half = key.0;
        half[8..].copy_from_slice(b"guessed!");
        let mut body = b"{\"note\":\"".to_vec();
        for id in ["../../x", "ffffffffffffffffffff"] {
            let request = forged(id);
            body.extend(v1::encode(&Entry::Put(request.clone())));
            body.extend(forged_frame(&guessed, &request));
            body.extend(forged_frame(&FileKey(half), &request));
        }
        body.extend_from_slice(b"\"}");
        body
    }

    fn assert_nothing_forged(scan: &Scan) {
        for found in &scan.found {
            if let Entry::Put(s) = &found.entry {
                assert_ne!(
                    s.method,
                    Method::DELETE,
                    "forged record at {}",
                    found.offset
                );
            }
        }
    }

    #[test]
    fn a_torn_write_in_a_planted_body_yields_no_forged_record() {
        let written = [
            put("0a", b"another client's acknowledged write"),
            put("0b", &planted(&KEY)),
            put("0c", b"written after"),
        ];
        let (log, spans) = file(&KEY, &written);
        let (start, len) = spans[1];
        // Torn anywhere in the planted record (kill -9, a truncated file).
        for cut in start + 1..start + len {
            let scan = scan(&log[..cut]);
            assert_nothing_forged(&scan);
            assert_eq!(entries(&scan), written[..1], "cut at {cut}");
            assert_eq!(scan.damaged, 1);
        }
        // Damaged anywhere in it, header included: the record after it
        // starts with the real tag and is found again.
        for byte in start..start + len {
            let mut damaged = log.clone();
            damaged[byte] ^= 0x20;
            let scan = scan(&damaged);
            assert_nothing_forged(&scan);
            let expected = [written[0].clone(), written[2].clone()];
            assert_eq!(entries(&scan), expected, "byte {byte}");
        }
        // Torn, then written after (which the store never does: it cuts a
        // failed write back, and starts a new segment after a crash): the
        // torn frame's header still holds its length, so what it covers is
        // lost, and nothing in it is read.
        let torn = [&log[..start + len / 2], &log[spans[2].0..]].concat();
        let scan = scan(&torn);
        assert_nothing_forged(&scan);
        assert_eq!(entries(&scan)[..1], written[..1]);
    }

    #[test]
    fn a_legacy_file_with_a_planted_body_yields_no_forged_record() {
        let written = [
            put("0a", b"another client's acknowledged write"),
            put("0b", &planted(&KEY)),
            put("0c", b"written after"),
        ]
        .map(|e| match e {
            Entry::Put(mut s) => {
                s.head.tls = false;
                Entry::Put(s)
            }
            other => other,
        });
        let (log, spans) = legacy_file(&written);
        let (start, len) = spans[1];
        for cut in start + 1..start + len {
            let scan = scan(&log[..cut]);
            assert_nothing_forged(&scan);
            assert_eq!((entries(&scan), scan.damaged), (written[..1].to_vec(), 1));
        }
        for byte in start..start + len {
            let mut damaged = log.clone();
            damaged[byte] ^= 0x20;
            let scan = scan(&damaged);
            assert_nothing_forged(&scan);
            // Strict: the record after it is lost with it.
            assert_eq!(entries(&scan), written[..1], "byte {byte}");
        }
    }

    // === property: only what was written, and all of it before the damage ===

    /// What a client may put in a body to be taken for a record.
    #[derive(Debug, Clone)]
    enum Piece {
        Bytes(Vec<u8>),
        /// A version 2 PUT under another key.
        OtherKey([u8; 16], Stored),
        /// A version 2 PUT with the file's tag and another CRC key.
        SameTag([u8; 8], Stored),
        /// A version 1 PUT.
        Legacy(Stored),
        /// The file's tag alone.
        Tag,
    }

    /// An entry to write, its bodies still to be made under the file's key.
    #[derive(Debug, Clone)]
    enum Plan {
        Put(Stored, Vec<Piece>),
        Done(String),
        Dead(Buried, Vec<Piece>),
    }

    /// A change to the written file.
    #[derive(Debug, Clone)]
    struct Damage {
        /// Bytes overwritten with random ones: anywhere, or in a frame's
        /// header (rarely hit at random, and where resync begins).
        overwrite: Option<(Where, Vec<u8>)>,
        /// The file cut at a byte.
        cut: Option<Index>,
    }

    #[derive(Debug, Clone)]
    enum Where {
        Anywhere(Index),
        Header(Index, usize),
    }

    fn arb_stored() -> impl Strategy<Value = Stored> {
        let method = prop::sample::select(vec![
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ]);
        let name = prop::sample::select(vec![
            "authorization",
            "content-type",
            "x-forwarded-for",
            "idempotency-key",
            "x-tag",
        ]);
        let value_byte = prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff];
        let value = prop::collection::vec(value_byte, 0..24);
        (
            "[0-9a-f]{1,64}",
            any::<u64>(),
            prop::option::of("[0-9a-f.:]{1,39}"),
            any::<bool>(),
            method,
            "\\PC{0,40}",
            prop::collection::vec((name, value), 0..4),
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(id, created_ms, client, tls, method, uri, fields, body)| {
                let mut headers = HeaderMap::new();
                for (name, value) in fields {
                    let value = HeaderValue::from_bytes(&value).expect("field bytes");
                    headers.append(name, value);
                }
                Stored {
                    head: StoredHead {
                        id,
                        created_ms,
                        client,
                        tls,
                        method,
                        uri,
                        headers,
                    },
                    body: body.into(),
                }
            })
    }

    fn arb_pieces() -> impl Strategy<Value = Vec<Piece>> {
        let piece = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200).prop_map(Piece::Bytes),
            (any::<[u8; 16]>(), arb_stored()).prop_map(|(k, s)| Piece::OtherKey(k, s)),
            (any::<[u8; 8]>(), arb_stored()).prop_map(|(k, s)| Piece::SameTag(k, s)),
            arb_stored().prop_map(Piece::Legacy),
            Just(Piece::Tag),
        ];
        prop::collection::vec(piece, 0..4)
    }

    fn arb_plan() -> impl Strategy<Value = Plan> {
        prop_oneof![
            3 => (arb_stored(), arb_pieces()).prop_map(|(s, p)| Plan::Put(s, p)),
            1 => "[0-9a-f]{1,64}".prop_map(Plan::Done),
            1 => (
                arb_stored(),
                arb_pieces(),
                prop::option::of(1u16..),
                "\\PC{0,20}",
                any::<u16>(),
                any::<u64>(),
            )
                .prop_map(|(request, pieces, status, excerpt, attempts, buried_ms)| {
                    let buried = Buried {
                        request,
                        status,
                        excerpt,
                        attempts,
                        buried_ms,
                    };
                    Plan::Dead(buried, pieces)
                }),
        ]
    }

    fn arb_damage() -> impl Strategy<Value = Damage> {
        let place = prop_oneof![
            any::<Index>().prop_map(Where::Anywhere),
            (any::<Index>(), 0..FRAME_HEADER + 4).prop_map(|(i, b)| Where::Header(i, b)),
        ];
        let overwrite = (place, prop::collection::vec(any::<u8>(), 1..40));
        (
            prop::option::of(overwrite),
            prop::option::of(any::<Index>()),
        )
            .prop_map(|(overwrite, cut)| Damage { overwrite, cut })
    }

    /// The body `pieces` make in a file under `key`.
    fn body(key: &FileKey, base: &Bytes, pieces: &[Piece]) -> Bytes {
        let mut out = base.to_vec();
        for piece in pieces {
            match piece {
                Piece::Bytes(b) => out.extend_from_slice(b),
                Piece::OtherKey(k, s) => out.extend(forged_frame(&FileKey(*k), s)),
                Piece::SameTag(half, s) => {
                    let mut k = key.0;
                    k[8..].copy_from_slice(half);
                    out.extend(forged_frame(&FileKey(k), s));
                }
                Piece::Legacy(s) => out.extend(v1::encode(&Entry::Put(s.clone()))),
                Piece::Tag => out.extend_from_slice(key.tag()),
            }
        }
        out.into()
    }

    fn realise(key: &FileKey, plan: &Plan, tls: bool) -> Entry {
        match plan {
            Plan::Put(s, pieces) => Entry::Put(Stored {
                head: StoredHead {
                    tls: s.tls && tls,
                    ..s.head.clone()
                },
                body: body(key, &s.body, pieces),
            }),
            Plan::Done(id) => Entry::Done(id.clone()),
            Plan::Dead(b, pieces) => {
                let mut b = b.clone();
                b.request.body = body(key, &b.request.body, pieces);
                b.request.head.tls &= tls;
                Entry::Dead(b)
            }
        }
    }

    fn damage(log: &[u8], spans: &[(usize, usize)], damage: &Damage) -> Vec<u8> {
        let mut out = log.to_vec();
        if let Some((place, bytes)) = &damage.overwrite {
            let start = match place {
                Where::Anywhere(i) => i.index(out.len()),
                Where::Header(i, byte) => spans[i.index(spans.len())].0 + byte,
            };
            let end = (start + bytes.len()).min(out.len());
            if start < end {
                out[start..end].copy_from_slice(&bytes[..end - start]);
            }
        }
        if let Some(cut) = damage.cut {
            out.truncate(cut.index(out.len() + 1));
        }
        out
    }

    /// Every record found was written, at its place, in order; every record
    /// wholly before the first changed byte is found.
    fn check(
        written: &[Entry],
        spans: &[(usize, usize)],
        log: &[u8],
        damaged: &[u8],
        scan: &Scan,
    ) -> Result<(), TestCaseError> {
        let mut last = None;
        for found in &scan.found {
            let place = spans.iter().position(|(o, _)| *o as u64 == found.offset);
            let Some(i) = place else {
                return Err(TestCaseError::fail(format!(
                    "a record at {} that was never written: {:?}",
                    found.offset, found.entry
                )));
            };
            prop_assert_eq!(found.len as usize, spans[i].1);
            prop_assert_eq!(&found.entry, &written[i]);
            prop_assert!(last < Some(found.offset), "out of order");
            last = Some(found.offset);
        }
        let first_change = log
            .iter()
            .zip(damaged)
            .position(|(a, b)| a != b)
            .unwrap_or(log.len().min(damaged.len()));
        for (i, (offset, len)) in spans.iter().enumerate() {
            if offset + len <= first_change {
                let found = scan.found.iter().any(|f| f.offset == *offset as u64);
                prop_assert!(
                    found,
                    "record {} before the damage at {} lost",
                    i,
                    first_change
                );
            }
        }
        if damaged == log {
            prop_assert_eq!(scan.damaged, 0);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn a_cut_or_corruption_never_yields_a_record_not_written_nor_loses_one_before_it(
            key in any::<[u8; 16]>(),
            plans in prop::collection::vec(arb_plan(), 1..8),
            change in arb_damage(),
        ) {
            let key = FileKey(key);
            let written: Vec<Entry> = plans.iter().map(|p| realise(&key, p, true)).collect();
            let (log, spans) = file(&key, &written);
            let damaged = damage(&log, &spans, &change);
            check(&written, &spans, &log, &damaged, &scan(&damaged))?;
        }

        #[test]
        fn a_legacy_file_yields_only_records_written_before_its_damage(
            key in any::<[u8; 16]>(),
            plans in prop::collection::vec(arb_plan(), 1..8),
            change in arb_damage(),
        ) {
            let key = FileKey(key);
            let written: Vec<Entry> = plans.iter().map(|p| realise(&key, p, false)).collect();
            let (log, spans) = legacy_file(&written);
            let damaged = damage(&log, &spans, &change);
            check(&written, &spans, &log, &damaged, &scan(&damaged))?;
        }
    }
}
