//! The proxy in process, a real upstream on loopback, HTTP between them.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;
use http::{Request, StatusCode};

fn url(running: &sluicegate::Running, path: &str) -> String {
    format!("http://{}{path}", running.proxy_addr())
}

fn admin(running: &sluicegate::Running, path: &str) -> String {
    format!("http://{}{path}", running.admin_addr())
}

#[tokio::test]
async fn get_and_post_are_forwarded_intact() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();

    let req = Request::get(url(&proxy, "/ingest/a?x=1&y=%20"))
        .header("x-custom", "v1")
        .header("x-custom", "v2")
        .header("authorization", "Bearer t")
        .body(full(""))
        .unwrap();
    let (res, body) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-upstream"], "echo");
    assert_eq!(res.headers()["content-type"], "application/json");
    let echo = json(&body);
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/ingest/a?x=1&y=%20");
    assert_eq!(echo["headers"]["x-custom"], serde_json::json!(["v1", "v2"]));
    assert_eq!(echo["headers"]["authorization"][0], "Bearer t");

    let payload = b"{\"event\":42}".to_vec();
    let mut sum = Checksum::new();
    sum.update(&payload);
    let req = Request::post(url(&proxy, "/ingest"))
        .header("content-type", "application/json")
        .body(full(payload))
        .unwrap();
    let (res, body) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::OK);
    let echo = json(&body);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], sum.hex());
    assert_eq!(echo["headers"]["content-length"][0], "12");

    // Upstream statuses pass through untouched.
    let (res, body) = get(&url(&proxy, "/status/418")).await;
    assert_eq!(res.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(&body[..], b"status");
    proxy.shutdown().await;
}

#[tokio::test]
async fn streamed_upload_arrives_byte_identical() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", "max_body_bytes = 30000000"))
        .await
        .unwrap();
    let (body, sum) = streamed(5 * 1024 * 1024 + 7, 64 * 1024);
    let req = Request::post(url(&proxy, "/upload")).body(body).unwrap();
    let (res, body) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(json(&body)["body"], sum);
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_set() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let req = Request::get(url(&proxy, "/h"))
        .header("host", "api.example.com")
        .header("connection", "x-client-hop")
        .header("x-client-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("trailer", "x-sum")
        .header("upgrade", "websocket")
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "203.0.113.9")
        .header("via", "1.1 edge")
        .body(full(""))
        .unwrap();
    let (res, body) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::OK);
    let seen = &json(&body)["headers"];
    for hop in [
        "x-client-hop",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
    ] {
        assert!(
            seen.get(hop).is_none(),
            "{hop} reached the upstream: {seen}"
        );
    }
    // hyper's client adds its own `connection` only when closing; ours never passes.
    assert!(
        seen.get("connection")
            .is_none_or(|v| v[0] != "x-client-hop"),
        "{seen}"
    );
    assert_eq!(seen["host"][0], "api.example.com");
    assert_eq!(seen["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"][0], "http");
    assert_eq!(seen["x-forwarded-host"][0], "api.example.com");
    assert_eq!(seen["via"][0], "1.1 edge, 1.1 sluicegate");

    // And the upstream's own hop-by-hop headers do not reach the client.
    assert!(res.headers().get("x-upstream-hop").is_none());
    assert!(res.headers().get("keep-alive").is_none());
    assert_eq!(res.headers()["via"], "1.1 sluicegate");
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let req = Request::post(url(&proxy, "/h2"))
        .body(full("over h2"))
        .unwrap();
    let (res, body) = send(&h2c_client(), req).await;
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), StatusCode::OK);
    let echo = json(&body);
    assert_eq!(echo["method"], "POST");
    // The :authority became the Host the upstream sees.
    assert_eq!(echo["headers"]["host"][0], proxy.proxy_addr().to_string());
    assert_eq!(echo["headers"]["via"][0], "2 sluicegate");
    proxy.shutdown().await;
}

