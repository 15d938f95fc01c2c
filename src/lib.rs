//! sluicegate: an HTTP admission-control reverse proxy that puts backpressure
//! first.
//!
//! The proxy is a tower stack (see [`stack`] for the order), and every piece is
//! usable on its own: [`admission::AdmissionLayer`], [`circuit::CircuitBreakerLayer`],
//! [`rate_limit::RateLimitLayer`], [`observe::ObserveLayer`], [`body_limit::BodyLimitLayer`],
//! [`upstream_timeout::UpstreamTimeoutLayer`], [`respond::RescueLayer`], and the
//! [`proxy::Forward`] service.
//!
//! Start a whole proxy with [`server::start`]; run the upstream simulator with
//! [`sim::spawn`].
//!
//! # Using the layers in an axum or hyper service
//!
//! ```
//! use std::sync::Arc;
//!
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full, Limited};
//! use bytes::Bytes;
//! use sluicegate::body::{BoxError, ProxyBody, full};
//! use sluicegate::body_limit::BodyLimitLayer;
//! use sluicegate::metrics::Registry;
//! use sluicegate::observe::{ObserveLayer, RouteStats};
//! use sluicegate::respond::RescueLayer;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! // Your handler: here it reads the (limited) body and answers its length.
//! async fn handler(req: Request<Limited<Full<Bytes>>>) -> Result<Response<ProxyBody>, BoxError> {
//!     let body = req.into_body().collect().await?.to_bytes();
//!     Ok(Response::new(full(body.len().to_string())))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let registry = Registry::new();
//! let stats = Arc::new(RouteStats::new("ingest", &registry));
//! let service = ServiceBuilder::new()
//!     .layer(ObserveLayer::new(stats.clone())) // counts by outcome, access log
//!     .layer(RescueLayer::new("ingest"))       // errors -> JSON answers
//!     .layer(BodyLimitLayer::new(1024))        // 413 past 1 KiB
//!     .service_fn(handler);
//!
//! let big = Request::new(Full::new(Bytes::from(vec![0u8; 2048])));
//! let status = service.clone().oneshot(big).await.unwrap().status();
//! assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
//!
//! let ok = Request::new(Full::new(Bytes::from_static(b"{}")));
//! let res = service.oneshot(ok).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert!(registry.render().contains(r#"outcome="body_too_large"} 1"#));
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod adaptive;
pub mod admission;
pub mod body;
pub mod body_limit;
pub mod circuit;
pub mod classify;
pub mod client_key;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod deadline;
pub mod demo;
pub mod dispatch;
pub mod distinct_clients;
pub mod error;
pub mod exchange;
pub mod grpc;
pub mod jitter;
pub mod latency;
pub mod limit;
pub mod loadgen;
pub mod metrics;
pub mod normalize;
pub mod observe;
pub mod pace;
pub mod proxy;
pub mod rate_limit;
pub mod request_id;
pub mod respond;
pub mod route;
pub mod server;
pub mod sim;
pub mod spool;
pub mod stack;
pub mod telemetry;
pub mod tls;
pub mod upstream_timeout;

pub use config::Config;
pub use server::{Running, start};

#[cfg(test)]
mod layout;
