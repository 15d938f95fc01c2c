//! gRPC spoken natively: a gRPC client refused by the proxy gets a gRPC
//! status it understands, with the pushback its retry policy obeys, instead of
//! an HTTP 503 with a JSON body (which gRPC libraries turn into an opaque
//! UNAVAILABLE).
//!
//! [`GrpcAnswersLayer`] sits just above the rescue layer: a request with
//! `content-type: application/grpc*` whose answer the proxy made itself (the
//! [`AnsweredByProxy`](crate::error::AnsweredByProxy) extension) is rewritten into a
//! trailers-only response: HTTP 200, `grpc-status`, `grpc-message` and, when
//! the refusal has a `Retry-After`, `grpc-retry-pushback-ms` from the same
//! computation, and `grpc-status-details-bin` with a `RetryInfo` of the same
//! delay, which OpenTelemetry exporters wait ([`details`]; [`status`] maps
//! reasons to codes). A call's `grpc-timeout`
//! becomes its [`Deadline`](crate::deadline::Deadline).

mod answer;
pub mod details;
pub mod status;

pub use answer::{GrpcAnswers, GrpcAnswersLayer, is_grpc};
pub use status::Code;
