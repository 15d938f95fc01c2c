//! Adaptive concurrency scenarios, each through sluicegate with
//! `max_inflight = "adaptive"` (not told the workers) and, as the baseline in
//! the same run, with the static `max_inflight = 16` that fits the simulator
//! (16 workers x 20 ms, 800 req/s). Both with `queue_capacity = 32`,
//! `queue_timeout_ms = 100`; open-loop load; every run a fresh proxy.
//!
//! - calm (issue 17): 0.5x and 0.8x the capacity for 150 s each. A healthy
//!   load: the adaptive limit must shed nothing the static one does not.
//! - halving (issue 6): 1.5x for 60 s; at 30 s the simulator loses half its
//!   workers.
//!
//! Run with `bash benches/adaptive.sh` (`SCENARIO=calm` or `halving` for one;
//! `BENCH_BIN` to measure another build); only 127.0.0.1, about 12 minutes.
//! Writes markdown tables and `benches/results/adaptive.svg` (limit, in
//! flight, p99 over time through the halving), `adaptive-calm.svg` (sheds per
//! second and the limit, calm loads).

#![allow(clippy::disallowed_types)] // wall-clock time of real processes: benchmarks measure it

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use sluicegate::loadgen::{self, LoadPlan, Second, quantile_ms};

mod common;
use common::*;

const CAPACITY: f64 = 800.0;
const RATE: f64 = 1200.0;
const SECONDS: usize = 60;
const HALVED_AT: usize = 30;
const CALM_SECONDS: usize = 150;
const SIM_PORT: u16 = 19130;
const PROXY_PORT: u16 = 19131;
const ADMIN_PORT: u16 = 19132;

struct Run {
    label: &'static str,
    seconds: Vec<Second>,
    /// `(seconds since start, limit, in flight)` every 100 ms.
    samples: Vec<(f64, u64, u64)>,
    halved_at: f64,
    /// The adaptive algorithm's state as the run ended (`/status`).
    adaptive_end: Option<serde_json::Value>,
}

impl Run {
    /// Seconds from the halving until the limit was at most `bound`.
    fn followed_after(&self, bound: u64) -> Option<f64> {
        self.samples
            .iter()
            .find(|(t, l, _)| *t >= self.halved_at && *l <= bound)
            .map(|(t, _, _)| t - self.halved_at)
    }

    fn goodput(&self, from: usize, to: usize) -> f64 {
        let s = &self.seconds[from..to];
        Second::total(s).good as f64 / s.len() as f64
    }

    fn p99(&self, from: usize, to: usize) -> Option<f64> {
        quantile_ms(&Second::total(&self.seconds[from..to]).ok_latency_us, 0.99)
    }

    fn shed(&self) -> u64 {
        Second::total(&self.seconds).shed
    }

    /// The limit's median and maximum over the run.
    fn limit_median_max(&self) -> (u64, u64) {
        let mut v: Vec<u64> = self.samples.iter().map(|(_, l, _)| *l).collect();
        v.sort_unstable();
        (
            v.get(v.len() / 2).copied().unwrap_or(0),
            v.last().copied().unwrap_or(0),
        )
    }
}

fn admission_state() -> Option<(u64, u64)> {
    let a = admission()?;
    Some((a["limit"].as_u64()?, a["inflight"].as_u64()?))
}

fn admission() -> Option<serde_json::Value> {
    let body = http_get(ADMIN_PORT, "/status")?;
    let mut v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(v["routes"][0]["admission"].take())
}

