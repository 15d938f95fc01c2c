//! Routing: puts the request's host and path in normal form (see
//! [`normalize`]; 400 when it has no one host or its path climbs above the
//! root), picks the route (longest path prefix, then a matching host over any
//! host) and calls that route's stack; 404 when none matches.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response, header};
use metrics::Counter;
use pin_project_lite::pin_project;
use tower::Service;
use tower::util::{Oneshot, ServiceExt};

use crate::body::ProxyBody;
use crate::error::{Reason, Rejection};
use crate::{normalize, respond};

/// One route of the table: what it matches and the service that answers.
#[derive(Debug, Clone)]
pub struct RouteEntry<S> {
    /// The route's name (a reload finds unchanged routes by it).
    pub name: String,
    /// Requests whose path starts with this match.
    pub path_prefix: String,
    /// When set, only requests for this host (lower case, no port) match.
    pub host: Option<String>,
    /// The route's stack.
    pub service: S,
}

/// Routes ordered for matching: the first entry that matches wins.
#[derive(Debug)]
pub struct RouteTable<S> {
    entries: Vec<RouteEntry<S>>,
}

impl<S> RouteTable<S> {
    /// Orders `entries` so that the longest prefix, then a specific host, wins.
    pub fn new(mut entries: Vec<RouteEntry<S>>) -> Self {
        // Stable sort: among identical keys the file order is kept.
        entries.sort_by_key(|e| (std::cmp::Reverse(e.path_prefix.len()), e.host.is_none()));
        Self { entries }
    }

    /// The route for a request to `host` (as sent: may have a port) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&RouteEntry<S>> {
        let host = host.map(strip_port);
        self.entries.iter().find(|e| {
            path.starts_with(e.path_prefix.as_str())
                && match (&e.host, host) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                }
        })
    }

    /// The entries in matching order.
    pub fn entries(&self) -> &[RouteEntry<S>] {
        &self.entries
    }
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The host a request is for: its `Host`, where [`normalize`] put the one
/// host of the request (an absolute-form or HTTP/2 authority included).
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
}

/// One generation of the live routes: the table requests are matched
/// against, and what the admin listener shows of each route (`I`, in
/// configuration order). A reload swaps the whole value at once, so the two
/// can never disagree.
#[derive(Debug)]
pub struct Generation<S, I> {
    /// The routes in matching order.
    pub table: RouteTable<S>,
    /// The routes' live state, in configuration order.
    pub routes: Vec<I>,
}

impl<S, I> Generation<S, I> {
    /// No routes: what a first build starts from.
    pub fn empty() -> Self {
        Self {
            table: RouteTable::new(Vec::new()),
            routes: Vec::new(),
        }
    }
}

/// The proxy's top service: routes each request to its route's stack.
#[derive(Debug)]
pub struct Proxy<S, I> {
    /// Swapped whole by a reload; each request reads the generation current
    /// when it arrives (no lock: an atomic load), so requests in flight finish
    /// on the routes they started on.
    live: Arc<ArcSwap<Generation<S, I>>>,
    unmatched: Arc<Unmatched>,
}

impl<S, I> Clone for Proxy<S, I> {
    fn clone(&self) -> Self {
        Self {
            live: self.live.clone(),
            unmatched: self.unmatched.clone(),
        }
    }
}

/// Counts of requests answered before any route: no route matched (404), or
/// refused as invalid (400: host or path).
#[derive(Debug)]
pub struct Unmatched {
    count: AtomicU64,
    counter: Counter,
    invalid_count: AtomicU64,
    invalid: Counter,
}

impl Unmatched {
    /// Counts 404s into `no_route` and 400s into `invalid` (and atomics, for
    /// `/status`).
    pub fn new(no_route: Counter, invalid: Counter) -> Self {
        Self {
            count: AtomicU64::new(0),
            counter: no_route,
            invalid_count: AtomicU64::new(0),
            invalid,
        }
    }

    /// Requests answered 404 so far.
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Requests refused as invalid (400) so far.
    pub fn invalid(&self) -> u64 {
        self.invalid_count.load(Ordering::Relaxed)
    }
}

impl<S, I> Proxy<S, I> {
    /// A proxy over `generation`, counting misses in `unmatched`.
    pub fn new(generation: Generation<S, I>, unmatched: Arc<Unmatched>) -> Self {
        Self {
            live: Arc::new(ArcSwap::from_pointee(generation)),
            unmatched,
        }
    }

