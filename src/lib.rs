//! sluicegate: an HTTP admission-control reverse proxy that puts backpressure
//! first.
//!
//! The proxy is a tower stack (see [`stack`] for the order), and every piece is
//! usable on its own: [`observe::ObserveLayer`], [`body_limit::BodyLimitLayer`],
//! [`respond::RescueLayer`], and the [`proxy::Forward`] service.
//!
//! Start a whole proxy with [`server::start`]; run the upstream simulator with
//! [`sim::spawn`].

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod body;
pub mod body_limit;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod request_id;
pub mod respond;
pub mod route;
pub mod server;
pub mod sim;
pub mod stack;
pub mod telemetry;

pub use config::Config;
pub use server::{Running, start};
