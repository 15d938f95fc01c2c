//! Reading a file back: frame after frame while headers hold, a damaged
//! payload skipped whole, a search for the file's tag only past a damaged
//! header.

use super::v1;
use super::*;

// === impl Scan ===

/// A frame found in a file.
#[derive(Debug)]
pub(in crate::spool) struct Found {
    /// Where its frame starts in the file.
    pub(in crate::spool) offset: u64,
    /// Its frame's length, header and trailer included.
    pub(in crate::spool) len: u32,
    pub(in crate::spool) entry: Entry,
}

/// What a scan found: every intact frame, and how many damaged stretches
/// (torn or corrupted records) it skipped.
#[derive(Debug, Default)]
pub(in crate::spool) struct Scan {
    pub(in crate::spool) found: Vec<Found>,
    pub(in crate::spool) damaged: u64,
}

impl Scan {
    pub(in crate::spool) fn found(&mut self, offset: usize, len: usize, entry: Entry) {
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
pub(in crate::spool) struct Stretch(bool);

impl Stretch {
    pub(in crate::spool) fn damaged(&mut self, scan: &mut Scan) {
        if !self.0 {
            scan.damaged += 1;
            self.0 = true;
        }
    }

    pub(in crate::spool) fn intact(&mut self) {
        self.0 = false;
    }
}

/// Every intact frame of a whole file, version 2 or version 1.
///
/// A file that is neither (a header damaged, or torn before it was whole)
/// is one damaged stretch with nothing in it; an empty file is nothing.
pub(in crate::spool) fn scan(buf: &[u8]) -> Scan {
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
pub(in crate::spool) enum Miss {
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
pub(in crate::spool) fn header(buf: &[u8], key: &FileKey) -> Option<(u8, usize)> {
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
pub(in crate::spool) fn read(buf: &[u8], key: &FileKey) -> Result<(usize, Entry), Miss> {
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
pub(in crate::spool) fn frame_at(buf: &[u8], key: &FileKey) -> Option<(usize, Entry)> {
    read(buf, key).ok()
}

/// Walks a version 2 file. An intact header is trusted for its length: a
/// payload that fails its CRC or does not decode is skipped whole, and one
/// cut off by the end of the file ends it. Only after a damaged header does
/// the walk search, for the next occurrence of the file's tag.
pub(in crate::spool) fn scan_keyed(buf: &[u8], key: FileKey) -> Scan {
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
pub(in crate::spool) fn read_file(bytes: &[u8]) -> Option<Entry> {
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
pub(in crate::spool) fn encode_file(entry: &Entry) -> io::Result<Vec<u8>> {
    let key = FileKey::generate()?;
    let mut out = key.header().to_vec();
    entry.encode_into(&key, &mut out)?;
    Ok(out)
}
