//! HTTP/2 floods against the proxy listener (h2c, prior knowledge), written
//! frame by frame on a plain TCP socket: rapid reset (CVE-2023-44487), the
//! CONTINUATION flood, the PING flood and the SETTINGS flood.
//!
//! Every test asserts outcomes, never rates: the flooding connection is cut
//! off (GOAWAY, a close, or TCP back-pressure within a byte bound), other
//! clients are served meanwhile, the upstream sees a bounded number of
//! requests, and the admission gauges return to 0. Each phase runs under a
//! real-time timeout (sockets are involved), so a wedged proxy fails the test
//! instead of hanging it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;

use crate::support::*;

/// The longest one step (a request, a handshake, a close) may take.
const PHASE: Duration = Duration::from_secs(2);
/// The longest a flood runs before the test gives up on the proxy reacting.
const FLOOD: Duration = Duration::from_secs(5);
/// The most bytes one flooding connection may push before the proxy must
/// have pushed back (stopped reading) or closed it: the kernel's socket
/// buffers on both ends (tcp_rmem/tcp_wmem allow tens of MiB on loopback)
/// plus the proxy's frame buffers, with room to spare. A proxy that kept
/// reading a client that never reads its answers would pass it.
const BYTE_BOUND: u64 = 64 << 20;
/// How much the process may grow during one flood: a gross bound only (an
/// unbounded buffer fed for seconds passes it), since the binary's other
/// tests run at the same time in the same process (a panicking one
/// symbolising a backtrace alone adds ~180 MiB).
const RSS_BOUND: u64 = 512 << 20;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

// Error codes (RFC 9113 §7).
const COMPRESSION_ERROR: u32 = 0x9;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The largest frame payload a peer must accept without asking
/// (SETTINGS_MAX_FRAME_SIZE's initial value).
const MAX_FRAME: usize = 16_384;

/// Appends one frame to `out`.
fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24, "frame too long");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    push_frame(&mut out, kind, flags, stream, payload);
    out
}

/// An HPACK integer (RFC 7541 §5.1) with a `prefix`-bit prefix, OR-ed into
/// the high bits `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | u8::try_from(value).unwrap());
        return;
    }
    out.push(first | u8::try_from(max).unwrap());
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push(u8::try_from(rest & 0x7f).unwrap() | 0x80);
        rest >>= 7;
    }
    out.push(u8::try_from(rest).unwrap());
}

/// A literal field without indexing whose name is static-table entry
/// `name_index` (RFC 7541 §6.2.2), value not Huffman-coded.
fn literal(block: &mut Vec<u8>, name_index: u8, value: &str) {
    hpack_int(block, 0x00, 4, usize::from(name_index));
    hpack_int(block, 0x00, 7, value.len());
    block.extend_from_slice(value.as_bytes());
}

/// `GET {path}` on `authority`, HPACK-encoded by hand from the static table:
/// `:method: GET` (index 2) and `:scheme: http` (index 6) indexed, `:path`
/// and `:authority` literal. Nothing enters the dynamic table, so the same
/// block is valid on every stream.
fn get_block(authority: &str, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    literal(&mut block, 4, path);
    literal(&mut block, 1, authority);
    block
}

/// One frame as read off the wire.
struct Frame {
    kind: u8,
    flags: u8,
    payload: Vec<u8>,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
    let mut payload = vec![0; usize::try_from(len).unwrap()];
    r.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: head[3],
        flags: head[4],
        payload,
    })
}

/// What the proxy sent a flooding client, read to the connection's end.
#[derive(Debug, Default)]
struct Seen {
    /// The GOAWAY's last stream id and error code, if one came.
    goaway: Option<(u32, u32)>,
    /// Response HEADERS frames.
    responses: u64,
}

