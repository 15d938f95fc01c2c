//! Circuit-breaker scenario (issue 4): steady open-loop load at half the
//! upstream simulator's capacity (400 req/s against 16 workers x 20 ms); the
//! simulator fails every request for 10 s, then recovers. Run once through
//! sluicegate with the SPEC's default `[route.circuit]` and once, as the
//! baseline in the same run, through sluicegate without a circuit.
//!
//! Run with `bash benches/circuit.sh`. Everything listens on 127.0.0.1 and the
//! run is bounded (5 + 10 + 60 s per target; AFTER_SECONDS shortens the tail).
//! Writes a markdown table to stdout and `benches/results/circuit.svg`.

#![allow(clippy::disallowed_types)] // wall-clock time of real processes: benchmarks measure it

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use sluicegate::loadgen::{self, LoadPlan, Second, quantile_ms};

mod common;
use common::*;

const RATE: f64 = 400.0;
const BEFORE: usize = 5;
const FAILING: usize = 10;
const SIM_PORT: u16 = 19110;
const PROXY_PORT: u16 = 19111;
const ADMIN_PORT: u16 = 19112;

struct Run {
    label: &'static str,
    seconds: Vec<Second>,
    /// Requests that reached the simulator, per second.
    hits: Vec<u64>,
    /// `(seconds since start, state)` every 20 ms: 0 closed, 1 open, 2 half-open.
    states: Vec<(f64, u8)>,
    /// When the simulator recovered, seconds since start.
    recovered_at: f64,
    /// Requests the failing simulator answered with a failure.
    failed_at_upstream: u64,
}

impl Run {
    /// Seconds from recovery until the circuit was closed for good.
    fn closed_after(&self) -> Option<f64> {
        let last_not_closed = self
            .states
            .iter()
            .filter(|(t, s)| *t >= self.recovered_at - 1.0 && *s != 0)
            .map(|(t, _)| *t)
            .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.max(t))))?;
        self.states
            .iter()
            .find(|(t, s)| *t > last_not_closed && *s == 0)
            .map(|(t, _)| (t - self.recovered_at).max(0.0))
    }
}

/// The route's protections: admission, and the circuit when `circuit`.
fn config(circuit: bool) -> String {
    let mut c = String::from(
        "[route.admission]\nmax_inflight = 16\nqueue_capacity = 32\nqueue_timeout_ms = 100\n",
    );
    if circuit {
        // The SPEC's defaults, spelled out.
        c.push_str(
            "[route.circuit]\nfailure_threshold = 5\nopen_ms = 5000\nmax_open_ms = 60000\n\
             half_open_max_probes = 1\nsuccess_threshold = 3\nmin_half_open_ms = 1000\n",
        );
    }
    c
}

fn sim_counter(name: &str) -> u64 {
    http_get(SIM_PORT, "/_sim/stats")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v[name].as_u64())
        .unwrap_or(0)
}

fn circuit_state() -> Option<u8> {
    let body = http_get(ADMIN_PORT, "/status")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    match v["routes"][0]["circuit"]["state"].as_str() {
        Some("open") => Some(1),
        Some("half_open") => Some(2),
        _ => Some(0),
    }
}