/// One fresh simulator and proxy; `rates` per second; `at(second)` runs as
/// each second ends and may return the simulator's new worker count.
fn run(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    label: &'static str,
    rates: Vec<f64>,
    at: impl Fn(usize) -> Option<usize>,
) -> Run {
    let limit = if label == "adaptive" {
        "\"adaptive\""
    } else {
        "16"
    };
    let route = format!(
        "[route.admission]\nmax_inflight = {limit}\nqueue_capacity = 32\nqueue_timeout_ms = 100\n"
    );
    let sim = spawn_sim(SIM_PORT, 16, 20);
    let proxy = start_proxy(dir, label, &route, (PROXY_PORT, ADMIN_PORT, SIM_PORT));
    let start = Instant::now();
    let sampler = Sampler::start(start, Duration::from_millis(100), admission_state);
    let plan = LoadPlan {
        url: format!("http://127.0.0.1:{PROXY_PORT}/ingest")
            .parse()
            .unwrap(),
        rates,
        max_outstanding: 4000,
        client_timeout: Duration::from_secs(10),
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::new(),
    };
    let mut halved_at = 0.0;
    let seconds = rt.block_on(loadgen::run(plan, |i, _| {
        if let Some(workers) = at(i + 1) {
            http_post(
                SIM_PORT,
                "/_sim/config",
                &format!(r#"{{"workers":{workers}}}"#),
            );
            halved_at = start.elapsed().as_secs_f64();
        }
    }));
    let adaptive_end = admission().map(|mut a| a["adaptive"].take());
    let samples = sampler
        .finish()
        .into_iter()
        .map(|(t, (limit, inflight))| (t, limit, inflight))
        .collect();
    drop(proxy);
    drop(sim);
    Run {
        label,
        seconds,
        samples,
        halved_at,
        adaptive_end,
    }
}

const TARGETS: [&str; 2] = ["adaptive", "static 16"];

fn main() {
    if only_listing() {
        return;
    }
    let dir = work_dir("adaptive");
    let rt = runtime();
    let scenario = std::env::var("SCENARIO").unwrap_or_default();
    println!("\n{} cores; simulator 16 workers x 20 ms\n", cores());
    if scenario.is_empty() || scenario == "calm" {
        calm(&rt, &dir);
    }
    if scenario.is_empty() || scenario == "halving" {
        halving(&rt, &dir);
    }
}

/// 0.5x and 0.8x for 150 s each, adaptive and static 16 side by side.
fn calm(rt: &tokio::runtime::Runtime, dir: &std::path::Path) {
    let mut panels = Vec::new();
    println!(
        "Calm: open loop at 0.5x and 0.8x for {CALM_SECONDS} s, each run from a fresh proxy\n"
    );
    println!(
        "| load | target | 503s | seconds with a 503 | worst second | goodput/s | admitted p99 ms | limit median / max | baseline at the end |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|");
    for load in [0.5, 0.8] {
        let runs: Vec<Run> = TARGETS
            .into_iter()
            .map(|label| {
                let r = run(rt, dir, label, vec![load * CAPACITY; CALM_SECONDS], |_| {
                    None
                });
                eprintln!("calm {load}x {label}: done");
                r
            })
            .collect();
        for r in &runs {
            let per_second: Vec<u64> = r.seconds.iter().map(|s| s.shed).collect();
            let (median, max) = r.limit_median_max();
            let baseline = r.adaptive_end.as_ref().map_or("-".into(), |a| {
                format!(
                    "{:.1} ms by {}, confirmed {:.1} s before",
                    a["baseline_ms"].as_f64().unwrap_or(f64::NAN),
                    a["baseline_source"].as_str().unwrap_or("?"),
                    a["baseline_confirmed_s_ago"].as_f64().unwrap_or(f64::NAN)
                )
            });
            println!(
                "| {load}x | {} | {} | {} | {} | {:.0} | {} | {median} / {max} | {baseline} |",
                r.label,
                r.shed(),
                per_second.iter().filter(|&&n| n > 0).count(),
                per_second.iter().max().copied().unwrap_or(0),
                r.goodput(0, CALM_SECONDS),
                r.p99(0, CALM_SECONDS)
                    .map_or("-".into(), |v| format!("{v:.1}")),
            );
        }
        panels.push((load, runs));
    }
    write_result("adaptive-calm.svg", &plot_calm(&panels));
}

/// 1.5x; the simulator drops from 16 to 8 workers at 30 s.
fn halving(rt: &tokio::runtime::Runtime, dir: &std::path::Path) {
    let runs: Vec<Run> = TARGETS
        .into_iter()
        .map(|label| {
            let r = run(rt, dir, label, vec![RATE; SECONDS], |s| {
                (s == HALVED_AT).then_some(8)
            });
            eprintln!("halving {label}: done");
            r
        })
        .collect();
    println!("\nHalving: open loop {RATE} req/s; 8 workers from {HALVED_AT} s\n");
    println!(
        "| target | limit before (median 20-30 s) | limit after (median 45-60 s) | limit ≤ 13 after halving | goodput/s 20-30 s | goodput/s 30-40 s | goodput/s 45-60 s | admitted p99 ms 20-30 s | 30-40 s | 45-60 s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        let median = |from: f64, to: f64| {
            let mut v: Vec<u64> = r
                .samples
                .iter()
                .filter(|(t, _, _)| *t >= from && *t < to)
                .map(|(_, l, _)| *l)
                .collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            r.label,
            median(20.0, 30.0),
            median(45.0, 60.0),
            r.followed_after(13)
                .map_or("never".into(), |s| format!("{s:.1} s")),
            r.goodput(20, 30),
            r.goodput(30, 40),
            r.goodput(45, 60),
            ms(r.p99(20, 30)),
            ms(r.p99(30, 40)),
            ms(r.p99(45, 60)),
        );
    }
    write_result("adaptive.svg", &plot(&runs));
}