/// Reads frames until the connection ends, noting what came. `stop` turns
/// true at a GOAWAY or the end, for the writer to stop flooding.
async fn watch_frames<R: AsyncRead + Unpin>(mut r: R, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    while let Ok(f) = read_frame(&mut r).await {
        match f.kind {
            GOAWAY if f.payload.len() >= 8 => {
                let p = &f.payload;
                let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
                let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                seen.goaway = Some((last, code));
                stop.store(true, Ordering::SeqCst);
            }
            HEADERS => seen.responses += 1,
            _ => {}
        }
    }
    stop.store(true, Ordering::SeqCst);
    seen
}

/// Opens an h2c connection as a real client does: the preface and an empty
/// SETTINGS, then the proxy's SETTINGS read and acknowledged. Nothing more is
/// read here.
async fn handshake(addr: SocketAddr) -> TcpStream {
    let mut stream = timeout(PHASE, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    stream.set_nodelay(true).unwrap();
    let mut hello = PREFACE.to_vec();
    push_frame(&mut hello, SETTINGS, 0, 0, &[]);
    stream.write_all(&hello).await.unwrap();
    timeout(PHASE, async {
        loop {
            let f = read_frame(&mut stream).await.expect("the proxy's SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                return;
            }
        }
    })
    .await
    .expect("the proxy's SETTINGS in time");
    stream
        .write_all(&frame(SETTINGS, ACK, 0, &[]))
        .await
        .unwrap();
    stream
}

/// A new client, once over HTTP/1.1 and once over h2c, is answered `200`
/// within [`PHASE`]. Two upstream requests.
async fn others_are_served(proxy: SocketAddr, when: &str) {
    let url = format!("http://{proxy}/ok");
    let (res, _) = timeout(PHASE, get(&url))
        .await
        .unwrap_or_else(|_| panic!("{when}: an HTTP/1.1 client waited over {PHASE:?}"));
    assert_eq!(res.status(), StatusCode::OK, "{when}: HTTP/1.1");
    let req = Request::get(&url).body(full("")).unwrap();
    let (res, _) = timeout(PHASE, send(&h2c_client(), req))
        .await
        .unwrap_or_else(|_| panic!("{when}: an h2c client waited over {PHASE:?}"));
    assert_eq!(res.status(), StatusCode::OK, "{when}: h2c");
}

/// The proxy's metrics text.
async fn metrics_text(admin: SocketAddr) -> String {
    let (_, body) = timeout(PHASE, get(&format!("http://{admin}/metrics")))
        .await
        .expect("/metrics in time");
    String::from_utf8_lossy(&body).into_owned()
}

/// Waits (up to a few seconds) for the route's in-flight and queue gauges to
/// read 0, and fails with their values otherwise.
async fn gauges_settle(admin: SocketAddr) {
    let mut last = (f64::NAN, f64::NAN);
    for _ in 0..60 {
        let text = metrics_text(admin).await;
        last = (
            metric(&text, "sluicegate_inflight{route=\"test\"}").unwrap_or(f64::NAN),
            metric(&text, "sluicegate_queue_depth{route=\"test\"}").unwrap_or(f64::NAN),
        );
        if last == (0.0, 0.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("in-flight and queue depth stuck at {last:?}");
}

/// This process's resident set, from `/proc/self/status` (0 where there is
/// none).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The peak resident set while it runs, sampled every 10 ms.
struct RssPeak {
    base: u64,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    fn start() -> Self {
        let base = rss();
        let peak = Arc::new(AtomicU64::new(base));
        let sampled = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                sampled.fetch_max(rss(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Self { base, peak, task }
    }

    /// How far above the start the process went, in bytes.
    fn growth(self) -> u64 {
        self.task.abort();
        self.peak
            .load(Ordering::Relaxed)
            .max(rss())
            .saturating_sub(self.base)
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Rapid reset (CVE-2023-44487): thousands of streams, each opened and at
/// once cancelled, back to back on one connection. hyper's h2 refuses more
/// than a few remotely-reset streams waiting to be accepted: the connection
/// must end with GOAWAY(ENHANCE_YOUR_CALM) long before the last stream, the
/// upstream see a bounded number of them, other clients be served during
/// and after, and every admission slot come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off_and_spares_the_upstream() {
    const STREAMS: u32 = 20_000;
    const BATCH: u32 = 100;
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let addr = proxy.proxy_addr();
    others_are_served(addr, "before the flood").await;
    let before = up.requests.load(Ordering::SeqCst);

    let (r, mut w) = handshake(addr).await.into_split();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(watch_frames(r, stop.clone()));
    let memory = RssPeak::start();
    let block = get_block("sluicegate.test", "/flood");
    let (progress, mut progress_rx) = watch::channel(0u32);
    let flood = async {
        let mut opened = 0u32;
        while opened < STREAMS && !stop.load(Ordering::SeqCst) {
            let mut batch = Vec::new();
            for _ in 0..BATCH {
                let id = 2 * opened + 1;
                push_frame(&mut batch, HEADERS, END_HEADERS | END_STREAM, id, &block);
                push_frame(&mut batch, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
                opened += 1;
            }
            if w.write_all(&batch).await.is_err() {
                break;
            }
            progress.send_replace(opened);
        }
        progress.send_replace(u32::MAX);
        opened
    };
    // Another client, once the flood is well under way (or over).
    let meanwhile = async {
        let _ = progress_rx.wait_for(|n| *n >= 10 * BATCH).await;
        others_are_served(addr, "during the rapid reset").await;
    };
    let (opened, ()) = tokio::join!(timeout(FLOOD, flood), meanwhile);
    let opened = opened.unwrap_or_else(|_| panic!("the flood's writes blocked for {FLOOD:?}"));
    let seen = timeout(PHASE, reader)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "after {opened} opened-and-reset streams the proxy has neither \
                 sent GOAWAY nor closed the connection"
            )
        })
        .unwrap();
    drop(w);
    let growth = memory.growth();
    others_are_served(addr, "after the rapid reset").await;
    gauges_settle(proxy.admin_addr()).await;
    // The two requests of the check after the flood, and the two during it.
    let reached = up.requests.load(Ordering::SeqCst) - before - 4;
    eprintln!(
        "rapid reset: {opened} streams written, {seen:?}, {reached} reached the upstream, \
         RSS +{:.1} MiB",
        mib(growth)
    );

    let (last_stream, code) = seen.goaway.expect("a GOAWAY");
    assert_eq!(code, ENHANCE_YOUR_CALM, "{seen:?}");
    // The proxy stopped processing streams long before the client stopped
    // opening them.
    assert!(
        last_stream < 2 * STREAMS - 1,
        "GOAWAY only after the last stream: {seen:?}"
    );
    let processed = u64::from(last_stream / 2 + 1);
    assert!(
        reached <= processed,
        "{reached} upstream requests for {processed} streams processed"
    );
    assert!(
        processed < u64::from(STREAMS) / 2,
        "the proxy processed {processed} of {STREAMS} reset streams before cutting off"
    );
    assert!(growth < RSS_BOUND, "RSS grew {:.1} MiB", mib(growth));
    proxy.shutdown().await;
}

/// Rapid reset, paced the way a patient attacker paces it: each round opens
/// as many streams as the route admits at once, to an endpoint that answers
/// slowly, waits until the upstream has every one of them, then cancels them
/// all. hyper's guard counts only streams reset *before* it accepts them, so
/// it never fires; each cancel frees its admission slot at once while the
/// upstream got the request (and an upstream that does not notice a closed
/// connection goes on working on it). The correct outcome: the proxy cuts the
/// connection off after a bounded number of such premature resets (as
/// Envoy's premature-reset limit and nginx's per-iteration stream cap do),
/// so that one connection cannot multiply the upstream load
/// `max_inflight` promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_is_cut_off_before_it_multiplies_upstream_load() {
    const SLOTS: u32 = 4;
    const ROUNDS: u32 = 250;
    let (up, mut held) = spawn_upstream().await;
    let route = format!(
        "[route.admission]\nmax_inflight = {SLOTS}\nqueue_capacity = 64\n\
         queue_timeout_ms = 2000\n"
    );
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &route))
        .await
        .unwrap();
    let addr = proxy.proxy_addr();
    let (r, mut w) = handshake(addr).await.into_split();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(watch_frames(r, stop.clone()));
    let block = get_block("sluicegate.test", "/hold");
    let cancel = CANCEL.to_be_bytes();
    let (progress, mut progress_rx) = watch::channel(0u32);
    let flood = async {
        let mut rounds = 0u32;
        'rounds: while rounds < ROUNDS && !stop.load(Ordering::SeqCst) {
            let ids: Vec<u32> = (0..SLOTS).map(|k| 2 * (rounds * SLOTS + k) + 1).collect();
            let mut opening = Vec::new();
            for &id in &ids {
                push_frame(&mut opening, HEADERS, END_HEADERS | END_STREAM, id, &block);
            }
            if w.write_all(&opening).await.is_err() {
                break;
            }
            // The proxy admitted every one and the upstream has them.
            for _ in &ids {
                if !matches!(timeout(PHASE, held.recv()).await, Ok(Some(()))) {
                    break 'rounds;
                }
            }
            let mut resets = Vec::new();
            for &id in &ids {
                push_frame(&mut resets, RST_STREAM, 0, id, &cancel);
            }
            if w.write_all(&resets).await.is_err() {
                break;
            }
            rounds += 1;
            progress.send_replace(rounds);
        }
        progress.send_replace(u32::MAX);
        rounds
    };
    let meanwhile = async {
        let _ = progress_rx.wait_for(|n| *n >= ROUNDS / 4).await;
        others_are_served(addr, "during the paced rapid reset").await;
    };
    let (rounds, ()) = tokio::join!(timeout(FLOOD, flood), meanwhile);
    let cut_off = stop.load(Ordering::SeqCst);
    let reached = up.requests.load(Ordering::SeqCst) - 2;
    let text = metrics_text(proxy.admin_addr()).await;
    drop(w);
    let seen = timeout(PHASE, reader).await;
    eprintln!(
        "paced rapid reset: {rounds:?} rounds of {SLOTS}, cut off: {cut_off}, {reached} \
         requests reached the upstream (max_inflight {SLOTS}), proxy in-flight {:?}, \
         {seen:?}",
        metric(&text, "sluicegate_inflight{route=\"test\"}"),
    );
    up.release.notify_waiters();
    others_are_served(addr, "after the paced rapid reset").await;
    gauges_settle(proxy.admin_addr()).await;
    assert!(
        cut_off,
        "{reached} requests reached the upstream through one connection that \
         cancelled every one, with max_inflight = {SLOTS}, and the proxy never \
         sent GOAWAY nor closed the connection"
    );
    // The proxy's allowance is 100 premature resets: the requests it let
    // through before the GOAWAY, and at most a round in flight beyond.
    assert!(
        reached <= 100 + 2 * u64::from(SLOTS),
        "{reached} requests reached the upstream before the proxy cut off"
    );
    proxy.shutdown().await;
}

