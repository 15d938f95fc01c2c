//! `sluicegate demo`: what backpressure buys, in about a minute, on a fresh
//! machine with nothing else running.
//!
//! The built-in upstream simulator (16 workers × 20 ms, about 800 req/s) gets an
//! open-loop load that ramps from half to four times its capacity and back,
//! first sent straight to it, then through sluicegate with the embedded default
//! configuration. A line per second shows the load, the answers and the queues;
//! the summary contrasts the two runs.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, UpstreamUrl};
use crate::loadgen::{self, LoadPlan, Second, quantile_ms};
use crate::server;
use crate::sim::{self, SimHandle, SimOptions};

/// The simulated upstream's capacity: 16 workers × 20 ms ≈ 800 requests/s.
pub const DEMO_SIM: SimOptions = SimOptions {
    workers: 16,
    service_time: Duration::from_millis(20),
};

/// Load steps as multiples of capacity, each held for [`STEP_SECONDS`].
const STEPS: [f64; 6] = [0.5, 1.0, 2.0, 4.0, 2.0, 0.5];
const STEP_SECONDS: usize = 4;

/// Points every route of `config` at `upstream`.
pub fn retarget(config: &mut Config, upstream: SocketAddr) {
    let url = UpstreamUrl::try_from(format!("http://{upstream}"))
        // A socket address always forms a valid http URL.
        .expect("socket address is a valid upstream");
    for route in &mut config.routes {
        route.upstream = url.clone();
    }
}

fn capacity() -> f64 {
    DEMO_SIM.workers as f64 / DEMO_SIM.service_time.as_secs_f64()
}

fn plan(url: String) -> Result<LoadPlan, http::uri::InvalidUri> {
    let rates = STEPS
        .iter()
        .flat_map(|m| std::iter::repeat_n(m * capacity(), STEP_SECONDS))
        .collect();
    Ok(LoadPlan {
        url: url.parse()?,
        rates,
        max_outstanding: 2000,
        client_timeout: Duration::from_secs(10),
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::new(),
    })
}

async fn local_sim() -> std::io::Result<SimHandle> {
    sim::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), DEMO_SIM).await
}

fn header(title: &str) {
    println!("\n{title}");
    println!(
        "{:>4} {:>5} {:>9} {:>7} {:>7} {:>7} {:>6} {:>9} {:>7} {:>9}",
        "s",
        "load",
        "offered/s",
        "2xx/s",
        "good/s",
        "503/s",
        "err/s",
        "p99 2xx",
        "queued",
        "upstream"
    );
}

fn line(i: usize, s: &Second, proxy_queue: Option<usize>, upstream_queue: u64) {
    let load = STEPS[(i / STEP_SECONDS).min(STEPS.len() - 1)];
    let p99 = quantile_ms(&s.ok_latency_us, 0.99).map_or("-".into(), |v| format!("{v:.0} ms"));
    let queued = proxy_queue.map_or("-".into(), |q| q.to_string());
    println!(
        "{:>4} {:>4}x {:>9} {:>7} {:>7} {:>7} {:>6} {:>9} {:>7} {:>9}",
        i + 1,
        load,
        s.offered + s.client_dropped,
        s.ok,
        s.good,
        s.shed,
        s.errors + s.client_dropped,
        p99,
        queued,
        upstream_queue
    );
}

/// Runs the demonstration and returns when it is done.
pub async fn run() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "sluicegate demo: an upstream of {} workers x {} ms (~{:.0} req/s) under an open-loop load \
         ramping {}",
        DEMO_SIM.workers,
        DEMO_SIM.service_time.as_millis(),
        capacity(),
        STEPS.map(|m| format!("{m}x")).join(" -> ")
    );
    println!(
        "good/s = 2xx answered within 250 ms; queued = sluicegate's queue; upstream = the app's own queue"
    );

    // 1. Straight to the upstream.
    let sim = local_sim().await?;
    header("1/2  straight to the upstream (no sluicegate)");
    let direct = loadgen::run(plan(format!("http://{}/ingest", sim.addr()))?, |i, s| {
        line(i, s, None, sim.stats().queued)
    })
    .await;
    sim.abort();

    // 2. Through sluicegate, embedded default config.
    let sim = local_sim().await?;
    let mut config = Config::embedded_default()?;
    retarget(&mut config, sim.addr());
    config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.admin_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let proxy = server::start(config).await?;
    let controller = proxy.routes()[0].protections.admission.clone();
    header(&format!(
        "2/2  through sluicegate (max_inflight 16, queue 64, queue timeout 200 ms; dashboard http://{}/)",
        proxy.admin_addr()
    ));
    let gated = loadgen::run(
        plan(format!("http://{}/ingest", proxy.proxy_addr()))?,
        |i, s| line(i, s, Some(controller.snapshot().queued), sim.stats().queued),
    )
    .await;
    proxy.shutdown().await;
    sim.abort();

    summary(&direct, &gated);
    Ok(())
}

fn summary(direct: &[Second], gated: &[Second]) {
    let peak = |run: &[Second]| {
        let at = STEPS.iter().position(|m| *m == 4.0).unwrap_or(0) * STEP_SECONDS;
        Second::total(&run[at..(at + STEP_SECONDS).min(run.len())])
    };
    println!("\nsummary                              straight to upstream   through sluicegate");
    let row = |name: &str, f: &dyn Fn(&[Second]) -> String| {
        println!("{name:<37}{:>20}   {:>18}", f(direct), f(gated));
    };
    let all = |run: &[Second]| Second::total(run);
    row("requests offered", &|r| {
        let t = all(r);
        (t.offered + t.client_dropped).to_string()
    });
    row("goodput, whole run (req/s)", &|r| {
        format!("{:.0}", all(r).good as f64 / r.len() as f64)
    });
    row("goodput at 4x load (req/s)", &|r| {
        format!("{:.0}", peak(r).good as f64 / STEP_SECONDS as f64)
    });
    row("2xx latency p50 / p99 (ms)", &|r| {
        let t = all(r);
        let q = |q| quantile_ms(&t.ok_latency_us, q).map_or("-".into(), |v| format!("{v:.0}"));
        format!("{} / {}", q(0.5), q(0.99))
    });
    row("503s (share with Retry-After)", &|r| {
        let t = all(r);
        if t.shed == 0 {
            "0".into()
        } else {
            format!(
                "{} ({:.0} %)",
                t.shed,
                100.0 * t.shed_with_retry_after as f64 / t.shed as f64
            )
        }
    });
    row("503 latency p99 (ms)", &|r| {
        quantile_ms(&all(r).shed_latency_us, 0.99).map_or("-".into(), |v| format!("{v:.1}"))
    });
    row("errors, timeouts, client-side drops", &|r| {
        let t = all(r);
        (t.errors + t.client_dropped).to_string()
    });
    println!(
        "\nStraight to the upstream, its queue grows without bound past capacity: latency \
         explodes and little is answered in time.\nThrough sluicegate the upstream stays busy at \
         its capacity with an empty queue, admitted requests stay fast, and the excess is told \
         at once when to come back."
    );
}
