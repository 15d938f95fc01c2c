//! The upstream simulator: a stand-in for a naive application server, for tests,
//! benchmarks, the demo, and users who want to load-test their configuration.
//!
//! It has a fixed number of workers, each taking `service_ms` per request; extra
//! requests wait in an unbounded FIFO queue, the way a thread-pool app server
//! behaves under overload (latency grows without bound). Switches at
//! `/_sim/config` make it fail, hang, or change its workers and service time
//! while it runs; `/_sim/stats` tells what it saw.
//!
//! ```text
//! GET  /_sim/stats    {"received","served","failed","in_service","queued","peak_concurrency","bytes_received"}
//! POST /_sim/reset    zero the counters (peak_concurrency restarts from in_service)
//! GET  /_sim/config   {"workers","service_ms","mode","fail_status"}
//! POST /_sim/config   the same keys, each optional; mode is "ok", "fail" or "hang"
//! anything else       work: 200 {"ok":true,"bytes":N} after queueing and service
//! ```

mod control;
mod workers;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use workers::Workers;

/// How the simulator answers work requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Queue for a worker, take `service_ms`, answer 200.
    Ok,
    /// Answer `fail_status` at once, without a worker (a crashing backend).
    Fail,
    /// Never answer while the switch is on; resume when it is switched off.
    Hang,
}

/// Starting settings.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// Concurrent requests in service.
    pub workers: usize,
    /// Time each request spends in service.
    pub service_time: Duration,
}

/// Counters, as served by `/_sim/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Work requests received.
    pub received: u64,
    /// Work requests answered 200.
    pub served: u64,
    /// Work requests answered with the failure status.
    pub failed: u64,
    /// Requests being served now.
    pub in_service: u64,
    /// Requests waiting for a worker now.
    pub queued: u64,
    /// Most requests in service at once.
    pub peak_concurrency: u64,
    /// Request body bytes read.
    pub bytes_received: u64,
}

#[derive(Debug)]
struct Sim {
    workers: Workers,
    service_us: AtomicU64,
    fail_status: AtomicU16,
    mode: watch::Sender<Mode>,
    received: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
    in_service: AtomicU64,
    queued: AtomicU64,
    peak: AtomicU64,
    bytes: AtomicU64,
}

/// A running simulator.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    sim: Arc<Sim>,
    task: JoinHandle<()>,
}

impl SimHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters now.
    pub fn stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// Switches the mode (as `POST /_sim/config` does).
    pub fn set_mode(&self, mode: Mode) {
        self.sim.mode.send_replace(mode);
    }

    /// Changes the number of workers (at least 1).
    pub fn set_workers(&self, workers: usize) {
        self.sim.workers.resize(workers.max(1));
    }

    /// Changes the service time.
    pub fn set_service_time(&self, service_time: Duration) {
        self.sim
            .service_us
            .store(service_time.as_micros() as u64, Ordering::Relaxed);
    }

    /// Stops serving.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a simulator on `addr` (port 0 picks a free port).
pub async fn spawn(addr: SocketAddr, options: SimOptions) -> io::Result<SimHandle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let sim = Arc::new(Sim {
        workers: Workers::new(options.workers.max(1)),
        service_us: AtomicU64::new(options.service_time.as_micros() as u64),
        fail_status: AtomicU16::new(500),
        mode: watch::Sender::new(Mode::Ok),
        received: AtomicU64::new(0),
        served: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        in_service: AtomicU64::new(0),
        queued: AtomicU64::new(0),
        peak: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/_sim/stats", get(control::stats))
        .route("/_sim/reset", post(control::reset))
        .route(
            "/_sim/config",
            get(control::get_config).post(control::set_config),
        )
        .fallback(work)
        .with_state(sim.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "simulator stopped");
        }
    });
    Ok(SimHandle { addr, sim, task })
}

impl Sim {
    fn stats(&self) -> SimStats {
        SimStats {
            received: self.received.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            in_service: self.in_service.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            peak_concurrency: self.peak.load(Ordering::Relaxed),
            bytes_received: self.bytes.load(Ordering::Relaxed),
        }
    }

    fn service_time(&self) -> Duration {
        Duration::from_micros(self.service_us.load(Ordering::Relaxed))
    }
}

/// Counts one in a gauge for as long as it lives (a dropped request counts out).
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn enter(counter: &'a AtomicU64) -> (Self, u64) {
        let now = counter.fetch_add(1, Ordering::Relaxed) + 1;
        (Self(counter), now)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn work(State(sim): State<Arc<Sim>>, body: Body) -> Response {
    sim.received.fetch_add(1, Ordering::Relaxed);
    // Read the body as a stream: counted, never held whole.
    let mut body = body;
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    bytes += data.len() as u64;
                }
            }
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    sim.bytes.fetch_add(bytes, Ordering::Relaxed);
    let mut mode = sim.mode.subscribe();
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Hang => {
                // Wait for the switch; the sender lives as long as `sim`.
                if mode.changed().await.is_err() {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
            }
            Mode::Fail => {
                sim.failed.fetch_add(1, Ordering::Relaxed);
                let status = StatusCode::from_u16(sim.fail_status.load(Ordering::Relaxed))
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return (status, Json(json!({"error": "simulated failure"}))).into_response();
            }
            Mode::Ok => break,
        }
    }
    let arrival = tokio::time::Instant::now();
    let (queued, _) = Gauge::enter(&sim.queued);
    let mut busy = sim.workers.acquire().await;
    drop(queued);
    let (in_service, now) = Gauge::enter(&sim.in_service);
    sim.peak.fetch_max(now, Ordering::Relaxed);
    busy.serve(arrival, sim.service_time()).await;
    drop(in_service);
    drop(busy);
    sim.served.fetch_add(1, Ordering::Relaxed);
    Json(json!({"ok": true, "bytes": bytes})).into_response()
}
