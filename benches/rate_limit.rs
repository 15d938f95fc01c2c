//! Per-request cost of the rate-limit layer with 1, 10 000 and 1 000 000
//! distinct clients (API keys), in process, no sockets, against the same
//! service without the layer. Every key stays tracked (`max_keys` above the
//! key count) so the map really holds them all. Run: `cargo bench --bench
//! rate_limit`.

use std::convert::Infallible;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response};
use sluicegate::rate_limit::{RateLimitLayer, RateLimiter};
use tower::{Layer, Service, ServiceExt};

fn answer(_: Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>> {
    std::future::ready(Ok(Response::new(())))
}

fn request(key: &HeaderValue) -> Request<()> {
    let mut req = Request::new(());
    req.headers_mut().insert("x-api-key", key.clone());
    req
}

async fn roundtrip<S>(svc: &S, key: &HeaderValue) -> bool
where
    S: Service<Request<()>, Response = Response<()>> + Clone,
{
    // A single key at millions of requests per second is over any rate: a
    // refusal costs the layer the same work, so it counts too.
    svc.clone().oneshot(request(key)).await.is_ok()
}

fn layered(keys: usize) -> RateLimitLayer {
    let text = format!(
        "[[route]]\nupstream = \"http://127.0.0.1:9\"\n[route.rate_limit]\n\
         key = \"header:x-api-key\"\nper_second = 1000000\nmax_keys = {}\n",
        keys + 1
    );
    let config = sluicegate::config::Config::parse("bench.toml", &text).unwrap();
    let registry = sluicegate::metrics::Registry::new();
    let metrics = sluicegate::rate_limit::RateLimitMetrics::new("bench", &registry);
    let limiter = RateLimiter::with_settings(
        &config.routes[0].rate_limit.as_ref().unwrap().into(),
        metrics,
    );
    RateLimitLayer::new(limiter)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let inner = tower::service_fn(answer);
    let mut group = c.benchmark_group("rate_limit");
    let one = HeaderValue::from_static("client-0");
    group.bench_function("without_layer", |b| {
        b.iter(|| rt.block_on(roundtrip(black_box(&inner), &one)))
    });
    for keys in [1usize, 10_000, 1_000_000] {
        let values: Vec<HeaderValue> = (0..keys)
            .map(|i| HeaderValue::from_str(&format!("client-{i}")).unwrap())
            .collect();
        let layer = layered(keys);
        let svc = layer.layer(inner);
        // Warm: every key is in the map before measuring.
        for v in &values {
            rt.block_on(roundtrip(&svc, v));
        }
        assert_eq!(layer.limiter().keys(), keys);
        let mut i = 0;
        group.bench_function(format!("keys_{keys}"), |b| {
            b.iter(|| {
                i = (i + 1) % keys;
                rt.block_on(roundtrip(black_box(&svc), &values[i]))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
