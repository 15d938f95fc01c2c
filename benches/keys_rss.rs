//! Proxy memory after a million distinct clients (issue 5): the release proxy
//! with a rate limit keyed by `x-api-key` in front of the upstream simulator;
//! one million requests, each with a new key, from 64 concurrent keep-alive
//! connections on 127.0.0.1. Run once with the default `max_keys = 100000` and,
//! as the baseline in the same run, with the cap above the key count (every key
//! kept). Reports the proxy's RSS before, along the way and at the end.
//!
//! Run with `bash benches/rate_limit.sh` (or `cargo bench --bench keys_rss`
//! after `cargo build --release`); KEYS=200000 shortens it.

#![allow(clippy::disallowed_types)] // wall-clock time of real processes: benchmarks measure it

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

mod common;
use common::*;

const SIM_PORT: u16 = 19120;
const PROXY_PORT: u16 = 19121;
const ADMIN_PORT: u16 = 19122;
const CONNECTIONS: usize = 64;

fn keys_tracked() -> u64 {
    http_get(ADMIN_PORT, "/status")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["routes"][0]["rate_limit"]["keys"].as_u64())
        .unwrap_or(0)
}

fn run(rt: &tokio::runtime::Runtime, dir: &std::path::Path, keys: usize, max_keys: usize) {
    let route = format!(
        "[route.rate_limit]\nkey = \"header:x-api-key\"\nper_second = 10\nmax_keys = {max_keys}\n"
    );
    let sim = spawn_sim(SIM_PORT, 256, 0);
    let name = format!("cap{max_keys}");
    let proxy = start_proxy(dir, &name, &route, (PROXY_PORT, ADMIN_PORT, SIM_PORT));
    let pid = proxy.0.id();
    let start_rss = status_kb(pid, "VmRSS:");
    let next = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let mut marks = Vec::new();
    rt.block_on(async {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(CONNECTIONS)
            .build_http();
        let workers: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let (client, next) = (client.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= keys {
                            return;
                        }
                        let req = Request::get(format!("http://127.0.0.1:{PROXY_PORT}/ingest"))
                            .header("x-api-key", format!("client-{i:08}"))
                            .body(Empty::new())
                            .unwrap();
                        if let Ok(res) = client.request(req).await {
                            let _ = res.into_body().collect().await;
                        }
                    }
                })
            })
            .collect();
        let mut mark = keys / 10;
        while next.load(Ordering::Relaxed) < keys {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if next.load(Ordering::Relaxed) >= mark {
                marks.push((mark, status_kb(pid, "VmRSS:"), keys_tracked()));
                mark += keys / 10;
            }
        }
        for w in workers {
            let _ = w.await;
        }
    });
    let secs = began.elapsed().as_secs_f64();
    let end_rss = status_kb(pid, "VmRSS:");
    let peak = status_kb(pid, "VmHWM:");
    let tracked = keys_tracked();
    println!(
        "| {max_keys} | {keys} | {:.0} s | {:.1} | {:.1} | {:.1} | {tracked} |",
        secs,
        start_rss as f64 / 1024.0,
        end_rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    for (n, rss, tracked) in marks {
        eprintln!(
            "  max_keys {max_keys}: after {n} keys RSS {:.1} MB, {tracked} tracked",
            rss as f64 / 1024.0
        );
    }
    drop(proxy);
    drop(sim);
}

fn main() {
    if only_listing() {
        return;
    }
    let keys: usize = std::env::var("KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = work_dir("keys");
    let rt = runtime();
    println!(
        "\n{} cores; {keys} requests, each with a new x-api-key, {CONNECTIONS} connections\n",
        cores()
    );
    println!(
        "| max_keys | distinct keys sent | time | RSS before MB | RSS after MB | peak RSS MB | keys tracked at the end |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    run(&rt, &dir, keys, 100_000);
    run(&rt, &dir, keys, keys + 1);
}
