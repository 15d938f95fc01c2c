//! Store and forward benchmark (issue 14), release binaries only:
//!
//! - **Write rate**: 64 (and 256) clients POST 512-byte events as fast as
//!   they are answered for `RUN_SECONDS`, to a route whose upstream is down,
//!   so that every answer is a spooled `202`; with `fsync = "always"` and
//!   `"batch"` (10 ms). Baseline in the same run: 64 clients forwarded to the
//!   simulator answering at once.
//! - **Replay rate**: the simulator (16 workers × 20 ms: 800 req/s) is down
//!   while the spool fills with `capacity × RUN_SECONDS` requests, then
//!   starts: deliveries per second from the first to the last, against the
//!   simulator's capacity measured directly and against what live traffic
//!   gets through the same route, with `max_inflight` = the workers and
//!   with 4 more.
//! - **Live traffic during replay**: an open-loop 400 req/s (half the
//!   capacity) for `RUN_SECONDS` on an empty spool, then the same while a
//!   backlog replays: the live requests' goodput and p99.
//!
//! - **Memory**: 100 clients at once upload 8 MiB each (of unknown length,
//!   64 KiB chunks) to a route whose upstream is down: the proxy's peak RSS
//!   when the spool keeps them (800 MiB through the disk), and when it is
//!   too small to keep one (refused before a byte is read). `SCENARIO=memory`
//!   runs it alone.
//!
//! Run with `bash benches/spool.sh`. Only 127.0.0.1; bounded in requests and
//! time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

const SIM_PORT: u16 = 19500;
const PROXY_PORT: u16 = 19501;
const ADMIN_PORT: u16 = 19502;
const WORKERS: usize = 16;
const SERVICE_MS: u64 = 20;

fn spool_dir(name: &str) -> std::path::PathBuf {
    // On the disk the build is on (not a tmpfs), so that fsync costs what
    // it costs.
    let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-spool"))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn route(dir: &std::path::Path, fsync: &str, max_inflight: usize) -> String {
    format!(
        "[route.admission]\nmax_inflight = {max_inflight}\nqueue_capacity = 256\nqueue_timeout_ms = 1000\n\
         [route.spool]\ndir = \"{}\"\nmax_bytes = 1073741824\nfsync = \"{fsync}\"\n",
        dir.display()
    )
}

