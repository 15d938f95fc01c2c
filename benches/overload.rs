//! Overload benchmark (issue 3): an open-loop load at 0.5x, 1x, 2x and 4x the
//! capacity of the upstream simulator (16 workers x 20 ms, about 800 req/s),
//! sent straight to it, through sluicegate and through HAProxy configured alike
//! (maxconn 16, maxqueue 32, timeout queue 100 ms).
//!
//! Run with `bash benches/overload.sh` (installs Debian's haproxy, builds the
//! release binary). Everything listens on 127.0.0.1; each step is bounded in
//! time. Writes a markdown table to stdout and `benches/results/overload.svg`.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

mod common;
use common::*;

use sluicegate::loadgen::{self, LoadPlan, Second, quantile_ms};

const CAPACITY: f64 = 800.0;
const STEPS: [f64; 4] = [0.5, 1.0, 2.0, 4.0];
const SIM_PORT: u16 = 19100;
const PROXY_PORT: u16 = 19101;
const ADMIN_PORT: u16 = 19102;

fn sim_queue(port: u16) -> u64 {
    common::http_get(port, "/_sim/stats")
        .and_then(|body| {
            let stats: serde_json::Value = serde_json::from_str(&body).ok()?;
            stats["queued"].as_u64()
        })
        .unwrap_or(0)
}

struct StepResult {
    target: &'static str,
    multiple: f64,
    total: Second,
    seconds: usize,
    peak_rss_kb: u64,
    peak_upstream_queue: u64,
    /// The concurrency limit at the end of the step (sluicegate only).
    limit: Option<u64>,
}

/// The admission section of each sluicegate target: the issue's static limit,
/// the adaptive one that is not told the 16 workers (issue 6), and the static
/// limit with a CoDel queue (issue 13).
fn route_of(target: &str) -> &'static str {
    match target {
        "adaptive" => {
            "[route.admission]\nmax_inflight = \"adaptive\"\nqueue_capacity = 32\nqueue_timeout_ms = 100\n"
        }
        "codel" => {
            "[route.admission]\nmax_inflight = 16\nqueue_capacity = 32\nqueue_timeout_ms = 100\n\
             queue_discipline = \"codel\"\n"
        }
        _ => "[route.admission]\nmax_inflight = 16\nqueue_capacity = 32\nqueue_timeout_ms = 100\n",
    }
}

fn write_configs(dir: &std::path::Path) {
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\n  timeout queue 100ms\n  option http-keep-alive\n\
             frontend fe\n  bind 127.0.0.1:{PROXY_PORT}\n  default_backend be\nbackend be\n  \
             server up 127.0.0.1:{SIM_PORT} maxconn 16 maxqueue 32\n"
        ),
    )
    .unwrap();
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would run this too.
    if only_listing() {
        return;
    }
    let step_seconds: usize = env_number("STEP_SECONDS", 15);
    let dir = work_dir("overload");
    write_configs(&dir);
    let rt = runtime();
    let haproxy = ["/usr/sbin/haproxy", "haproxy"]
        .into_iter()
        .find(|p| Command::new(p).arg("-v").output().is_ok());
    let mut results = Vec::new();
    let targets = std::env::var("TARGETS")
        .unwrap_or_else(|_| "direct,sluicegate,adaptive,codel,haproxy".into());
    for target in ["direct", "sluicegate", "adaptive", "codel", "haproxy"] {
        if !targets.split(',').any(|t| t == target) {
            continue;
        }
        if target == "haproxy" && haproxy.is_none() {
            eprintln!("haproxy not installed: skipped (benches/overload.sh installs it)");
            continue;
        }
        for multiple in STEPS {
            let sim = spawn_sim(SIM_PORT, 16, 20);
            let proxy = match target {
                "sluicegate" | "adaptive" | "codel" => Some(start_proxy(
                    &dir,
                    target,
                    route_of(target),
                    (PROXY_PORT, ADMIN_PORT, SIM_PORT),
                )),
                "haproxy" => Some(spawn(
                    haproxy.unwrap(),
                    &["-f", dir.join("haproxy.cfg").to_str().unwrap(), "-db"],
                    PROXY_PORT,
                )),
                _ => None,
            };
            let port = if proxy.is_some() {
                PROXY_PORT
            } else {
                SIM_PORT
            };
            let plan = LoadPlan {
                url: format!("http://127.0.0.1:{port}/ingest").parse().unwrap(),
                rates: vec![multiple * CAPACITY; step_seconds],
                max_outstanding: 4000,
                client_timeout: Duration::from_secs(10),
                headers: http::HeaderMap::new(),
                body: bytes::Bytes::new(),
            };
            let mut peak_queue = 0;
            let seconds = rt.block_on(loadgen::run(plan, |_, _| {
                peak_queue = peak_queue.max(sim_queue(SIM_PORT));
            }));
            let total = Second::total(&seconds);
            let limit = common::http_get(ADMIN_PORT, "/status")
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v["routes"][0]["admission"]["limit"].as_u64());
            let rss = proxy.as_ref().map_or(0, |p| peak_rss_kb(p.0.id()));
            eprintln!(
                "{target} {multiple}x: good {}/s, p99 ok {:?} ms",
                total.good / step_seconds as u64,
                quantile_ms(&total.ok_latency_us, 0.99)
            );
            results.push(StepResult {
                target,
                multiple,
                total,
                seconds: step_seconds,
                peak_rss_kb: rss,
                peak_upstream_queue: peak_queue,
                limit,
            });
            drop(proxy);
            drop(sim);
        }
    }
    print_table(&results, step_seconds);
    let svg = plot(&results);
    write_result("overload.svg", &svg);
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn print_table(results: &[StepResult], step_seconds: usize) {
    println!(
        "\n{} cores; open loop, {step_seconds} s per step; upstream 16 workers x 20 ms (~800 req/s)\n",
        cores()
    );
    println!(
        "| target | load | goodput/s | admitted p50 / p99 ms | shed p50 / p99 ms | 503s | with Retry-After | errors | upstream queue peak | proxy peak RSS MB | limit at end |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let t = &r.total;
        let share = if t.shed == 0 {
            "-".into()
        } else {
            format!(
                "{:.0} %",
                100.0 * t.shed_with_retry_after as f64 / t.shed as f64
            )
        };
        println!(
            "| {} | {}x | {:.0} | {} / {} | {} / {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.multiple,
            t.good as f64 / r.seconds as f64,
            ms(quantile_ms(&t.ok_latency_us, 0.5)),
            ms(quantile_ms(&t.ok_latency_us, 0.99)),
            ms(quantile_ms(&t.shed_latency_us, 0.5)),
            ms(quantile_ms(&t.shed_latency_us, 0.99)),
            t.shed,
            share,
            t.errors + t.client_dropped,
            r.peak_upstream_queue,
            if r.peak_rss_kb == 0 {
                "-".into()
            } else {
                format!("{:.1}", r.peak_rss_kb as f64 / 1024.0)
            },
            r.limit.map_or("-".into(), |l| l.to_string()),
        );
    }
}

