//! The request path, in one place (README "What the proxy does to a request").
//! Layer order is semantics: read the phases below before moving one.
//!
//! A request passes these phases, each owned by one module:
//!
//! 1. **Accept** (`server/listener.rs`): the connection cap, `TCP_NODELAY`,
//!    the client's address and its close watcher as request extensions
//!    ([`crate::conn`]).
//! 2. **Framing guard** (`server/framing.rs`): the raw bytes of every head,
//!    before hyper parses them; ambiguous framing (smuggling shapes) is
//!    refused with 400 and the connection closed.
//! 3. **HTTP** (hyper): the head within `header_read_timeout_ms` and
//!    `max_header_bytes`; the request body within `body_read_timeout_ms` per
//!    read ([`crate::proxy::ReadTimeout`]).
//! 4. **Request id** (tower-http): kept or generated, echoed on the response.
//! 5. **Route** ([`crate::route`]): the one host and path in normal form (400
//!    otherwise), matched against the live [`Generation`] (404 when none).
//! 6. **Per route**, outermost first: observe (counts, access log) → gRPC
//!    answers (a gRPC call marked as one, its deadline set, [`crate::grpc`])
//!    → rescue (errors become responses, a gRPC call's as its
//!    `grpc-status`, [`crate::respond`]) → body limit (413) →
//!    rate limit (429) → spool (an eligible refusal below becomes a `202`,
//!    [`crate::spool`]) → circuit breaker (503, never queued) → admission
//!    (in-flight limit, queue; 503 with `Retry-After`; the priority header
//!    rewritten as decided) → upstream timeout (504; the upload's progress,
//!    and admission's bytes budget on a streaming body) → forward. A client
//!    over its rate is refused before it can count as an upstream call; an
//!    open circuit never takes a queue slot.
//! 7. **Forward** ([`crate::proxy::Forward`]): hop-by-hop headers out,
//!    forwarding headers in, a connection from the route's keep-alive pool
//!    (`proxy/pool.rs`, given back when the response body has been read), one
//!    retry when a reused connection loses the race with the upstream closing
//!    it and the request may run twice (`proxy/retry.rs`), or an HTTP/2
//!    stream the upstream did not process.
//!
//! On the way back the same layers see the response in reverse order, and two
//! of them keep a hand on its body: the admission slot is held until the body
//! has been sent, and the circuit decides a call's outcome at the body's end.
//! How an exchange ended is decided once, in [`crate::classify`]; the layers
//! are siblings that share only leaf vocabulary ([`crate::exchange`],
//! [`crate::limit`]), and this module wires them (ARCHITECTURE.md).

use std::sync::Arc;

use tower::ServiceBuilder;
use tower::ServiceExt;
use tower::util::{BoxCloneService, Either};
use tower_http::request_id::{
    PropagateRequestId, PropagateRequestIdLayer, SetRequestId, SetRequestIdLayer,
};

use crate::admission::{
    Admission, AdmissionLayer, AdmissionMetrics, AdmissionSettings, Controller, Priority, everyone,
};
use crate::body_limit::{BodyLimit, BodyLimitLayer};
use crate::circuit::{
    Circuit, CircuitBreaker, CircuitBreakerLayer, CircuitMetrics, CircuitSettings, FailurePolicy,
    SlowStart,
};
use crate::cluster::Cluster;
use crate::config::{Config, RouteConfig, normalize_host};
use crate::error::StaticAnswer;
use crate::exchange::Granted;
use crate::grpc::{GrpcAnswers, GrpcAnswersLayer};
use crate::metrics::CLUSTER_FALLBACK_TOTAL;
use crate::metrics::{INVALID_TOTAL, Registry, UNMATCHED_TOTAL};
use crate::observe::{Observe, ObserveLayer, RouteStats};
use crate::proxy::{Forward, UpstreamProtocol};
use crate::rate_limit::{
    RateLimit, RateLimitLayer, RateLimitMetrics, RateLimitSettings, RateLimiter, Scope,
};
use crate::request_id::SequentialIds;
use crate::respond::{Rescue, RescueLayer};
use crate::route::{Generation, Proxy, RouteEntry, RouteTable, Unmatched};
use crate::spool::{Spool, SpoolLayer, SpoolSettings, Spooling, Spools, replay};
use crate::upstream_timeout::{UpstreamTimeout, UpstreamTimeoutLayer};

