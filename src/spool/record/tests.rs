use proptest::prelude::*;
use proptest::sample::Index;

use super::scan::Scan;
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
    let (mut out, mut frame) = PutFrame::start(key, PUT, &fields, Some(body_len)).expect("small");
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
