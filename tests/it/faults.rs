//! Upstream faults through the real proxy: an upstream that resets, closes
//! mid-body, hangs after its headers, or answers garbage. The client gets a
//! 502/504 (or a cut-off body once headers were sent), and every slot the
//! request took is released: in-flight and queue depth return to 0.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw TCP upstream misbehaving by path.
async fn faulty_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(misbehave(stream));
        }
    });
    addr
}

async fn misbehave(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    match path.as_str() {
        "/reset" => {
            // Linger 0: close with a TCP reset.
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        "/garbage" => {
            let _ = stream.write_all(b"this is not HTTP\r\n\r\n").await;
        }
        "/cut" => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
                .await;
        }
        "/stall" => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst part")
                .await;
            std::future::pending::<()>().await;
        }
        _ => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    }
}

const LIMITS: &str = "timeout_ms = 2000\nread_timeout_ms = 1000\n\
                      [route.admission]\nmax_inflight = 2\nqueue_capacity = 4\n";

/// GET `url`: the status, and whether reading the body failed (cut off).
async fn get_body_outcome(url: &str) -> (StatusCode, bool) {
    let req = http::Request::get(url).body(full("")).unwrap();
    let res = client().request(req).await.unwrap();
    let status = res.status();
    (status, res.into_body().collect().await.is_err())
}

async fn gauges(admin: SocketAddr) -> (f64, f64) {
    let text = get(&format!("http://{admin}/metrics")).await.1;
    let text = String::from_utf8_lossy(&text);
    (
        metric(&text, "sluicegate_inflight{route=\"test\"}").unwrap(),
        metric(&text, "sluicegate_queue_depth{route=\"test\"}").unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn every_fault_gets_an_answer_and_frees_its_slot() {
    let upstream = faulty_upstream().await;
    let proxy = sluicegate::start(config(upstream, "/", LIMITS))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    for (path, status) in [
        ("/reset", StatusCode::BAD_GATEWAY),
        ("/garbage", StatusCode::BAD_GATEWAY),
    ] {
        for _ in 0..5 {
            let (res, body) = get(&format!("{base}{path}")).await;
            assert_eq!(res.status(), status, "{path}");
            assert_eq!(json(&body)["reason"], "upstream_unavailable", "{path}");
        }
    }
    // Headers sent, then the upstream dies or stalls: the client sees a body
    // cut short (an error reading it), never a hang.
    for path in ["/cut", "/stall"] {
        for _ in 0..3 {
            let start = tokio::time::Instant::now();
            let (status, cut) = get_body_outcome(&format!("{base}{path}")).await;
            assert_eq!(status, StatusCode::OK);
            assert!(cut, "{path}: the body should be cut off");
            if path == "/stall" {
                // Cut by read_timeout_ms, not by anything else.
                assert_eq!(start.elapsed(), Duration::from_secs(1));
            }
        }
    }
    assert_eq!(gauges(proxy.admin_addr()).await, (0.0, 0.0));
    // And the route still works.
    let (res, _) = get(&format!("{base}/fine")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(gauges(proxy.admin_addr()).await, (0.0, 0.0));
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_body_cut_after_good_headers_counts_against_the_circuit() {
    let upstream = faulty_upstream().await;
    let route = "read_timeout_ms = 1000\n[route.circuit]\nfailure_threshold = 2\n";
    let proxy = sluicegate::start(config(upstream, "/", route))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    for path in ["/cut", "/stall"] {
        let (status, cut) = get_body_outcome(&format!("{base}{path}")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(cut);
    }
    let (res, body) = get(&format!("{base}/fine")).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["reason"], "circuit_open");
    proxy.shutdown().await;
}