/// One route's stack around an innermost service `S`.
pub type RouteStack<S> =
    Observe<GrpcAnswers<Rescue<BodyLimit<Either<RateLimit<Spooled<S>>, Spooled<S>>>>>>;

/// A route's stack from the spool down (a pass-through spool on routes
/// without one).
pub type Spooled<S> = Spooling<Guarded<S>>;

/// A route's stack from the circuit breaker down (a pass-through breaker on
/// routes without one).
pub type Guarded<S> = CircuitBreaker<Admitted<S>>;

/// A route's stack from admission down.
pub type Admitted<S> = Admission<UpstreamTimeout<S>>;

/// One generation of the routes around innermost services `S`.
pub type Routes<S> = Generation<RouteStack<S>, RouteInfo>;

/// The routing service around innermost services `S`.
pub type RouteProxy<S> = Proxy<RouteStack<S>, RouteInfo>;

/// The whole proxy as one service around innermost services `S`.
pub type ProxyOf<S> = SetRequestId<PropagateRequestId<RouteProxy<S>>, SequentialIds>;

/// The whole proxy as one service, ready for the listener.
pub type ProxyService = ProxyOf<Forward>;

/// Wraps `inner` (the forwarder, or a stand-in in benches) in a route's layers.
pub fn route_stack<S>(
    route: &RouteConfig,
    stats: Arc<RouteStats>,
    protections: &Protections,
    inner: S,
) -> RouteStack<S> {
    ServiceBuilder::new()
        .layer(ObserveLayer::new(stats.clone()))
        .layer(GrpcAnswersLayer)
        .layer(RescueLayer::new(stats.name().clone()))
        .layer(BodyLimitLayer::new(route.max_body_bytes.get()))
        .option_layer(
            protections
                .rate_limit
                .clone()
                .map(RateLimitLayer::with_limiter),
        )
        .layer(
            SpoolLayer::optional(protections.spool.clone()).deliverable_up_to(
                route
                    .admission
                    .as_ref()
                    .and_then(|a| a.max_inflight_bytes.map(|b| b.get())),
            ),
        )
        .service(guarded(route, protections, inner))
}

/// The route's stack from the circuit breaker down: the live path's, and
/// the spool replayer's (over its own forwarder).
fn guarded<S>(route: &RouteConfig, protections: &Protections, inner: S) -> Guarded<S> {
    ServiceBuilder::new()
        .layer(CircuitBreakerLayer::optional(protections.circuit.clone()))
        .layer(admission_layer(route, protections.admission.clone()))
        .layer(
            UpstreamTimeoutLayer::new(route.timeout_ms.get())
                .write_timeout(route.write_timeout_ms.get())
                // An HTTP/2 request may wait for a stream: not the upstream's time.
                .from_dispatch(route.upstream_protocol == UpstreamProtocol::Http2),
        )
        .service(inner)
}

/// Where `info`'s spool replays to: its live protections, over `forward`.
pub fn replay_target(info: &RouteInfo, forward: Forward) -> replay::Target {
    let service = ServiceExt::<replay::ReplayRequest>::map_response(
        guarded(&info.config, &info.protections, forward),
        boxed_response,
    );
    replay::Target {
        service: BoxCloneService::new(service),
        gate: Arc::new(ReplayGate {
            admission: info.protections.admission.clone(),
            circuit: info.protections.circuit.clone(),
        }),
        backpressure: info.config.circuit.as_ref().map_or_else(
            || FailurePolicy::DEFAULT_BACKPRESSURE.to_vec(),
            |c| c.backpressure_statuses.clone(),
        ),
    }
}

/// A route's circuit breaker and admission as its spool's replayer asks them.
struct ReplayGate {
    admission: Arc<Controller>,
    circuit: Option<Arc<Circuit>>,
}

impl replay::Gate for ReplayGate {
    fn too_heavy(&self, bytes: u64) -> bool {
        self.admission.too_heavy(self.admission.weight(Some(bytes)))
    }

    fn open_remaining(&self, now: tokio::time::Instant) -> Option<std::time::Duration> {
        self.circuit.as_ref()?.open_remaining(now)
    }

