//! The upstream keep-alive pool against application servers that close idle
//! connections (Node's keepAliveTimeout, gunicorn's keepalive): no request is
//! lost to the race with the server closing the connection it was about to
//! reuse. Paused clock; a raw upstream that loses the race on purpose.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::support::*;
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream saw.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    answered: AtomicU64,
    /// Requests that arrived on a connection the server had decided to close.
    dropped: AtomicU64,
}

/// A keep-alive HTTP/1.1 server that answers `200 ok` and, once a connection
/// has been idle for `idle`, closes it the moment the next request arrives,
/// unread (a reset): the race an idle-closing server can lose, lost every time.
/// `first_only`: closes every connection on its first request instead.
async fn closing_upstream(idle: Duration, first_only: bool) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            s.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, idle, first_only, s.clone()));
        }
    });
    (addr, seen)
}

async fn serve(mut stream: TcpStream, idle: Duration, first_only: bool, seen: Arc<Seen>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut idle_since = tokio::time::Instant::now();
    loop {
        // Wait for the next request (or the proxy closing its end).
        match stream.peek(&mut chunk[..1]).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        if first_only || idle_since.elapsed() >= idle {
            // Too late: the server closes without reading what arrived.
            seen.dropped.fetch_add(1, Ordering::SeqCst);
            let _ = stream.set_zero_linger();
            return;
        }
        // A request: its head, then its Content-Length body.
        let body_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + length {
                    break end + 4 + length;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        buf.drain(..body_end);
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if stream.write_all(answer).await.is_err() {
            return;
        }
        seen.answered.fetch_add(1, Ordering::SeqCst);
        idle_since = tokio::time::Instant::now();
    }
}

/// GETs and POSTs with a body, `every` apart; their statuses. The POSTs
/// carry an `Idempotency-Key`: only requests that may run twice are sent
/// again after losing the race (`tests/adversarial/retries.rs` shows a POST
/// without one is not).
async fn traffic(proxy: SocketAddr, every: Duration, n: usize) -> Vec<StatusCode> {
    let mut statuses = Vec::new();
    for i in 0..n {
        let url = format!("http://{proxy}/ingest");
        let req = if i % 2 == 0 {
            Request::get(url).body(full("")).unwrap()
        } else {
            Request::post(url)
                .header("idempotency-key", format!("batch-{i}"))
                .body(full(vec![b'e'; 10_000]))
                .unwrap()
        };
        statuses.push(send(&client(), req).await.0.status());
        tokio::time::sleep(every).await;
    }
    statuses
}

#[tokio::test(start_paused = true)]
async fn the_pool_closes_idle_connections_before_the_server_does() {
    // gunicorn's default: 2 s. Requests every 2.5 s: the server would drop a
    // reused connection every time; the pool's 1 s default never offers one.
    let (upstream, seen) = closing_upstream(Duration::from_secs(2), false).await;
    let proxy = sluicegate::start(config(upstream, "/", "")).await.unwrap();
    let statuses = traffic(proxy.proxy_addr(), Duration::from_millis(2500), 10).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(seen.dropped.load(Ordering::SeqCst), 0);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_that_loses_the_race_is_sent_again_once() {
    // An upstream that closes after 1 s, a pool kept longer (misconfigured, or
    // an upstream shorter than any default): every reuse loses the race.
    let (upstream, seen) = closing_upstream(Duration::from_secs(1), false).await;
    let config = config(upstream, "/", "pool_idle_timeout_ms = 10000\n");
    let proxy = sluicegate::start(config).await.unwrap();
    let statuses = traffic(proxy.proxy_addr(), Duration::from_millis(1500), 10).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(seen.answered.load(Ordering::SeqCst), 10);
    assert_eq!(
        seen.dropped.load(Ordering::SeqCst),
        9,
        "the race was not lost"
    );
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_fresh_connection_closed_unanswered_is_not_retried() {
    // Closed before answering on a connection that served nothing before:
    // that is the upstream failing, not an idle close. 502, sent once.
    let (upstream, seen) = closing_upstream(Duration::from_secs(1), true).await;
    let proxy = sluicegate::start(config(upstream, "/", "")).await.unwrap();
    let statuses = traffic(proxy.proxy_addr(), Duration::from_millis(10), 2).await;
    assert_eq!(statuses, [StatusCode::BAD_GATEWAY, StatusCode::BAD_GATEWAY]);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;
}
