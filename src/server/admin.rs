//! The admin listener: `/` (a live dashboard, [`dashboard`]), `/metrics`,
//! `/healthz`, `/readyz`, `/status`, `/status/history` (the last minutes,
//! [`super::history`]), `POST /reload`, and the spools' `/spool` endpoints
//! ([`spool`]).
//!
//! It runs on its own address (loopback by default) so that scraping and probing
//! never compete with proxied traffic for connections, and it keeps answering
//! while the proxy drains, so that Kubernetes sees `/readyz` turn 503.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt;

mod dashboard;
mod spool;

use super::Shared;
use crate::admission::AdmissionSnapshot;
use crate::circuit::CircuitSnapshot;
use crate::config::ServerConfig;
use crate::observe::RouteStatsSnapshot;
use crate::rate_limit::RateLimitSnapshot;
use crate::spool::SpoolSnapshot;
use crate::stack::RouteInfo;

/// Who may use the admin endpoints.
///
/// A configured `admin_token` is always required for `/status`, `/reload`
/// and `/spool` (on loopback too: another local user, or a process in the
/// same pod, is not the operator). Without one, those are open on a loopback
/// listener only. `/metrics`, `/healthz` and `/readyz` stay open for scrapers
/// and probes.
///
/// A loopback listener also answers only requests whose `Host` names
/// loopback (probes excepted): a web page a local user visits can make its own name resolve to
/// 127.0.0.1 (DNS rebinding) and then read from it as a same-origin page,
/// but its requests still carry its own name.
#[derive(Debug, Clone)]
pub struct Access {
    loopback: bool,
    token: Option<String>,
}

impl Access {
    /// The rule for an admin listener bound to `addr`.
    pub fn new(server: &ServerConfig, addr: SocketAddr) -> Self {
        Self {
            loopback: addr.ip().to_canonical().is_loopback(),
            token: server.admin_token.clone(),
        }
    }

    /// `None`: the request may reach this listener at all. `Some`: the
    /// refusal to send (a foreign `Host` on a loopback listener).
    fn misdirected(&self, req: &Request) -> Option<Response> {
        if !self.loopback {
            return None;
        }
        let host = req
            .uri()
            .authority()
            .map(|a| a.host().to_owned())
            .or_else(|| {
                let value = req.headers().get(header::HOST)?.to_str().ok()?;
                Some(host_of(value).to_owned())
            });
        match host {
            // No name at all (HTTP/1.0): no browser sends that.
            None => None,
            Some(host) if names_loopback(&host) => None,
            Some(host) => {
                let msg = format!(
                    "this admin listener is on loopback and answers only Host names that \
                     are loopback (localhost, 127.0.0.1, [::1]), not {host:?}"
                );
                Some((StatusCode::FORBIDDEN, Json(json!({"error": msg}))).into_response())
            }
        }
    }

    /// `None`: allowed. `Some`: the refusal to send.
    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let Some(token) = &self.token else {
            if self.loopback {
                return None;
            }
            let msg = "the admin listener is not on loopback: set server.admin_token to use this";
            return Some((StatusCode::FORBIDDEN, Json(json!({"error": msg}))).into_response());
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            return None;
        }
        let res = (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "bearer token required"})),
        );
        Some(res.into_response())
    }
}

/// The host part of a `Host` value: without its port, an IPv6 literal
/// still in brackets.
fn host_of(value: &str) -> &str {
    let value = value.trim();
    if value.starts_with('[') {
        return value.find(']').map_or(value, |end| &value[..=end]);
    }
    value.rsplit_once(':').map_or(value, |(host, _)| host)
}

/// Whether `host` can only mean this machine: `localhost` and its
/// subdomains (RFC 6761 §6.3), or a loopback address.
fn names_loopback(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    literal
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is
/// case-insensitive (RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without returning early, so that timing does not reveal how much
/// of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the admin endpoints read: the running proxy's shared state, and who
/// may read it.
#[derive(Debug)]
pub(crate) struct AdminState {
    shared: Arc<Shared>,
    access: Access,
    started: Instant,
}

impl AdminState {
    /// State over the running proxy's `shared` state.
    pub(crate) fn new(shared: Arc<Shared>, access: Access) -> Arc<Self> {
        Arc::new(Self {
            shared,
            access,
            started: Instant::now(),
        })
    }
}

/// The admin router, for serving or for `oneshot` in tests.
pub(crate) fn router(state: Arc<AdminState>) -> Router {
    let guarded = Router::new()
        .route("/status", get(status))
        .route("/status/history", get(history))
        .route("/reload", post(reload))
        .route("/spool", get(spool::summary))
        .route("/spool/dead", get(spool::dead_letters))
        .route("/spool/dead/{id}", axum::routing::delete(spool::forget))
        .route("/spool/dead/{id}/replay", post(spool::resurrect))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard));
    // Probes hold no data: a health checker may send any `Host`.
    let probes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    Router::new()
        .route("/", get(dashboard::page))
        .route("/assets/{name}", get(dashboard::asset))
        .route("/metrics", get(metrics))
        .merge(guarded)
        .route_layer(middleware::from_fn_with_state(state.clone(), same_host))
        .merge(probes)
        .with_state(state)
}

