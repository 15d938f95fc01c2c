//! The guard alone (byte by byte), and against hyper itself: for any byte
//! stream, every head hyper's HTTP/1 server parses after the guard must be one
//! the guard saw as a head, in the same order.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::config::ServerConfig;

/// The listener's default head limit (`server.max_header_bytes`).
fn max_head() -> usize {
    ServerConfig::default().max_header_bytes.as_usize()
}

/// What hyper would read, fed in `chunks`; and whether a head was refused.
fn through(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
    let mut guard = FramingGuard::new((), max_head(), Counter::noop());
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

fn refused(raw: &[u8]) -> bool {
    let bytes: Vec<&[u8]> = raw.chunks(1).collect();
    let one_by_one = through(&bytes).1;
    assert_eq!(
        through(&[raw]).1,
        one_by_one,
        "chunking changed the verdict"
    );
    one_by_one
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
    // A head with a bare-LF line is judged whole: the LF that ends it is
    // poisoned.
    let bare_lf: &[u8] = b"GET / HTTP/1.1\nhost: x\n\n";
    assert_eq!(
        through(&[bare_lf]),
        ([&b"GET / HTTP/1.1\nhost: x\n"[..], POISON].concat(), true)
    );
    // A long header line that is no framing header passes.
    let long = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(40_000));
    assert_eq!(
        through(&[long.as_bytes()]),
        (long.clone().into_bytes(), false)
    );
    // HTTP/2 prior knowledge is passed through untouched.
    let h2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\n\x04";
    assert_eq!(through(&[h2]), (h2.to_vec(), false));
}

/// The bypasses found on main: after each, the guard had stopped following
/// and a Content-Length + Transfer-Encoding head reached the upstream.
#[test]
fn no_head_switches_the_guard_off() {
    let smuggled = "POST /s HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\
                    transfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    // An Upgrade header answered normally (no 101): still HTTP/1 framing.
    let upgrade = format!("GET /a HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\r\n{smuggled}");
    assert!(refused(upgrade.as_bytes()), "the head after an Upgrade");
    // CONNECT is refused outright: a reverse proxy has nothing to tunnel.
    assert!(refused(b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n"));
    // A Content-Length line longer than what the guard keeps is refused,
    // not waved through.
    let long_cl = format!(
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: {}5\r\n\r\nhello{smuggled}",
        "0".repeat(20_000)
    );
    assert!(refused(long_cl.as_bytes()), "the long Content-Length");
    // A bare LF inside chunked trailers is part of the trailer line, as in
    // hyper: the "head" after it is still trailer, and the real next head
    // (smuggled) is seen.
    let trailers = format!(
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
         0\r\nx-t: 1\nGET /b HTTP/1.1\r\n\r\n{smuggled}"
    );
    assert!(
        refused(trailers.as_bytes()),
        "the head after bare-LF trailers"
    );
}

#[test]
fn a_malformed_chunk_ends_what_hyper_is_given() {
    let raw: &[u8] = b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n\
                   GET /b HTTP/1.1\r\n\r\n";
    let mut guard = FramingGuard::new((), max_head(), Counter::noop());
    assert_eq!(guard.follow(raw), None);
    assert_eq!(
        guard.state,
        State::Done,
        "hyper fails the body at the bare LF"
    );
}

#[test]
fn a_head_past_hypers_buffer_ends_what_hyper_is_given() {
    // hyper answers 431 and closes once its buffer holds this much of a head.
    let long = format!("GET / HTTP/1.1\r\nx-big: {}", "a".repeat(max_head()));
    let mut guard = FramingGuard::new((), max_head(), Counter::noop());
    assert_eq!(guard.follow(long.as_bytes()), None);
    assert_eq!(guard.state, State::Done);
    assert!(guard.head.capacity() == 0, "the gathered head is let go");
    // One byte short of the limit it is still a head being gathered.
    let short = &long.as_bytes()[..max_head() - 1];
    let mut guard = FramingGuard::new((), max_head(), Counter::noop());
    assert_eq!(guard.follow(short), None);
    assert_eq!(guard.state, State::Head);
    // hyper parses a head completed by the read that takes it past its
    // limit: so does the guard.
    assert_eq!(guard.follow(b"a\r\n\r\nGET /next HTTP/1.1\r\n"), None);
    assert_eq!(guard.state, State::Head, "complete, and let through");
    assert_eq!(guard.heads.lock().unwrap().len(), 1);
    assert_eq!(
        guard.head, b"GET /next HTTP/1.1\r\n",
        "the next head gathered"
    );
}

#[test]
fn empty_lines_before_a_request_line_are_not_a_head() {
    let raw: &[u8] =
        b"\r\n\r\n\nGET /a HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n";
    assert_eq!(through(&[raw]), (raw.to_vec(), false));
    assert!(!refused(raw));
    assert_in_step(&[raw.to_vec()]);
}

// === Differential: the guard against hyper ===

/// Feeds `chunks` through the guard into hyper's HTTP/1 server (built as the
/// listener builds it); returns the request targets hyper parsed and the
/// heads the guard let through.
fn against_hyper(chunks: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 20);
        let guard = FramingGuard::new(server, max_head(), Counter::noop());
        let guard_heads = guard.heads.clone();
        let parsed = Arc::new(Mutex::new(Vec::new()));
        let seen = parsed.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            seen.lock()
                .unwrap()
                .push(req.uri().to_string().into_bytes());
            async move {
                let _ = req.into_body().collect().await;
                // Never a 2xx to CONNECT nor a 101, as the proxy: hyper would
                // stop reading HTTP/1 after them.
                let mut res = Response::new(Empty::<Bytes>::new());
                *res.status_mut() = http::StatusCode::NOT_FOUND;
                Ok::<_, Infallible>(res)
            }
        });
        let builder = super::super::listener::http_builder(
            &ServerConfig::default(),
            metrics::Counter::noop(),
        );
        let conn = builder.serve_connection(TokioIo::new(guard), service);
        let (mut rd, mut wr) = tokio::io::split(client);
        let write = async {
            for c in chunks {
                if wr.write_all(c).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        };
        let all = async { tokio::join!(conn, write, read) };
        let _ = tokio::time::timeout(Duration::from_secs(600), all).await;
        let hyper = parsed.lock().unwrap().clone();
        let guard = guard_heads
            .lock()
            .unwrap()
            .iter()
            .map(|h| target(h))
            .collect();
        (hyper, guard)
    })
}

