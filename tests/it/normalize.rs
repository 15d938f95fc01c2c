//! One host and one path per request: the route and the upstream read a
//! request the same way, whatever the client writes. Raw TCP, real proxy,
//! two real upstreams on 127.0.0.1 to tell the routes apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::support::*;
use sluicegate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A proxy where `root` takes `/`, `ingest` takes `/ingest` (for any host)
/// and `eu` takes `/ingest` for host `eu.example`; the two upstreams, and it.
async fn two_routes() -> (Arc<Upstream>, Arc<Upstream>, sluicegate::Running) {
    let (root, _) = spawn_upstream().await;
    let (ingest, _) = spawn_upstream().await;
    let config = routes(root.addr.unwrap(), ingest.addr.unwrap());
    (root, ingest, sluicegate::start(config).await.unwrap())
}

fn routes(root: SocketAddr, ingest: SocketAddr) -> Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[[route]]
name = "root"
path_prefix = "/"
upstream = "http://{root}"

[[route]]
name = "ingest"
path_prefix = "/ingest"
upstream = "http://{ingest}"

[[route]]
name = "eu"
path_prefix = "/ingest"
host = "eu.example"
upstream = "http://{ingest}"
"#
    );
    Config::parse("test.toml", &text).unwrap()
}

/// Sends one request with `connection: close`; the status line and the body.
async fn raw(proxy: SocketAddr, head: &str) -> (String, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[tokio::test]
async fn dot_segments_and_escapes_cannot_reach_another_route() {
    let (root, ingest, proxy) = two_routes().await;
    let addr = proxy.proxy_addr();
    for target in [
        "/public/../ingest/logs",
        "/public/%2e%2e/ingest/logs",
        "/public/.%2E/ingest/logs",
        "//ingest//logs",
        "/ingest/./logs",
        "/%69ngest/logs",
    ] {
        let before = ingest.requests.load(Ordering::SeqCst);
        let (status, body) = raw(addr, &format!("GET {target} HTTP/1.1\r\nhost: a\r\n")).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{target}: {status}");
        assert_eq!(
            ingest.requests.load(Ordering::SeqCst),
            before + 1,
            "{target} was not served by /ingest"
        );
        // The upstream gets the path the route matched.
        assert_eq!(json(&body.into())["path"], "/ingest/logs", "{target}");
    }
    for target in ["/../ingest", "/%2e%2e/ingest", "/a/../../ingest"] {
        let (status, body) = raw(addr, &format!("GET {target} HTTP/1.1\r\nhost: a\r\n")).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{target}: {status}");
        assert!(body.contains(r#""reason":"bad_request""#), "{body}");
    }
    assert_eq!(root.requests.load(Ordering::SeqCst), 0, "/ served one");
    let status = json(
        &get(&format!("http://{}/status", proxy.admin_addr()))
            .await
            .1,
    );
    assert_eq!(status["invalid_requests"], 3);
    proxy.shutdown().await;
}

#[tokio::test]
async fn one_host_decides_the_route_and_reaches_the_upstream() {
    let (root, ingest, proxy) = two_routes().await;
    let addr = proxy.proxy_addr();
    // Absolute form: its authority wins over Host, for routing and upstream.
    let (status, body) = raw(
        addr,
        "GET http://eu.example/ingest/x HTTP/1.1\r\nhost: us.example\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let echo = json(&body.into());
    assert_eq!(echo["headers"]["host"][0], "eu.example");
    assert_eq!(echo["headers"]["x-forwarded-host"][0], "eu.example");
    assert_eq!(echo["path"], "/ingest/x");
    let routes = json(
        &get(&format!("http://{}/status", proxy.admin_addr()))
            .await
            .1,
    );
    let eu = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "eu")
        .unwrap()
        .clone();
    assert_eq!(eu["requests"]["2xx"], 1, "{eu}");

    // `Connection: host` cannot take Host away from the upstream.
    let (status, body) = raw(
        addr,
        "GET /ingest/x HTTP/1.1\r\nhost: api.example\r\nconnection: host\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(json(&body.into())["headers"]["host"][0], "api.example");

    // No one valid Host: 400, nothing forwarded.
    let before = ingest.requests.load(Ordering::SeqCst) + root.requests.load(Ordering::SeqCst);
    for head in [
        "GET /ingest HTTP/1.1\r\n",
        "GET /ingest HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\n",
        "GET /ingest HTTP/1.1\r\nhost: a b\r\n",
        "GET /ingest HTTP/1.1\r\nhost: user@a.example\r\n",
    ] {
        let (status, _) = raw(addr, head).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{head:?}: {status}");
    }
    let after = ingest.requests.load(Ordering::SeqCst) + root.requests.load(Ordering::SeqCst);
    assert_eq!(after, before, "an invalid request was forwarded");
    // HTTP/1.0 needs no Host.
    let (status, _) = raw(addr, "GET /ingest HTTP/1.0\r\n").await;
    assert!(status.starts_with("HTTP/1.0 200"), "{status}");
    proxy.shutdown().await;
}
