//! Ambiguous requests, sent over raw TCP: each is refused with 400 and the
//! connection closed, and nothing reaches the upstream.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `raw`, then reads until the proxy closes the connection (bounded).
async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the proxy kept the connection open after {raw:?}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_requests_are_refused_with_400_and_the_connection_closed() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let cases: &[(&str, &[u8])] = &[
        (
            "two different Content-Length values",
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        ),
        (
            "Content-Length with a list",
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5, 6\r\n\r\nhello!",
        ),
        (
            "Transfer-Encoding not ending in chunked",
            b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\nhello",
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST /a HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "obs-fold in a header",
            b"GET /a HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\n\r\n",
        ),
        (
            "a space before the colon",
            b"GET /a HTTP/1.1\r\nhost: x\r\ncontent-length : 0\r\n\r\n",
        ),
        (
            "a bare CR in a header",
            b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: b\rc\r\n\r\n",
        ),
        (
            "Content-Length and Transfer-Encoding",
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding and Content-Length, the other order",
            b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "bare LF line ends",
            b"GET /a HTTP/1.1\nhost: x\n\n",
        ),
        (
            "a bare LF in one header line",
            b"GET /a HTTP/1.1\r\nhost: x\nx-b: c\r\n\r\n",
        ),
        (
            "a negative Content-Length",
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        ),
    ];
    for (what, raw) in cases {
        let answer = exchange(proxy.proxy_addr(), raw).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer:?}");
    }
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        0,
        "something reached the upstream"
    );
    // The guard counts its own refusals; obs-fold, the space before the
    // colon and the bare CR are hyper's own 400s.
    let (_, metrics) = get(&format!("http://{}/metrics", proxy.admin_addr())).await;
    let text = String::from_utf8_lossy(&metrics);
    assert_eq!(
        metric(&text, "sluicegate_framing_refused_total"),
        Some((cases.len() - 3) as f64),
        "{text}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_request_before_an_ambiguous_one_is_answered_then_the_connection_refused() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let raw = b"POST /first HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello\
                POST /second HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\
                transfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    let answer = exchange(proxy.proxy_addr(), raw).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let second = answer
        .find("HTTP/1.1 400")
        .expect("a 400 after the first answer");
    assert!(answer[second..].contains("connection: close"), "{answer:?}");
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        1,
        "only the first reached the upstream"
    );
    // Chunked and Content-Length bodies that contain what looks like a head
    // are bodies, not requests.
    let body = "GET /smuggled HTTP/1.1\r\ncontent-length: 0\r\n\r\n";
    let raw = format!(
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(proxy.proxy_addr(), raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer:?}");
    proxy.shutdown().await;
}

/// The guard bypasses found on main: after each, a Content-Length +
/// Transfer-Encoding head reached the upstream. Now every such head is
/// refused, whatever came before it on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_before_an_ambiguous_head_switches_the_guard_off() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let smuggled = "POST /smuggled HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\
                    transfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    let cases = [
        (
            "an Upgrade answered without a 101",
            format!("GET /a HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\r\n{smuggled}"),
            1,
        ),
        (
            "a CONNECT",
            format!("CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n{smuggled}"),
            0,
        ),
        // A length hyper reads as 5, as the guard now does (it once refused
        // any framing value over 1 KiB): `/a` is served, the smuggled head is
        // not.
        (
            "a Content-Length with 20 000 leading zeros",
            format!(
                "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: {}5\r\n\r\nhello{smuggled}",
                "0".repeat(20_000)
            ),
            1,
        ),
        (
            "a bare LF inside chunked trailers",
            format!(
                "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
                 0\r\nx-t: 1\n\nPOST /cover HTTP/1.1\r\ncontent-length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            1,
        ),
    ];
    for (what, raw, reached) in cases {
        let before = up.requests.load(Ordering::SeqCst);
        let answer = exchange(proxy.proxy_addr(), raw.as_bytes()).await;
        assert!(answer.contains("HTTP/1.1 400"), "{what}: {answer:?}");
        assert_eq!(
            up.requests.load(Ordering::SeqCst) - before,
            reached,
            "{what}: the smuggled head reached the upstream"
        );
    }
    proxy.shutdown().await;
}