/// Sends HEADERS carrying `first` without END_HEADERS, then CONTINUATION frames
/// each carrying `piece`, until the proxy ends the connection or [`BYTE_BOUND`]
/// bytes have gone. Returns what the proxy sent and how many bytes went.
async fn continuation_flood(addr: SocketAddr, first: Vec<u8>, piece: &[u8]) -> (Seen, u64) {
    let (r, mut w) = handshake(addr).await.into_split();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(watch_frames(r, stop.clone()));
    let flood = async {
        let mut sent = 0u64;
        let opening = frame(HEADERS, END_STREAM, 1, &first);
        if w.write_all(&opening).await.is_err() {
            return sent;
        }
        sent += opening.len() as u64;
        while sent < BYTE_BOUND && !stop.load(Ordering::SeqCst) {
            let mut batch = Vec::new();
            while batch.len() < 64 * 1024 {
                push_frame(&mut batch, CONTINUATION, 0, 1, piece);
            }
            if w.write_all(&batch).await.is_err() {
                break;
            }
            sent += batch.len() as u64;
        }
        sent
    };
    let sent = timeout(FLOOD, flood)
        .await
        .unwrap_or_else(|_| panic!("the CONTINUATION flood's writes blocked for {FLOOD:?}"));
    let seen = timeout(PHASE, reader)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{sent} bytes of one unfinished header block, and the proxy has \
                 not closed the connection"
            )
        })
        .unwrap();
    (seen, sent)
}

