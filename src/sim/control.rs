//! The simulator's control endpoints under `/_sim/`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Mode, Sim, SimStats};

/// The switches, as read and written at `/_sim/config`.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct SimConfig {
    workers: usize,
    service_ms: f64,
    mode: Mode,
    fail_status: u16,
}

/// A change to the switches; absent keys stay as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SimChange {
    workers: Option<usize>,
    service_ms: Option<f64>,
    mode: Option<Mode>,
    fail_status: Option<u16>,
}

pub(super) async fn stats(State(sim): State<Arc<Sim>>) -> Json<SimStats> {
    Json(sim.stats())
}

pub(super) async fn reset(State(sim): State<Arc<Sim>>) -> Json<SimStats> {
    for counter in [&sim.received, &sim.served, &sim.failed, &sim.bytes] {
        counter.store(0, Ordering::Relaxed);
    }
    sim.peak
        .store(sim.in_service.load(Ordering::Relaxed), Ordering::Relaxed);
    Json(sim.stats())
}

pub(super) async fn get_config(State(sim): State<Arc<Sim>>) -> Json<SimConfig> {
    Json(current(&sim))
}

pub(super) async fn set_config(
    State(sim): State<Arc<Sim>>,
    change: Result<Json<SimChange>, JsonRejection>,
) -> Result<Json<SimConfig>, (StatusCode, Json<Value>)> {
    let bad = |msg: String| (StatusCode::BAD_REQUEST, Json(json!({"error": msg})));
    let Json(change) = change.map_err(|e| bad(e.body_text()))?;
    if change.workers == Some(0) {
        return Err(bad("workers must be at least 1".into()));
    }
    if let Some(ms) = change.service_ms
        && !(ms.is_finite() && (0.0..=3_600_000.0).contains(&ms))
    {
        return Err(bad("service_ms must be between 0 and 3600000".into()));
    }
    if let Some(status) = change.fail_status
        && !(400..=599).contains(&status)
    {
        return Err(bad("fail_status must be between 400 and 599".into()));
    }
    if let Some(workers) = change.workers {
        sim.workers.resize(workers);
    }
    if let Some(ms) = change.service_ms {
        sim.service_us
            .store((ms * 1000.0) as u64, Ordering::Relaxed);
    }
    if let Some(status) = change.fail_status {
        sim.fail_status.store(status, Ordering::Relaxed);
    }
    if let Some(mode) = change.mode {
        sim.mode.send_replace(mode);
    }
    Ok(Json(current(&sim)))
}

fn current(sim: &Sim) -> SimConfig {
    SimConfig {
        workers: sim.workers.size(),
        service_ms: sim.service_time().as_secs_f64() * 1000.0,
        mode: *sim.mode.borrow(),
        fail_status: sim.fail_status.load(Ordering::Relaxed),
    }
}
