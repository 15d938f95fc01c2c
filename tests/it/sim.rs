//! The upstream simulator over HTTP, as benchmarks and users drive it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use http::{Request, StatusCode};
use sluicegate::sim::{self, Mode, SimOptions, SimStats};

async fn start(workers: usize, service_ms: u64) -> sim::SimHandle {
    let options = SimOptions {
        workers,
        service_time: Duration::from_millis(service_ms),
    };
    sim::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .unwrap()
}

async fn post_json(url: &str, body: &str) -> (StatusCode, serde_json::Value) {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap();
    let (res, body) = send(&client(), req).await;
    (res.status(), json(&body))
}

#[tokio::test(start_paused = true)]
async fn extra_requests_queue_behind_the_workers() {
    let sim = start(2, 100).await;
    let url = format!("http://{}/work", sim.addr());
    let started = tokio::time::Instant::now();
    let requests: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for r in requests {
        let (res, body) = r.await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(json(&body)["ok"], true);
    }
    // 6 requests, 2 at a time, 100 ms each: three rounds.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(400),
        "{took:?}"
    );
    let stats = sim.stats();
    assert_eq!(stats.served, 6);
    assert_eq!(stats.peak_concurrency, 2);
    assert_eq!((stats.in_service, stats.queued), (0, 0));
}

#[tokio::test]
async fn stats_and_reset_over_http() {
    let sim = start(4, 0).await;
    let req = Request::post(format!("http://{}/x", sim.addr()))
        .body(full("12345"))
        .unwrap();
    assert_eq!(send(&client(), req).await.0.status(), StatusCode::OK);
    let (_, body) = get(&format!("http://{}/_sim/stats", sim.addr())).await;
    let stats: SimStats = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (stats.received, stats.served, stats.bytes_received),
        (1, 1, 5)
    );
    let (status, after) = post_json(&format!("http://{}/_sim/reset", sim.addr()), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(after["served"], 0);
}

#[tokio::test]
async fn fail_mode_answers_the_configured_status_and_ok_mode_recovers() {
    let sim = start(4, 0).await;
    let config = format!("http://{}/_sim/config", sim.addr());
    let (status, now) = post_json(&config, r#"{"mode":"fail","fail_status":503}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(now["mode"], "fail");
    let work = format!("http://{}/w", sim.addr());
    assert_eq!(get(&work).await.0.status(), StatusCode::SERVICE_UNAVAILABLE);
    post_json(&config, r#"{"mode":"ok"}"#).await;
    assert_eq!(get(&work).await.0.status(), StatusCode::OK);
    assert_eq!((sim.stats().failed, sim.stats().served), (1, 1));
}

#[tokio::test]
async fn hang_mode_holds_requests_until_switched_off() {
    let sim = start(4, 0).await;
    sim.set_mode(Mode::Hang);
    let work = format!("http://{}/w", sim.addr());
    let pending = tokio::spawn(async move { get(&work).await });
    while sim.stats().received == 0 {
        tokio::task::yield_now().await;
    }
    assert!(!pending.is_finished());
    sim.set_mode(Mode::Ok);
    assert_eq!(pending.await.unwrap().0.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn workers_and_service_time_change_live() {
    let sim = start(1, 100).await;
    let config = format!("http://{}/_sim/config", sim.addr());
    let (_, now) = post_json(&config, r#"{"workers":3,"service_ms":50}"#).await;
    assert_eq!(now["workers"], 3);
    assert_eq!(now["service_ms"], 50.0);
    let url = format!("http://{}/w", sim.addr());
    let started = tokio::time::Instant::now();
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap().0.status(), StatusCode::OK);
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_millis(100),
        "{took:?}"
    );
    assert_eq!(sim.stats().peak_concurrency, 3);
}

#[tokio::test]
async fn bad_switches_are_refused_with_400() {
    let sim = start(1, 0).await;
    let config = format!("http://{}/_sim/config", sim.addr());
    for body in [
        r#"{"workers":0}"#,
        r#"{"mode":"explode"}"#,
        r#"{"fail_status":200}"#,
        r#"{"service_ms":-1}"#,
        r#"{"worker":2}"#,
        "not json",
    ] {
        let (status, answer) = post_json(&config, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{body}: {answer}");
    }
}