    fn admit(
        &self,
        bytes: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<http::Extensions>> + Send>> {
        let admission = self.admission.clone();
        Box::pin(async move {
            let weight = admission.weight(Some(bytes));
            let permit = admission
                .acquire_as(Priority::Batch, everyone(), weight)
                .await
                .ok()?;
            let mut granted = http::Extensions::new();
            granted.insert(Granted::new(permit));
            Some(granted)
        })
    }
}

fn boxed_response<B>(res: http::Response<B>) -> http::Response<crate::body::ProxyBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    res.map(crate::body::boxed)
}

/// Opens the spools `config` configures (and recovers what they hold).
pub fn open_spools(config: &Config, registry: &Registry) -> std::io::Result<Spools> {
    Spools::open(
        config.routes.iter().filter_map(|route| {
            let spool = route.spool.as_ref()?;
            Some((route.display_name(), SpoolSettings::from(spool)))
        }),
        registry,
    )
}

/// The route's admission layer over `controller`: its priority rule and, with
/// a `tenant_key`, its tenants.
fn admission_layer(route: &RouteConfig, controller: Arc<Controller>) -> AdmissionLayer {
    let layer = AdmissionLayer::with_controller(controller)
        .priority(route.priority_rule())
        .clients(route.client_addresses());
    let per_client = route
        .admission
        .as_ref()
        .map_or(1, |a| a.tenants_per_client.as_usize());
    match route.tenant_extractor() {
        Some(keys) => layer.tenants_per_client(keys, per_client),
        None => layer,
    }
}

/// The route's admission controller: the configured limits, or an unlimited one
/// that only measures in-flight requests.
fn controller(route: &RouteConfig, registry: &Registry) -> Arc<Controller> {
    let settings = route
        .admission
        .as_ref()
        .map_or(AdmissionSettings::UNLIMITED, AdmissionSettings::from);
    let metrics = match route.admission {
        Some(_) => AdmissionMetrics::new(route.display_name(), registry),
        None => AdmissionMetrics::unlimited(route.display_name(), registry),
    };
    match route.admission.as_ref().and_then(|a| a.adaptive_settings()) {
        Some(adaptive) => Controller::adaptive(settings, adaptive, metrics),
        None => Controller::with_metrics(settings, metrics),
    }
}

/// The route's circuit breaker, when configured.
fn circuit(
    route: &RouteConfig,
    admission: &Arc<Controller>,
    registry: &Registry,
) -> Option<Arc<Circuit>> {
    let config = route.circuit.as_ref()?;
    let settings = CircuitSettings::from(config);
    let name = route.display_name();
    let probes = settings.half_open_max_probes as usize;
    let mut circuit = Circuit::new(settings, FailurePolicy::from(config))
        .with_metrics(name, CircuitMetrics::new(name, registry))
        .with_clients(route.client_addresses());
    if let Some(f) = &config.fallback {
        circuit = circuit.with_fallback(StaticAnswer {
            status: f.status,
            content_type: f.content_type.clone(),
            body: bytes::Bytes::from(f.body.clone()),
        });
    }
    if config.slow_start_ms > 0 {
        let over = std::time::Duration::from_millis(config.slow_start_ms);
        circuit = circuit.with_slow_start(SlowStart::new(admission.clone(), probes, over));
    }
    Some(Arc::new(circuit))
}

/// What a process opens once and its routes share across reloads: the
/// spools and the connection to the cluster.
#[derive(Debug, Clone, Copy)]
pub struct Opened<'a> {
    /// The routes' spools, by name.
    pub spools: &'a Spools,
    /// The cluster's Redis, with `[cluster]`.
    pub cluster: Option<&'a Arc<Cluster>>,
}

impl Opened<'static> {
    /// Nothing opened (no spools, no cluster): for embedding and benches.
    pub fn none() -> Self {
        static NONE: std::sync::LazyLock<Spools> = std::sync::LazyLock::new(Spools::default);
        Self {
            spools: &NONE,
            cluster: None,
        }
    }
}

/// A route's protections, shared between its stack and the admin listener.
#[derive(Debug, Clone)]
pub struct Protections {
    /// Per-client rate limit, when configured.
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// Circuit breaker, when configured.
    pub circuit: Option<Arc<Circuit>>,
    /// Admission (unlimited when not configured: it still measures in-flight).
    pub admission: Arc<Controller>,
    /// Store and forward, when configured (opened once per process).
    pub spool: Option<Arc<Spool>>,
}