/// The request target of a head the guard let through.
fn target(head: &[u8]) -> Vec<u8> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let _ = req.parse(head); // the HTTP/2 preface is no HTTP/1 head
    req.path.unwrap_or_default().as_bytes().to_vec()
}

fn assert_in_step(chunks: &[Vec<u8>]) {
    let (hyper, guard) = against_hyper(chunks);
    let shown = |v: &[Vec<u8>]| {
        v.iter()
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .collect::<Vec<_>>()
    };
    let stream = String::from_utf8_lossy(&chunks.concat()).into_owned();
    assert!(
        hyper.len() <= guard.len() && hyper[..] == guard[..hyper.len()],
        "hyper parsed {:?}, the guard saw {:?}, in {stream:?}",
        shown(&hyper),
        shown(&guard)
    );
}

#[test]
fn the_reported_bypasses_stay_in_step_with_hyper() {
    let smuggled = "POST /s HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\
                    transfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    for stream in [
        format!("GET /a HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\r\n{smuggled}"),
        format!(
            "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
             0\r\nx-t: 1\nGET /b HTTP/1.1\r\n\r\n{smuggled}"
        ),
        format!(
            "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: {}5\r\n\r\nhello{smuggled}",
            "0".repeat(20_000)
        ),
        format!("POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello{smuggled}"),
    ] {
        assert_in_step(&[stream.into_bytes()]);
    }
}

/// One request of a generated stream.
#[derive(Debug, Clone)]
struct Message {
    method: &'static str,
    http10: bool,
    headers: Vec<(&'static str, Value)>,
    body: BodyShape,
    /// Line end of each header line (by index, cycled).
    ends: Vec<&'static str>,
}

/// A header value, some computed from the body.
#[derive(Debug, Clone)]
enum Value {
    Fixed(&'static str),
    /// The body's true length, with `pad` leading zeros and `space` around.
    Length {
        pad: usize,
        space: bool,
    },
    /// The body's length off by this much.
    Off(i8),
}

#[derive(Debug, Clone)]
enum BodyShape {
    None,
    Raw(Vec<Segment>),
    Chunked {
        chunks: Vec<Chunk>,
        trailers: Vec<Segment>,
    },
}

#[derive(Debug, Clone)]
struct Chunk {
    data: Vec<Segment>,
    size_off: i8,
    ext: &'static str,
    after_size: &'static str,
    after_data: &'static str,
}

/// Body material: junk, or what looks like a head.
#[derive(Debug, Clone)]
enum Segment {
    Junk(&'static str),
    Head,
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        3 => prop::sample::select(vec!["x", "hello", "0\r\n\r\n", "\r\n", "\n", ": 1\r\n"])
            .prop_map(Segment::Junk),
        2 => Just(Segment::Head),
    ]
}

fn end() -> impl Strategy<Value = &'static str> {
    prop_oneof![12 => Just("\r\n"), 1 => Just("\n"), 1 => Just("\r")]
}

fn header() -> impl Strategy<Value = (&'static str, Value)> {
    let fixed = |name, values: Vec<&'static str>| {
        prop::sample::select(values).prop_map(move |v| (name, Value::Fixed(v)))
    };
    prop_oneof![
        6 => (prop_oneof![8 => 0..3usize, 1 => 1000..1100usize], any::<bool>())
            .prop_map(|(pad, space)| ("content-length", Value::Length { pad, space })),
        1 => (-3i8..3).prop_map(|n| ("Content-Length", Value::Off(n))),
        1 => fixed("content-length", vec!["5, 5", "+5", "0x5", "99999999999999999999", ""]),
        1 => fixed("content-length ", vec!["0"]),
        5 => fixed(
            "transfer-encoding",
            vec!["chunked", "gzip, chunked", "chunked, gzip", " chunked ", "Chunked", "xchunked"]
        ),
        1 => fixed("Transfer-Encoding", vec!["chunked"]),
        2 => fixed("upgrade", vec!["websocket", "h2c"]),
        2 => fixed("connection", vec!["upgrade", "close", "keep-alive"]),
        1 => fixed("expect", vec!["100-continue"]),
        2 => fixed("x-f", vec!["a", "b c", "\t"]),
    ]
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        prop::collection::vec(segment(), 1..3),
        prop_oneof![8 => Just(0i8), 1 => -2i8..3],
        prop::sample::select(vec!["", "", ";a=b", ";a\n", " ", ";"]),
        end(),
        end(),
    )
        .prop_map(|(data, size_off, ext, after_size, after_data)| Chunk {
            data,
            size_off,
            ext,
            after_size,
            after_data,
        })
}

