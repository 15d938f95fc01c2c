//! The proxy's own retry: it may hide an upstream's idle-connection race or
//! a stream the upstream never processed, but it must never execute a
//! request twice that was not allowed to run twice, and a stream the
//! upstream refused is not the upstream failing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// An HTTP/1.1 upstream that answers the first request of each connection
/// (keep-alive) and, on the second, reads it whole, executes it (counts it)
/// and dies without a byte of answer: the worst case of the idle race.
async fn dies_after_executing() -> (SocketAddr, Arc<Mutex<HashMap<String, u32>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let executed = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let seen = executed.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for n in 0.. {
                    let Some(line) = read_request(&mut tcp, &mut buf).await else {
                        return;
                    };
                    *seen.lock().unwrap().entry(line).or_default() += 1;
                    if n == 1 {
                        return; // executed, then gone
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if tcp.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, executed)
}

/// Reads one request (head and `content-length` body) from `r`; its
/// request line's method and path.
async fn read_request<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Option<String> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = r.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < end + length {
        let mut chunk = [0u8; 4096];
        let n = r.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = head.lines().next()?.rsplit_once(' ')?.0.to_string();
    buf.drain(..end + length);
    Some(line)
}

#[tokio::test]
async fn a_post_the_upstream_may_have_executed_is_not_sent_again() {
    let (upstream, executed) = dies_after_executing().await;
    let proxy = sluicegate::start(config(upstream, "/", "pool_idle_timeout_ms = 60000\n"))
        .await
        .unwrap();
    let url = |path: &str| format!("http://{}{path}", proxy.proxy_addr());
    let send_as = |method: &str, path: &str, key: Option<&str>| {
        let mut req = Request::builder().method(method).uri(url(path));
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let req = req.body(full("{\"amount\":1}")).unwrap();
        async move { send(&client(), req).await.0.status() }
    };
    // Each case: a request that opens a keep-alive connection, then the one
    // reusing it, which the upstream executes and dies on.
    let cases = [
        ("POST", "/pay", None, StatusCode::BAD_GATEWAY, 1),
        ("PATCH", "/account", None, StatusCode::BAD_GATEWAY, 1),
        // Idempotent methods, and a key that makes the repeat harmless, are
        // sent again on a fresh connection (which answers).
        ("PUT", "/doc", None, StatusCode::OK, 2),
        ("DELETE", "/doc", None, StatusCode::OK, 2),
        ("POST", "/keyed", Some("k-1"), StatusCode::OK, 2),
    ];
    for (i, (method, path, key, status, times)) in cases.into_iter().enumerate() {
        assert_eq!(
            send_as("GET", &format!("/warm{i}"), None).await,
            StatusCode::OK
        );
        assert_eq!(send_as(method, path, key).await, status, "{method} {path}");
        let line = format!("{} {path}", method.to_ascii_lowercase());
        assert_eq!(
            executed.lock().unwrap().get(&line).copied(),
            Some(times),
            "{line}"
        );
    }
    proxy.shutdown().await;
}

/// One HTTP/2 frame as read: type, flags, stream id, payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream,
    })
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const REFUSED_STREAM: u32 = 0x7;

/// `200`, no body: `:status: 200` is HPACK static entry 8.
fn ok(stream: u32) -> Vec<u8> {
    frame(HEADERS, 0x1 | 0x4, stream, &[0x88])
}

/// How the raw HTTP/2 upstream treats its streams.
#[derive(Clone, Copy)]
enum Refuses {
    /// The very first stream it is sent (`REFUSED_STREAM`); then serves.
    First,
    /// Every stream.
    All,
    /// On its first connection: serves the first stream, then, once two
    /// more are open, sends a graceful GOAWAY naming the first of them as
    /// the last it processes and serves that one only.
    AboveGoaway,
}