/// A chart panel: title, the value plotted, the top of its axis.
type Panel = (&'static str, Box<dyn Fn(&StepResult) -> f64>, f64);

/// Two panels: goodput and admitted p99 against offered load, one line per target.
fn plot(results: &[StepResult]) -> String {
    let colors = [
        ("direct", "#d62728"),
        ("sluicegate", "#2ca02c"),
        ("adaptive", "#9467bd"),
        ("codel", "#ff7f0e"),
        ("haproxy", "#1f77b4"),
    ];
    let (w, h, pad) = (420.0, 300.0, 50.0);
    let mut svg = svg::open(2.0 * w, h + 30.0);
    let panels: [Panel; 2] = [
        (
            "goodput (2xx within 250 ms, req/s)",
            Box::new(|r| r.total.good as f64 / r.seconds as f64),
            900.0,
        ),
        (
            "admitted p99 latency (ms, log scale)",
            Box::new(|r| {
                quantile_ms(&r.total.ok_latency_us, 0.99)
                    .unwrap_or(1.0)
                    .max(1.0)
                    .log10()
            }),
            4.0,
        ),
    ];
    for (i, (title, value, ymax)) in panels.iter().enumerate() {
        let x0 = i as f64 * w;
        let _ = write!(svg, r#"<text x="{}" y="18">{title}</text>"#, x0 + pad);
        let _ = write!(
            svg,
            r#"<rect x="{}" y="30" width="{}" height="{}" fill="none" stroke="gray"/>"#,
            x0 + pad,
            w - 1.5 * pad,
            h - 60.0
        );
        let px = |m: f64| x0 + pad + (m.log2() + 1.0) / 3.0 * (w - 1.5 * pad);
        let py = |v: f64| 30.0 + (h - 60.0) * (1.0 - (v / ymax).clamp(0.0, 1.0));
        for m in STEPS {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="middle">{m}x</text>"#,
                px(m),
                h - 14.0
            );
        }
        let ticks: Vec<(f64, String)> = if i == 0 {
            (0..=3)
                .map(|k| (k as f64 * 300.0, format!("{}", k * 300)))
                .collect()
        } else {
            (0..=4)
                .map(|k| (k as f64, format!("{}", 10u64.pow(k))))
                .collect()
        };
        for (v, label) in ticks {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#,
                x0 + pad - 4.0,
                py(v) + 4.0
            );
        }
        let mut shown = Vec::new();
        for (target, color) in colors {
            let points: Vec<String> = results
                .iter()
                .filter(|r| r.target == target)
                .map(|r| format!("{:.1},{:.1}", px(r.multiple), py(value(r))))
                .collect();
            if !points.is_empty() {
                svg.push_str(&svg::polyline(&points, color));
                shown.push((target, color));
            }
        }
        if i == 0 {
            svg::legend(&mut svg, x0 + pad + 8.0, 48.0, &shown);
        }
    }
    svg.push_str("</svg>\n");
    svg
}
