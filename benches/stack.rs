//! Per-request cost of the middleware stack, in process, no sockets.
//!
//! `inner_only` calls a service that answers at once; `full_stack` calls the same
//! service behind request id, routing, observe, rescue, body limit and timeout,
//! exactly as `stack::build` assembles them for the proxy. The difference is what
//! the stack adds to each request. Run: `cargo bench --bench stack`.

use std::convert::Infallible;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sluicegate::body::{ProxyBody, full};
use sluicegate::config::Config;
use sluicegate::metrics::Registry;
use sluicegate::stack;
use tower::{Service, ServiceExt};

const CONFIG: &str = r#"
[[route]]
name = "other"
path_prefix = "/other"
upstream = "http://127.0.0.1:9"

[[route]]
name = "ingest"
path_prefix = "/ingest"
upstream = "http://127.0.0.1:9"
"#;

fn answer<B>(_: Request<B>) -> std::future::Ready<Result<Response<ProxyBody>, Infallible>> {
    std::future::ready(Ok(Response::new(full("ok"))))
}

fn request() -> Request<Full<Bytes>> {
    Request::post("/ingest/events")
        .header("host", "bench.local")
        .header("content-length", "2")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

async fn roundtrip<S, B>(svc: &S) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(request()).await.unwrap();
    res.into_body().collect().await.unwrap().to_bytes().len()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = Config::parse("bench.toml", CONFIG).unwrap();
    let registry = Registry::new();
    // Timers need a runtime context at build time.
    let _guard = rt.enter();
    let built = stack::build_with(&config, &registry, stack::Opened::none(), |_| {
        tower::service_fn(answer)
    });
    let inner = tower::service_fn(answer::<Full<Bytes>>);

    let mut group = c.benchmark_group("per_request");
    group.bench_function("inner_only", |b| {
        b.iter(|| rt.block_on(roundtrip(black_box(&inner))))
    });
    group.bench_function("full_stack", |b| {
        b.iter(|| rt.block_on(roundtrip(black_box(&built.service))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
