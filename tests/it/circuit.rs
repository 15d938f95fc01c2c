//! The circuit breaker through the real proxy, over HTTP, against the upstream
//! simulator switched to failing and back (paused clock: open durations and
//! half-open times are advanced, not slept).

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use http::StatusCode;
use sluicegate::sim::{self, Mode, SimHandle, SimOptions};
use tokio::time::advance;

const CIRCUIT: &str = "[route.circuit]\nfailure_threshold = 3\nopen_ms = 5000\n\
     max_open_ms = 60000\nhalf_open_max_probes = 1\nsuccess_threshold = 2\n\
     min_half_open_ms = 1000\n";

async fn simulator() -> SimHandle {
    let options = SimOptions {
        workers: 4,
        service_time: Duration::from_millis(1),
    };
    sim::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .unwrap()
}

async fn status(url: &str) -> (StatusCode, Option<u64>, serde_json::Value) {
    let (res, body) = get(url).await;
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = serde_json::from_slice(&body).unwrap_or_default();
    (res.status(), retry_after, body)
}

#[tokio::test(start_paused = true)]
async fn opens_refuses_without_the_upstream_probes_and_closes() {
    let sim = simulator().await;
    let proxy = sluicegate::start(config(sim.addr(), "/", CIRCUIT))
        .await
        .unwrap();
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    let admin = format!("http://{}", proxy.admin_addr());
    let circuit = |s: serde_json::Value| s["routes"][0]["circuit"].clone();

    assert_eq!(status(&url).await.0, StatusCode::OK);
    sim.set_mode(Mode::Fail);
    for _ in 0..3 {
        // Failures pass through to the client as the upstream sent them.
        assert_eq!(status(&url).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let reached = sim.stats().received;
    assert_eq!(reached, 4);

    // Open: 503 circuit_open at once, Retry-After = time to half-open (+0..20 %).
    for _ in 0..10 {
        let (code, retry_after, body) = status(&url).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reason"], "circuit_open");
        assert!((5..=6).contains(&retry_after.unwrap()), "{retry_after:?}");
    }
    assert_eq!(
        sim.stats().received,
        reached,
        "an open circuit called upstream"
    );
    let s = status(&format!("{admin}/status")).await.2;
    assert_eq!(circuit(s.clone())["state"], "open");
    assert_eq!(circuit(s)["cause"], "3 consecutive failures");

    // Half-open with the upstream still failing: the probe fails, the circuit
    // re-opens for twice as long.
    advance(Duration::from_secs(5)).await;
    assert_eq!(status(&url).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    let (code, retry_after, _) = status(&url).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!((10..=12).contains(&retry_after.unwrap()), "{retry_after:?}");

    // Recovered: two probe successes, but closed only after min_half_open.
    sim.set_mode(Mode::Ok);
    advance(Duration::from_secs(10)).await;
    assert_eq!(status(&url).await.0, StatusCode::OK);
    assert_eq!(status(&url).await.0, StatusCode::OK);
    let s = status(&format!("{admin}/status")).await.2;
    assert_eq!(circuit(s)["state"], "half_open");
    advance(Duration::from_secs(1)).await;
    assert_eq!(status(&url).await.0, StatusCode::OK);
    let s = status(&format!("{admin}/status")).await.2;
    assert_eq!(circuit(s.clone())["state"], "closed");
    assert_eq!(circuit(s)["cause"], "2 consecutive probe successes");

    let metrics = get(&format!("{admin}/metrics")).await.1;
    let metrics = String::from_utf8_lossy(&metrics);
    let series = |from: &str, to: &str| {
        format!(
            "sluicegate_circuit_transitions_total{{route=\"test\",from=\"{from}\",to=\"{to}\"}}"
        )
    };
    assert_eq!(metric(&metrics, &series("closed", "open")), Some(1.0));
    assert_eq!(metric(&metrics, &series("open", "half_open")), Some(2.0));
    assert_eq!(metric(&metrics, &series("half_open", "open")), Some(1.0));
    assert_eq!(metric(&metrics, &series("half_open", "closed")), Some(1.0));
    assert_eq!(
        metric(&metrics, "sluicegate_circuit_state{route=\"test\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "sluicegate_requests_total{route=\"test\",outcome=\"circuit_open\"}"
        ),
        Some(11.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_one_probe_through_and_refuses_the_rest_at_once() {
    let (up, mut held) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", CIRCUIT))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    for _ in 0..3 {
        assert_eq!(
            status(&format!("{base}/status/502")).await.0,
            StatusCode::BAD_GATEWAY
        );
    }
    advance(Duration::from_secs(5)).await;
    let hold = format!("{base}/hold");
    let probe = tokio::spawn(async move { status(&hold).await });
    held.recv().await.unwrap();
    let before = up.requests.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..5 {
        let start = tokio::time::Instant::now();
        let (code, retry_after, body) = status(&format!("{base}/other")).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "a refusal waited");
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reason"], "circuit_open");
        assert!(retry_after.unwrap() >= 1);
    }
    assert_eq!(
        up.requests.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    up.release.notify_one();
    assert_eq!(probe.await.unwrap().0, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn upstream_backpressure_keeps_the_circuit_open_as_long_as_asked() {
    let (up, _) = spawn_upstream().await;
    let extra = format!("{CIRCUIT}failure_threshold = 1\n").replace("failure_threshold = 3\n", "");
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &extra))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    // An upstream 429 is one client's quota: by default not the upstream's
    // health, even with a Retry-After.
    let (code, retry_after, _) = status(&format!("{base}/status/429?retry_after=40")).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        retry_after,
        Some(40),
        "the upstream's answer passes through"
    );
    assert_eq!(status(&format!("{base}/x")).await.0, StatusCode::OK);
    // A 503 with Retry-After is route-wide backpressure.
    let (code, retry_after, _) = status(&format!("{base}/status/503?retry_after=40")).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after, Some(40));
    let (code, retry_after, body) = status(&format!("{base}/x")).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reason"], "circuit_open");
    assert!((40..=48).contains(&retry_after.unwrap()), "{retry_after:?}");
    advance(Duration::from_secs(39)).await;
    assert_eq!(
        status(&format!("{base}/x")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    advance(Duration::from_secs(1)).await;
    assert_eq!(status(&format!("{base}/x")).await.0, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn backpressure_statuses_are_configurable() {
    let (up, _) = spawn_upstream().await;
    let extra = format!("{CIRCUIT}backpressure_statuses = [429]\nfailure_threshold = 1\n")
        .replace("failure_threshold = 3\n", "");
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &extra))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    let (code, _, _) = status(&format!("{base}/status/429?retry_after=40")).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    let (code, retry_after, _) = status(&format!("{base}/x")).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!((40..=48).contains(&retry_after.unwrap()), "{retry_after:?}");
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_fallback_answers_while_open() {
    let (up, _) = spawn_upstream().await;
    let extra =
        format!("{CIRCUIT}[route.circuit.fallback]\nstatus = 202\nbody = '{{\"queued\":false}}'\n");
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &extra))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    for _ in 0..3 {
        status(&format!("{base}/status/500")).await;
    }
    let (res, body) = get(&format!("{base}/x")).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(&body[..], br#"{"queued":false}"#);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(res.headers()["x-sluicegate-fallback"], "circuit_open");
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 3);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_the_admission_limit_after_closing() {
    let sim = simulator().await;
    let extra = format!("[route.admission]\nmax_inflight = 21\n{CIRCUIT}slow_start_ms = 10000\n");
    let proxy = sluicegate::start(config(sim.addr(), "/", &extra))
        .await
        .unwrap();
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    let admin = format!("http://{}/status", proxy.admin_addr());
    let limit = || async {
        let s = status(&admin).await.2;
        s["routes"][0]["admission"]["limit"].as_u64().unwrap()
    };
    assert_eq!(limit().await, 21);
    sim.set_mode(Mode::Fail);
    for _ in 0..3 {
        status(&url).await;
    }
    sim.set_mode(Mode::Ok);
    advance(Duration::from_secs(5)).await;
    status(&url).await;
    status(&url).await;
    advance(Duration::from_secs(1)).await;
    assert_eq!(status(&url).await.0, StatusCode::OK); // closes: limit back to 1
    assert_eq!(limit().await, 1);
    advance(Duration::from_secs(5)).await;
    status(&url).await;
    assert_eq!(limit().await, 11, "halfway through the ramp");
    advance(Duration::from_secs(5)).await;
    status(&url).await;
    assert_eq!(limit().await, 21);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_state_gauge_follows_the_breaker_on_a_quiet_route() {
    let sim = simulator().await;
    let proxy = sluicegate::start(config(sim.addr(), "/", CIRCUIT))
        .await
        .unwrap();
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    let metrics = format!("http://{}/metrics", proxy.admin_addr());
    let gauge = || async {
        let text = get(&metrics).await.1;
        metric(
            &String::from_utf8_lossy(&text),
            r#"sluicegate_circuit_state{route="test"}"#,
        )
    };
    sim.set_mode(sim::Mode::Fail);
    for _ in 0..3 {
        status(&url).await;
    }
    assert_eq!(gauge().await, Some(1.0), "open");
    // No request comes. Past open_ms the breaker is half-open, and the
    // gauge (what the SluicegateCircuitOpen alert reads) says so within a
    // second, not at the next request.
    tokio::time::sleep(Duration::from_millis(6_100)).await;
    assert_eq!(gauge().await, Some(2.0), "half-open");
    proxy.shutdown().await;
}