    /// The generation in force.
    pub fn generation(&self) -> Arc<Generation<S, I>> {
        self.live.load_full()
    }

    /// Puts `generation` in force for the requests that arrive from now on;
    /// requests in flight finish on the routes they started on.
    pub fn swap(&self, generation: Generation<S, I>) {
        self.live.store(Arc::new(generation));
    }

    /// Requests answered before any route.
    pub fn unmatched(&self) -> &Arc<Unmatched> {
        &self.unmatched
    }
}

impl<S, I, B> Service<Request<B>> for Proxy<S, I>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible> + Clone,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ProxyFuture<S, Request<B>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each request's route is only known in `call`; routes wait there.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Refused here, a gRPC call is answered in gRPC all the same.
        let grpc = crate::classify::is_grpc_content(req.headers());
        if let Err(why) = normalize::request(&mut req) {
            tracing::debug!(why, uri = %req.uri(), "refused an invalid request (400)");
            self.unmatched.invalid_count.fetch_add(1, Ordering::Relaxed);
            self.unmatched.invalid.increment(1);
            return ProxyFuture::Ready {
                response: Some(respond::answer(Rejection::new(Reason::BadRequest), grpc)),
            };
        }
        let route = self
            .live
            .load()
            .table
            .find(request_host(&req), req.uri().path())
            .map(|route| route.service.clone());
        match route {
            Some(service) => ProxyFuture::Route {
                inner: service.oneshot(req),
            },
            None => {
                self.unmatched.count.fetch_add(1, Ordering::Relaxed);
                self.unmatched.counter.increment(1);
                ProxyFuture::Ready {
                    response: Some(respond::answer(Rejection::new(Reason::NoRoute), grpc)),
                }
            }
        }
    }
}

pin_project! {
    /// Future of [`Proxy`].
    #[allow(missing_docs)] // pin-project-lite allows no docs on variant fields
    #[project = ProxyProj]
    pub enum ProxyFuture<S: Service<Req>, Req> {
        /// Waiting for the route's stack.
        Route {
            #[pin]
            inner: Oneshot<S, Req>,
        },
        /// Answered by the router itself.
        Ready {
            response: Option<Response<ProxyBody>>,
        },
    }
}

impl<S, Req> Future for ProxyFuture<S, Req>
where
    S: Service<Req, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ProxyProj::Route { inner } => inner.poll(cx),
            // Taken once: a completed future is not polled again.
            ProxyProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ProxyFuture polled after completion"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable<&'static str> {
        let e = |prefix: &str, host: Option<&str>, service| RouteEntry {
            name: prefix.to_string(),
            path_prefix: prefix.into(),
            host: host.map(Into::into),
            service,
        };
        RouteTable::new(vec![
            e("/", None, "root"),
            e("/ingest", None, "ingest"),
            e("/ingest/logs", None, "logs"),
            e("/ingest", Some("eu.example.com"), "ingest-eu"),
        ])
    }

    fn find(host: Option<&str>, path: &str) -> Option<&'static str> {
        table().find(host, path).map(|e| e.service)
    }

    #[test]
    fn longest_prefix_wins() {
        assert_eq!(find(None, "/ingest/logs/x"), Some("logs"));
        assert_eq!(find(None, "/ingest/metrics"), Some("ingest"));
        assert_eq!(find(None, "/other"), Some("root"));
    }

    #[test]
    fn host_specific_route_wins_at_equal_prefix() {
        assert_eq!(
            find(Some("EU.example.com:8080"), "/ingest/x"),
            Some("ingest-eu")
        );
        assert_eq!(find(Some("us.example.com"), "/ingest/x"), Some("ingest"));
        // A longer prefix still beats a host match.
        assert_eq!(find(Some("eu.example.com"), "/ingest/logs"), Some("logs"));
    }

    #[test]
    fn no_match() {
        let t = RouteTable::new(vec![RouteEntry {
            name: "r".into(),
            path_prefix: "/api".into(),
            host: None,
            service: (),
        }]);
        assert!(t.find(None, "/ap").is_none());
    }

    #[test]
    fn ports_are_stripped_but_ipv6_literals_kept() {
        assert_eq!(strip_port("a.example:80"), "a.example");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.example"), "a.example");
    }
}
