//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status`.
//!
//! It runs on its own address (loopback by default) so that scraping and probing
//! never compete with proxied traffic for connections, and it keeps answering
//! while the proxy drains, so that Kubernetes sees `/readyz` turn 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Registry;
use crate::route::Unmatched;
use crate::stack::RouteInfo;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    registry: Arc<Registry>,
    routes: Vec<RouteInfo>,
    unmatched: Arc<Unmatched>,
    draining: Arc<AtomicBool>,
    started: Instant,
}

impl AdminState {
    /// State over a proxy's registry, routes and drain flag.
    pub fn new(
        registry: Arc<Registry>,
        routes: Vec<RouteInfo>,
        unmatched: Arc<Unmatched>,
        draining: Arc<AtomicBool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            routes,
            unmatched,
            draining,
            started: Instant::now(),
        })
    }
}

/// The admin router, for serving or for `oneshot` in tests.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(state)
}

/// Serves the admin router until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<bool>,
) {
    let shutdown = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %e, "admin listener failed");
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.registry.render(),
    )
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AdminState>>) -> (StatusCode, Json<Value>) {
    if state.draining.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
    } else {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    }
}

async fn status(State(state): State<Arc<AdminState>>) -> Json<Value> {
    let routes: Vec<Value> = state
        .routes
        .iter()
        .map(|r| {
            let mut route = json!({
                "name": r.stats.name().as_ref(),
                "path_prefix": r.config.path_prefix.as_str(),
                "host": r.config.host,
                "upstream": format!("{:?}", r.config.upstream),
                "timeout_ms": r.config.timeout_ms.get().as_millis() as u64,
                "max_body_bytes": r.config.max_body_bytes.get(),
            });
            if let (Some(route), Value::Object(live)) = (route.as_object_mut(), r.stats.snapshot())
            {
                route.extend(live);
                let p = &r.protections;
                route.insert("admission".into(), json!(p.admission.snapshot()));
                let circuit = p.circuit.as_ref().map(|c| c.snapshot());
                route.insert("circuit".into(), json!(circuit));
                let rate_limit = p.rate_limit.as_ref().map(|l| l.snapshot());
                route.insert("rate_limit".into(), json!(rate_limit));
            }
            route
        })
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "draining": state.draining.load(Ordering::SeqCst),
        "unmatched_requests": state.unmatched.get(),
        "routes": routes,
    }))
}
