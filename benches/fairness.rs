//! Noisy-neighbour benchmark (issue 13): tenant A floods at 4x the upstream's
//! capacity (3200 req/s) while tenant B sends 160 req/s, both open loop,
//! through the upstream simulator (16 workers x 20 ms, about 800 req/s):
//! through sluicegate with `tenant_key` (`fair`), through sluicegate's one
//! FIFO (`fifo`), and through HAProxy configured alike (maxconn 16,
//! maxqueue 32, timeout queue 100 ms).
//!
//! Run with `bash benches/fairness.sh`. Everything listens on 127.0.0.1; each
//! run is bounded in time. Writes a markdown table to stdout and
//! `benches/results/fairness.svg` (each tenant's goodput, second by second).

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

mod common;
use common::*;

use sluicegate::loadgen::{self, LoadPlan, Second, quantile_ms};

const SIM_PORT: u16 = 19300;
const PROXY_PORT: u16 = 19301;
const ADMIN_PORT: u16 = 19302;
/// The tenants: name, API key, requests per second.
const TENANTS: [(&str, &str, f64); 2] = [("A", "tenant-a", 3200.0), ("B", "tenant-b", 160.0)];
const TARGETS: [&str; 3] = ["fair", "fifo", "haproxy"];

/// The admission section of each sluicegate target.
fn route_of(target: &str) -> String {
    let admission =
        "[route.admission]\nmax_inflight = 16\nqueue_capacity = 32\nqueue_timeout_ms = 100\n";
    match target {
        // Every tenant comes from this one address: trusted to name itself.
        "fair" => {
            format!("{admission}tenant_key = \"header:x-api-key\"\ntenants_per_client = 100\n")
        }
        _ => admission.to_string(),
    }
}

fn haproxy_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("haproxy.cfg");
    std::fs::write(
        &path,
        format!(
            "global\n  nbthread 1\n  maxconn 8192\ndefaults\n  mode http\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\n  timeout queue 100ms\n  option http-keep-alive\n\
             frontend fe\n  bind 127.0.0.1:{PROXY_PORT}\n  default_backend be\nbackend be\n  \
             server up 127.0.0.1:{SIM_PORT} maxconn 16 maxqueue 32\n"
        ),
    )
    .unwrap();
    path
}

struct Run {
    target: &'static str,
    /// Each tenant's seconds, in `TENANTS` order.
    tenants: Vec<Vec<Second>>,
}

fn main() {
    if only_listing() {
        return;
    }
    let seconds: usize = env_number("RUN_SECONDS", 20);
    let dir = work_dir("fairness");
    let haproxy = ["/usr/sbin/haproxy", "haproxy"]
        .into_iter()
        .find(|p| Command::new(p).arg("-v").output().is_ok());
    let rt = runtime();
    let mut runs = Vec::new();
    for target in TARGETS {
        let sim = spawn_sim(SIM_PORT, 16, 20);
        let proxy = match (target, haproxy) {
            ("haproxy", Some(bin)) => {
                let cfg = haproxy_config(&dir);
                spawn(bin, &["-f", cfg.to_str().unwrap(), "-db"], PROXY_PORT)
            }
            ("haproxy", None) => {
                eprintln!("haproxy not installed: skipped (benches/fairness.sh installs it)");
                continue;
            }
            _ => start_proxy(
                &dir,
                target,
                &route_of(target),
                (PROXY_PORT, ADMIN_PORT, SIM_PORT),
            ),
        };
        let plans: Vec<LoadPlan> = TENANTS
            .iter()
            .map(|&(_, key, rate)| {
                let mut headers = http::HeaderMap::new();
                headers.insert("x-api-key", http::HeaderValue::from_static(key));
                LoadPlan {
                    url: format!("http://127.0.0.1:{PROXY_PORT}/ingest")
                        .parse()
                        .unwrap(),
                    rates: vec![rate; seconds],
                    max_outstanding: 4000,
                    client_timeout: Duration::from_secs(10),
                    headers,
                    body: bytes::Bytes::new(),
                }
            })
            .collect();
        let [a, b] = <[LoadPlan; 2]>::try_from(plans).ok().unwrap();
        let (a, b) = rt.block_on(async {
            tokio::join!(loadgen::run(a, |_, _| {}), loadgen::run(b, |_, _| {}))
        });
        let run = Run {
            target,
            tenants: vec![a, b],
        };
        for (i, (name, _, _)) in TENANTS.iter().enumerate() {
            let total = Second::total(&run.tenants[i]);
            eprintln!(
                "{target} {name}: good {}/s, p99 ok {:?} ms",
                total.good / seconds as u64,
                quantile_ms(&total.ok_latency_us, 0.99)
            );
        }
        runs.push(run);
        drop(proxy);
        drop(sim);
    }
    print_table(&runs, seconds);
    write_result("fairness.svg", &plot(&runs, seconds));
}