/// Per run: limit and in-flight (left axis) and admitted p99 per second (right
/// axis, ms), the halving marked.
fn plot(runs: &[Run]) -> String {
    let (w, h, pad, gap) = (860.0, 220.0, 50.0, 40.0);
    let mut svg = svg::open(w, runs.len() as f64 * (h + gap) + 10.0);
    let (count_max, ms_max) = (40.0, 200.0);
    for (k, r) in runs.iter().enumerate() {
        let y0 = k as f64 * (h + gap) + 20.0;
        let px = |t: f64| pad + t / SECONDS as f64 * (w - 2.0 * pad);
        let py = |v: f64, max: f64| y0 + h * (1.0 - (v / max).clamp(0.0, 1.0));
        let _ = write!(
            svg,
            r#"<text x="{pad}" y="{}">{}</text>"#,
            y0 - 6.0,
            r.label
        );
        let _ = write!(
            svg,
            r#"<rect x="{pad}" y="{y0}" width="{}" height="{h}" fill="none" stroke="gray"/>"#,
            w - 2.0 * pad
        );
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" y1="{y0}" x2="{0:.1}" y2="{1}" stroke="#999" stroke-dasharray="3 3"/><text x="{2:.1}" y="{3}" fill="#666">workers 16 → 8</text>"##,
            px(r.halved_at),
            y0 + h,
            px(r.halved_at) + 4.0,
            y0 + 14.0
        );
        for v in [0.0, 10.0, 20.0, 30.0, 40.0] {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{v}</text>"#,
                pad - 4.0,
                py(v, count_max) + 4.0
            );
        }
        for v in [0.0, 50.0, 100.0, 150.0, 200.0] {
            let _ = write!(
                svg,
                r##"<text x="{}" y="{}" fill="#d62728">{v} ms</text>"##,
                w - pad + 4.0,
                py(v, ms_max) + 4.0
            );
        }
        svg::time_axis(&mut svg, SECONDS, 10, y0 + h + 14.0, px);
        let limit: Vec<String> = r
            .samples
            .iter()
            .map(|(t, l, _)| format!("{:.1},{:.1}", px(*t), py(*l as f64, count_max)))
            .collect();
        let inflight: Vec<String> = r
            .samples
            .iter()
            .map(|(t, _, i)| format!("{:.1},{:.1}", px(*t), py(*i as f64, count_max)))
            .collect();
        let p99: Vec<String> = r
            .seconds
            .iter()
            .enumerate()
            .filter_map(|(t, s)| {
                let v = quantile_ms(&s.ok_latency_us, 0.99)?;
                Some(format!("{:.1},{:.1}", px(t as f64 + 0.5), py(v, ms_max)))
            })
            .collect();
        svg.push_str(&svg::polyline(&inflight, "#aec7e8"));
        svg.push_str(&svg::polyline(&limit, "#1f77b4"));
        svg.push_str(&svg::polyline(&p99, "#d62728"));
        let items = [
            ("limit", "#1f77b4"),
            ("in flight", "#aec7e8"),
            ("admitted p99 (ms, right)", "#d62728"),
        ];
        svg::legend(&mut svg, pad + 8.0, y0 + 16.0, &items);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Per calm load: 503s per second of both targets (left axis) and the
