//! The one place where the layer order is decided (SPEC "The request path").
//!
//! Outermost first: request id → route match → per route: observe (counts, access
//! log) → rescue (errors become responses) → body limit → admission (in-flight
//! limit, queue) → upstream timeout → forward. The rate limit and the circuit
//! breaker will go between the body limit and admission, in the SPEC's order:
//! an open circuit must never queue. Layer order is
//! semantics: read the SPEC before moving one.

use std::sync::Arc;

use tower::ServiceBuilder;
use tower::timeout::{Timeout, TimeoutLayer};
use tower_http::request_id::{
    PropagateRequestId, PropagateRequestIdLayer, SetRequestId, SetRequestIdLayer,
};

use crate::admission::{
    Admission, AdmissionLayer, AdmissionMetrics, AdmissionSettings, Controller,
};
use crate::body_limit::{BodyLimit, BodyLimitLayer};
use crate::config::{Config, RouteConfig, normalize_host};
use crate::metrics::{Registry, UNMATCHED_TOTAL};
use crate::observe::{Observe, ObserveLayer, RouteStats};
use crate::proxy::Forward;
use crate::request_id::SequentialIds;
use crate::respond::{Rescue, RescueLayer};
use crate::route::{Proxy, RouteEntry, RouteTable, Unmatched};

/// One route's stack around an innermost service `S`.
pub type RouteStack<S> = Observe<Rescue<BodyLimit<Admission<Timeout<S>>>>>;

/// The whole proxy as one service, ready for the listener.
pub type ProxyService = SetRequestId<PropagateRequestId<Proxy<RouteStack<Forward>>>, SequentialIds>;

/// Wraps `inner` (the forwarder, or a stand-in in benches) in a route's layers.
pub fn route_stack<S>(
    route: &RouteConfig,
    stats: Arc<RouteStats>,
    admission: Arc<Controller>,
    inner: S,
) -> RouteStack<S> {
    let priority_header = route
        .admission
        .as_ref()
        .map(|a| a.priority_header.clone())
        .unwrap_or_else(|| http::HeaderName::from_static("x-priority"));
    ServiceBuilder::new()
        .layer(ObserveLayer::new(stats.clone()))
        .layer(RescueLayer::new(stats.name().clone()))
        .layer(BodyLimitLayer::new(route.max_body_bytes.get()))
        .layer(AdmissionLayer::with_controller(admission).priority_header(priority_header))
        .layer(TimeoutLayer::new(route.timeout_ms.get()))
        .service(inner)
}

/// The route's admission controller: the configured limits, or an unlimited one
/// that only measures in-flight requests.
fn controller(route: &RouteConfig, registry: &Registry) -> Arc<Controller> {
    let settings = route
        .admission
        .as_ref()
        .map_or(AdmissionSettings::UNLIMITED, AdmissionSettings::from);
    let metrics = AdmissionMetrics::new(route.display_name(), registry);
    Controller::with_metrics(settings, metrics)
}

/// What the admin listener shows of a route.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    /// The route's configuration.
    pub config: RouteConfig,
    /// Its live counters.
    pub stats: Arc<RouteStats>,
    /// Its admission state.
    pub admission: Arc<Controller>,
}

/// The proxy built from a configuration, with handles on its live state.
#[derive(Debug)]
pub struct Built<S> {
    /// The service to serve.
    pub service: S,
    /// The routes, in configuration order.
    pub routes: Vec<RouteInfo>,
    /// Requests no route matched.
    pub unmatched: Arc<Unmatched>,
}

/// Builds the proxy, with `make_inner` giving each route's innermost service.
pub fn build_with<S>(
    config: &Config,
    registry: &Registry,
    mut make_inner: impl FnMut(&RouteConfig, &Arc<RouteStats>) -> S,
) -> Built<SetRequestId<PropagateRequestId<Proxy<RouteStack<S>>>, SequentialIds>> {
    let mut routes = Vec::with_capacity(config.routes.len());
    let mut entries = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        let stats = Arc::new(RouteStats::new(route.display_name(), registry));
        let admission = controller(route, registry);
        let inner = make_inner(route, &stats);
        entries.push(RouteEntry {
            path_prefix: route.path_prefix.as_str().to_string(),
            host: route.host.as_deref().map(normalize_host),
            service: route_stack(route, stats.clone(), admission.clone(), inner),
        });
        routes.push(RouteInfo {
            config: route.clone(),
            stats,
            admission,
        });
    }
    let unmatched = Arc::new(Unmatched::new(registry.counter(UNMATCHED_TOTAL, &[])));
    let proxy = Proxy::new(RouteTable::new(entries), unmatched.clone());
    let service = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(SequentialIds::default()))
        .layer(PropagateRequestIdLayer::x_request_id())
        .service(proxy);
    Built {
        service,
        routes,
        unmatched,
    }
}

/// Builds the proxy forwarding to the configured upstreams.
pub fn build(config: &Config, registry: &Registry) -> Built<ProxyService> {
    build_with(config, registry, |route, stats| {
        Forward::new(route, stats.clone())
    })
}
