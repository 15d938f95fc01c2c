//! Store and forward through the whole proxy: refusals become `202`s on
//! disk, the replayer delivers them once the upstream can take them, poison
//! ends in the dead-letter store and the admin API handles it, a full spool
//! refuses as the proxy would without one.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::keys::{reserve_addr, serve_keys};
use crate::support::*;
use http::{Request, StatusCode};
use serde_json::Value;

fn spool_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sluicegate-spool-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn post(url: &str, key: Option<&str>, body: &str) -> Request<TestBody> {
    let mut req = Request::post(url).header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(full(body.to_string())).unwrap()
}

async fn spool_status(admin: std::net::SocketAddr) -> Value {
    let (_, body) = get(&format!("http://{admin}/spool")).await;
    json(&body)["routes"][0].clone()
}

/// A proxy on `upstream` whose route has `before` (other sections) and a
/// 1 MiB spool in a fresh directory named `name`, with `spool` keys added.
async fn start_spooling(
    upstream: std::net::SocketAddr,
    name: &str,
    before: &str,
    spool: &str,
) -> (sluicegate::server::Running, PathBuf) {
    let dir = spool_dir(name);
    let route = format!(
        "{before}[route.spool]\ndir = \"{}\"\nmax_bytes = 1048576\n{spool}",
        dir.display()
    );
    let proxy = sluicegate::server::start(config(upstream, "/", &route))
        .await
        .unwrap();
    (proxy, dir)
}

