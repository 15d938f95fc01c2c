//! Soak (issue 7): mixed open-loop load through sluicegate for 10 minutes while
//! the upstream simulator fails, hangs, slows down and recovers, and clients
//! hang up at random. Reports requests sent, answered by status, abandoned by
//! the client on purpose, lost (sent, not abandoned, never answered: must be
//! 0), and the proxy's RSS over time (must be flat).
//!
//! Run with `bash benches/soak.sh` (SOAK_SECONDS=120 for a shorter run). Only
//! 127.0.0.1; bounded in time and in open requests.

#![allow(clippy::disallowed_types)] // wall-clock time of real processes: benchmarks measure it

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

mod common;
use common::*;

const SIM_PORT: u16 = 19140;
const PROXY_PORT: u16 = 19141;
const ADMIN_PORT: u16 = 19142;
const MAX_OPEN: u64 = 4000;

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    abandoned: AtomicU64,
    lost: AtomicU64,
    by_status: Mutex<BTreeMap<u16, u64>>,
    open: AtomicU64,
}

/// A small xorshift generator: the soak needs variety, not cryptography.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The simulator's mood in second `t` of every 60: healthy, failing, hanging,
/// slow, healthy.
fn mood(t: u64) -> &'static str {
    match t % 60 {
        0..=19 => r#"{"mode":"ok","service_ms":20}"#,
        20..=29 => r#"{"mode":"fail"}"#,
        30..=34 => r#"{"mode":"hang"}"#,
        35..=44 => r#"{"mode":"ok","service_ms":60}"#,
        _ => r#"{"mode":"ok","service_ms":20}"#,
    }
}

fn main() {
    if only_listing() {
        return;
    }
    let seconds: u64 = env_number("SOAK_SECONDS", 600);
    let dir = work_dir("soak");
    let route = "timeout_ms = 1000\nread_timeout_ms = 2000\n\
             [route.admission]\nmax_inflight = 16\nqueue_capacity = 64\nqueue_timeout_ms = 200\n\
             priority_trusted_proxies = [\"127.0.0.1\"]\n\
             [route.rate_limit]\nkey = \"header:x-api-key\"\nper_second = 100\nburst = 100\n\
             [route.circuit]\nfailure_threshold = 5\nopen_ms = 2000\nmax_open_ms = 8000\n";
    let sim = spawn_sim(SIM_PORT, 16, 20);
    let proxy = start_proxy(&dir, "soak", route, (PROXY_PORT, ADMIN_PORT, SIM_PORT));
    let pid = proxy.0.id();
    let rt = runtime();
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let mut rss = Vec::new();
    rt.block_on(async {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(512)
            .build_http();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut due = 0.0f64;
        let mut last = Instant::now();
        let mut second = u64::MAX;
        let body = Bytes::from(vec![b'x'; 512]);
        while start.elapsed() < Duration::from_secs(seconds) {
            let t = start.elapsed().as_secs();
            if t != second {
                second = t;
                http_post(SIM_PORT, "/_sim/config", mood(t));
                if t.is_multiple_of(10) {
                    rss.push((t, status_kb(pid, "VmRSS:")));
                }
            }
            // 600 req/s, with a 1 600 req/s burst 10 s of every 30.
            let rate = if t % 30 < 10 { 1600.0 } else { 600.0 };
            let now = Instant::now();
            due += rate * (now - last).as_secs_f64();
            last = now;
            while due >= 1.0 {
                due -= 1.0;
                if tally.open.load(Ordering::Relaxed) >= MAX_OPEN {
                    continue;
                }
                tally.sent.fetch_add(1, Ordering::Relaxed);
                tally.open.fetch_add(1, Ordering::Relaxed);
                // 20 API keys, two of them noisy (over their rate in bursts);
                // one request in ten is abandoned by its client after 0-100 ms.
                let key = match rng.below(10) {
                    0 | 1 => "noisy".to_string(),
                    _ => format!("k{}", rng.below(20)),
                };
                let abandon = (rng.below(10) == 0).then(|| Duration::from_millis(rng.below(100)));
                let post = rng.below(2) == 0;
                let req = Request::builder()
                    .method(if post { "POST" } else { "GET" })
                    .uri(format!("http://127.0.0.1:{PROXY_PORT}/ingest"))
                    .header("x-api-key", key)
                    .header(
                        "x-priority",
                        ["critical", "normal", "batch"][rng.below(3) as usize],
                    )
                    .body(Full::new(if post { body.clone() } else { Bytes::new() }))
                    .unwrap();
                let (client, tally) = (client.clone(), tally.clone());
                tokio::spawn(async move {
                    let call = async {
                        let res = client.request(req).await.ok()?;
                        let status = res.status().as_u16();
                        // A body cut off after the headers still counts as
                        // answered: the client got a status and an error.
                        let _ = res.into_body().collect().await;
                        Some(status)
                    };
                    let outcome = match abandon {
                        Some(after) => match tokio::time::timeout(after, call).await {
                            Ok(done) => done.ok_or(false),
                            Err(_) => Err(true),
                        },
                        None => tokio::time::timeout(Duration::from_secs(30), call)
                            .await
                            .ok()
                            .flatten()
                            .ok_or(false),
                    };
                    match outcome {
                        Ok(status) => {
                            *tally.by_status.lock().unwrap().entry(status).or_default() += 1;
                        }
                        Err(true) => {
                            tally.abandoned.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(false) => {
                            tally.lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tally.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        http_post(SIM_PORT, "/_sim/config", r#"{"mode":"ok","service_ms":20}"#);
        // Let every request still open finish (bounded by its own timeout).
        let deadline = Instant::now() + Duration::from_secs(35);
        while tally.open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    rss.push((seconds, status_kb(pid, "VmRSS:")));
    let gauges = http_get(ADMIN_PORT, "/metrics").unwrap_or_default();
    let gauge = |name: &str| {
        gauges
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("?")
            .to_string()
    };
    let by_status = tally.by_status.lock().unwrap().clone();
    let answered: u64 = by_status.values().sum();
    println!(
        "\n{} cores; {seconds} s; 600 req/s with 1 600 req/s bursts; simulator cycling ok / fail / hang / slow every 60 s\n",
        cores()
    );
    println!("| sent | answered | abandoned by the client | lost | still open at the end |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {answered} | {} | {} | {} |",
        tally.sent.load(Ordering::Relaxed),
        tally.abandoned.load(Ordering::Relaxed),
        tally.lost.load(Ordering::Relaxed),
        tally.open.load(Ordering::Relaxed),
    );
    println!("\n| status | count |\n|---:|---:|");
    for (status, n) in &by_status {
        println!("| {status} | {n} |");
    }
    println!("\n| second | proxy RSS MB |\n|---:|---:|");
    for (t, kb) in &rss {
        println!("| {t} | {:.1} |", *kb as f64 / 1024.0);
    }
    println!(
        "\nat the end: sluicegate_inflight {} , sluicegate_queue_depth {}",
        gauge("sluicegate_inflight{route=\"bench\"}"),
        gauge("sluicegate_queue_depth{route=\"bench\"}")
    );
    drop(proxy);
    drop(sim);
}