/// The first second or two warm up; the figures are over the rest.
const WARM_UP: usize = 2;

fn steady(seconds: &[Second]) -> Second {
    Second::total(seconds.iter().skip(WARM_UP))
}

fn print_table(runs: &[Run], seconds: usize) {
    let span = (seconds - WARM_UP) as f64;
    println!(
        "\n{} cores; open loop, {seconds} s (the first {WARM_UP} not counted); upstream 16 workers x 20 ms (~800 req/s); \
         A {} req/s, B {} req/s\n",
        cores(),
        TENANTS[0].2,
        TENANTS[1].2
    );
    println!(
        "| target | tenant | offered/s | goodput/s | goodput / offered | admitted p99 ms | 503s | with Retry-After | errors |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let total_good = |run: &Run| {
        run.tenants
            .iter()
            .map(|t| steady(t).good as f64 / span)
            .sum::<f64>()
    };
    for run in runs {
        for (i, (name, _, _)) in TENANTS.iter().enumerate() {
            let t = steady(&run.tenants[i]);
            let offered = (t.offered + t.client_dropped) as f64 / span;
            let good = t.good as f64 / span;
            let retry = if t.shed == 0 {
                "-".to_string()
            } else {
                format!(
                    "{:.0} %",
                    100.0 * t.shed_with_retry_after as f64 / t.shed as f64
                )
            };
            println!(
                "| {} | {name} | {offered:.0} | {good:.0} | {:.1} % | {} | {} | {retry} | {} |",
                run.target,
                100.0 * good / offered.max(1.0),
                quantile_ms(&t.ok_latency_us, 0.99).map_or("-".into(), |v| format!("{v:.1}")),
                t.shed,
                t.errors + t.client_dropped,
            );
        }
        println!(
            "| {} | total | | {:.0} | | | | | |",
            run.target,
            total_good(run)
        );
    }
    if let Some(haproxy) = runs.iter().find(|r| r.target == "haproxy") {
        for run in runs.iter().filter(|r| r.target != "haproxy") {
            println!(
                "\n{}: total goodput {:.3}x HAProxy's",
                run.target,
                total_good(run) / total_good(haproxy)
            );
        }
    }
}

/// One panel per target: each tenant's goodput per second.
fn plot(runs: &[Run], seconds: usize) -> String {
    let colors = ["#d62728", "#1f77b4"];
    let (w, h, pad, gap) = (560.0, 170.0, 50.0, 30.0);
    let ymax = 900.0;
    let mut out = svg::open(w, runs.len() as f64 * (h + gap) + 10.0);
    for (r, run) in runs.iter().enumerate() {
        let y0 = r as f64 * (h + gap) + 20.0;
        let _ = write!(
            out,
            r#"<text x="{pad}" y="{}">{}: goodput per second by tenant (req/s)</text>"#,
            y0 - 6.0,
            run.target
        );
        let _ = write!(
            out,
            r#"<rect x="{pad}" y="{y0}" width="{}" height="{h}" fill="none" stroke="gray"/>"#,
            w - 1.5 * pad
        );
        let px = |t: f64| pad + t / seconds as f64 * (w - 1.5 * pad);
        let py = |v: f64| y0 + h * (1.0 - (v / ymax).clamp(0.0, 1.0));
        for v in [0.0, 400.0, 800.0] {
            let _ = write!(
                out,
                r#"<text x="{}" y="{}" text-anchor="end">{v}</text>"#,
                pad - 4.0,
                py(v) + 4.0
            );
        }
        svg::time_axis(&mut out, seconds, 5, y0 + h + 14.0, px);
        let mut items = Vec::new();
        for (i, (name, _, rate)) in TENANTS.iter().enumerate() {
            let points: Vec<String> = run.tenants[i]
                .iter()
                .enumerate()
                .map(|(s, sec)| format!("{:.1},{:.1}", px(s as f64 + 0.5), py(sec.good as f64)))
                .collect();
            out.push_str(&svg::polyline(&points, colors[i]));
            items.push((format!("{name} ({rate} req/s offered)"), colors[i]));
        }
        let items: Vec<(&str, &str)> = items.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        svg::legend(&mut out, pad + 8.0, y0 + 16.0, &items);
    }
    out.push_str("</svg>\n");
    out
}