/// CONTINUATION flood: a header block that never ends, in empty frames, in
/// frames of one small field each, and in full-size frames of one endless
/// header value. hyper's h2 bounds the CONTINUATION frames of a block by
/// the header list size (`max_header_bytes`) and the frame size: the
/// connection must end with a GOAWAY long before the flood does, nothing
/// reach the upstream, and other clients be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off_at_the_header_limit() {
    // A 16 KiB head limit: the bound is this config's, not h2's default.
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config_with(
        up.addr.unwrap(),
        "max_header_bytes = 16384",
        "",
    ))
    .await
    .unwrap();
    let addr = proxy.proxy_addr();
    let before = up.requests.load(Ordering::SeqCst);
    let memory = RssPeak::start();

    // One endless `x-flood` value: its length says 128 MiB (the largest
    // length h2's HPACK decoder takes: four continuation bytes), sent 16 KiB
    // a frame.
    let mut endless = get_block("sluicegate.test", "/flood");
    endless.push(0x00);
    hpack_int(&mut endless, 0x00, 7, 7);
    endless.extend_from_slice(b"x-flood");
    hpack_int(&mut endless, 0x00, 7, 1 << 27);
    let floods = [
        (
            "empty frames",
            get_block("sluicegate.test", "/flood"),
            vec![],
        ),
        (
            "one small field a frame",
            get_block("sluicegate.test", "/flood"),
            // `x-a: b`, a literal without indexing with a new name.
            vec![0x00, 0x03, b'x', b'-', b'a', 0x01, b'b'],
        ),
        (
            "full frames of one endless value",
            endless,
            vec![b'a'; MAX_FRAME],
        ),
    ];
    for (what, first, piece) in floods {
        let (seen, sent) = continuation_flood(addr, first, &piece).await;
        eprintln!("CONTINUATION flood, {what}: {sent} bytes written, {seen:?}");
        assert!(
            sent < BYTE_BOUND,
            "{what}: the proxy took {sent} bytes of one header block"
        );
        let (last_stream, code) = seen
            .goaway
            .unwrap_or_else(|| panic!("{what}: closed without a GOAWAY: {seen:?}"));
        // h2 counts the block's frames against the header list size
        // (ENHANCE_YOUR_CALM), and refuses to buffer an over-size block
        // (COMPRESSION_ERROR).
        assert!(
            code == ENHANCE_YOUR_CALM || code == COMPRESSION_ERROR,
            "{what}: {seen:?}"
        );
        assert_eq!(last_stream, 0, "{what}: the stream was accepted: {seen:?}");
        assert_eq!(seen.responses, 0, "{what}: {seen:?}");
        others_are_served(addr, what).await;
    }
    let growth = memory.growth();
    eprintln!("CONTINUATION floods: RSS +{:.1} MiB", mib(growth));
    // Only the checks' requests (two after each flood) reached the upstream.
    assert_eq!(up.requests.load(Ordering::SeqCst) - before, 6);
    gauges_settle(proxy.admin_addr()).await;
    assert!(growth < RSS_BOUND, "RSS grew {:.1} MiB", mib(growth));
    proxy.shutdown().await;
}