#[tokio::test]
async fn unmatched_path_gets_404_json() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/api", ""))
        .await
        .unwrap();
    let (res, body) = get(&url(&proxy, "/other")).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(json(&body)["reason"], "no_route");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    let (_, metrics) = get(&admin(&proxy, "/metrics")).await;
    let text = String::from_utf8_lossy(&metrics);
    assert_eq!(
        metric(&text, "sluicegate_unmatched_requests_total"),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn declared_body_over_the_limit_gets_413_without_an_upstream_call() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", "max_body_bytes = 1000"))
        .await
        .unwrap();
    let req = Request::post(url(&proxy, "/ingest"))
        .body(full(vec![b'x'; 1001]))
        .unwrap();
    let (res, body) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json(&body)["reason"], "body_too_large");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);

    // At the limit is fine.
    let req = Request::post(url(&proxy, "/ingest"))
        .body(full(vec![b'x'; 1000]))
        .unwrap();
    assert_eq!(send(&client(), req).await.0.status(), StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn streamed_body_over_the_limit_is_cut_off_with_413() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", "max_body_bytes = 100000"))
        .await
        .unwrap();
    let (body, _) = streamed(1024 * 1024, 16 * 1024);
    let req = Request::post(url(&proxy, "/ingest")).body(body).unwrap();
    let res = client().request(req).await;
    // The proxy answers 413 as soon as the limit passes; it may close the
    // connection while the client is still sending, which a client may see as
    // an error on its side of the write.
    if let Ok(res) = res {
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    let (_, metrics) = get(&admin(&proxy, "/metrics")).await;
    let text = String::from_utf8_lossy(&metrics);
    assert_eq!(
        metric(
            &text,
            r#"sluicegate_requests_total{route="test",outcome="body_too_large"}"#
        ),
        Some(1.0),
        "{text}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn unreachable_upstream_gets_502_without_internals() {
    // A port that was free a moment ago and has no listener now.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = sluicegate::start(config(closed, "/", "")).await.unwrap();
    let (res, body) = get(&url(&proxy, "/x")).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(res.headers()["content-type"], "application/json");
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains(&closed.port().to_string()), "{text}");
    assert!(!text.contains("127.0.0.1"), "{text}");
    assert_eq!(json(&body)["reason"], "upstream_unavailable");
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn upstream_silent_past_timeout_gets_504() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", "timeout_ms = 30000"))
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let (res, body) = get(&url(&proxy, "/hang")).await;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json(&body)["reason"], "upstream_timeout");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "{waited:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn metrics_count_what_was_sent() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", "max_body_bytes = 10"))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(get(&url(&proxy, "/ok")).await.0.status(), StatusCode::OK);
    }
    assert_eq!(
        get(&url(&proxy, "/status/503")).await.0.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let big = Request::post(url(&proxy, "/x"))
        .body(full(vec![0u8; 11]))
        .unwrap();
    assert_eq!(
        send(&client(), big).await.0.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );

    let (res, body) = get(&admin(&proxy, "/metrics")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    let count = |outcome: &str| {
        metric(
            &text,
            &format!(r#"sluicegate_requests_total{{route="test",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(count("2xx"), Some(3.0), "{text}");
    assert_eq!(count("5xx"), Some(1.0), "{text}");
    assert_eq!(count("body_too_large"), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, r#"sluicegate_inflight{route="test"}"#),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"sluicegate_upstream_duration_seconds_count{route="test"}"#
        ),
        Some(4.0),
        "{text}"
    );

    let (_, status) = get(&admin(&proxy, "/status")).await;
    let status = json(&status);
    assert_eq!(status["routes"][0]["name"], "test");
    assert_eq!(status["routes"][0]["requests"]["2xx"], 3);
    assert_eq!(status["routes"][0]["admission"]["inflight"], 0);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn inflight_counts_until_the_response_is_answered() {
    let (up, mut held) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let target = url(&proxy, "/hold");
    let pending = tokio::spawn(async move { get(&target).await });
    held.recv().await.unwrap();
    let (_, status) = get(&admin(&proxy, "/status")).await;
    assert_eq!(json(&status)["routes"][0]["admission"]["inflight"], 1);
    up.release.notify_waiters();
    assert_eq!(pending.await.unwrap().0.status(), StatusCode::OK);
    let (_, status) = get(&admin(&proxy, "/status")).await;
    assert_eq!(json(&status)["routes"][0]["admission"]["inflight"], 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_id_is_kept_or_generated() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let (res, body) = get(&url(&proxy, "/id")).await;
    let generated = res.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!generated.is_empty());
    assert_eq!(json(&body)["headers"]["x-request-id"][0], generated);

    let req = Request::get(url(&proxy, "/id"))
        .header("x-request-id", "client-chosen-1")
        .body(full(""))
        .unwrap();
    let (res, body) = send(&client(), req).await;
    assert_eq!(res.headers()["x-request-id"], "client-chosen-1");
    assert_eq!(json(&body)["headers"]["x-request-id"][0], "client-chosen-1");
    proxy.shutdown().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    assert_eq!(
        get(&admin(&proxy, "/healthz")).await.0.status(),
        StatusCode::OK
    );
    let (res, body) = get(&admin(&proxy, "/readyz")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(json(&body)["status"], "ready");
    proxy.shutdown().await;
}

#[tokio::test]
async fn drain_lets_the_request_in_flight_finish_and_refuses_new_connections() {
    let (up, mut held) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let proxy_addr = proxy.proxy_addr();
    let admin_url = admin(&proxy, "/readyz");
    let target = url(&proxy, "/hold");
    let pending = tokio::spawn(async move { get(&target).await });
    held.recv().await.unwrap();

    let shutdown = tokio::spawn(proxy.shutdown());
    // Readiness flips before the drain ends (the request is still held).
    let mut tries = 0;
    while get(&admin_url).await.0.status() != StatusCode::SERVICE_UNAVAILABLE {
        tries += 1;
        assert!(tries < 10_000, "/readyz never turned 503");
        tokio::task::yield_now().await;
    }
    assert!(tokio::net::TcpStream::connect(proxy_addr).await.is_err());
    up.release.notify_waiters();
    let (res, body) = pending.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(&body[..], b"released");
    assert_eq!(
        shutdown.await.unwrap(),
        sluicegate::server::DrainReport::Drained
    );
}

#[tokio::test(start_paused = true)]
async fn connection_cap_pauses_accepting_until_a_connection_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, _) = spawn_upstream().await;
    let mut config = config(up.addr.unwrap(), "/", "");
    config.server.max_connections = sluicegate::config::Limit::new(2);
    let proxy = sluicegate::start(config).await.unwrap();
    let addr = proxy.proxy_addr();
    let request = b"GET /cap HTTP/1.1\r\nhost: t\r\n\r\n";

    // Two connections fill the cap; each is served.
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    for conn in [&mut first, &mut second] {
        conn.write_all(request).await.unwrap();
        let mut buf = [0u8; 12];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
    }
    // A third waits in the backlog: no answer, however long it waits.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut buf = [0u8; 12];
    let waited = tokio::time::timeout(Duration::from_secs(5), third.read_exact(&mut buf)).await;
    assert!(
        waited.is_err(),
        "the third connection was served past the cap"
    );
    // When one closes, the third is accepted and answered.
    drop(first);
    third.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    drop((second, third));
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn slow_headers_are_cut_off_at_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let mut conn = tokio::net::TcpStream::connect(proxy.proxy_addr())
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    conn.write_all(b"GET /slow HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    // The headers never finish; the proxy closes the connection (408 or EOF).
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest).await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "closed after {waited:?}"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_admin_listener_serves_a_live_dashboard() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", ""))
        .await
        .unwrap();
    let (res, body) = get(&format!("http://{}/", proxy.admin_addr())).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = String::from_utf8_lossy(&body);
    // It renders what /status and /status/history say, polling them, with the
    // embedded chart library.
    assert!(page.contains("getJson(\"/status\")"), "{page}");
    assert!(page.contains("getJson(\"/status/history\")"), "{page}");
    for field in [
        "inflight",
        "queue_capacity",
        "shed_queue_full",
        "circuit",
        "rate_limit",
    ] {
        assert!(page.contains(field), "the page does not show {field}");
    }
    for (asset, kind) in [
        ("uplot-1.6.32.min.js", "text/javascript"),
        ("uplot-1.6.32.min.css", "text/css"),
    ] {
        assert!(page.contains(&format!("/assets/{asset}")), "{asset}");
        let (res, _) = get(&format!("http://{}/assets/{asset}", proxy.admin_addr())).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind)
        );
    }
    let (res, _) = get(&format!("http://{}/assets/nope.js", proxy.admin_addr())).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);

    // One sample a second: past the first (the baseline), a request, three
    // seconds, and the history has it.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (res, _) = get(&format!("http://{}/x", proxy.proxy_addr())).await;
    assert_eq!(res.status(), StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let (_, body) = get(&format!("http://{}/status/history", proxy.admin_addr())).await;
    let doc = json(&body);
    let route = &doc["routes"][0];
    assert_eq!(route["name"], "test");
    let t = route["t"].as_array().unwrap();
    assert!(t.len() >= 2, "{doc}");
    let offered: u64 = route["offered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(offered, 1, "{doc}");
    assert_eq!(doc["capacity"], 300);
    proxy.shutdown().await;
}
