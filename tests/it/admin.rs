//! The admin listener holds its ground: a head timeout and a connection cap of
//! its own, a bearer scheme in any case, and a reload no web page can trigger.

use std::time::Duration;

use crate::support::*;
use http::{Request, StatusCode};
use sluicegate::config::Config;
use sluicegate::server::admin::ADMIN_MAX_CONNECTIONS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(start_paused = true)]
async fn slow_heads_are_cut_and_connections_capped() {
    let (up, _) = spawn_upstream().await;
    let config = config_with(up.addr.unwrap(), "header_read_timeout_ms = 1000", "");
    let proxy = sluicegate::start(config).await.unwrap();
    let admin = proxy.admin_addr();
    // Every slot taken by a client that never finishes its head.
    let mut slow = Vec::new();
    for _ in 0..ADMIN_MAX_CONNECTIONS {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        slow.push(s);
    }
    // One more waits in the backlog, unserved...
    let mut next = TcpStream::connect(admin).await.unwrap();
    next.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(500), next.read_to_end(&mut answer));
    assert!(early.await.is_err(), "served beyond the cap: {answer:?}");
    // ...until header_read_timeout_ms closes the slow ones.
    tokio::time::timeout(Duration::from_secs(5), next.read_to_end(&mut answer))
        .await
        .expect("the slow heads were never cut")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for mut s in slow {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        assert!(
            rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
            "{rest:?}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let (up, _) = spawn_upstream().await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\n\
         admin_token = \"0123456789abcdef-secret\"\n[[route]]\nupstream = \"http://{}\"\n",
        up.addr.unwrap()
    );
    let proxy = sluicegate::start(Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{}/status", proxy.admin_addr().port());
    for (auth, status) in [
        ("Bearer 0123456789abcdef-secret", StatusCode::OK),
        ("bearer 0123456789abcdef-secret", StatusCode::OK),
        ("BEARER  0123456789abcdef-secret ", StatusCode::OK),
        ("Basic 0123456789abcdef-secret", StatusCode::UNAUTHORIZED),
        ("Bearer0123456789abcdef-secret", StatusCode::UNAUTHORIZED),
    ] {
        let req = Request::get(&url)
            .header("authorization", auth)
            .body(full(""))
            .unwrap();
        assert_eq!(send(&client(), req).await.0.status(), status, "{auth}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_simple_request_cannot_reload() {
    let (up, _) = spawn_upstream().await;
    let dir = std::env::temp_dir().join(format!("sluicegate-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("reload.toml");
    let text = |timeout: u64| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[route]]\nupstream = \"http://{}\"\ntimeout_ms = {timeout}\n",
            up.addr.unwrap()
        )
    };
    std::fs::write(&path, text(1000)).unwrap();
    let config = Config::load(&path).unwrap();
    let proxy = sluicegate::server::start_from(config, Some(path.clone()))
        .await
        .unwrap();
    std::fs::write(&path, text(2000)).unwrap();
    let url = format!("http://{}/reload", proxy.admin_addr());
    let timeout = || proxy.routes()[0].config.timeout_ms.get();
    // What a web page can send without a preflight: refused, nothing reloaded.
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
    ] {
        let mut req = Request::post(&url);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let (res, body) = send(&client(), req.body(full("{}")).unwrap()).await;
        assert_eq!(
            res.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert!(String::from_utf8_lossy(&body).contains("application/json"));
        assert_eq!(
            timeout(),
            Duration::from_millis(1000),
            "{content_type:?} reloaded"
        );
    }
    let req = Request::post(&url)
        .header("content-type", "application/json; charset=utf-8")
        .body(full(""))
        .unwrap();
    let (res, body) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::OK, "{body:?}");
    assert_eq!(timeout(), Duration::from_millis(2000));
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A route without admission has no limit and no queue timeout: README says
/// their gauges are absent for it, and a limit of 0 would draw as one on the
/// dashboard's "In flight vs limit". Its in-flight gauge is there.
#[tokio::test]
async fn routes_without_admission_export_no_limit() {
    let (up, _) = spawn_upstream().await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"limited\"\npath_prefix = \"/a\"\nupstream = \"http://{up}\"\n\
         [route.admission]\nmax_inflight = 4\n\
         [[route]]\nname = \"open\"\npath_prefix = \"/b\"\nupstream = \"http://{up}\"\n",
        up = up.addr.unwrap()
    );
    let proxy = sluicegate::start(Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    let (_, body) = get(&format!("http://{}/metrics", proxy.admin_addr())).await;
    let metrics = String::from_utf8_lossy(&body);
    for gauge in [
        "sluicegate_concurrency_limit",
        "sluicegate_queue_timeout_seconds",
    ] {
        assert!(
            metrics.contains(&format!("{gauge}{{route=\"limited\"}}")),
            "{gauge}"
        );
        assert!(
            !metrics.contains(&format!("{gauge}{{route=\"open\"}}")),
            "{gauge}"
        );
    }
    assert!(metrics.contains("sluicegate_inflight{route=\"open\"}"));
    proxy.shutdown().await;
}