/// How a control-frame flood by a client that never reads ended.
#[derive(Debug)]
enum Ended {
    /// A write failed: the proxy closed the connection.
    Closed(io::ErrorKind),
    /// [`BYTE_BOUND`] bytes went without the proxy pushing back.
    Unbounded,
}

/// Writes `batch` over and over on an h2c connection whose answers are never
/// read, until a write fails or [`BYTE_BOUND`] bytes have gone, with another
/// client served once the flood has been running for a while. Returns how it
/// ended and how many bytes went.
async fn control_flood(proxy: &sluicegate::Running, batch: &[u8], what: &str) -> (Ended, u64) {
    let addr = proxy.proxy_addr();
    let mut stream = handshake(addr).await;
    let written = AtomicU64::new(0);
    let (done, mut done_rx) = watch::channel(false);
    let flood = async {
        let ended = loop {
            if written.load(Ordering::SeqCst) >= BYTE_BOUND {
                break Ended::Unbounded;
            }
            if let Err(e) = stream.write_all(batch).await {
                break Ended::Closed(e.kind());
            }
            written.fetch_add(batch.len() as u64, Ordering::SeqCst);
        };
        done.send_replace(true);
        ended
    };
    // Another client, a while into the flood (the proxy's answers have long
    // filled the socket by then) or once it is over.
    let meanwhile = async {
        let _ = timeout(Duration::from_millis(500), done_rx.wait_for(|d| *d)).await;
        others_are_served(addr, what).await;
    };
    let (ended, ()) = tokio::join!(timeout(FLOOD, flood), meanwhile);
    let written = written.load(Ordering::SeqCst);
    let ended = ended.unwrap_or_else(|_| {
        panic!(
            "{what}: after {written} bytes the proxy neither closed the connection \
             nor took more within {FLOOD:?}"
        )
    });
    (ended, written)
}

