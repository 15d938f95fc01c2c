//! Admission control through the real proxy, over HTTP (paused clock where
//! time matters).

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use http::StatusCode;
use sluicegate::sim::{self, SimOptions};

fn admission(max: usize, capacity: usize, timeout_ms: u64) -> String {
    format!(
        "[route.admission]\nmax_inflight = {max}\nqueue_capacity = {capacity}\n\
         queue_timeout_ms = {timeout_ms}\nretry_after_min_s = 2\nretry_after_max_s = 30\n"
    )
}

// Real clock: this is about concurrency, not time, and 500 real sockets leave the
// runtime idle often enough for a paused clock to leap ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_never_sees_more_than_max_inflight_with_500_clients() {
    // The simulator could serve 100 at once; admission must hold it to 8.
    let options = SimOptions {
        workers: 100,
        service_time: Duration::from_millis(10),
    };
    let sim = sim::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .unwrap();
    let proxy = sluicegate::start(config(sim.addr(), "/", &admission(8, 600, 60_000)))
        .await
        .unwrap();
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    let clients: Vec<_> = (0..500)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let (res, body) = get(&url).await;
                (res.status(), body)
            })
        })
        .collect();
    for c in clients {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body:?}");
    }
    let stats = sim.stats();
    assert_eq!(stats.served, 500);
    assert!(
        stats.peak_concurrency <= 8,
        "upstream peak {}",
        stats.peak_concurrency
    );
    assert_eq!(stats.peak_concurrency, 8, "the limit was not used fully");
    proxy.shutdown().await;
}

