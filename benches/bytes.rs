//! Byte-aware admission benchmark (issue 13), against the upstream simulator
//! with 64 workers × 20 ms, so that only the proxy bounds what it takes:
//!
//! - **Uploads**: 16 clients each POST 1 MiB at once, 5 rounds, through
//!   admission that counts only requests (`max_inflight = 16`) and through
//!   the same with `max_inflight_bytes = 4 MiB`: how many the upstream works
//!   on at once (the simulator's `peak_concurrency`), and whether every
//!   upload succeeds.
//! - **Mixed**: open loop, 1 KiB events at 396 req/s with 1 MiB batches at
//!   4 req/s (1 %), against events alone at 400 req/s, both through the
//!   byte-budgeted route: the events' p99.
//!
//! Run with `bash benches/bytes.sh`. Only 127.0.0.1; bounded in requests and
//! time.

use std::time::Duration;

use tokio::time::Instant;

mod common;
use common::*;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluicegate::loadgen::{self, LoadPlan, Second, quantile_ms};

const SIM_PORT: u16 = 19400;
const PROXY_PORT: u16 = 19401;
const ADMIN_PORT: u16 = 19402;
const MIB: usize = 1 << 20;

fn route(bytes: bool) -> String {
    let mut route = String::from(
        "[route.admission]\nmax_inflight = 16\nqueue_capacity = 64\nqueue_timeout_ms = 10000\n",
    );
    if bytes {
        route.push_str("max_inflight_bytes = 4194304\n");
    }
    route
}

fn sim_peak() -> u64 {
    http_get(SIM_PORT, "/_sim/stats")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["peak_concurrency"].as_u64())
        .unwrap_or(0)
}

/// 16 uploads of 1 MiB at once, `rounds` times: (statuses not 200, peak at
/// the upstream, seconds).
async fn uploads(rounds: usize) -> (usize, u64, f64) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let body = Bytes::from(vec![b'u'; MIB]);
    let url = format!("http://127.0.0.1:{PROXY_PORT}/ingest");
    let start = Instant::now();
    let mut failed = 0;
    for _ in 0..rounds {
        let sends: Vec<_> = (0..16)
            .map(|_| {
                let (client, body, url) = (client.clone(), body.clone(), url.clone());
                tokio::spawn(async move {
                    let req = http::Request::post(url).body(Full::new(body)).unwrap();
                    match client.request(req).await {
                        Ok(res) => {
                            let ok = res.status() == 200;
                            ok && res.into_body().collect().await.is_ok()
                        }
                        Err(_) => false,
                    }
                })
            })
            .collect();
        for s in sends {
            failed += usize::from(!s.await.unwrap_or(false));
        }
    }
    (failed, sim_peak(), start.elapsed().as_secs_f64())
}

fn plan(rate: f64, size: usize, seconds: usize) -> LoadPlan {
    LoadPlan {
        url: format!("http://127.0.0.1:{PROXY_PORT}/ingest")
            .parse()
            .unwrap(),
        rates: vec![rate; seconds],
        max_outstanding: 2000,
        client_timeout: Duration::from_secs(10),
        headers: http::HeaderMap::new(),
        body: Bytes::from(vec![b'e'; size]),
    }
}

fn main() {
    if only_listing() {
        return;
    }
    let seconds: usize = env_number("RUN_SECONDS", 15);
    let dir = work_dir("bytes");
    let rt = runtime();
    println!(
        "\n{} cores; upstream simulator 64 workers x 20 ms; admission max_inflight 16\n",
        cores()
    );
    println!("| route | uploads of 1 MiB | failed | upstream peak at once | seconds |");
    println!("|---|---:|---:|---:|---:|");
    for bytes in [false, true] {
        let sim = spawn_sim(SIM_PORT, 64, 20);
        let name = if bytes { "bytes" } else { "counted" };
        let proxy = start_proxy(
            &dir,
            name,
            &route(bytes),
            (PROXY_PORT, ADMIN_PORT, SIM_PORT),
        );
        let (failed, peak, secs) = rt.block_on(uploads(5));
        let label = if bytes {
            "max_inflight_bytes = 4 MiB"
        } else {
            "requests only"
        };
        println!("| {label} | 80 | {failed} | {peak} | {secs:.2} |");
        drop(proxy);
        drop(sim);
    }
    println!(
        "\n| run (max_inflight_bytes = 4 MiB) | events/s | batches/s | events ok | events p50 ms | events p99 ms | batches ok | batches p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut p99s = Vec::new();
    for (label, events, batches) in [("events only", 400.0, 0.0), ("mixed", 396.0, 4.0)] {
        let sim = spawn_sim(SIM_PORT, 64, 20);
        let proxy = start_proxy(
            &dir,
            "mixed",
            &route(true),
            (PROXY_PORT, ADMIN_PORT, SIM_PORT),
        );
        let (ev, ba) = rt.block_on(async {
            let ev = loadgen::run(plan(events, 1024, seconds), |_, _| {});
            if batches > 0.0 {
                let ba = loadgen::run(plan(batches, MIB, seconds), |_, _| {});
                let (ev, ba) = tokio::join!(ev, ba);
                (ev, Some(ba))
            } else {
                (ev.await, None)
            }
        });
        let ev = Second::total(&ev);
        let p99 = quantile_ms(&ev.ok_latency_us, 0.99);
        p99s.push(p99.unwrap_or(0.0));
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let (ba_ok, ba_p99) = ba.map_or(("-".to_string(), "-".to_string()), |b| {
            let b = Second::total(&b);
            (b.ok.to_string(), ms(quantile_ms(&b.ok_latency_us, 0.99)))
        });
        println!(
            "| {label} | {events} | {batches} | {} of {} | {} | {} | {ba_ok} | {ba_p99} |",
            ev.ok,
            ev.offered,
            ms(quantile_ms(&ev.ok_latency_us, 0.5)),
            ms(p99),
        );
        drop(proxy);
        drop(sim);
    }
    println!(
        "\nevents' p99, mixed / events only: {:.2}x",
        p99s[1] / p99s[0].max(f64::MIN_POSITIVE)
    );
}
