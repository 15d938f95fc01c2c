//! gRPC spoken natively: a gRPC client refused by the proxy gets a gRPC
//! status it understands, with the pushback its retry policy obeys, instead of
//! an HTTP 503 with a JSON body (which gRPC libraries turn into an opaque
//! UNAVAILABLE).
//!
//! [`GrpcAnswersLayer`] sits just above the rescue layer and marks a request
//! with `content-type: application/grpc*` as a gRPC call
//! ([`GrpcCall`](crate::exchange::GrpcCall)); its `grpc-timeout` becomes its
//! [`Deadline`](crate::deadline::Deadline). A refusal of such a call is
//! rendered once, by the rescue layer (or the router, for `no_route` and
//! `bad_request`), through [`refusal`]: a trailers-only response, HTTP 200,
//! `grpc-status`, `grpc-message` and, when the refusal has a `Retry-After`,
//! `grpc-retry-pushback-ms` of the same delay and `grpc-status-details-bin`
//! with a `RetryInfo` of it, which OpenTelemetry exporters wait
//! ([`details`]; [`status`] maps reasons to codes).

mod answer;
pub mod details;
pub mod status;

pub use answer::{GrpcAnswers, GrpcAnswersLayer, is_grpc, refusal};
pub use status::Code;