fn body() -> impl Strategy<Value = BodyShape> {
    prop_oneof![
        2 => Just(BodyShape::None),
        3 => prop::collection::vec(segment(), 0..4).prop_map(BodyShape::Raw),
        3 => (
            prop::collection::vec(chunk(), 0..3),
            prop::collection::vec(
                prop_oneof![
                    3 => prop::sample::select(vec!["x-t: 1\r\n", "x-t: 1\n", "\n", "\r\n"])
                        .prop_map(Segment::Junk),
                    1 => Just(Segment::Head),
                ],
                0..4
            ),
        )
            .prop_map(|(chunks, trailers)| BodyShape::Chunked { chunks, trailers }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (
        prop::sample::select(vec!["GET", "POST", "POST", "PUT", "CONNECT", "PRI"]),
        prop::bool::weighted(0.1),
        prop::collection::vec(header(), 0..4),
        body(),
        prop::collection::vec(end(), 1..4),
    )
        .prop_map(|(method, http10, headers, body, ends)| Message {
            method,
            http10,
            headers,
            body,
            ends,
        })
}

/// Renders the messages, numbering request targets `/mN` and the heads
/// hidden in bodies `/sN`.
fn render(messages: &[Message]) -> Vec<u8> {
    let mut smuggled = 0;
    let mut segments = |segs: &[Segment]| {
        let mut out = String::new();
        for s in segs {
            match s {
                Segment::Junk(j) => out.push_str(j),
                Segment::Head => {
                    out.push_str(&format!("GET /s{smuggled} HTTP/1.1\r\nhost: a\r\n\r\n"));
                    smuggled += 1;
                }
            }
        }
        out
    };
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let body = match &m.body {
            BodyShape::None => String::new(),
            BodyShape::Raw(segs) => segments(segs),
            BodyShape::Chunked { chunks, trailers } => {
                let mut b = String::new();
                for c in chunks {
                    let data = segments(&c.data);
                    let size = (data.len() as i64 + i64::from(c.size_off)).max(0);
                    b.push_str(&format!(
                        "{size:x}{}{}{data}{}",
                        c.ext, c.after_size, c.after_data
                    ));
                }
                b.push_str("0\r\n");
                b.push_str(&segments(trailers));
                b.push_str("\r\n");
                b
            }
        };
        let version = if m.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let target = if m.method == "CONNECT" {
            format!("m{i}:443")
        } else {
            format!("/m{i}")
        };
        out.extend_from_slice(format!("{} {target} {version}\r\n", m.method).as_bytes());
        for (n, (name, value)) in m.headers.iter().enumerate() {
            let value = match value {
                Value::Fixed(v) => v.to_string(),
                Value::Length { pad, space } => {
                    let v = format!("{}{}", "0".repeat(*pad), body.len());
                    if *space { format!(" {v} ") } else { v }
                }
                Value::Off(d) => (body.len() as i64 + i64::from(*d)).max(0).to_string(),
            };
            let end = m.ends[n % m.ends.len()];
            out.extend_from_slice(format!("{name}: {value}{end}").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// A few bytes changed, added or removed: what a grammar does not produce.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, op, byte) in edits {
        if bytes.is_empty() {
            break;
        }
        let at = at % bytes.len();
        let byte = b"\r\n:0 a5;G"[usize::from(byte) % 9];
        match op % 3 {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            _ => {
                bytes.remove(at);
            }
        }
    }
    bytes
}

/// Cuts `bytes` at sizes taken in turn from `sizes`.
fn split(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (a, b) = rest.split_at((*size).clamp(1, rest.len()));
        out.push(a.to_vec());
        rest = b;
    }
    out
}

proptest! {
    // 256 cases, or PROPTEST_CASES (scripts/fuzz.sh).
    #[test]
    fn every_head_hyper_parses_is_one_the_guard_saw(
        messages in prop::collection::vec(message(), 1..5),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
        sizes in prop::collection::vec(1usize..80, 1..8),
    ) {
        let bytes = mutate(render(&messages), &edits);
        assert_in_step(&split(&bytes, &sizes));
    }
}
