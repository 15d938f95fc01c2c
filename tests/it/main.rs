//! The integration tests: the real proxy (or its layers) against real
//! upstreams, Redis, Prometheus and Chromium on loopback, a module per
//! concern. One test binary, linked once per `cargo test` (a binary per
//! file linked the whole crate 23 times); the adversarial suite and the
//! property tests (`tests/fuzz.rs`, run long by `scripts/fuzz.sh`) are the
//! other two. One module's tests: `cargo test --test it admission::`.

#[path = "../support/mod.rs"]
mod support;

mod adaptive;
mod adaptive_sim;
mod admin;
mod admission;
mod attribution;
mod circuit;
mod cli;
mod clients;
mod cluster;
mod dashboard;
mod faults;
mod grpc;
mod normalize;
mod otlp;
mod proxy;
mod rate_limit;
mod reload;
mod sim;
mod smuggling;
mod spool;
mod spool_crash;
mod tls;
mod upstream_pool;
mod upstream_tls;
