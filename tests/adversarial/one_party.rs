//! What one party can make a protection believe: a client naming its own
//! priority for the next tier, a dual-stack address that hides a trusted
//! peer, a web page reaching the admin listener through DNS rebinding.
//! Whatever one party does, the protection decides for everyone by its own
//! rules.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};

use crate::support::*;

async fn queued(admin: SocketAddr) -> u64 {
    let status = json(&get(&format!("http://{admin}/status")).await.1);
    status["routes"][0]["admission"]["queued"].as_u64().unwrap()
}

async fn until_queued(admin: SocketAddr, n: u64) {
    for _ in 0..5000 {
        if queued(admin).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never {n} queued");
}

/// The priority header the upstream received for a request with `claim`.
async fn forwarded_priority(proxy: SocketAddr, claim: Option<&str>) -> serde_json::Value {
    let mut req = Request::get(format!("http://{proxy}/echo"));
    if let Some(claim) = claim {
        req = req.header("x-priority", claim);
    }
    let (res, body) = send(&client(), req.body(full("")).unwrap()).await;
    assert_eq!(res.status(), StatusCode::OK);
    json(&body)["headers"]["x-priority"].clone()
}

#[tokio::test]
async fn the_next_tier_sees_the_class_this_proxy_decided_not_the_claim() {
    let (up, _) = spawn_upstream().await;
    // Nobody trusted; the tier "gold" is critical.
    let route = "[route.admission]\nmax_inflight = 4\n\
                 [route.rate_limit]\nper_second = 1000\nkey = \"header:x-api-key\"\n\
                 [[route.rate_limit.tier]]\nname = \"gold\"\nkeys = [\"k-gold\"]\n\
                 per_second = 1000\npriority = \"critical\"\n";
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", route))
        .await
        .unwrap();
    let addr = proxy.proxy_addr();
    // An anonymous claim is what this proxy decided instead: normal.
    assert_eq!(
        forwarded_priority(addr, Some("critical")).await,
        serde_json::json!(["normal"])
    );
    assert_eq!(
        forwarded_priority(addr, Some("batch")).await,
        serde_json::json!(["normal"])
    );
    // No claim, no class: nothing added.
    assert_eq!(
        forwarded_priority(addr, None).await,
        serde_json::Value::Null
    );
    // A tier's class goes on, whatever its client claimed.
    let req = Request::get(format!("http://{addr}/echo"))
        .header("x-api-key", "k-gold")
        .header("x-priority", "batch")
        .body(full(""))
        .unwrap();
    let body = send(&client(), req).await.1;
    assert_eq!(
        json(&body)["headers"]["x-priority"],
        serde_json::json!(["critical"])
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_peer_is_trusted_on_a_dual_stack_listener() {
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("skipped: no IPv6 on this machine");
        return;
    }
    let (up, mut held) = spawn_upstream().await;
    let route = "[route.admission]\nmax_inflight = 1\nqueue_capacity = 4\n\
                 queue_timeout_ms = 30000\npriority_trusted_proxies = [\"127.0.0.1\"]\n";
    let proxy = sluicegate::start(config_text_listen(up.addr.unwrap(), "[::]:0", route))
        .await
        .unwrap();
    // Seen by the proxy as ::ffff:127.0.0.1.
    let addr = SocketAddr::from(([127, 0, 0, 1], proxy.proxy_addr().port()));
    let admin = proxy.admin_addr();
    let hold = tokio::spawn(async move {
        let req = Request::get(format!("http://{addr}/hold")).body(full(""));
        send(&client(), req.unwrap()).await.0.status()
    });
    held.recv().await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let ask = |path: &'static str, class: &'static str| {
        let order = order.clone();
        tokio::spawn(async move {
            let req = Request::get(format!("http://{addr}/{path}"))
                .header("x-priority", class)
                .body(full(""))
                .unwrap();
            let status = send(&client(), req).await.0.status();
            order.lock().unwrap().push(path);
            status
        })
    };
    let normal = ask("first", "normal");
    until_queued(admin, 1).await;
    let critical = ask("second", "critical");
    until_queued(admin, 2).await;
    while !hold.is_finished() {
        up.release.notify_waiters();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(hold.await.unwrap(), StatusCode::OK);
    assert_eq!(critical.await.unwrap(), StatusCode::OK);
    assert_eq!(normal.await.unwrap(), StatusCode::OK);
    assert_eq!(*order.lock().unwrap(), ["second", "first"]);
    proxy.shutdown().await;
}

fn config_text_listen(upstream: SocketAddr, listen: &str, route: &str) -> sluicegate::Config {
    let text = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"test\"\nupstream = \"http://{upstream}\"\n{route}"
    );
    sluicegate::Config::parse("test.toml", &text).unwrap()
}

#[tokio::test]
async fn a_loopback_admin_listener_is_closed_to_dns_rebinding_and_keeps_its_token() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config_with(up.addr.unwrap(), "", ""))
        .await
        .unwrap();
    let admin = proxy.admin_addr();
    let with_host = |path: &str, host: &str| {
        Request::get(format!("http://{admin}{path}"))
            .header("host", host)
            .body(full(""))
            .unwrap()
    };
    // A page whose name now resolves to 127.0.0.1 still sends its own name.
    for path in ["/status", "/metrics", "/", "/spool/dead"] {
        let (res, body) = send(&client(), with_host(path, "evil.example:9901")).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(
            String::from_utf8_lossy(&body).contains("loopback"),
            "{path}"
        );
    }
    // Probes hold nothing: a health checker may send any name.
    let (res, _) = send(&client(), with_host("/healthz", "evil.example")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let reload = Request::post(format!("http://{admin}/reload"))
        .header("host", "evil.example")
        .header("content-type", "application/json")
        .body(full(""))
        .unwrap();
    assert_eq!(
        send(&client(), reload).await.0.status(),
        StatusCode::FORBIDDEN
    );
    for host in [
        "localhost:9901",
        "127.0.0.1",
        "[::1]:9901",
        "app.localhost",
        "127.1.2.3:80",
    ] {
        let (res, _) = send(&client(), with_host("/status", host)).await;
        assert_eq!(res.status(), StatusCode::OK, "{host}");
    }
    proxy.shutdown().await;

    // A token, once set, is asked for on loopback too.
    let token = "admin_token = \"0123456789abcdef-secret\"\n";
    let proxy = sluicegate::start(config_with(up.addr.unwrap(), token, ""))
        .await
        .unwrap();
    let url = format!("http://{}/status", proxy.admin_addr());
    assert_eq!(get(&url).await.0.status(), StatusCode::UNAUTHORIZED);
    let req = Request::get(&url)
        .header("authorization", "Bearer 0123456789abcdef-secret")
        .body(full(""))
        .unwrap();
    assert_eq!(send(&client(), req).await.0.status(), StatusCode::OK);
    // Scrapers need none.
    let metrics = format!("http://{}/metrics", proxy.admin_addr());
    assert_eq!(get(&metrics).await.0.status(), StatusCode::OK);
    proxy.shutdown().await;
}