/// The config of the control-frame floods: a client that takes none of the
/// proxy's bytes for a second is dropped (`send_timeout_ms`, nginx's
/// `send_timeout`; 60 s by default).
fn stalled_clients_dropped(upstream: SocketAddr) -> sluicegate::config::Config {
    config_with(upstream, "send_timeout_ms = 1000", "")
}

/// Runs a control-frame flood of `batch` and checks the outcome: the proxy
/// stops reading once its answers back up (the flood is held to socket
/// buffers), then drops the connection after `send_timeout_ms`; other
/// clients are served throughout.
async fn control_flood_is_bounded(batch: Vec<u8>, what: &str) {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(stalled_clients_dropped(up.addr.unwrap()))
        .await
        .unwrap();
    let memory = RssPeak::start();
    let (ended, written) = control_flood(&proxy, &batch, what).await;
    let growth = memory.growth();
    let text = metrics_text(proxy.admin_addr()).await;
    let send_timeouts = metric(&text, "sluicegate_send_timeout_total").unwrap_or(0.0);
    eprintln!(
        "{what}: {ended:?} after {written} bytes ({:.1} MiB), send timeouts {send_timeouts}, \
         RSS +{:.1} MiB",
        mib(written),
        mib(growth)
    );
    let Ended::Closed(how) = ended else {
        panic!(
            "{what}: the proxy read {:.1} MiB from a client that reads nothing",
            mib(written)
        );
    };
    assert!(
        send_timeouts >= 1.0,
        "{what}: closed ({how}), but not for the stalled answers"
    );
    others_are_served(proxy.proxy_addr(), what).await;
    gauges_settle(proxy.admin_addr()).await;
    assert!(
        growth < RSS_BOUND,
        "{what}: RSS grew {:.1} MiB",
        mib(growth)
    );
    proxy.shutdown().await;
}

/// PING flood: PINGs back to back from a client that never reads the ACKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_from_a_client_that_never_reads_is_bounded() {
    let mut batch = Vec::new();
    for i in 0..1024u64 {
        push_frame(&mut batch, PING, 0, 0, &i.to_be_bytes());
    }
    control_flood_is_bounded(batch, "PING flood").await;
}