impl Protections {
    /// The protections `route` configures, registered in `registry`, with
    /// what the process opened once (its spool, the cluster connection).
    pub fn new(route: &RouteConfig, registry: &Registry, opened: Opened<'_>) -> Self {
        Self::after(route, registry, opened, None)
    }

    /// The same, carrying on from `previous`, the route's protections
    /// before a reload changed it: requests in flight and queued count
    /// against the new limits (the two never admit side by side), the
    /// breaker keeps its state, clients keep what they spent of their rate.
    pub fn after(
        route: &RouteConfig,
        registry: &Registry,
        opened: Opened<'_>,
        previous: Option<&Protections>,
    ) -> Self {
        let admission = controller(route, registry);
        let name = route.display_name();
        let rate_limit = route.rate_limit.as_ref().map(|config| {
            let metrics = RateLimitMetrics::new(name, registry);
            let settings = RateLimitSettings::from(config);
            let mut limiter = RateLimiter::with_settings(&settings, metrics);
            if let Some(old) = previous.and_then(|p| p.rate_limit.as_ref()) {
                limiter = limiter.carry_from(old);
            }
            let limiter = Arc::new(match (settings.scope, opened.cluster) {
                (Scope::Cluster { fallback, sync }, Some(cluster)) => {
                    let fallbacks = registry.counter(CLUSTER_FALLBACK_TOTAL, &[("route", name)]);
                    limiter.shared_on(cluster.clone(), name, fallback, sync, fallbacks)
                }
                // Validation ties scope = "cluster" to a [cluster] section.
                _ => limiter,
            });
            limiter.prune_in_background();
            limiter
        });
        let spool = opened.spools.get(name);
        let circuit = circuit(route, &admission, registry);
        if let Some(previous) = previous {
            if let (Some(old), Some(new)) = (&previous.circuit, &circuit) {
                old.hand_over(new);
            }
            previous.admission.hand_over(&admission);
        }
        Self {
            rate_limit,
            circuit,
            admission,
            spool,
        }
    }
}

/// What the admin listener shows of a route.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    /// The route's configuration.
    pub config: RouteConfig,
    /// Its live counters.
    pub stats: Arc<RouteStats>,
    /// Its protections' live state.
    pub protections: Protections,
}

/// The proxy built from a configuration, with a handle on its live routes.
#[derive(Debug)]
pub struct Built<S> {
    /// The service to serve.
    pub service: ProxyOf<S>,
    /// The routing layer: its live generation (routes and their state), the
    /// unmatched counters, and the swap a reload makes.
    pub proxy: RouteProxy<S>,
}

/// One route's stack entry and live state.
fn route_parts<S>(
    route: &RouteConfig,
    registry: &Registry,
    opened: Opened<'_>,
    make_inner: &mut impl FnMut(&RouteConfig) -> S,
    previous: Option<&Protections>,
) -> (RouteEntry<RouteStack<S>>, RouteInfo) {
    let stats = Arc::new(RouteStats::new(route.display_name(), registry));
    let protections = Protections::after(route, registry, opened, previous);
    let inner = make_inner(route);
    let entry = RouteEntry {
        name: route.display_name().to_string(),
        path_prefix: route.path_prefix.as_str().to_string(),
        host: route.host.as_deref().map(normalize_host),
        service: route_stack(route, stats.clone(), &protections, inner),
    };
    let info = RouteInfo {
        config: route.clone(),
        stats,
        protections,
    };
    (entry, info)
}

/// Builds the proxy, with `make_inner` giving each route's innermost service
/// and `opened` what the process opened once: the same assembly as a reload's
/// ([`rebuild`]), from no routes.
pub fn build_with<S: Clone>(
    config: &Config,
    registry: &Registry,
    opened: Opened<'_>,
    make_inner: impl FnMut(&RouteConfig) -> S,
) -> Built<S> {
    let (generation, _) = rebuild(config, registry, &Generation::empty(), opened, make_inner);
    let unmatched = Arc::new(Unmatched::new(
        registry.counter(UNMATCHED_TOTAL, &[]),
        registry.counter(INVALID_TOTAL, &[]),
    ));
    let proxy = Proxy::new(generation, unmatched);
    let service = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(SequentialIds::default()))
        .layer(PropagateRequestIdLayer::x_request_id())
        .service(proxy.clone());
    Built { service, proxy }
}