/// Polls `check` every 20 ms until it holds, for at most `limit` (real
/// time: the proxy and the upstream are real).
async fn eventually(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let tries = limit.as_millis() / 20;
    for _ in 0..tries {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within {limit:?}: {what}");
}

#[tokio::test]
async fn refusals_are_spooled_and_delivered_once_the_upstream_is_back() {
    let upstream = reserve_addr();
    let (proxy, dir) = start_spooling(upstream, "deliver", "", "").await;
    let base = format!("http://{}", proxy.proxy_addr());
    let client = client();
    for i in 0..20 {
        let req = post(
            &format!("{base}/ingest"),
            Some(&format!("k{i}")),
            &format!("event {i}"),
        );
        let (res, body) = send(&client, req).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED, "{body:?}");
        let doc = json(&body);
        assert_eq!(doc["status"], "spooled");
        assert_eq!(
            res.headers()["x-sluicegate-spooled"],
            doc["id"].as_str().unwrap()
        );
    }
    // No key: one is generated (the spool id) and sent with it.
    let (res, body) = send(&client, post(&format!("{base}/ingest"), None, "keyless")).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let generated = json(&body)["id"].as_str().unwrap().to_string();
    // A read is never spooled: the refusal stands.
    let (res, _) = get(&format!("{base}/ingest")).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);

    let admin = proxy.admin_addr();
    assert_eq!(spool_status(admin).await["requests"], 21);
    // /status carries each route's spool, which the dashboard draws.
    let (_, status) = get(&format!("http://{admin}/status")).await;
    assert_eq!(json(&status)["routes"][0]["spool"]["requests"], 21);
    let (_, page) = get(&format!("http://{admin}/")).await;
    assert!(String::from_utf8_lossy(&page).contains("r.spool"));
    let (_, metrics) = get(&format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    let age = metric(
        &metrics,
        r#"sluicegate_spool_oldest_age_seconds{route="test"}"#,
    );
    assert!(age.is_some_and(|a| a >= 0.0), "{age:?}");
    assert!(metric(&metrics, r#"sluicegate_spool_bytes{route="test"}"#).unwrap() > 0.0);
    assert_eq!(
        metric(&metrics, r#"sluicegate_spooled_total{route="test"}"#),
        Some(21.0)
    );
    assert_eq!(
        metric(
            &metrics,
            r#"sluicegate_requests_total{route="test",outcome="spooled"}"#
        ),
        Some(21.0)
    );
    assert_eq!(
        metric(&metrics, r#"sluicegate_spool_requests{route="test"}"#),
        Some(21.0)
    );

    let keys = serve_keys(upstream).await;
    eventually(Duration::from_secs(20), "the spool empties", async || {
        spool_status(admin).await["requests"] == 0
    })
    .await;
    let seen = keys.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 21, "{:?}", seen.keys());
    for i in 0..20 {
        let (count, body) = &seen[&format!("k{i}")];
        assert_eq!(*count, 1);
        assert_eq!(body, &format!("event {i}"));
    }
    assert_eq!(seen[&generated].1, "keyless");
    let (_, metrics) = get(&format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(
        metric(
            &metrics,
            r#"sluicegate_replayed_total{route="test",result="delivered"}"#
        ),
        Some(21.0)
    );
    assert_eq!(
        metric(&metrics, r#"sluicegate_spool_requests{route="test"}"#),
        Some(0.0)
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn poison_is_dead_lettered_listed_sent_back_and_deleted() {
    let upstream = reserve_addr();
    let (proxy, dir) = start_spooling(upstream, "poison", "", "").await;
    let base = format!("http://{}", proxy.proxy_addr());
    let admin = format!("http://{}", proxy.admin_addr());
    let client = client();
    for (path, key) in [("/poison/1", "p1"), ("/ingest", "ok"), ("/poison/2", "p2")] {
        let (res, _) = send(&client, post(&format!("{base}{path}"), Some(key), "{}")).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    let keys = serve_keys(upstream).await;
    eventually(Duration::from_secs(20), "two dead letters", async || {
        let s = spool_status(proxy.admin_addr()).await;
        s["requests"] == 0 && s["dead_letters"] == 2
    })
    .await;
    assert_eq!(keys.counts().get("ok"), Some(&1));
    let (res, body) = get(&format!("{admin}/spool/dead?route=test")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let dead = json(&body)["dead"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 2);
    let by_uri = |uri: &str| dead.iter().find(|d| d["uri"] == uri).unwrap().clone();
    let (p1, p2) = (by_uri("/poison/1"), by_uri("/poison/2"));
    assert_eq!(p1["status"], 400);
    assert_eq!(p1["excerpt"], "bad event");
    assert_eq!(p1["attempts"], 1, "a 4xx is not tried again");
    // Paged.
    let (_, body) = get(&format!("{admin}/spool/dead?limit=1")).await;
    let page = json(&body);
    assert_eq!(page["dead"].as_array().unwrap().len(), 1);
    let (_, body) = get(&format!(
        "{admin}/spool/dead?limit=1&after={}",
        page["next"].as_str().unwrap()
    ))
    .await;
    assert_eq!(json(&body)["dead"].as_array().unwrap().len(), 1);

    let p2_id = p2["id"].as_str().unwrap();
    let delete = |id: &str| {
        Request::delete(format!("{admin}/spool/dead/{id}"))
            .body(full(""))
            .unwrap()
    };
    let (res, _) = send(&client, delete(p2_id)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let (res, _) = send(&client, delete(p2_id)).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);

    let p1_id = p1["id"].as_str().unwrap();
    let replay = |json: bool| {
        let mut req = Request::post(format!("{admin}/spool/dead/{p1_id}/replay"));
        if json {
            req = req.header("content-type", "application/json");
        }
        req.body(full("{}")).unwrap()
    };
    // A plain form post (what any web page can send) is refused.
    let (res, _) = send(&client, replay(false)).await;
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    keys.poison_ok.store(true, Ordering::SeqCst);
    let (res, body) = send(&client, replay(true)).await;
    assert_eq!(res.status(), StatusCode::OK, "{body:?}");
    assert_eq!(json(&body)["status"], "requeued");
    eventually(
        Duration::from_secs(20),
        "the replayed dead letter arrives",
        async || keys.counts().get("p1") == Some(&1),
    )
    .await;
    let s = spool_status(proxy.admin_addr()).await;
    assert_eq!(s["dead_letters"], 0);
    assert_eq!(
        keys.counts().get("p2"),
        None,
        "a deleted dead letter is gone"
    );
    let (_, metrics) = get(&format!("{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(
        metric(&metrics, r#"sluicegate_dead_lettered_total{route="test"}"#),
        Some(2.0)
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_full_spool_refuses_as_without_one_and_takes_again_once_delivered() {
    let (upstream, mut held) = spawn_upstream().await;
    let dir = spool_dir("full");
    let route = format!(
        "[route.admission]\nmax_inflight = 1\nqueue_capacity = 0\n\
         [route.spool]\ndir = \"{}\"\nmax_bytes = 8192\n",
        dir.display()
    );
    let proxy = sluicegate::server::start(config(upstream.addr.unwrap(), "/", &route))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    let client = client();
    let hold = |client: &_| {
        let req = Request::get(format!("{base}/hold")).body(full("")).unwrap();
        let client: hyper_util::client::legacy::Client<_, TestBody> = Clone::clone(client);
        tokio::spawn(async move { send(&client, req).await })
    };
    let first = hold(&client);
    held.recv().await.unwrap();
    let body = "x".repeat(1000);
    let mut accepted = 0;
    let refusal = loop {
        let (res, answer) = send(&client, post(&format!("{base}/ingest"), None, &body)).await;
        match res.status() {
            StatusCode::ACCEPTED => accepted += 1,
            _ => break (res, answer),
        }
        assert!(accepted < 20, "max_bytes is not enforced");
    };
    assert!(accepted >= 3, "{accepted}");
    let (res, answer) = refusal;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(json(&answer)["reason"], "queue_full");

    upstream.release.notify_one();
    first.await.unwrap();
    let admin = proxy.admin_addr();
    eventually(
        Duration::from_secs(20),
        "delivered and the space freed",
        async || {
            let s = spool_status(admin).await;
            s["requests"] == 0 && s["bytes"].as_u64().unwrap() < 4096
        },
    )
    .await;
    let second = hold(&client);
    held.recv().await.unwrap();
    let (res, _) = send(&client, post(&format!("{base}/ingest"), None, &body)).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    upstream.release.notify_one();
    second.await.unwrap();
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// An upstream that reads the start of each request and closes the
/// connection: the request reached it, so it must not be spooled (it may
/// have been processed), whatever `on` says.
#[tokio::test]
async fn a_request_that_reached_the_upstream_is_never_spooled() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let arrived = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = arrived.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 64];
            if stream.read(&mut buf).await.unwrap_or(0) > 0 {
                count.fetch_add(1, Ordering::SeqCst);
            }
            drop(stream);
        }
    });
    let (proxy, dir) = start_spooling(upstream, "reached", "", "").await;
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    // With a body and without: an empty one is never read by the forwarder,
    // yet its head reached the upstream.
    for body in ["{}", ""] {
        let (res, _) = send(&client(), post(&url, Some("k"), body)).await;
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY, "body {body:?}");
    }
    assert!(arrived.load(Ordering::SeqCst) >= 2);
    assert_eq!(spool_status(proxy.admin_addr()).await["requests"], 0);
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A spool is opened once per process: a reload may change the route around
/// it (which keeps it) but not the spool itself.
#[tokio::test]
async fn a_reload_keeps_the_spool_and_refuses_to_change_it() {
    let upstream = reserve_addr();
    let dir = spool_dir("reload");
    let text = |timeout: u64, max_bytes: u64| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[route]]\nname = \"test\"\nupstream = \"http://{upstream}\"\ntimeout_ms = {timeout}\n\
             [route.spool]\ndir = \"{}\"\nmax_bytes = {max_bytes}\n",
            dir.display()
        )
    };
    let path = std::env::temp_dir().join(format!(
        "sluicegate-spool-reload-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text(30000, 1 << 20)).unwrap();
    let config = sluicegate::config::Config::load(&path).unwrap();
    let proxy = sluicegate::server::start_from(config, Some(path.clone()))
        .await
        .unwrap();
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    let (res, _) = send(&client(), post(&url, Some("before"), "{}")).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    std::fs::write(&path, text(20000, 1 << 20)).unwrap();
    let changes = proxy.reload().unwrap();
    assert_eq!(changes.changed, ["test"]);
    let (res, _) = send(&client(), post(&url, Some("after"), "{}")).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(spool_status(proxy.admin_addr()).await["requests"], 2);

    std::fs::write(&path, text(20000, 2 << 20)).unwrap();
    let err = proxy.reload().unwrap_err().to_string();
    assert!(
        err.contains("route `test`: [route.spool] cannot be"),
        "{err}"
    );

    let keys = serve_keys(upstream).await;
    eventually(Duration::from_secs(20), "both delivered", async || {
        keys.distinct() == 2
    })
    .await;
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(path);
}

/// The upstream pushing back (503 + Retry-After): the replayer waits at
/// least that long between attempts; an upstream that keeps failing (500)
/// dead-letters the request after `max_attempts`.
#[tokio::test]
async fn pushback_is_honoured_and_attempts_are_bounded() {
    let upstream = reserve_addr();
    let (proxy, dir) = start_spooling(upstream, "pushback", "", "max_attempts = 3\n").await;
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    let (res, _) = send(&client(), post(&url, Some("later"), "{}")).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let keys = serve_keys(upstream).await;
    keys.refuse_with.store(503, Ordering::SeqCst);
    eventually(Duration::from_secs(20), "two refusals", async || {
        keys.refused_at.lock().unwrap().len() >= 2
    })
    .await;
    keys.refuse_with.store(0, Ordering::SeqCst);
    let at = keys.refused_at.lock().unwrap().clone();
    assert!(
        at[1] - at[0] >= Duration::from_millis(950),
        "Retry-After: 1 not honoured: {:?}",
        at[1] - at[0]
    );
    eventually(Duration::from_secs(20), "delivered", async || {
        keys.counts().get("later") == Some(&1)
    })
    .await;

    // Failing for good: three attempts, then a dead letter.
    keys.refuse_with.store(500, Ordering::SeqCst);
    keys.refused_at.lock().unwrap().clear();
    // The upstream is up: a live request is answered by it, not spooled.
    let (res, _) = send(&client(), post(&url, Some("live"), "{}")).await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let admin = proxy.admin_addr();
    assert_eq!(spool_status(admin).await["requests"], 0);
    proxy.shutdown().await;

    // Spooled while the upstream is down, then it answers 500 every time.
    let down = reserve_addr();
    let (proxy, attempts_dir) = start_spooling(down, "attempts", "", "max_attempts = 3\n").await;
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    let (res, _) = send(&client(), post(&url, Some("doomed"), "{}")).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let keys = serve_keys(down).await;
    keys.refuse_with.store(500, Ordering::SeqCst);
    let admin = proxy.admin_addr();
    eventually(Duration::from_secs(30), "dead-lettered", async || {
        spool_status(admin).await["dead_letters"] == 1
    })
    .await;
    assert_eq!(keys.refused_at.lock().unwrap().len(), 3);
    let (_, body) = get(&format!("http://{admin}/spool/dead")).await;
    let dead = &json(&body)["dead"][0];
    assert_eq!(dead["status"], 500);
    assert_eq!(dead["attempts"], 3);
    assert_eq!(dead["excerpt"], "not now");
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(attempts_dir);
}

/// Nothing is replayed while the circuit is open, however long the spool
/// waits; the spool takes the circuit's refusals meanwhile.
#[tokio::test]
async fn nothing_is_replayed_while_the_circuit_is_open() {
    let upstream = reserve_addr();
    let circuit =
        "[route.circuit]\nfailure_threshold = 1\nopen_ms = 600000\nmax_open_ms = 600000\n";
    let (proxy, dir) = start_spooling(upstream, "circuit", circuit, "").await;
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    // The first fails to connect (spooled) and opens the circuit; the rest
    // are refused by the open circuit (spooled too).
    for i in 0..5 {
        let (res, _) = send(&client(), post(&url, Some(&format!("c{i}")), "{}")).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    let (_, metrics) = get(&format!("http://{}/metrics", proxy.admin_addr())).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(
        metric(&metrics, r#"sluicegate_circuit_state{route="test"}"#),
        Some(1.0)
    );
    let keys = serve_keys(upstream).await;
    // A negative check: a replayer that ignored the circuit would deliver
    // within milliseconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(keys.distinct(), 0, "replayed through an open circuit");
    assert_eq!(spool_status(proxy.admin_addr()).await["requests"], 5);
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
