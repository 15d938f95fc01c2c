//! Clients that keep the proxy waiting just inside every per-pause bound: a
//! body trickled a byte at a time, a probe held by its own slow upload, an
//! answer read a little at a time. Each is cut by a bound on the whole
//! (a minimum rate, a probe lease), not only on each pause.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use crate::support::*;

/// Sends a POST head declaring `len` bytes, then one byte every `every`
/// until the proxy answers or closes; returns the status line it got.
async fn trickle_post(addr: SocketAddr, len: usize, every: Duration) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /ingest HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    for _ in 0..len {
        let mut buf = [0u8; 1024];
        match timeout(every, conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {
                if conn.write_all(b"x").await.is_err() {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or("").to_string()
}

#[tokio::test]
async fn trickled_uploads_are_cut_at_the_minimum_rate_and_free_their_slots() {
    let (up, _) = spawn_upstream().await;
    // Each byte comes inside the 1 s pause bound, far below 100 bytes/s.
    let proxy = sluicegate::start(config_with(
        up.addr.unwrap(),
        "body_read_timeout_ms = 1000\nbody_min_bytes_per_s = 100",
        "[route.admission]\nmax_inflight = 2\nqueue_capacity = 0\n",
    ))
    .await
    .unwrap();
    let addr = proxy.proxy_addr();
    let start = Instant::now();
    let tricklers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(trickle_post(addr, 10_000, Duration::from_millis(800))))
        .collect();
    for t in tricklers {
        let line = timeout(Duration::from_secs(20), t)
            .await
            .expect("the trickle is cut, not held for ever")
            .unwrap();
        assert!(line.contains(" 408 "), "{line}");
    }
    // 1 s of grace and 10 ms per byte received.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let (res, _) = get(&format!("http://{addr}/x")).await;
    assert_eq!(res.status(), StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_probe_held_by_its_client_gives_the_circuit_to_another_probe() {
    let (up, _) = spawn_upstream().await;
    let route = "[route.circuit]\nfailure_threshold = 1\nopen_ms = 200\n\
                 success_threshold = 1\nmin_half_open_ms = 0\nprobe_timeout_ms = 500\n";
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", route))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    assert_eq!(get(&format!("{base}/status/500")).await.0.status(), 500);
    sleep(Duration::from_millis(300)).await;
    // The half-open probe: an upload trickled a byte a second (inside every
    // body bound), held by its client.
    let holder = tokio::spawn(trickle_post(proxy.proxy_addr(), 60, Duration::from_secs(1)));
    sleep(Duration::from_millis(200)).await;
    let (res, body) = get(&format!("{base}/x")).await;
    assert_eq!(res.status(), 503, "the probe slot is held for now");
    assert_eq!(json(&body)["reason"], "circuit_open");
    // Past the lease, the next request probes, succeeds and closes it.
    sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&format!("{base}/x")).await.0.status(), StatusCode::OK);
    let status = json(
        &get(&format!("http://{}/status", proxy.admin_addr()))
            .await
            .1,
    );
    assert_eq!(
        status["routes"][0]["circuit"]["state"], "closed",
        "{status}"
    );
    holder.abort();
    proxy.shutdown().await;
}

/// Reads a 1 GiB answer 256 KiB every 50 ms (about 5 MiB/s: every wait on
/// this reader ends well inside the 2 s `send_timeout_ms`, the kernel's
/// buffers drained in time); how long until the proxy gave up on it, by its
/// send-timeout count (`None`: not within `limit`).
async fn slow_read(proxy: &sluicegate::Running, limit: Duration) -> Option<Duration> {
    let mut conn = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
    conn.write_all(b"GET /big/1073741824 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let mut got = 0;
            while got < buf.len() {
                match conn.read(&mut buf[got..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
            sleep(Duration::from_millis(50)).await;
        }
    });
    let start = Instant::now();
    let metrics = format!("http://{}/metrics", proxy.admin_addr());
    let cut = loop {
        let text = get(&metrics).await.1;
        let cuts = metric(
            &String::from_utf8_lossy(&text),
            "sluicegate_send_timeout_total",
        );
        if cuts.is_some_and(|n| n >= 1.0) {
            break Some(start.elapsed());
        }
        if start.elapsed() > limit {
            break None;
        }
        sleep(Duration::from_millis(100)).await;
    };
    reader.abort();
    cut
}

#[tokio::test]
async fn a_slow_reader_is_cut_at_the_minimum_rate() {
    let (up, _) = spawn_upstream().await;
    let server = |rate: u64| format!("send_timeout_ms = 2000\nsend_min_bytes_per_s = {rate}");
    // Control: with no real minimum, this reader is never cut.
    let lax = sluicegate::start(config_with(up.addr.unwrap(), &server(1), ""))
        .await
        .unwrap();
    assert_eq!(slow_read(&lax, Duration::from_secs(4)).await, None);
    lax.shutdown().await;
    // Held to 64 MiB/s, the same reader is cut: its waits add up past the
    // grace and what its bytes earned.
    let strict = sluicegate::start(config_with(up.addr.unwrap(), &server(64 << 20), ""))
        .await
        .unwrap();
    let cut = slow_read(&strict, Duration::from_secs(20)).await;
    assert!(cut.is_some_and(|t| t < Duration::from_secs(10)), "{cut:?}");
    strict.shutdown().await;
}

#[tokio::test]
async fn an_http2_stream_its_client_stops_reading_is_reset_and_frees_its_slot() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config_with(
        up.addr.unwrap(),
        "send_timeout_ms = 500",
        "[route.admission]\nmax_inflight = 1\nqueue_capacity = 0\n",
    ))
    .await
    .unwrap();
    let addr = proxy.proxy_addr();
    // An HTTP/2 client asks for 32 MiB and never reads it: its connection
    // stays alive (hyper's client task reads the socket), only the stream's
    // window stays shut. Its writes never block; the stream just waits.
    let h2 = h2c_client();
    let req = http::Request::get(format!("http://{addr}/big/33554432"))
        .body(full(""))
        .unwrap();
    let stalled = h2.request(req).await.unwrap();
    assert_eq!(stalled.status(), StatusCode::OK);
    let (res, _) = get(&format!("http://{addr}/x")).await;
    assert_eq!(res.status(), 503, "the only slot is the stalled stream's");
    // Past send_timeout_ms the stream is reset: the slot is back.
    let start = Instant::now();
    let served = loop {
        let (res, _) = get(&format!("http://{addr}/x")).await;
        if res.status() == StatusCode::OK || start.elapsed() > Duration::from_secs(10) {
            break res.status();
        }
        sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(served, StatusCode::OK);
    let text = get(&format!("http://{}/metrics", proxy.admin_addr()))
        .await
        .1;
    assert_eq!(
        metric(
            &String::from_utf8_lossy(&text),
            "sluicegate_send_timeout_total"
        ),
        Some(1.0)
    );
    drop(stalled);
    proxy.shutdown().await;
}

#[tokio::test]
async fn bytes_sent_early_buy_no_lasting_credit() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config_with(
        up.addr.unwrap(),
        "body_read_timeout_ms = 1000\nbody_min_bytes_per_s = 500",
        "[route.admission]\nmax_inflight = 1\nqueue_capacity = 0\n",
    ))
    .await
    .unwrap();
    // 200 kB at once (worth 400 s at 500 B/s if it could be banked), then a
    // byte every 800 ms, inside every pause bound.
    let mut conn = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
    let head = "POST /ingest HTTP/1.1\r\nhost: x\r\ncontent-length: 300000\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&[b'x'; 200_000]).await.unwrap();
    let start = Instant::now();
    let mut answer = [0u8; 64];
    let line = loop {
        match timeout(Duration::from_millis(800), conn.read(&mut answer)).await {
            Ok(Ok(n)) => break String::from_utf8_lossy(&answer[..n]).to_string(),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {
                assert!(start.elapsed() < Duration::from_secs(20), "held for 20 s");
                conn.write_all(b"x").await.unwrap();
            }
        }
    };
    assert!(line.contains(" 408 "), "{line}");
    // About a second of credit once the early bytes' grace is spent.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    proxy.shutdown().await;
}