/// `clients` POST loops to `port` for `seconds`: answers by status class
/// (2xx counted apart for 202), and the 202s' latencies.
async fn closed_loop(port: u16, clients: usize, seconds: f64) -> (u64, u64, u64, Vec<u64>) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build(HttpConnector::new());
    let body = Bytes::from(vec![b'e'; 512]);
    let url = format!("http://127.0.0.1:{port}/ingest");
    let (accepted, ok, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, body, url) = (client.clone(), body.clone(), url.clone());
            let (accepted, ok, other) = (accepted.clone(), ok.clone(), other.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < end {
                    let start = Instant::now();
                    let req = http::Request::post(url.as_str())
                        .body(Full::new(body.clone()))
                        .unwrap();
                    match client.request(req).await {
                        Ok(res) => {
                            let status = res.status();
                            let _ = res.into_body().collect().await;
                            if status == 202 {
                                accepted.fetch_add(1, Ordering::Relaxed);
                                latencies.push(start.elapsed().as_micros() as u64);
                            } else if status.is_success() {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                other.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    latencies.sort_unstable();
    (
        accepted.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
        latencies,
    )
}

fn spool_requests() -> Option<u64> {
    let body = http_get(ADMIN_PORT, "/spool")?;
    let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
    doc["routes"][0]["requests"].as_u64()
}

fn sim_received() -> u64 {
    http_get(SIM_PORT, "/_sim/stats")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["received"].as_u64())
        .unwrap_or(0)
}

fn spooled_total() -> u64 {
    let text = http_get(ADMIN_PORT, "/metrics").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(r#"sluicegate_spooled_total{route="bench"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Fills the spool (upstream down) with at least `n` requests.
async fn fill(n: u64) {
    while spool_requests().unwrap_or(0) < n {
        closed_loop(PROXY_PORT, 64, 0.5).await;
    }
}

/// Waits (bounded) until the simulator has received something, then until
/// the spool is empty: (seconds from first delivery to empty, seconds from
/// the simulator's start to first delivery).
fn replay_times(started: Instant, limit: Duration) -> (f64, f64) {
    while sim_received() == 0 {
        assert!(started.elapsed() < limit, "replay never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let first = Instant::now();
    let resumed = started.elapsed().as_secs_f64();
    while spool_requests().unwrap_or(1) > 0 {
        assert!(started.elapsed() < limit, "replay never finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    (first.elapsed().as_secs_f64(), resumed)
}

fn live_plan(seconds: usize) -> LoadPlan {
    LoadPlan {
        url: format!("http://127.0.0.1:{PROXY_PORT}/ingest")
            .parse()
            .unwrap(),
        rates: vec![(WORKERS as f64 * 1000.0 / SERVICE_MS as f64) / 2.0; seconds],
        max_outstanding: 2000,
        client_timeout: Duration::from_secs(10),
        headers: http::HeaderMap::new(),
        body: Bytes::from(vec![b'l'; 512]),
    }
}

/// A body of `total` bytes in 64 KiB frames, of unknown length.
struct Upload(usize);

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        static CHUNK: [u8; 64 * 1024] = [b'u'; 64 * 1024];
        let n = self.0.min(CHUNK.len());
        self.0 -= n;
        std::task::Poll::Ready(
            (n > 0).then(|| Ok(http_body::Frame::data(Bytes::from_static(&CHUNK[..n])))),
        )
    }
}

/// `clients` upload `size` bytes each at once: answers by status.
async fn uploads(port: u16, clients: usize, size: usize) -> std::collections::BTreeMap<u16, u64> {
    let client: Client<HttpConnector, Upload> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build(HttpConnector::new());
    let url = format!("http://127.0.0.1:{port}/ingest");
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let req = http::Request::post(url.as_str())
                    .body(Upload(size))
                    .unwrap();
                match client.request(req).await {
                    Ok(res) => res.status().as_u16(),
                    Err(_) => 0,
                }
            })
        })
        .collect();
    let mut by_status = std::collections::BTreeMap::new();
    for t in tasks {
        *by_status.entry(t.await.unwrap()).or_default() += 1;
    }
    by_status
}

/// Peak RSS of 100 concurrent 8 MiB uploads spooled, and refused.
fn memory(dir: &std::path::Path, rt: &tokio::runtime::Runtime) {
    const CLIENTS: usize = 100;
    const SIZE: usize = 8 << 20;
    println!(
        "\n{CLIENTS} clients upload {} MiB each at once, upstream down\n",
        SIZE >> 20
    );
    println!(
        "| spool max_bytes | answers | proxy RSS before MiB | peak RSS MiB | grown MiB | × uploaded |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for (max_bytes, label) in [
        (2u64 << 30, "2 GiB (keeps them)"),
        (1 << 20, "1 MiB (keeps none)"),
    ] {
        let spool = spool_dir("memory");
        let route = format!(
            "max_body_bytes = 16777216\n[route.spool]\ndir = \"{}\"\nmax_bytes = {max_bytes}\nfsync = \"batch\"\n",
            spool.display()
        );
        let proxy = start_proxy(dir, "memory", &route, (PROXY_PORT, ADMIN_PORT, SIM_PORT));
        rt.block_on(uploads(PROXY_PORT, 4, 1024));
        let before = peak_rss_kb(proxy.0.id());
        let answers = rt.block_on(uploads(PROXY_PORT, CLIENTS, SIZE));
        let peak = peak_rss_kb(proxy.0.id());
        let grown = peak.saturating_sub(before) as f64 / 1024.0;
        println!(
            "| {label} | {answers:?} | {:.1} | {:.1} | {grown:.1} | {:.3} |",
            before as f64 / 1024.0,
            peak as f64 / 1024.0,
            grown / ((CLIENTS * SIZE) >> 20) as f64,
        );
        drop(proxy);
        let _ = std::fs::remove_dir_all(spool);
    }
}

fn main() {
    if only_listing() {
        return;
    }
    let seconds: usize = env_number("RUN_SECONDS", 10);
    let dir = work_dir("spool");
    let rt = runtime();
    memory(&dir, &rt);
    if std::env::var("SCENARIO").is_ok_and(|s| s == "memory") {
        return;
    }
    println!(
        "\n{} cores; 64 clients, 512-byte POSTs, {seconds} s per run\n",
        cores()
    );
    println!("| run | answers/s | 202 p50 ms | 202 p99 ms | × forwarded |");
    println!("|---|---:|---:|---:|---:|");
    let sim = spawn_sim(SIM_PORT, 512, 0);
    let proxy = start_proxy(&dir, "forward", "", (PROXY_PORT, ADMIN_PORT, SIM_PORT));
    let (_, forwarded, _, _) = rt.block_on(closed_loop(PROXY_PORT, 64, seconds as f64));
    let forwarded = forwarded as f64 / seconds as f64;
    println!("| forwarded to the simulator (0 ms) | {forwarded:.0} | - | - | 1.00 |");
    drop(proxy);
    drop(sim);
    for (fsync, clients) in [("always", 64), ("batch", 64), ("batch", 256)] {
        let spool = spool_dir(fsync);
        let proxy = start_proxy(
            &dir,
            fsync,
            &route(&spool, fsync, WORKERS),
            (PROXY_PORT, ADMIN_PORT, SIM_PORT),
        );
        let (accepted, _, other, lat) =
            rt.block_on(closed_loop(PROXY_PORT, clients, seconds as f64));
        let rate = accepted as f64 / seconds as f64;
        let ms = |q| quantile_ms(&lat, q).map_or("-".into(), |v| format!("{v:.2}"));
        println!(
            "| spooled, fsync = \"{fsync}\", {clients} clients ({other} not 202) | {rate:.0} | {} | {} | {:.2} |",
            ms(0.5),
            ms(0.99),
            rate / forwarded
        );
        drop(proxy);
        let _ = std::fs::remove_dir_all(spool);
    }

    // Capacity of the simulator, measured directly.
    let sim = spawn_sim(SIM_PORT, WORKERS, SERVICE_MS);
    let (_, direct, _, _) = rt.block_on(closed_loop(SIM_PORT, 64, seconds as f64));
    let capacity = direct as f64 / seconds as f64;
    drop(sim);
    println!(
        "\nsimulator {WORKERS} workers x {SERVICE_MS} ms: {capacity:.0} req/s measured directly\n"
    );
    println!(
        "| route max_inflight | through the route req/s | backlog | resumed after s | replay s | delivered/s | × capacity | × through the route |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let backlog = (capacity * seconds as f64) as u64;
    // The workers exactly, and a little headroom (a request queued at the
    // upstream while another's answer travels back).
    for max_inflight in [WORKERS, WORKERS + 4] {
        let spool = spool_dir("replay");
        let sim = spawn_sim(SIM_PORT, WORKERS, SERVICE_MS);
        let proxy = start_proxy(
            &dir,
            "replay",
            &route(&spool, "batch", max_inflight),
            (PROXY_PORT, ADMIN_PORT, SIM_PORT),
        );
        // What live traffic gets at most through this route.
        let (_, through, _, _) = rt.block_on(closed_loop(PROXY_PORT, 64, seconds as f64));
        let through = through as f64 / seconds as f64;
        drop(sim);
        rt.block_on(fill(backlog));
        let n = spool_requests().unwrap_or(0);
        let started = Instant::now();
        let sim = spawn_sim(SIM_PORT, WORKERS, SERVICE_MS);
        let (took, resumed) = replay_times(started, Duration::from_secs(600));
        let rate = n as f64 / took;
        println!(
            "| {max_inflight} | {through:.0} | {n} | {resumed:.2} | {took:.2} | {rate:.0} | {:.3} | {:.3} |",
            rate / capacity,
            rate / through
        );
        drop(sim);
        drop(proxy);
        let _ = std::fs::remove_dir_all(spool);
    }

    let spool = spool_dir("live");
    let proxy = start_proxy(
        &dir,
        "live",
        &route(&spool, "batch", WORKERS),
        (PROXY_PORT, ADMIN_PORT, SIM_PORT),
    );
    // Live traffic: alone, then beside a replaying backlog.
    println!(
        "\n| live 400 req/s for {seconds} s | live ok | live spooled | live p50 ms | live p99 ms | replayed meanwhile |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut goodput = Vec::new();
    for beside_replay in [false, true] {
        if beside_replay {
            rt.block_on(fill(backlog * 2));
        }
        let before_spooled = spooled_total();
        let before_spool = spool_requests().unwrap_or(0);
        let sim = spawn_sim(SIM_PORT, WORKERS, SERVICE_MS);
        if beside_replay {
            while sim_received() == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let live = rt.block_on(loadgen::run(live_plan(seconds), |_, _| {}));
        let live = Second::total(&live);
        let spooled = spooled_total() - before_spooled;
        let replayed = before_spool.saturating_sub(spool_requests().unwrap_or(0)) + spooled;
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let label = if beside_replay {
            "beside replay"
        } else {
            "alone"
        };
        println!(
            "| {label} | {} of {} | {spooled} | {} | {} | {} |",
            live.ok - spooled.min(live.ok),
            live.offered,
            ms(quantile_ms(&live.ok_latency_us, 0.5)),
            ms(quantile_ms(&live.ok_latency_us, 0.99)),
            if beside_replay {
                replayed.to_string()
            } else {
                "-".into()
            },
        );
        goodput.push((live.ok - spooled.min(live.ok)) as f64 / live.offered.max(1) as f64);
        drop(sim);
    }
    println!(
        "\nlive goodput beside replay / alone: {:.3}",
        goodput[1] / goodput[0].max(f64::MIN_POSITIVE)
    );
    drop(proxy);
    let _ = std::fs::remove_dir_all(spool);
}
