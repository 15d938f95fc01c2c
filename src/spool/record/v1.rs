//! Version 1, read only: `SGS1`, payload length, CRC-32 of the payload,
//! payload (a kind byte, then the fields; no `tls`).
//!
//! Its magic is no secret and a client could write it in a body, so a
//! version 1 file is never searched: it is read from offset 0, and the
//! first damaged frame ends it (what follows is one damaged stretch).

use super::scan::Scan;
use super::{Buried, DEAD, DONE, Entry, PUT, Reader};

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