/// What a reload changed, by route name.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouteChanges {
    /// Identical routes: they keep their counters, circuit and adaptive limit.
    pub kept: Vec<String>,
    /// New names.
    pub added: Vec<String>,
    /// Same name, new settings: rebuilt, carrying on from the old state
    /// (in-flight and queued requests, breaker state, rate-limit buckets).
    pub changed: Vec<String>,
    /// Gone.
    pub removed: Vec<String>,
}

/// The routes of `config` as a new generation, reusing the stack and state of
/// every route of `current` whose configuration did not change.
pub fn rebuild<S: Clone>(
    config: &Config,
    registry: &Registry,
    current: &Routes<S>,
    opened: Opened<'_>,
    mut make_inner: impl FnMut(&RouteConfig) -> S,
) -> (Routes<S>, RouteChanges) {
    let mut changes = RouteChanges::default();
    let mut entries = Vec::with_capacity(config.routes.len());
    let mut routes = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        let name = route.display_name();
        let old = current
            .routes
            .iter()
            .find(|r| r.config.display_name() == name);
        let old_entry = current.table.entries().iter().find(|e| e.name == name);
        match (old, old_entry) {
            (Some(info), Some(entry)) if info.config == *route => {
                changes.kept.push(name.to_string());
                entries.push(entry.clone());
                routes.push(info.clone());
            }
            (old, _) => {
                let list = if old.is_some() {
                    &mut changes.changed
                } else {
                    &mut changes.added
                };
                list.push(name.to_string());
                // The spool and the cluster connection stay open across
                // reloads (their settings cannot change without a restart).
                // A changed route carries on from its old protections.
                let previous = old.map(|info| &info.protections);
                let (entry, info) = route_parts(route, registry, opened, &mut make_inner, previous);
                entries.push(entry);
                routes.push(info);
            }
        }
    }
    for old in &current.routes {
        let name = old.config.display_name();
        if !config.routes.iter().any(|r| r.display_name() == name) {
            changes.removed.push(name.to_string());
        }
    }
    let generation = Generation {
        table: RouteTable::new(entries),
        routes,
    };
    (generation, changes)
}

/// The forwarder to `route`'s upstream.
pub fn forward(route: &RouteConfig) -> Forward {
    Forward::new(&route.into())
}

/// Builds the proxy forwarding to the configured upstreams, with what the
/// process opened once.
pub fn build(config: &Config, registry: &Registry, opened: Opened<'_>) -> Built<Forward> {
    build_with(config, registry, opened, forward)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route stack's layers, outermost first, as its type nests them,
    /// are the phases the module's header lists, in its order: moving a
    /// layer means changing the documented request path too.
    #[test]
    fn the_route_stack_is_in_the_documented_order() {
        let layers = [
            ("observe", "Observe<"),
            ("gRPC answers", "GrpcAnswers<"),
            ("rescue", "Rescue<"),
            ("body limit", "BodyLimit<"),
            ("rate limit", "RateLimit<"),
            ("spool", "Spooling<"),
            ("circuit breaker", "CircuitBreaker<"),
            ("admission", "Admission<"),
            ("upstream timeout", "UpstreamTimeout<"),
            ("forward", "Forward"),
        ];
        let stack = std::any::type_name::<RouteStack<Forward>>();
        let mut at = 0;
        for (_, layer) in layers {
            let found = stack[at..]
                .find(layer)
                .unwrap_or_else(|| panic!("{layer} not after position {at} in {stack}"));
            at += found + layer.len();
        }
        // The header's list of the per-route phases, in the same order.
        let header = include_str!("stack.rs");
        let start = header.find("6. **Per route**").expect("phase 6");
        let end = header[start..].find("7. **Forward**").expect("phase 7") + start;
        let text = header[start..end]
            .replace("//!", "")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let mut at = 0;
        for (phase, _) in layers {
            let found = text[at..]
                .find(phase)
                .unwrap_or_else(|| panic!("phase {phase:?} not in order in: {text}"));
            at += found + phase.len();
        }
    }
}