fn run(rt: &tokio::runtime::Runtime, dir: &std::path::Path, label: &'static str) -> Run {
    let after: usize = env_number("AFTER_SECONDS", 60);
    let sim = spawn_sim(SIM_PORT, 16, 20);
    let route = config(label == "circuit");
    let proxy = start_proxy(dir, label, &route, (PROXY_PORT, ADMIN_PORT, SIM_PORT));
    let start = Instant::now();
    let sampler = Sampler::start(start, Duration::from_millis(20), circuit_state);
    let plan = LoadPlan {
        url: format!("http://127.0.0.1:{PROXY_PORT}/ingest")
            .parse()
            .unwrap(),
        rates: vec![RATE; BEFORE + FAILING + after],
        max_outstanding: 4000,
        client_timeout: Duration::from_secs(10),
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::new(),
    };
    let mut hits = Vec::new();
    let mut received = 0;
    let mut recovered_at = 0.0;
    let seconds = rt.block_on(loadgen::run(plan, |i, _| {
        let now = sim_counter("received");
        hits.push(now - received);
        received = now;
        if i + 1 == BEFORE {
            http_post(SIM_PORT, "/_sim/config", r#"{"mode":"fail"}"#);
        }
        if i + 1 == BEFORE + FAILING {
            http_post(SIM_PORT, "/_sim/config", r#"{"mode":"ok"}"#);
            recovered_at = start.elapsed().as_secs_f64();
        }
    }));
    let states = sampler.finish();
    let failed_at_upstream = sim_counter("failed");
    drop(proxy);
    drop(sim);
    Run {
        label,
        seconds,
        hits,
        states,
        recovered_at,
        failed_at_upstream,
    }
}

fn main() {
    if only_listing() {
        return;
    }
    let dir = work_dir("circuit");
    let rt = runtime();
    let runs: Vec<Run> = ["circuit", "no circuit"]
        .into_iter()
        .map(|label| {
            let r = run(&rt, &dir, label);
            eprintln!("{label}: done");
            r
        })
        .collect();
    print_table(&runs);
    write_result("circuit.svg", &plot(&runs));
}

fn print_table(runs: &[Run]) {
    println!(
        "\n{} cores; open loop {RATE} req/s (half the simulator's 800); simulator fails \
         from {BEFORE} s to {} s\n",
        cores(),
        BEFORE + FAILING
    );
    println!(
        "| target | requests reaching the failing upstream | offered while failing | recovery → closed | 503 p50 / p99 ms while failing | goodput/s in the minute after recovery | 5xx/errors to clients |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        let failing = Second::total(&r.seconds[BEFORE..BEFORE + FAILING]);
        let after = &r.seconds[BEFORE + FAILING..];
        let after_total = Second::total(after);
        let all = Second::total(&r.seconds);
        println!(
            "| {} | {} | {} | {} | {} / {} | {:.0} | {} |",
            r.label,
            r.failed_at_upstream,
            failing.offered,
            r.closed_after().map_or("-".into(), |s| format!("{s:.2} s")),
            quantile_ms(&failing.shed_latency_us, 0.5).map_or("-".into(), |v| format!("{v:.2}")),
            quantile_ms(&failing.shed_latency_us, 0.99).map_or("-".into(), |v| format!("{v:.2}")),
            after_total.good as f64 / after.len() as f64,
            all.errors,
        );
    }
}

/// One panel per run: the circuit state as a background band, and per second
/// the 2xx, 503 and 5xx answers and the requests that reached the upstream.
fn plot(runs: &[Run]) -> String {
    let (w, h, pad, gap) = (860.0, 220.0, 50.0, 40.0);
    let mut svg = svg::open(w, runs.len() as f64 * (h + gap) + 20.0);
    let ymax = RATE * 1.25;
    for (k, r) in runs.iter().enumerate() {
        let y0 = k as f64 * (h + gap) + 20.0;
        let n = r.seconds.len() as f64;
        let px = |t: f64| pad + t / n * (w - 1.5 * pad);
        let py = |v: f64| y0 + h * (1.0 - (v / ymax).clamp(0.0, 1.0));
        let _ = write!(
            svg,
            r#"<text x="{pad}" y="{}">{}</text>"#,
            y0 - 6.0,
            r.label
        );
        // One band per run of samples in the same state.
        let mut band: Option<(f64, u8)> = None;
        let end = r.states.last().map_or(0.0, |s| s.0);
        for &(t, state) in r.states.iter().chain(std::iter::once(&(end, u8::MAX))) {
            match band {
                Some((_, s)) if s == state => continue,
                Some((from, s)) if s == 1 || s == 2 => {
                    let color = if s == 1 { "#f4b6b6" } else { "#f9e79f" };
                    let _ = write!(
                        svg,
                        r#"<rect x="{:.1}" y="{y0}" width="{:.1}" height="{h}" fill="{color}"/>"#,
                        px(from),
                        (px(t) - px(from)).max(1.0)
                    );
                }
                _ => {}
            }
            band = Some((t, state));
        }
        let _ = write!(
            svg,
            r#"<rect x="{pad}" y="{y0}" width="{}" height="{h}" fill="none" stroke="gray"/>"#,
            w - 1.5 * pad
        );
        for v in [0.0, 100.0, 200.0, 300.0, 400.0, 500.0] {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{v}</text>"#,
                pad - 4.0,
                py(v) + 4.0
            );
        }
        for t in (0..=r.seconds.len()).step_by(5) {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{t}s</text>"#,
                px(t as f64),
                y0 + h + 14.0
            );
        }
        let series: [(&str, &str, Vec<f64>); 4] = [
            (
                "2xx/s",
                "#2ca02c",
                r.seconds.iter().map(|s| s.ok as f64).collect(),
            ),
            (
                "503/s",
                "#ff7f0e",
                r.seconds.iter().map(|s| s.shed as f64).collect(),
            ),
            (
                "5xx+errors/s",
                "#d62728",
                r.seconds.iter().map(|s| s.errors as f64).collect(),
            ),
            (
                "upstream hits/s",
                "#1f77b4",
                r.hits.iter().map(|&h| h as f64).collect(),
            ),
        ];
        for (i, (name, color, values)) in series.iter().enumerate() {
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(t, v)| format!("{:.1},{:.1}", px(t as f64 + 0.5), py(*v)))
                .collect();
            let dash = if i == 3 {
                r#" stroke-dasharray="4 3""#
            } else {
                ""
            };
            let _ = write!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>"#,
                points.join(" ")
            );
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
                w - 1.5 * pad - 100.0,
                y0 + 16.0 + 14.0 * i as f64
            );
        }
    }
    let _ = write!(
        svg,
        r##"<text x="{pad}" y="{}" font-size="11">background: red = open, yellow = half-open</text>"##,
        runs.len() as f64 * (h + gap) + 12.0
    );
    svg.push_str("</svg>\n");
    svg
}