/// adaptive limit (right axis).
fn plot_calm(panels: &[(f64, Vec<Run>)]) -> String {
    let (w, h, pad, gap) = (860.0, 180.0, 50.0, 40.0);
    let mut svg = svg::open(w, panels.len() as f64 * (h + gap) + 10.0);
    let shed_max = panels
        .iter()
        .flat_map(|(_, runs)| runs.iter().flat_map(|r| r.seconds.iter().map(|s| s.shed)))
        .max()
        .unwrap_or(0)
        .max(10) as f64;
    let limit_max = panels
        .iter()
        .flat_map(|(_, runs)| runs.iter().map(|r| r.limit_median_max().1))
        .max()
        .unwrap_or(0)
        .max(20) as f64;
    for (k, (load, runs)) in panels.iter().enumerate() {
        let y0 = k as f64 * (h + gap) + 20.0;
        let px = |t: f64| pad + t / CALM_SECONDS as f64 * (w - 2.0 * pad);
        let py = |v: f64, max: f64| y0 + h * (1.0 - (v / max).clamp(0.0, 1.0));
        let _ = write!(
            svg,
            r#"<text x="{pad}" y="{}">{load}x capacity ({:.0} req/s)</text><rect x="{pad}" y="{y0}" width="{}" height="{h}" fill="none" stroke="gray"/>"#,
            y0 - 6.0,
            load * CAPACITY,
            w - 2.0 * pad
        );
        for f in [0.0, 0.5, 1.0] {
            let _ = write!(
                svg,
                r##"<text x="{}" y="{}" text-anchor="end">{:.0}</text><text x="{}" y="{}" fill="#1f77b4">{:.0}</text>"##,
                pad - 4.0,
                py(f * shed_max, shed_max) + 4.0,
                f * shed_max,
                w - pad + 4.0,
                py(f * limit_max, limit_max) + 4.0,
                f * limit_max
            );
        }
        svg::time_axis(&mut svg, CALM_SECONDS, 30, y0 + h + 14.0, px);
        for (r, color) in runs.iter().zip(["#d62728", "#7f7f7f"]) {
            let sheds: Vec<String> = r
                .seconds
                .iter()
                .enumerate()
                .map(|(t, s)| {
                    format!(
                        "{:.1},{:.1}",
                        px(t as f64 + 0.5),
                        py(s.shed as f64, shed_max)
                    )
                })
                .collect();
            svg.push_str(&svg::polyline(&sheds, color));
        }
        if let Some(r) = runs.iter().find(|r| r.label == "adaptive") {
            let limit: Vec<String> = r
                .samples
                .iter()
                .map(|(t, l, _)| format!("{:.1},{:.1}", px(*t), py(*l as f64, limit_max)))
                .collect();
            svg.push_str(&svg::polyline(&limit, "#1f77b4"));
        }
        let items = [
            ("503s per second, adaptive", "#d62728"),
            ("503s per second, static 16", "#7f7f7f"),
            ("adaptive limit (right)", "#1f77b4"),
        ];
        svg::legend(&mut svg, pad + 8.0, y0 + 16.0, &items);
    }
    svg.push_str("</svg>\n");
    svg
}