async fn guard(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    match state.access.refusal(req.headers()) {
        None => next.run(req).await,
        Some(refusal) => refusal,
    }
}

async fn same_host(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    match state.access.misdirected(&req) {
        None => next.run(req).await,
        Some(refusal) => refusal,
    }
}

/// `POST /reload` takes effect only when sent as a JSON request: a browser
/// sends one cross-site only after a CORS preflight this listener never
/// grants, so a web page a local user visits cannot reload the proxy (a plain
/// form post or `fetch` without custom headers is a "simple" request).
fn non_simple(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

async fn reload(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if !non_simple(&headers) {
        let error = "send POST /reload with `Content-Type: application/json` \
                     (a plain form post from a web page cannot reload the proxy)";
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(json!({"status": "refused", "error": error})),
        )
            .into_response();
    }
    let shared = state.shared.clone();
    // Reading and building are quick but blocking (file I/O, locks).
    let result = tokio::task::spawn_blocking(move || shared.reloader.reload()).await;
    match result {
        Ok(Ok(changes)) => Json(json!({"status": "reloaded", "routes": changes})).into_response(),
        Ok(Err(error)) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"status": "refused", "error": error.to_string()})),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Connections the admin listener serves at once: scrapers, probes and an
/// operator or two. Beyond it the accept loop pauses (the kernel backlog
/// holds the rest), so nobody can exhaust the process's descriptors here.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Largest admin request head; admin requests are small.
const ADMIN_MAX_HEAD: usize = 16 * 1024;

/// Serves the admin router until `stop` turns true: HTTP/1.1, at most
/// [`ADMIN_MAX_CONNECTIONS`] connections, and `header_timeout` for a request's
/// head (and an idle keep-alive connection), as on the proxy listener.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    header_timeout: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let router = router(state);
    let slots = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(ADMIN_MAX_HEAD);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
            () = stopped(&mut stop) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |req: Request<Incoming>| router.clone().oneshot(req));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
            drop(permit);
        });
    }
    graceful.shutdown().await;
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.shared.registry.render(),
    )
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AdminState>>) -> (StatusCode, Json<Value>) {
    if state.shared.draining.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
    } else {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    }
}

/// The `/status` document: the proxy, then each route's settings and live
/// state, every part the `Serialize` snapshot of the module that owns it.
#[derive(Serialize)]
struct StatusDocument {
    version: &'static str,
    uptime_s: u64,
    draining: bool,
    unmatched_requests: u64,
    invalid_requests: u64,
    /// `[cluster]`: whether Redis answers.
    cluster: Option<crate::cluster::ClusterSnapshot>,
    routes: Vec<RouteStatus>,
}

#[derive(Serialize)]
struct RouteStatus {
    name: String,
    path_prefix: String,
    host: Option<String>,
    upstream: String,
    timeout_ms: u64,
    max_body_bytes: u64,
    #[serde(flatten)]
    stats: RouteStatsSnapshot,
    admission: AdmissionSnapshot,
    circuit: Option<CircuitSnapshot>,
    rate_limit: Option<RateLimitSnapshot>,
    spool: Option<SpoolSnapshot>,
}

impl RouteStatus {
    fn of(r: &RouteInfo) -> Self {
        let p = &r.protections;
        Self {
            name: r.stats.name().to_string(),
            path_prefix: r.config.path_prefix.as_str().to_string(),
            host: r.config.host.clone(),
            upstream: format!("{:?}", r.config.upstream),
            timeout_ms: u64::try_from(r.config.timeout_ms.get().as_millis()).unwrap_or(u64::MAX),
            max_body_bytes: r.config.max_body_bytes.get(),
            stats: r.stats.snapshot(),
            admission: p.admission.snapshot(),
            circuit: p.circuit.as_ref().map(|c| c.snapshot()),
            rate_limit: p.rate_limit.as_ref().map(|l| l.snapshot()),
            spool: p.spool.as_ref().map(|s| s.store().snapshot()),
        }
    }
}

/// The routes' last minutes, one sample a second ([`super::history`]).
async fn history(State(state): State<Arc<AdminState>>) -> Json<Value> {
    Json(state.shared.history.document())
}

async fn status(State(state): State<Arc<AdminState>>) -> Json<StatusDocument> {
    let shared = &state.shared;
    let unmatched = shared.proxy.unmatched();
    Json(StatusDocument {
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: state.started.elapsed().as_secs(),
        draining: shared.draining.load(Ordering::SeqCst),
        unmatched_requests: unmatched.get(),
        invalid_requests: unmatched.invalid(),
        cluster: shared.cluster.as_ref().map(|c| c.snapshot()),
        routes: shared
            .proxy
            .generation()
            .routes
            .iter()
            .map(RouteStatus::of)
            .collect(),
    })
}
