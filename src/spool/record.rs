//! The spool's on-disk records: a frame per record (`SGS1`, payload length,
//! CRC-32 of the payload, payload), so that a torn write or a flipped byte is
//! found and skipped, and the records after it are found again by their
//! magic.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// Every frame starts with these bytes.
const MAGIC: [u8; 4] = *b"SGS1";
/// Magic, length, CRC.
pub(super) const FRAME_HEADER: usize = 12;

const PUT: u8 = 1;
const DONE: u8 = 2;
const DEAD: u8 = 3;

/// A request as it was accepted, whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The spool's id for it (and its generated idempotency key).
    pub id: String,
    /// When it was accepted, in Unix milliseconds.
    pub created_ms: u64,
    /// The client's address, for `X-Forwarded-For` on replay.
    pub client: Option<String>,
    /// Whether the client used TLS (`X-Forwarded-Proto: https` on replay).
    pub tls: bool,
    /// Its method.
    pub method: Method,
    /// Its path and query.
    pub uri: String,
    /// Its end-to-end header fields, the idempotency key among them.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
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

/// `payload` in a frame.
fn frame(payload: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("records are bounded by max_body_bytes");
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

impl Entry {
    /// The entry as a frame.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut w = Vec::new();
        match self {
            Entry::Put(stored) => {
                w.push(PUT);
                put_stored(&mut w, stored);
            }
            Entry::Done(id) => {
                w.push(DONE);
                put_bytes(&mut w, id.as_bytes());
            }
            Entry::Dead(buried) => {
                w.push(DEAD);
                put_stored(&mut w, &buried.request);
                w.extend_from_slice(&buried.status.unwrap_or(0).to_le_bytes());
                put_bytes(&mut w, buried.excerpt.as_bytes());
                w.extend_from_slice(&buried.attempts.to_le_bytes());
                w.extend_from_slice(&buried.buried_ms.to_le_bytes());
            }
        }
        frame(w)
    }

    fn decode(payload: &[u8]) -> Option<Self> {
        let mut r = Reader(payload);
        let entry = match r.u8()? {
            PUT => Entry::Put(r.stored()?),
            DONE => Entry::Done(r.string()?),
            DEAD => {
                let request = r.stored()?;
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
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    let len = u32::try_from(b.len()).expect("fields are bounded by max_body_bytes");
    w.extend_from_slice(&len.to_le_bytes());
    w.extend_from_slice(b);
}

fn put_stored(w: &mut Vec<u8>, s: &Stored) {
    put_bytes(w, s.id.as_bytes());
    w.extend_from_slice(&s.created_ms.to_le_bytes());
    put_bytes(w, s.client.as_deref().unwrap_or("").as_bytes());
    put_bytes(w, s.method.as_str().as_bytes());
    put_bytes(w, s.uri.as_bytes());
    let count = u32::try_from(s.headers.len()).expect("headers are bounded by max_header_bytes");
    w.extend_from_slice(&count.to_le_bytes());
    for (name, value) in &s.headers {
        put_bytes(w, name.as_str().as_bytes());
        put_bytes(w, value.as_bytes());
    }
    put_bytes(w, &s.body);
}

/// Reads fields off a payload; `None` when it is short or malformed.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }

    fn stored(&mut self) -> Option<Stored> {
        let id = self.string()?;
        let created_ms = self.u64()?;
        let client = Some(self.string()?).filter(|c| !c.is_empty());
        let method = Method::from_bytes(self.bytes()?).ok()?;
        let uri = self.string()?;
        let count = self.u32()?;
        let mut headers = HeaderMap::new();
        for _ in 0..count {
            let name = HeaderName::from_bytes(self.bytes()?).ok()?;
            let value = HeaderValue::from_bytes(self.bytes()?).ok()?;
            headers.append(name, value);
        }
        let body = Bytes::copy_from_slice(self.bytes()?);
        Some(Stored {
            id,
            created_ms,
            client,
            tls: false,
            method,
            uri,
            headers,
            body,
        })
    }
}

/// A frame found in a file.
#[derive(Debug)]
pub(super) struct Found {
    /// Where its frame starts.
    pub(super) offset: u64,
    /// Its frame's length.
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

/// The frame at the start of `buf`, when it is whole and intact.
pub(super) fn frame_at(buf: &[u8]) -> Option<(usize, Entry)> {
    if buf.len() < FRAME_HEADER || buf[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    let payload = buf.get(FRAME_HEADER..FRAME_HEADER + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    Some((FRAME_HEADER + len, Entry::decode(payload)?))
}

/// Every intact frame of `buf`; past a damaged one, the scan looks for the
/// next magic (a false one in a body fails its CRC).
pub(super) fn scan(buf: &[u8]) -> Scan {
    let mut scan = Scan::default();
    let mut at = 0;
    let mut in_damage = false;
    while at < buf.len() {
        match frame_at(&buf[at..]) {
            Some((len, entry)) => {
                scan.found.push(Found {
                    offset: at as u64,
                    len: len as u32,
                    entry,
                });
                at += len;
                in_damage = false;
            }
            None => {
                if !in_damage {
                    scan.damaged += 1;
                    in_damage = true;
                }
                at += 1;
                match memchr::memmem::find(&buf[at..], &MAGIC) {
                    Some(next) => at += next,
                    None => break,
                }
            }
        }
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn stored(id: &str, body: &'static [u8]) -> Stored {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-tag", HeaderValue::from_static("a"));
        headers.append("x-tag", HeaderValue::from_static("b"));
        Stored {
            id: id.into(),
            created_ms: 1_700_000_000_000,
            client: Some("10.0.0.1".into()),
            tls: false,
            method: Method::POST,
            uri: "/ingest?batch=1".into(),
            headers,
            body: Bytes::from_static(body),
        }
    }

    #[test]
    fn every_entry_comes_back_as_written() {
        let entries = [
            Entry::Put(stored("a", b"{\"n\":1}")),
            Entry::Done("a".into()),
            Entry::Dead(Buried {
                request: stored("b", b""),
                status: Some(400),
                excerpt: "bad".into(),
                attempts: 1,
                buried_ms: 5,
            }),
        ];
        let log: Vec<u8> = entries.iter().flat_map(Entry::encode).collect();
        let scan = scan(&log);
        assert_eq!(scan.damaged, 0);
        let back: Vec<Entry> = scan.found.into_iter().map(|f| f.entry).collect();
        assert_eq!(back, entries);
    }

    #[test]
    fn a_flipped_byte_loses_only_its_record() {
        let records: Vec<Vec<u8>> = (0..5)
            .map(|i| Entry::Put(stored(&format!("r{i}"), b"payload SGS1 inside")).encode())
            .collect();
        let mut log: Vec<u8> = records.concat();
        // A byte in the middle of the third record's body.
        let third = records[0].len() * 2 + records[2].len() - 5;
        log[third] ^= 0x40;
        let scan = scan(&log);
        assert_eq!(scan.damaged, 1);
        let ids: Vec<String> = scan
            .found
            .iter()
            .map(|f| match &f.entry {
                Entry::Put(s) => s.id.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, ["r0", "r1", "r3", "r4"]);
    }

    #[test]
    fn a_torn_tail_and_a_damaged_length_are_skipped() {
        let a = Entry::Put(stored("a", b"x")).encode();
        let b = Entry::Put(stored("b", b"y")).encode();
        let mut log = [a.clone(), b.clone(), a.clone()].concat();
        log.truncate(log.len() - 3);
        assert_eq!(scan(&log).found.len(), 2);
        assert_eq!(scan(&log).damaged, 1);
        // A length field pointing far past the end.
        let mut log = [a.clone(), b].concat();
        log[5] = 0xff;
        let found = scan(&log);
        assert_eq!(found.found.len(), 1);
        assert_eq!(found.damaged, 1);
    }
}
