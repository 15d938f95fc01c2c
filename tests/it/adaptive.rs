//! An adaptive limit through the real proxy, against the upstream simulator
//! (paused clock: the simulator's service times are exact and nothing sleeps).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::*;
use sluicegate::sim::{self, SimOptions};

#[tokio::test(start_paused = true)]
async fn the_limit_finds_the_simulators_workers_without_being_told() {
    let options = SimOptions {
        workers: 8,
        service_time: Duration::from_millis(20),
    };
    let sim = sim::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .unwrap();
    let adaptive = "[route.admission]\nmax_inflight = \"adaptive\"\nqueue_capacity = 64\n\
                    queue_timeout_ms = 1000\n[route.admission.adaptive]\ninitial_limit = 2\n";
    let proxy = sluicegate::start(config(sim.addr(), "/", adaptive))
        .await
        .unwrap();
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    let stop = Arc::new(AtomicBool::new(false));
    // Far more demand than 8 workers: 40 clients, each sending back to back.
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    get(&url).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let status = json(
        &get(&format!("http://{}/status", proxy.admin_addr()))
            .await
            .1,
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let admission = &status["routes"][0]["admission"];
    let limit = admission["limit"].as_u64().unwrap();
    assert!((8..=14).contains(&limit), "limit {limit}: {admission}");
    let adaptive = &admission["adaptive"];
    assert_eq!(adaptive["algorithm"], "gradient");
    let baseline = adaptive["baseline_ms"].as_f64().unwrap();
    assert!((19.0..25.0).contains(&baseline), "baseline {baseline} ms");
    // The first window bound (2 slots, 40 clients), so its baseline was
    // re-measured by a probe at once; the load has kept the limit binding
    // since, so nothing confirmed it, and it goes stale in 45-75 s.
    assert_eq!(adaptive["phase"], "tracking", "{adaptive}");
    assert_eq!(adaptive["baseline_source"], "probe", "{adaptive}");
    let measured = adaptive["baseline_measured_s_ago"].as_f64().unwrap();
    assert!((6.0..8.0).contains(&measured), "{adaptive}");
    let stale_in = adaptive["baseline_stale_in_s"].as_f64().unwrap();
    assert!((37.0..75.0).contains(&stale_in), "{adaptive}");
    let metrics = get(&format!("http://{}/metrics", proxy.admin_addr()))
        .await
        .1;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(
        metric(&metrics, "sluicegate_concurrency_limit{route=\"test\"}"),
        Some(limit as f64)
    );
    proxy.shutdown().await;
}
