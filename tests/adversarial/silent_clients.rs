//! Clients that open connections and say nothing, or stop talking: a
//! silent socket, one that sends half a preface, an HTTP/2 client that
//! never opens a stream, a TLS client silent after its handshake, and an
//! HTTP/2 connection kept idle by answering PINGs. None may hold a
//! connection slot for longer than its bound.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluicegate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::support::process::scratch_dir;
use crate::support::tls::{Ca, connect, connector, write};
use crate::support::*;

/// Waits for the proxy to close `stream` (EOF or reset); how long it took.
async fn closed_by_proxy<S: tokio::io::AsyncRead + Unpin>(mut stream: S) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Err(_) => panic!("the proxy kept a silent connection open for 10 s"),
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            // The proxy's own SETTINGS, for an HTTP/2 client.
            Ok(Ok(_)) => {}
        }
    }
}

async fn closed_count(admin: SocketAddr, reason: &str) -> Option<f64> {
    let text = get(&format!("http://{admin}/metrics")).await.1;
    metric(
        &String::from_utf8_lossy(&text),
        &format!(r#"sluicegate_connections_closed_total{{reason="{reason}"}}"#),
    )
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

#[tokio::test]
async fn silent_connections_are_closed_and_cannot_hold_every_slot() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config_with(
        up.addr.unwrap(),
        "max_connections = 3\nheader_read_timeout_ms = 500",
        "",
    ))
    .await
    .unwrap();
    let addr = proxy.proxy_addr();
    // Every slot taken: one silent, one half a preface (stuck in protocol
    // detection), one HTTP/2 client that never opens a stream.
    let silent = TcpStream::connect(addr).await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(&PREFACE[..10]).await.unwrap();
    let mut h2 = TcpStream::connect(addr).await.unwrap();
    h2.write_all(PREFACE).await.unwrap();
    h2.write_all(EMPTY_SETTINGS).await.unwrap();
    // A real client waits in the backlog only until they are gone.
    let start = Instant::now();
    let (res, _) = timeout(Duration::from_secs(10), get(&format!("http://{addr}/x")))
        .await
        .expect("served once the silent connections are closed");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    for waited in [
        closed_by_proxy(silent).await,
        closed_by_proxy(half).await,
        closed_by_proxy(h2).await,
    ] {
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }
    assert_eq!(
        closed_count(proxy.admin_addr(), "first_request_timeout").await,
        Some(3.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_tls_client_silent_after_its_handshake_is_closed() {
    let (up, _) = spawn_upstream().await;
    let ca = Ca::new("test CA");
    let dir = scratch_dir("silent-tls");
    write(&dir, &ca.issue(&["localhost"]), &ca);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         header_read_timeout_ms = 500\n\
         [server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [[route]]\nupstream = \"http://{}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        up.addr.unwrap(),
    );
    let proxy = sluicegate::start(Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let tls = connect(
            &connector(&ca, &[alpn], None),
            proxy.proxy_addr(),
            "localhost",
        )
        .await
        .expect("handshake");
        let waited = closed_by_proxy(tls).await;
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }
    proxy.shutdown().await;
}

/// An HTTP/2 connection (hyper's client: it answers PINGs) with one
/// request done: `(sender, connection task)`.
async fn h2_connection(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<TestBody>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    (tx, tokio::spawn(conn))
}

async fn h2_get(
    tx: &mut hyper::client::conn::http2::SendRequest<TestBody>,
    addr: SocketAddr,
    path: &str,
) -> StatusCode {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(full(""))
        .unwrap();
    let res = tx.send_request(req).await.expect("answered");
    let status = res.status();
    res.into_body().collect().await.expect("whole body");
    status
}

#[tokio::test]
async fn an_idle_http2_connection_is_told_to_go_away() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config_with(
        up.addr.unwrap(),
        "http2_idle_timeout_ms = 300",
        "",
    ))
    .await
    .unwrap();
    let addr = proxy.proxy_addr();
    let (mut tx, conn) = h2_connection(addr).await;
    assert_eq!(h2_get(&mut tx, addr, "/x").await, StatusCode::OK);
    // Idle, PINGs answered every 100 ms: still closed by the proxy.
    let start = Instant::now();
    timeout(Duration::from_secs(5), conn)
        .await
        .expect("the proxy closed the idle connection")
        .unwrap()
        .expect("closed cleanly, by GOAWAY");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        closed_count(proxy.admin_addr(), "http2_idle").await,
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_http2_connection_with_a_stream_open_is_not_idle() {
    let (up, mut held) = spawn_upstream().await;
    let proxy = sluicegate::start(config_with(
        up.addr.unwrap(),
        "http2_idle_timeout_ms = 300",
        "",
    ))
    .await
    .unwrap();
    let addr = proxy.proxy_addr();
    let (mut tx, conn) = h2_connection(addr).await;
    let hold = tokio::spawn({
        let mut tx = tx.clone();
        async move { h2_get(&mut tx, addr, "/hold").await }
    });
    held.recv().await.unwrap();
    // Three idle timeouts with the stream open: the connection stays.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(!conn.is_finished());
    up.release.notify_waiters();
    assert_eq!(hold.await.unwrap(), StatusCode::OK);
    assert_eq!(h2_get(&mut tx, addr, "/x").await, StatusCode::OK);
    assert_eq!(
        closed_count(proxy.admin_addr(), "http2_idle").await,
        Some(0.0)
    );
    proxy.shutdown().await;
}
