//! Live reload through `POST /reload` (the binary's SIGHUP does the same; see
//! tests/cli.rs) and the admin token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::support::*;
use http::{Request, StatusCode};
use sluicegate::config::Config;

fn file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluicegate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn routes(upstream: SocketAddr, b_timeout: u64, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"a\"\npath_prefix = \"/status\"\nupstream = \"http://{upstream}\"\n\
         [route.circuit]\nfailure_threshold = 1\nopen_ms = 600000\nmax_open_ms = 600000\n\
         [[route]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"http://{upstream}\"\n\
         timeout_ms = {b_timeout}\n{extra}"
    )
}

async fn reload(admin: SocketAddr) -> (StatusCode, serde_json::Value) {
    let req = Request::post(format!("http://{admin}/reload"))
        .header("content-type", "application/json")
        .body(full(""))
        .unwrap();
    let (res, body) = send(&client(), req).await;
    (res.status(), json(&body))
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    json(&get(&format!("http://{admin}/status")).await.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_change_is_applied_under_load_without_a_failed_request() {
    let (up, _) = spawn_upstream().await;
    let upstream = up.addr.unwrap();
    let path = file("valid.toml", &routes(upstream, 30000, ""));
    let config = Config::load(&path).unwrap();
    let proxy = sluicegate::server::start_from(config, Some(path.clone()))
        .await
        .unwrap();
    let (base, admin) = (format!("http://{}", proxy.proxy_addr()), proxy.admin_addr());
    // Route a (/status) opens its circuit on one failure and stays open for
    // 10 minutes.
    assert_eq!(get(&format!("{base}/status/500")).await.0.status(), 500);
    assert_eq!(get(&format!("{base}/status/200")).await.0.status(), 503);

    // Load on route b throughout the reload.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (stop, failed, sent, url) = (
                stop.clone(),
                failed.clone(),
                sent.clone(),
                format!("{base}/b/load"),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::Relaxed);
                    if get(&url).await.0.status() != StatusCode::OK {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    while sent.load(Ordering::Relaxed) < 200 {
        tokio::task::yield_now().await;
    }
    // b changes, c is added.
    let c = "[[route]]\nname = \"c\"\npath_prefix = \"/c\"\nupstream = \"http://UP\"\n"
        .replace("UP", &upstream.to_string());
    std::fs::write(&path, routes(upstream, 20000, &c)).unwrap();
    let (code, body) = reload(admin).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["routes"]["kept"], serde_json::json!(["a"]));
    assert_eq!(body["routes"]["changed"], serde_json::json!(["b"]));
    assert_eq!(body["routes"]["added"], serde_json::json!(["c"]));
    let before = sent.load(Ordering::Relaxed);
    while sent.load(Ordering::Relaxed) < before + 200 {
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed across the reload"
    );
    assert_eq!(get(&format!("{base}/c/x")).await.0.status(), StatusCode::OK);
    // The unchanged route kept its state: the circuit is still open, and its
    // counters did not restart.
    assert_eq!(get(&format!("{base}/status/200")).await.0.status(), 503);
    let s = status(admin).await;
    let a = &s["routes"][0];
    assert_eq!(a["name"], "a");
    assert_eq!(a["circuit"]["state"], "open");
    assert_eq!(s["routes"][1]["timeout_ms"], 20000);

    // Removing c: its path is no longer routed.
    std::fs::write(&path, routes(upstream, 20000, "")).unwrap();
    let (code, body) = reload(admin).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["routes"]["removed"], serde_json::json!(["c"]));
    assert_eq!(
        get(&format!("{base}/c/x")).await.0.status(),
        StatusCode::NOT_FOUND
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_change_is_refused_and_the_old_config_keeps_serving() {
    let (up, _) = spawn_upstream().await;
    let upstream = up.addr.unwrap();
    let path = file("invalid.toml", &routes(upstream, 30000, ""));
    let config = Config::load(&path).unwrap();
    let proxy = sluicegate::server::start_from(config, Some(path.clone()))
        .await
        .unwrap();
    let (base, admin) = (format!("http://{}", proxy.proxy_addr()), proxy.admin_addr());

    let broken = routes(upstream, 30000, "").replace("timeout_ms = 30000", "timeout_ms = 0");
    std::fs::write(&path, &broken).unwrap();
    let expected = Config::load(&path).unwrap_err().to_string();
    let (code, body) = reload(admin).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        expected.as_str(),
        "the same words as check-config"
    );
    assert!(expected.contains("route[1].timeout_ms"), "{expected}");

    // A [server] change needs a restart: refused, naming the key.
    let moved = routes(upstream, 30000, "").replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"127.0.0.1:0\"\ndrain_timeout_ms = 1",
    );
    std::fs::write(&path, moved).unwrap();
    let (code, body) = reload(admin).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("server.drain_timeout_ms"),
        "{body}"
    );

    assert_eq!(get(&format!("{base}/b/x")).await.0.status(), StatusCode::OK);
    let text = get(&format!("http://{admin}/metrics")).await.1;
    let text = String::from_utf8_lossy(&text);
    assert_eq!(
        metric(&text, "sluicegate_config_reload_total{result=\"error\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "sluicegate_config_reload_total{result=\"ok\"}"),
        Some(0.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_status_and_reload_need_the_admin_token() {
    let (up, _) = spawn_upstream().await;
    let text = |token: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\n{token}\
             [[route]]\nupstream = \"http://{}\"\n",
            up.addr.unwrap()
        )
    };
    // No token configured: refused with a pointer to the setting.
    let proxy = sluicegate::start(Config::parse("t.toml", &text("")).unwrap())
        .await
        .unwrap();
    let admin = format!("127.0.0.1:{}", proxy.admin_addr().port());
    for path in ["/status", "/status/history"] {
        let (res, body) = get(&format!("http://{admin}{path}")).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(String::from_utf8_lossy(&body).contains("admin_token"));
    }
    // The page and its chart library hold no data: open to all.
    assert_eq!(
        get(&format!("http://{admin}/")).await.0.status(),
        StatusCode::OK
    );
    let (res, js) = get(&format!("http://{admin}/assets/uplot-1.6.32.min.js")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(String::from_utf8_lossy(&js).contains("uPlot"));
    // Scrapers and probes need no token.
    assert_eq!(
        get(&format!("http://{admin}/metrics")).await.0.status(),
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("http://{admin}/readyz")).await.0.status(),
        StatusCode::OK
    );
    proxy.shutdown().await;

    let token = "admin_token = \"0123456789abcdef-secret\"\n";
    let proxy = sluicegate::start(Config::parse("t.toml", &text(token)).unwrap())
        .await
        .unwrap();
    let admin = format!("127.0.0.1:{}", proxy.admin_addr().port());
    for path in ["/status", "/status/history"] {
        let status = |auth: Option<&str>| {
            let mut req = Request::get(format!("http://{admin}{path}"));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            req.body(full("")).unwrap()
        };
        let (res, _) = send(&client(), status(None)).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        let (res, _) = send(&client(), status(Some("Bearer wrong-token-wrong-token"))).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{path}");
        let (res, _) = send(&client(), status(Some("Bearer 0123456789abcdef-secret"))).await;
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    }
    proxy.shutdown().await;
}

/// An upstream holding each request 20 ms, noting the most at once.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let peak = Arc::new(AtomicU64::new(0));
    let seen = peak.clone();
    serve_http1(listener, Arc::new((state, seen)), |s, _req| async move {
        let ((now, _), peak) = (&*s.0, &s.1);
        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(at_once, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        now.fetch_sub(1, Ordering::SeqCst);
        Ok(http::Response::new(full("ok")))
    });
    (addr, peak)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_never_admit_past_the_limit() {
    let (upstream, peak) = counting_upstream().await;
    let text = |timeout: u64| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[route]]\nname = \"r\"\nupstream = \"http://{upstream}\"\ntimeout_ms = {timeout}\n\
             [route.admission]\nmax_inflight = 4\nqueue_capacity = 256\nqueue_timeout_ms = 30000\n"
        )
    };
    let path = file("under-load.toml", &text(5000));
    let proxy = sluicegate::server::start_from(Config::load(&path).unwrap(), Some(path.clone()))
        .await
        .unwrap();
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    answers.push(get(&format!("http://{addr}/x")).await.0.status());
                }
                answers
            })
        })
        .collect();
    // Ten reloads that change the route, under load.
    for i in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        std::fs::write(&path, text(5000 + i + 1)).unwrap();
        let (status, body) = reload(admin).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["routes"]["changed"], serde_json::json!(["r"]));
    }
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    assert!(answers.len() > 100, "{}", answers.len());
    assert!(answers.iter().all(|s| *s == StatusCode::OK));
    assert_eq!(
        peak.load(Ordering::SeqCst),
        4,
        "the upstream saw more than max_inflight"
    );
    // Nothing leaked: the last controller counts none in flight.
    let admission = &status(admin).await["routes"][0]["admission"];
    assert_eq!(admission["inflight"], 0, "{admission}");
    assert_eq!(admission["queued"], 0, "{admission}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_reload_keeps_an_open_breaker_and_spent_rates() {
    let (up, _) = spawn_upstream().await;
    let upstream = up.addr.unwrap();
    let text = |timeout: u64| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[route]]\nname = \"r\"\nupstream = \"http://{upstream}\"\ntimeout_ms = {timeout}\n\
             [route.rate_limit]\nper_second = 0.01\nburst = 3\n\
             [route.circuit]\nfailure_threshold = 1\nopen_ms = 600000\nmax_open_ms = 600000\n"
        )
    };
    let path = file("keeps-state.toml", &text(5000));
    let proxy = sluicegate::server::start_from(Config::load(&path).unwrap(), Some(path.clone()))
        .await
        .unwrap();
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    // Two of the burst of 3 spent, the second opening the circuit.
    assert_eq!(
        get(&format!("http://{addr}/ok")).await.0.status(),
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("http://{addr}/status/500")).await.0.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    std::fs::write(&path, text(6000)).unwrap();
    assert_eq!(reload(admin).await.0, StatusCode::OK);
    let route = &status(admin).await["routes"][0];
    assert_eq!(route["circuit"]["state"], "open", "{route}");
    // Still open: refused without reaching the upstream (the third token).
    assert_eq!(
        get(&format!("http://{addr}/ok")).await.0.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // The burst is spent: no fresh one came with the reload.
    assert_eq!(
        get(&format!("http://{addr}/ok")).await.0.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    proxy.shutdown().await;
}
