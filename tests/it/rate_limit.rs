//! Per-client rate limits through the real proxy, over HTTP (paused clock).

use std::time::Duration;

use crate::support::*;
use http::{Request, StatusCode};

async fn call(url: &str, headers: &[(&str, &str)]) -> (http::Response<()>, serde_json::Value) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (res, body) = send(&client(), req.body(full("")).unwrap()).await;
    let body = serde_json::from_slice(&body).unwrap_or_default();
    (res, body)
}

const BY_API_KEY: &str =
    "[route.rate_limit]\nkey = \"header:x-api-key\"\nper_second = 2\nburst = 3\n";

#[tokio::test(start_paused = true)]
async fn a_client_over_its_rate_gets_429_while_another_is_unaffected() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", BY_API_KEY))
        .await
        .unwrap();
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    let noisy = [("x-api-key", "noisy")];
    for remaining in [2, 1, 0] {
        let (res, _) = call(&url, &noisy).await;
        assert_eq!(res.status(), StatusCode::OK);
        // Admitted answers tell the client where it stands too.
        assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=3;w=2");
        assert_eq!(
            res.headers()["ratelimit"],
            format!("\"default\";r={remaining};t={}", (3 - remaining + 1) / 2)
        );
    }
    let (res, body) = call(&url, &noisy).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=3;w=2");
    assert_eq!(res.headers()["ratelimit"], "\"default\";r=0;t=2");
    assert_eq!(body["reason"], "rate_limited");
    assert_eq!(body["retry_after_s"], 1);
    let reached = up.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(reached, 3, "a refused request reached the upstream");

    // Another key, same address: its own bucket.
    let (res, _) = call(&url, &[("x-api-key", "quiet")]).await;
    assert_eq!(res.status(), StatusCode::OK);

    // Half a second later the noisy client has one token back (2 per second).
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(call(&url, &noisy).await.0.status(), StatusCode::OK);
    assert_eq!(
        call(&url, &noisy).await.0.status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let metrics = get(&format!("http://{}/metrics", proxy.admin_addr()))
        .await
        .1;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(
        metric(&metrics, "sluicegate_rate_limited_total{route=\"test\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&metrics, "sluicegate_rate_limit_keys{route=\"test\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "sluicegate_requests_total{route=\"test\",outcome=\"rate_limited\"}"
        ),
        Some(2.0)
    );
    let status = json(
        &get(&format!("http://{}/status", proxy.admin_addr()))
            .await
            .1,
    );
    assert_eq!(status["routes"][0]["rate_limit"]["keys"], 2);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    let (up, _) = spawn_upstream().await;
    let limit = "[route.rate_limit]\nkey = \"ip\"\nper_second = 1\nburst = 1\n";
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", limit))
        .await
        .unwrap();
    let url = format!("http://{}/x", proxy.proxy_addr());
    let (res, _) = call(&url, &[("x-forwarded-for", "198.51.100.1")]).await;
    assert_eq!(res.status(), StatusCode::OK);
    let (res, _) = call(&url, &[("x-forwarded-for", "198.51.100.2")]).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket() {
    let (up, _) = spawn_upstream().await;
    let limit = "[route.rate_limit]\nkey = \"ip\"\nper_second = 1\nburst = 1\n\
                 trusted_proxies = [\"127.0.0.0/8\"]\n";
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", limit))
        .await
        .unwrap();
    let url = format!("http://{}/x", proxy.proxy_addr());
    let a = [("x-forwarded-for", "6.6.6.6, 198.51.100.1")];
    let b = [("x-forwarded-for", "6.6.6.6, 198.51.100.2")];
    assert_eq!(call(&url, &a).await.0.status(), StatusCode::OK);
    assert_eq!(call(&url, &b).await.0.status(), StatusCode::OK);
    assert_eq!(
        call(&url, &a).await.0.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn refusals_further_down_still_carry_the_ratelimit_fields() {
    let (up, _) = spawn_upstream().await;
    let extra = format!("{BY_API_KEY}[route.circuit]\nfailure_threshold = 1\n");
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &extra))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    let key = [("x-api-key", "k")];
    call(&format!("{base}/status/500"), &key).await;
    let (res, body) = call(&format!("{base}/x"), &key).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reason"], "circuit_open");
    assert_eq!(res.headers()["ratelimit"], "\"default\";r=1;t=1");
    proxy.shutdown().await;
}
