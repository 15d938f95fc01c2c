//! An upstream that accepts a connection and stops reading (a hung worker,
//! a body larger than the socket buffers), and a client that goes away
//! while its upload is stuck behind one: neither may hold a slot, the
//! circuit or the client for longer than a bound.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::support::*;

/// An upstream that accepts connections and never reads a byte of them.
async fn deaf_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

async fn status_of(admin: SocketAddr) -> serde_json::Value {
    json(&get(&format!("http://{admin}/status")).await.1)["routes"][0].clone()
}

async fn metrics_of(admin: SocketAddr) -> String {
    String::from_utf8_lossy(&get(&format!("http://{admin}/metrics")).await.1).into_owned()
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_stops_reading_the_body_is_cut_and_blamed() {
    let upstream = deaf_upstream().await;
    let route = "write_timeout_ms = 500\nconnect_timeout_ms = 500\n\
                 [route.admission]\nmax_inflight = 1\nqueue_capacity = 0\n\
                 [route.circuit]\nfailure_threshold = 1\nopen_ms = 60000\n";
    let proxy = sluicegate::start(config(upstream, "/", route))
        .await
        .unwrap();
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    // 32 MiB: far more than the socket buffers between here and the upstream.
    let (body, _) = streamed(32 << 20, 64 << 10);
    let start = Instant::now();
    let req = Request::post(&url).body(body).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("the proxy answers: the upload cannot hang for ever")
        .expect("a response");
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // The slot is back, and the stall was the upstream's: the circuit opened.
    let route = status_of(proxy.admin_addr()).await;
    assert_eq!(route["admission"]["inflight"], 0, "{route}");
    assert_eq!(route["circuit"]["state"], "open", "{route}");
    proxy.shutdown().await;
}

// On the real clock: a paused one would jump past the write timeout while
// the client's writes wait on the socket.
#[tokio::test]
async fn a_client_that_leaves_during_a_stuck_upload_frees_its_slot_at_once() {
    let upstream = deaf_upstream().await;
    // The write timeout is far away: only noticing the client frees the slot.
    let route = "write_timeout_ms = 600000\nmax_body_bytes = 67108864\n\
                 [route.admission]\nmax_inflight = 1\nqueue_capacity = 0\n\
                 [route.circuit]\nfailure_threshold = 1\n";
    let proxy = sluicegate::start(config(upstream, "/", route))
        .await
        .unwrap();
    let mut conn = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
    let total = 32usize << 20;
    let head = format!("POST /ingest HTTP/1.1\r\nhost: x\r\ncontent-length: {total}\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    // Write until the proxy stops taking bytes (the upstream holds the upload).
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0;
    while sent < total
        && tokio::time::timeout(Duration::from_millis(200), conn.write_all(&chunk))
            .await
            .is_ok()
    {
        sent += chunk.len();
    }
    assert!(
        sent < total,
        "the upload should be stuck behind the upstream"
    );
    let route = status_of(proxy.admin_addr()).await;
    assert_eq!(route["admission"]["inflight"], 1, "{route}");
    // Gone with a reset: the client's unsent bytes will never arrive.
    conn.set_zero_linger().unwrap();
    drop(conn);
    let left = Instant::now();
    let route = loop {
        let route = status_of(proxy.admin_addr()).await;
        if route["admission"]["inflight"] == 0 || left.elapsed() > Duration::from_secs(10) {
            break route;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(route["admission"]["inflight"], 0, "{route}");
    // The client's doing: the circuit learned nothing.
    assert_eq!(route["circuit"]["state"], "closed", "{route}");
    let metrics = metrics_of(proxy.admin_addr()).await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluicegate_requests_total{route="test",outcome="client_closed"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    proxy.shutdown().await;
}

/// An upstream with a body timeout of its own (uWSGI's `socket-timeout`,
/// gunicorn's worker timeout) that closes the connection when the body
/// pauses for half a second.
async fn impatient_upstream() -> SocketAddr {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await
                {
                    if n == 0 {
                        return;
                    }
                }
                // Gave up on the client's pace: closed without an answer.
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_that_gives_up_on_a_paused_upload_is_not_blamed() {
    use tokio::io::AsyncReadExt;
    let upstream = impatient_upstream().await;
    let route = "[route.circuit]\nfailure_threshold = 1\nopen_ms = 60000\n";
    let proxy = sluicegate::start(config_with(upstream, "body_read_timeout_ms = 5000", route))
        .await
        .unwrap();
    for _ in 0..3 {
        let mut conn = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
        let head = "POST /ingest HTTP/1.1\r\nhost: x\r\ncontent-length: 20\r\n\r\n0123456789";
        conn.write_all(head.as_bytes()).await.unwrap();
        // Paused inside the proxy's own bounds, past the upstream's.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _ = conn.write_all(b"0123456789").await;
        let mut answer = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        let line = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(line.starts_with("HTTP/1.1 408"), "{line}");
    }
    // The client's pace, not the upstream's failure: the circuit is closed.
    let route = status_of(proxy.admin_addr()).await;
    assert_eq!(route["circuit"]["state"], "closed", "{route}");
    proxy.shutdown().await;
}
