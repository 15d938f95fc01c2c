//! Ambiguous requests, sent over raw TCP: each is refused with 400 and the
//! connection closed, or — the one case RFC 9112 lets a server repair — made
//! unambiguous before anything reaches the upstream.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;
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
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_forwarded_chunked_only_and_the_connection_closed() {
    // RFC 9112 §6.1: Transfer-Encoding overrides Content-Length; the server
    // must drop Content-Length and close the connection after responding.
    // hyper does exactly that, so the upstream sees one unambiguous request
    // and nothing smuggled behind it can follow on this connection.
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let raw =
        b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
                5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    let answer = exchange(proxy.proxy_addr(), raw).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let echo = body.find('{').map(|i| {
        json(&bytes::Bytes::from(
            body[i..].trim_end_matches(|c: char| c != '}').to_string(),
        ))
    });
    let echo = echo.expect("an echo");
    assert!(echo["headers"].get("content-length").is_none(), "{echo}");
    assert_eq!(echo["path"], "/a");
    // "hello" arrived whole, once; the smuggled request never reached the upstream.
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
    assert!(!answer.contains("/smuggled"));
    proxy.shutdown().await;
}
