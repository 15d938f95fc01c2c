//! gRPC through sluicegate against gRPC direct: a tonic OTLP trace receiver
//! (answering at once), h2load sending it unary Export calls (an empty
//! request, `content-type: application/grpc`, `te: trailers`) straight and
//! through a route with `upstream_protocol = "http2"`, interleaved rounds.
//! Overhead per call = the difference of mean call times at the same
//! concurrency; the receiver counts the calls it answered, so a call the
//! proxy lost or refused would show.
//!
//! Run with `bash benches/grpc.sh` (installs h2load from Debian's
//! nghttp2-client). The receiver and the proxy run in this process on two
//! tokio worker threads (the proxy on one of its own), h2load in another
//! process; everything on 127.0.0.1, each run bounded by -n.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use sluicegate::config::Config;

const PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

struct Receiver(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        _: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// h2load's figures: (req/s, mean ms, succeeded).
fn h2load(
    port: u16,
    n: u64,
    clients: u64,
    streams: u64,
    body: &std::path::Path,
) -> (f64, f64, u64) {
    let out = Command::new("h2load")
        .args([
            "-n",
            &n.to_string(),
            "-c",
            &clients.to_string(),
            "-m",
            &streams.to_string(),
        ])
        .args(["-d", body.to_str().unwrap()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("http://127.0.0.1:{port}{PATH}"))
        .output()
        .expect("h2load (apt-get install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("finished in ")?
                .split(", ")
                .nth(1)?
                .strip_suffix(" req/s")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no req/s in:\n{text}"));
    let mean = text
        .lines()
        .find(|l| l.trim_start().starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .map(to_ms)
        .unwrap_or_else(|| panic!("no request time in:\n{text}"));
    let ok = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with(" succeeded")))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (rps, mean, ok)
}

fn to_ms(v: &str) -> f64 {
    if let Some(us) = v.strip_suffix("us") {
        us.parse::<f64>().unwrap() / 1000.0
    } else if let Some(ms) = v.strip_suffix("ms") {
        ms.parse().unwrap()
    } else {
        v.strip_suffix('s').unwrap().parse::<f64>().unwrap() * 1000.0
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds = env("ROUNDS", 3);
    let n = env("CALLS", 50_000);
    let clients = env("CLIENTS", 4);
    let streams = env("STREAMS", 16);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let (direct, proxy) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let direct = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Receiver(calls.clone())))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[route]]\nname = \"otlp\"\nupstream = \"http://{direct}\"\nupstream_protocol = \"http2\"\n"
        );
        let proxy = sluicegate::start(Config::parse("grpc-bench.toml", &text).unwrap())
            .await
            .unwrap();
        (direct, proxy)
    });
    let body = std::env::temp_dir().join(format!("sluicegate-grpc-{}.bin", std::process::id()));
    std::fs::write(&body, [0u8; 5]).unwrap(); // an empty message, uncompressed
    let mut results: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    for round in 1..=rounds {
        for (i, (name, port)) in [
            ("direct", direct.port()),
            ("sluicegate", proxy.proxy_addr().port()),
        ]
        .into_iter()
        .enumerate()
        {
            let before = calls.load(Ordering::Relaxed);
            let (rps, mean, ok) = h2load(port, n, clients, streams, &body);
            let answered = calls.load(Ordering::Relaxed) - before;
            assert_eq!(ok, n, "{name}: {ok} of {n} calls succeeded");
            assert_eq!(
                answered, n,
                "{name}: the receiver answered {answered} of {n}"
            );
            eprintln!("round {round} {name}: {rps:.0} calls/s, mean {mean:.3} ms");
            results[i].0.push(rps);
            results[i].1.push(mean);
        }
    }
    let _ = std::fs::remove_file(&body);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (d_rps, d_mean) = (median(results[0].0.clone()), median(results[0].1.clone()));
    let (s_rps, s_mean) = (median(results[1].0.clone()), median(results[1].1.clone()));
    println!(
        "\n{cores} cores; h2load -n {n} -c {clients} -m {streams}, unary OTLP Export calls, medians of {rounds} rounds\n"
    );
    println!("| target | calls/s | mean call time (ms) |");
    println!("|---|---:|---:|");
    println!("| tonic receiver direct | {d_rps:.0} | {d_mean:.3} |");
    println!("| through sluicegate (h2c upstream) | {s_rps:.0} | {s_mean:.3} |");
    println!(
        "\nthrough / direct: calls/s {:.2}x; mean call time +{:.0} us at {} calls in flight; \
         the machine is saturated, so the proxy's cost per call is 1/{s_rps:.0} - 1/{d_rps:.0} s \
         = {:.1} us of the {cores} cores' time",
        s_rps / d_rps,
        (s_mean - d_mean) * 1000.0,
        clients * streams,
        (1.0 / s_rps - 1.0 / d_rps) * 1e6 * cores as f64
    );
    runtime.block_on(proxy.shutdown());
}