/// SETTINGS flood: SETTINGS frames (each with one parameter, which the
/// proxy must apply and acknowledge) from a client that never reads the ACKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_from_a_client_that_never_reads_is_bounded() {
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = 100.
    let setting = [0x00, 0x03, 0x00, 0x00, 0x00, 0x64];
    let mut batch = Vec::new();
    for _ in 0..1024 {
        push_frame(&mut batch, SETTINGS, 0, 0, &setting);
    }
    control_flood_is_bounded(batch, "SETTINGS flood").await;
}

/// Answers without a body (204, HEAD) end at once and are never polled by
/// hyper: they are not the client cancelling, however many there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodyless_answers_are_not_premature_resets() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let addr = proxy.proxy_addr();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    for i in 0..300 {
        let req = if i % 2 == 0 {
            Request::head(format!("http://{addr}/x"))
        } else {
            Request::get(format!("http://{addr}/empty/204"))
        }
        .body(full(""))
        .unwrap();
        let res = timeout(PHASE, tx.send_request(req))
            .await
            .expect("answered in time")
            .expect("answered, not refused by a GOAWAY");
        assert!(res.status().is_success(), "{}", res.status());
    }
    assert!(!conn.is_finished(), "the connection was closed");
    let text = metrics_text(proxy.admin_addr()).await;
    assert_eq!(
        metric(
            &text,
            r#"sluicegate_connections_closed_total{reason="premature_resets"}"#
        ),
        Some(0.0)
    );
    proxy.shutdown().await;
}

/// The paced reset padded with requests the proxy answers itself (404s):
/// they reach no upstream, so they do not dilute the share of cancelled
/// streams that did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_padded_with_local_answers_is_cut_off_too() {
    const SLOTS: u32 = 4;
    const PADDING: u32 = 8;
    const ROUNDS: u32 = 150;
    let (up, mut held) = spawn_upstream().await;
    let route = format!(
        "[route.admission]\nmax_inflight = {SLOTS}\nqueue_capacity = 64\n\
         queue_timeout_ms = 2000\n"
    );
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/hold", &route))
        .await
        .unwrap();
    let (r, mut w) = handshake(proxy.proxy_addr()).await.into_split();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(watch_frames(r, stop.clone()));
    let hold = get_block("sluicegate.test", "/hold");
    let pad = get_block("sluicegate.test", "/nowhere");
    let cancel = CANCEL.to_be_bytes();
    let mut next_id = 1u32;
    let mut id = || {
        let this = next_id;
        next_id += 2;
        this
    };
    let flood = async {
        'rounds: for _ in 0..ROUNDS {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let ids: Vec<u32> = (0..SLOTS).map(|_| id()).collect();
            let mut frames = Vec::new();
            for &i in &ids {
                push_frame(&mut frames, HEADERS, END_HEADERS | END_STREAM, i, &hold);
            }
            if w.write_all(&frames).await.is_err() {
                break;
            }
            for _ in &ids {
                if !matches!(timeout(PHASE, held.recv()).await, Ok(Some(()))) {
                    break 'rounds;
                }
            }
            let mut frames = Vec::new();
            for &i in &ids {
                push_frame(&mut frames, RST_STREAM, 0, i, &cancel);
            }
            for _ in 0..PADDING {
                push_frame(&mut frames, HEADERS, END_HEADERS | END_STREAM, id(), &pad);
            }
            if w.write_all(&frames).await.is_err() {
                break;
            }
        }
    };
    let _ = timeout(FLOOD, flood).await;
    let cut_off = stop.load(Ordering::SeqCst);
    let reached = up.requests.load(Ordering::SeqCst);
    drop(w);
    let _ = timeout(PHASE, reader).await;
    up.release.notify_waiters();
    assert!(
        cut_off,
        "{reached} requests reached the upstream, no GOAWAY"
    );
    assert!(
        reached <= 100 + 2 * u64::from(SLOTS),
        "{reached} requests reached the upstream before the proxy cut off"
    );
    proxy.shutdown().await;
}