/// An h2c upstream speaking raw frames; notes each stream it served as
/// (connection number, stream id).
async fn raw_h2(refuses: Refuses) -> (SocketAddr, Arc<Mutex<Vec<(u32, u32)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(Mutex::new(Vec::new()));
    let noted = served.clone();
    tokio::spawn(async move {
        let mut refused_one = false;
        for conn in 0u32.. {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (mut rd, mut wr) = tcp.into_split();
            let mut preface = [0u8; 24];
            if rd.read_exact(&mut preface).await.is_err() {
                continue;
            }
            wr.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
            let served = noted.clone();
            let refuse_first = matches!(refuses, Refuses::First) && !refused_one;
            refused_one = true;
            tokio::spawn(async move {
                let mut open = Vec::new();
                let mut first = true;
                while let Some(f) = read_frame(&mut rd).await {
                    if f.kind == SETTINGS && f.flags & 0x1 == 0 {
                        let _ = wr.write_all(&frame(SETTINGS, 0x1, 0, &[])).await;
                    }
                    if f.kind != HEADERS {
                        continue;
                    }
                    let refuse = match refuses {
                        Refuses::First => refuse_first && first,
                        Refuses::All => true,
                        Refuses::AboveGoaway => false,
                    };
                    let was_first = std::mem::replace(&mut first, false);
                    if refuse {
                        let code = REFUSED_STREAM.to_be_bytes();
                        let _ = wr.write_all(&frame(RST_STREAM, 0, f.stream, &code)).await;
                        continue;
                    }
                    if matches!(refuses, Refuses::AboveGoaway) && conn == 0 && !was_first {
                        open.push(f.stream);
                        if open.len() < 2 {
                            continue;
                        }
                        let mut away = open[0].to_be_bytes().to_vec();
                        away.extend_from_slice(&0u32.to_be_bytes());
                        let _ = wr.write_all(&frame(GOAWAY, 0, 0, &away)).await;
                        served.lock().unwrap().push((conn, open[0]));
                        let _ = wr.write_all(&ok(open[0])).await;
                        continue;
                    }
                    served.lock().unwrap().push((conn, f.stream));
                    let _ = wr.write_all(&ok(f.stream)).await;
                }
            });
        }
    });
    (addr, served)
}

const H2_ROUTE: &str = "upstream_protocol = \"http2\"\n\
                        [route.circuit]\nfailure_threshold = 1\nopen_ms = 60000\n";

async fn circuit(proxy: &sluicegate::Running) -> serde_json::Value {
    let status = json(
        &get(&format!("http://{}/status", proxy.admin_addr()))
            .await
            .1,
    );
    status["routes"][0]["circuit"]["state"].clone()
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_elsewhere_and_never_blamed() {
    let (upstream, served) = raw_h2(Refuses::First).await;
    let proxy = sluicegate::start(config(upstream, "/", H2_ROUTE))
        .await
        .unwrap();
    let url = format!("http://{}/event", proxy.proxy_addr());
    let req = Request::post(&url).body(full("{}")).unwrap();
    assert_eq!(send(&client(), req).await.0.status(), StatusCode::OK);
    // Served on another connection than the one that refused it.
    assert_eq!(*served.lock().unwrap(), [(1, 1)]);
    assert_eq!(circuit(&proxy).await, "closed");
    proxy.shutdown().await;

    // An upstream refusing everything is saturated, not failing: 503 with
    // Retry-After, and the circuit stays closed.
    let (upstream, _) = raw_h2(Refuses::All).await;
    let proxy = sluicegate::start(config(upstream, "/", H2_ROUTE))
        .await
        .unwrap();
    let url = format!("http://{}/event", proxy.proxy_addr());
    for _ in 0..5 {
        let req = Request::post(&url).body(full("{}")).unwrap();
        let (res, _) = send(&client(), req).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().contains_key("retry-after"));
    }
    assert_eq!(circuit(&proxy).await, "closed");
    proxy.shutdown().await;
}

#[tokio::test]
async fn streams_above_a_graceful_goaway_are_sent_again() {
    let (upstream, served) = raw_h2(Refuses::AboveGoaway).await;
    let proxy = sluicegate::start(config(upstream, "/", H2_ROUTE))
        .await
        .unwrap();
    let url = format!("http://{}/event", proxy.proxy_addr());
    let post = || {
        let req = Request::post(&url).body(full("{}")).unwrap();
        async { send(&client(), req).await.0.status() }
    };
    // The connection is open and knows the upstream's SETTINGS.
    assert_eq!(post().await, StatusCode::OK);
    let (a, b) = tokio::join!(post(), post());
    assert_eq!((a, b), (StatusCode::OK, StatusCode::OK));
    let served = served.lock().unwrap().clone();
    // Streams 1 and 3 on the first connection; the one above the GOAWAY's
    // last id on a new connection, once.
    assert_eq!(served.len(), 3, "{served:?}");
    assert_eq!(
        served.iter().filter(|(conn, _)| *conn == 1).count(),
        1,
        "{served:?}"
    );
    assert_eq!(circuit(&proxy).await, "closed");
    proxy.shutdown().await;
}