/// Releases the upstream's held requests until `task` has its answer.
async fn released<T>(up: &Upstream, task: tokio::task::JoinHandle<T>) -> T {
    while !task.is_finished() {
        up.release.notify_waiters();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    task.await.unwrap()
}

type Answer = tokio::task::JoinHandle<(http::Response<()>, bytes::Bytes)>;

/// A route through a held upstream with one request holding the slot and
/// one waiting.
struct OneWaiting {
    up: std::sync::Arc<Upstream>,
    /// Told of each request reaching the upstream.
    held: tokio::sync::mpsc::UnboundedReceiver<()>,
    proxy: sluicegate::Running,
    /// The held path's URL.
    hold: String,
    first: Answer,
    queued: Answer,
}

async fn one_held_one_queued(route: &str) -> OneWaiting {
    let (up, mut held) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", route))
        .await
        .unwrap();
    let hold = format!("http://{}/hold", proxy.proxy_addr());
    let (h1, h2) = (hold.clone(), hold.clone());
    let first = tokio::spawn(async move { get(&h1).await });
    held.recv().await.unwrap();
    let queued = tokio::spawn(async move { get(&h2).await });
    let status_url = format!("http://{}/status", proxy.admin_addr());
    while json(&get(&status_url).await.1)["routes"][0]["admission"]["queued"] != 1 {
        tokio::task::yield_now().await;
    }
    OneWaiting {
        up,
        held,
        proxy,
        hold,
        first,
        queued,
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_answers_503_queue_full_at_once_with_retry_after() {
    let OneWaiting {
        up,
        mut held,
        proxy,
        hold,
        first,
        queued,
    } = one_held_one_queued(&admission(1, 1, 60_000)).await;

    let start = tokio::time::Instant::now();
    let (res, body) = get(&hold).await;
    assert_eq!(start.elapsed(), Duration::ZERO, "the refusal waited");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (2..=30).contains(&retry),
        "Retry-After {retry} outside the clamp"
    );
    let body = json(&body);
    assert_eq!(body["reason"], "queue_full");
    assert_eq!(body["retry_after_s"], retry);

    // The held and the queued request still complete.
    up.release.notify_waiters();
    assert_eq!(first.await.unwrap().0.status(), StatusCode::OK);
    held.recv().await.unwrap();
    up.release.notify_waiters();
    assert_eq!(queued.await.unwrap().0.status(), StatusCode::OK);

    let (_, metrics) = get(&format!("http://{}/metrics", proxy.admin_addr())).await;
    let text = String::from_utf8_lossy(&metrics);
    let series = |s: &str| metric(&text, s);
    assert_eq!(
        series(r#"sluicegate_shed_total{route="test",reason="queue_full"}"#),
        Some(1.0)
    );
    assert_eq!(
        series(r#"sluicegate_requests_total{route="test",outcome="queue_full"}"#),
        Some(1.0)
    );
    assert_eq!(
        series(r#"sluicegate_concurrency_limit{route="test"}"#),
        Some(1.0)
    );
    assert_eq!(
        series(r#"sluicegate_queue_timeout_seconds{route="test"}"#),
        Some(60.0)
    );
    assert_eq!(series(r#"sluicegate_queue_depth{route="test"}"#), Some(0.0));
    assert_eq!(series(r#"sluicegate_inflight{route="test"}"#), Some(0.0));
    assert_eq!(
        series(r#"sluicegate_queue_wait_seconds_count{route="test"}"#),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_that_waits_too_long_gets_503_queue_timeout() {
    let (up, mut held) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &admission(1, 4, 250)))
        .await
        .unwrap();
    let hold = format!("http://{}/hold", proxy.proxy_addr());
    let h1 = hold.clone();
    let first = tokio::spawn(async move { get(&h1).await });
    held.recv().await.unwrap();

    let start = tokio::time::Instant::now();
    let (res, body) = get(&format!("http://{}/other", proxy.proxy_addr())).await;
    let waited = start.elapsed();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["reason"], "queue_timeout");
    assert!(res.headers().contains_key("retry-after"));
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(300),
        "{waited:?}"
    );
    up.release.notify_waiters();
    assert_eq!(first.await.unwrap().0.status(), StatusCode::OK);
    let (_, status) = get(&format!("http://{}/status", proxy.admin_addr())).await;
    let adm = &json(&status)["routes"][0]["admission"];
    assert_eq!(adm["shed_queue_timeout"], 1);
    assert_eq!(
        (adm["inflight"].as_u64(), adm["queued"].as_u64()),
        (Some(0), Some(0))
    );
    proxy.shutdown().await;
}

/// One request holds the only slot, one `normal` waits in the only queue
/// place; a third arrives with `headers`. Returns its status and the
/// waiter's.
async fn arrival_against_a_full_queue(extra: &str, headers: &[(&str, &str)]) -> (u16, u16) {
    let route = format!("{}{extra}", admission(1, 1, 60_000));
    let OneWaiting {
        up,
        proxy,
        hold,
        first,
        queued: waiter,
        ..
    } = one_held_one_queued(&route).await;
    let mut req = http::Request::get(&hold);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let arrival = tokio::spawn(async move { send(&client(), req.body(full("")).unwrap()).await });
    // Let the arrival be decided (queued, or refused at once), then release
    // whoever holds or waits.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let mut results = Vec::new();
    for task in [first, waiter, arrival] {
        results.push(released(&up, task).await.0.status().as_u16());
    }
    proxy.shutdown().await;
    assert_eq!(results[0], 200, "the held request");
    (results[2], results[1])
}

#[tokio::test(start_paused = true)]
async fn a_priority_header_from_an_untrusted_peer_evicts_nobody() {
    let (arrival, waiter) = arrival_against_a_full_queue("", &[("x-priority", "critical")]).await;
    assert_eq!(
        (arrival, waiter),
        (503, 200),
        "the client named its own class"
    );
}

#[tokio::test(start_paused = true)]
async fn a_priority_header_from_a_trusted_proxy_is_believed() {
    let trusted = "priority_trusted_proxies = [\"127.0.0.1\"]\n";
    let (arrival, waiter) =
        arrival_against_a_full_queue(trusted, &[("x-priority", "critical")]).await;
    assert_eq!(
        (arrival, waiter),
        (200, 503),
        "critical evicts the normal waiter"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_tier_carries_its_class() {
    let tiers = "[route.rate_limit]\nkey = \"header:x-api-key\"\nper_second = 1000\n\
                 [[route.rate_limit.tier]]\nname = \"gold\"\nkeys = [\"gold-key\"]\n\
                 per_second = 1000\npriority = \"critical\"\n";
    let (arrival, waiter) = arrival_against_a_full_queue(tiers, &[("x-api-key", "gold-key")]).await;
    assert_eq!((arrival, waiter), (200, 503), "the gold tier's class");
    // Another key is `normal`, whatever header it sends.
    let (arrival, waiter) =
        arrival_against_a_full_queue(tiers, &[("x-api-key", "other"), ("x-priority", "critical")])
            .await;
    assert_eq!((arrival, waiter), (503, 200));
}

#[tokio::test(start_paused = true)]
async fn a_quiet_tenant_is_not_refused_behind_a_flooding_one() {
    let (up, mut held) = spawn_upstream().await;
    let route = format!(
        // Every tenant of this test comes from one address (127.0.0.1).
        "{}tenant_key = \"header:x-api-key\"\ntenants_per_client = 10\n",
        admission(1, 2, 60_000)
    );
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &route))
        .await
        .unwrap();
    let hold = format!("http://{}/hold", proxy.proxy_addr());
    let status_url = format!("http://{}/status", proxy.admin_addr());
    let as_tenant = |key: &'static str| {
        let hold = hold.clone();
        tokio::spawn(async move {
            let req = http::Request::get(&hold)
                .header("x-api-key", key)
                .body(full(""))
                .unwrap();
            send(&client(), req).await.0.status().as_u16()
        })
    };
    let queued = |n: u64| {
        let url = status_url.clone();
        async move {
            while json(&get(&url).await.1)["routes"][0]["admission"]["queued"] != n {
                tokio::task::yield_now().await;
            }
        }
    };
    let first = as_tenant("flood");
    held.recv().await.unwrap();
    let flood: Vec<_> = (0..2).map(|_| as_tenant("flood")).collect();
    queued(2).await;
    let quiet = as_tenant("quiet");
    // The quiet tenant takes the flood's newest place; the flood's is refused.
    let mut refused = 0;
    while refused == 0 {
        refused = flood.iter().filter(|t| t.is_finished()).count();
        tokio::task::yield_now().await;
    }
    let status = json(&get(&status_url).await.1);
    let tenants = &status["routes"][0]["admission"]["tenants"];
    assert_eq!(tenants["waiting"], 2, "{status}");
    assert_eq!(tenants["top_shed"][0]["tenant"], "flood", "{status}");
    let mut statuses = Vec::new();
    for task in [first, quiet].into_iter().chain(flood) {
        statuses.push(released(&up, task).await);
    }
    statuses[2..].sort();
    assert_eq!(
        statuses,
        [200, 200, 200, 503],
        "first, quiet, then the flood's two"
    );
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn uploads_are_admitted_by_their_bytes_as_well_as_their_count() {
    let (up, mut held) = spawn_upstream().await;
    let route = format!("{}max_inflight_bytes = 100000\n", admission(16, 4, 60_000));
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &route))
        .await
        .unwrap();
    let hold = format!("http://{}/hold", proxy.proxy_addr());
    let post = |n: usize| {
        let hold = hold.clone();
        tokio::spawn(async move {
            let req = http::Request::post(&hold)
                .body(full(vec![b'e'; n]))
                .unwrap();
            send(&client(), req).await.0.status().as_u16()
        })
    };
    // Heavier than the whole budget: 413 before it queues or reaches the upstream.
    assert_eq!(post(200_000).await.unwrap(), 413);
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    let first = post(60_000);
    held.recv().await.unwrap();
    let second = post(60_000);
    let status_url = format!("http://{}/status", proxy.admin_addr());
    loop {
        let status = json(&get(&status_url).await.1);
        let a = &status["routes"][0]["admission"];
        if a["queued"] == 1 {
            assert_eq!(a["inflight"], 1, "slots are free: the bytes are not");
            assert_eq!(a["inflight_bytes"], 60_000);
            assert_eq!(a["bytes_limit"], 100_000);
            break;
        }
        tokio::task::yield_now().await;
    }
    // A body-less request weighs nothing and passes.
    let (res, _) = get(&format!("http://{}/x", proxy.proxy_addr())).await;
    assert_eq!(res.status(), 200);
    for task in [first, second] {
        assert_eq!(released(&up, task).await, 200);
    }
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_chunked_upload_weighs_what_it_streams() {
    let (up, mut held) = spawn_upstream().await;
    let route = format!(
        "{}max_inflight_bytes = 1000000\nunknown_length_bytes = 65536\n",
        admission(16, 4, 60_000)
    );
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &route))
        .await
        .unwrap();
    let hold = format!("http://{}/hold", proxy.proxy_addr());
    // 300 000 bytes with no Content-Length, held at the upstream once sent.
    let (body, _) = streamed(300_000, 10_000);
    let upload = tokio::spawn(async move {
        let req = http::Request::post(&hold).body(body).unwrap();
        send(&client(), req).await.0.status().as_u16()
    });
    held.recv().await.unwrap();
    let status_url = format!("http://{}/status", proxy.admin_addr());
    let bytes = || async {
        json(&get(&status_url).await.1)["routes"][0]["admission"]["inflight_bytes"].clone()
    };
    // Re-weighed in 64 KiB steps past the estimate: 327 680 once all is sent.
    let mut seen = serde_json::Value::Null;
    for _ in 0..1000 {
        seen = bytes().await;
        if seen == 327_680 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(seen, 327_680);
    assert_eq!(released(&up, upload).await, 200);
    assert_eq!(bytes().await, 0);
    proxy.shutdown().await;
}

/// What `bursts` bursts of `size` requests `every` apart did through a
/// route with `discipline`: requests served while the load lasted (goodput;
/// a FIFO's full queue drains after it), refused in all, and the served
/// ones' mean latency (ms).
async fn bursts(discipline: &str, bursts: usize, size: usize, every: Duration) -> (u32, u32, u64) {
    // 4 workers of 100 ms: 40 requests a second.
    let upstream = workers(4, Duration::from_millis(100)).await;
    let route = format!(
        "{}queue_discipline = \"{discipline}\"\n",
        admission(4, 16, 1000)
    );
    let proxy = sluicegate::start(config(upstream, "/", &route))
        .await
        .unwrap();
    let url = format!("http://{}/x", proxy.proxy_addr());
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..bursts {
        for _ in 0..size {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let sent = tokio::time::Instant::now();
                let status = get(&url).await.0.status();
                (status, sent, tokio::time::Instant::now())
            }));
        }
        tokio::time::sleep(every).await;
    }
    let end = start + every * bursts as u32;
    let (mut served, mut refused, mut waited) = (0, 0, Duration::ZERO);
    for t in tasks {
        let (status, sent, done) = t.await.unwrap();
        if status != StatusCode::OK {
            refused += 1;
            continue;
        }
        waited += done - sent;
        if done <= end {
            served += 1;
        }
    }
    proxy.shutdown().await;
    let all = tasks_len(bursts, size) - refused;
    let mean = waited.as_millis() as u64 / u64::from(all.max(1));
    (served, refused, mean)
}

fn tasks_len(bursts: usize, size: usize) -> u32 {
    u32::try_from(bursts * size).unwrap()
}

#[tokio::test(start_paused = true)]
async fn codel_loses_no_more_than_fifo_to_bursts_or_overload() {
    // Bursts of 12 every 600 ms: 20 a second, half of what the upstream
    // serves, each burst taking 300 ms to drain.
    let every = Duration::from_millis(600);
    let fifo = bursts("fifo", 10, 12, every).await;
    let codel = bursts("codel", 10, 12, every).await;
    eprintln!("bursts at half load: fifo {fifo:?}, codel {codel:?} (served, refused, mean ms)");
    assert!(
        codel.1 <= fifo.1,
        "codel refused {} > fifo {}",
        codel.1,
        fifo.1
    );
    // Twice the capacity: 8 every 100 ms for 5 s.
    let every = Duration::from_millis(100);
    let fifo = bursts("fifo", 50, 8, every).await;
    let codel = bursts("codel", 50, 8, every).await;
    eprintln!("2x overload: fifo {fifo:?}, codel {codel:?} (served, refused, mean ms)");
    assert!(
        codel.0 >= fifo.0,
        "codel served {} < fifo {}",
        codel.0,
        fifo.0
    );
    // At its lower latency.
    assert!(codel.2 < fifo.2, "codel {} ms, fifo {} ms", codel.2, fifo.2);
}
