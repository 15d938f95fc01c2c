//! How an exchange ended, decided once: whose doing it was (the client's,
//! its deadline's, the proxy's own refusal, the upstream's), whether it is a
//! sign of overload, and how long the upstream asked callers to wait.
//!
//! Every protection reads its answer here instead of deciding for itself, as
//! tower-http's `classify` and linkerd2-proxy's `http/classify` do: the
//! circuit breaker (failure or not), admission (the adaptive limit's overload
//! signal), the spool (take a refusal over; deliver, try again, or give up),
//! the proxy's own retry and the rescue layer (which refusal the client gets).
//! README "How an exchange ended" is generated from this module (its test
//! checks the table).
//!
//! A leaf: it knows HTTP, the error vocabulary and the gRPC wire format,
//! nothing of the layers.

use std::time::Duration;

use http::{HeaderMap, HeaderName, Response, StatusCode, header};

use crate::body::find_cause;
use crate::deadline::ClientDeadline;
use crate::error::{NotSent, Reason, Rejection, client_fault};

/// `grpc-status`.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-retry-pushback-ms`: how long the client's retry policy waits.
pub static GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// Whether `headers` say gRPC: `application/grpc`, `application/grpc+proto`,
/// `application/grpc-web`...
pub fn is_grpc_content(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What an exchange says of the load on the upstream, for the adaptive limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// A sample of the upstream's normal work: its latency counts.
    Normal,
    /// An overload signal: a timeout, a connection failure, the upstream's
    /// own backpressure, a gateway's timeout behind it.
    Overload,
    /// No sample at all: the client's doing, or an error the upstream answers
    /// by itself to one client's input (`500`, gRPC `INTERNAL`).
    Unrelated,
}

/// How a stored request's delivery went, by the upstream's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Taken (2xx).
    Delivered,
    /// Refused for now: try again later (408, 429, 5xx).
    Again,
    /// Refused for good (any other status): a dead letter.
    Refused,
}

// === Failures ===

/// An exchange that ended in an error instead of an answer from the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client's own doing, with the reason it is answered with: a body
    /// over its limit, paused, too slow, cut short or malformed, or the
    /// client gone. Says nothing of the upstream, nor of load.
    Client(Reason),
    /// The client's own deadline (`grpc-timeout`) ran out while the upstream
    /// worked: answered as `upstream_timeout`, counted against no one.
    ClientDeadline,
    /// The proxy refused the request itself (a full queue, an open circuit,
    /// no free HTTP/2 stream, ...); `retry_after` as it told the client.
    Refused {
        /// Its reason.
        reason: Reason,
        /// The `Retry-After` it carries, if any.
        retry_after: Option<Duration>,
    },
    /// The upstream failed: `upstream_timeout` or `upstream_unavailable`.
    Upstream {
        /// Its reason.
        reason: Reason,
        /// Whether any of the request may have reached the upstream: `false`
        /// only when provably nothing did (no connection, or every
        /// connection tried gave the request back unsent).
        sent: bool,
    },
}

/// How an error of the services below ended the exchange.
pub fn failure(err: &(dyn std::error::Error + 'static)) -> Failure {
    if let Some(reason) = client_fault(err) {
        return Failure::Client(reason);
    }
    if find_cause::<ClientDeadline>(err).is_some() {
        return Failure::ClientDeadline;
    }
    let sent = find_cause::<NotSent>(err).is_none();
    if let Some(rejection) = find_cause::<Rejection>(err) {
        return match rejection.reason() {
            reason @ (Reason::UpstreamTimeout | Reason::UpstreamUnavailable) => {
                Failure::Upstream { reason, sent }
            }
            reason => Failure::Refused {
                reason,
                retry_after: rejection.retry_after().map(Duration::from_secs),
            },
        };
    }
    let reason = if find_cause::<tower::timeout::error::Elapsed>(err).is_some() {
        Reason::UpstreamTimeout
    } else {
        // A connect error, a broken connection, any other failure below.
        Reason::UpstreamUnavailable
    };
    Failure::Upstream { reason, sent }
}

impl Failure {
    /// The refusal the client is answered with.
    pub fn reason(self) -> Reason {
        match self {
            Failure::Client(reason)
            | Failure::Refused { reason, .. }
            | Failure::Upstream { reason, .. } => reason,
            Failure::ClientDeadline => Reason::UpstreamTimeout,
        }
    }

    /// Whether the upstream failed (the circuit breaker counts it).
    pub fn upstream_failed(self) -> bool {
        matches!(self, Failure::Upstream { .. })
    }

    /// Whether the client caused it.
    pub fn clients_doing(self) -> bool {
        matches!(self, Failure::Client(_))
    }

    /// What it says of load: an upstream failure, or no capacity below
    /// (an HTTP/2 upstream with every stream taken), is overload; the
    /// client's doing and the proxy's other refusals are no sample.
    pub fn load(self) -> Load {
        match self {
            Failure::Upstream { .. }
            | Failure::Refused {
                reason: Reason::QueueFull | Reason::QueueTimeout,
                ..
            } => Load::Overload,
            Failure::Client(_) | Failure::ClientDeadline | Failure::Refused { .. } => {
                Load::Unrelated
            }
        }
    }

    /// Whether the request was held back by the proxy or provably never
    /// reached the upstream: not an attempt of its own, and a sign that the
    /// whole route must wait (the spool's replay pauses).
    pub fn held_back(self) -> bool {
        matches!(
            self,
            Failure::Refused {
                reason: Reason::CircuitOpen | Reason::QueueFull | Reason::QueueTimeout,
                ..
            } | Failure::Upstream { sent: false, .. }
        )
    }

    /// How long the proxy asked the client to wait, when it refused.
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            Failure::Refused { retry_after, .. } => retry_after,
            _ => None,
        }
    }

    /// Whether the spool may take this refusal over when it is configured
    /// for `on`: a refusal among them, and an unreachable upstream only when
    /// nothing of the request reached it (never delivered twice).
    pub fn spoolable(self, on: &[Reason]) -> bool {
        match self {
            Failure::Refused { reason, .. } => on.contains(&reason),
            Failure::Upstream {
                reason: Reason::UpstreamUnavailable,
                sent: false,
            } => on.contains(&Reason::UpstreamUnavailable),
            _ => false,
        }
    }
}

// === Answers ===

/// What the upstream's gRPC status says of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// OK, or a code the client caused (INVALID_ARGUMENT, NOT_FOUND,
    /// PERMISSION_DENIED, ...) or a quota of its own (RESOURCE_EXHAUSTED
    /// without pushback): says nothing against the upstream.
    Healthy,
    /// The upstream failing: the codes gRPC uses as HTTP uses 500
    /// (UNKNOWN, INTERNAL, DATA_LOSS). A server also answers them by itself
    /// to a message it cannot decode, so they say nothing about load.
    Failing,
    /// The upstream out of capacity or time: UNAVAILABLE, DEADLINE_EXCEEDED
    /// (a failure, and an overload signal).
    Unavailable,
    /// RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`: route-wide
    /// backpressure, as a 503 with Retry-After.
    Backpressure(Duration),
}

impl Verdict {
    /// What it says of load: out of capacity or time, or explicit
    /// backpressure, is overload; not INTERNAL or UNKNOWN.
    pub fn load(self) -> Load {
        match self {
            Verdict::Unavailable | Verdict::Backpressure(_) => Load::Overload,
            Verdict::Failing => Load::Unrelated,
            Verdict::Healthy => Load::Normal,
        }
    }
}

/// The verdict of the `grpc-status` in `headers` (a trailers-only response's
/// headers, or a response's trailers); `None` without one.
pub fn grpc_verdict(headers: &HeaderMap) -> Option<Verdict> {
    let code: u32 = headers
        .get(&GRPC_STATUS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(match code {
        2 | 13 | 15 => Verdict::Failing,
        4 | 14 => Verdict::Unavailable,
        8 => match headers
            .get(&GRPC_RETRY_PUSHBACK_MS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(ms) => Verdict::Backpressure(Duration::from_millis(ms)),
            None => Verdict::Healthy,
        },
        _ => Verdict::Healthy,
    })
}

/// How a gRPC call's answer reports its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcStatus {
    /// Not a gRPC answer to a gRPC call (judged by its HTTP status).
    None,
    /// A trailers-only answer: its status is in its headers.
    InHeaders(Verdict),
    /// Its status comes in its trailers, decided at the body's end.
    InTrailers,
}

/// What the head of an upstream's answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its gRPC status, for a gRPC call answered in gRPC (HTTP 200 with a
    /// gRPC content type; any other status is an HTTP-level answer).
    pub grpc: GrpcStatus,
    /// Its `Retry-After`, in seconds or as an HTTP date (a date passed is
    /// zero).
    pub retry_after: Option<Duration>,
}

/// Reads the head of `res`, an answer to a request that was a gRPC call when
/// `grpc_call`.
pub fn answer<B>(res: &Response<B>, grpc_call: bool) -> Answer {
    let status = res.status();
    let headers = res.headers();
    let grpc = if grpc_call && status == StatusCode::OK && is_grpc_content(headers) {
        match grpc_verdict(headers) {
            Some(verdict) => GrpcStatus::InHeaders(verdict),
            None if headers.contains_key(&GRPC_STATUS) => GrpcStatus::InHeaders(Verdict::Healthy),
            None => GrpcStatus::InTrailers,
        }
    } else {
        GrpcStatus::None
    };
    Answer {
        status,
        grpc,
        retry_after: retry_after(headers),
    }
}

impl Answer {
    /// What the answer's head says of load. `503` (the upstream's own
    /// backpressure) and `504` (a gateway behind it timed out) are overload;
    /// any other 5xx is the upstream's error, often an instant answer to one
    /// client's input: no sample at all, neither against the limit nor for
    /// the latency it measures. A trailers-only gRPC answer by its status
    /// alike (`INTERNAL`, `UNKNOWN` are no sample); one with trailers is
    /// corrected by the status in them.
    pub fn load(&self) -> Load {
        match self.status.as_u16() {
            503 | 504 => Load::Overload,
            500..=599 => Load::Unrelated,
            _ => match self.grpc {
                GrpcStatus::InHeaders(verdict) => verdict.load(),
                GrpcStatus::None | GrpcStatus::InTrailers => Load::Normal,
            },
        }
    }

    /// Whether the status comes at the body's end.
    pub fn trailers_decide(&self) -> bool {
        self.grpc == GrpcStatus::InTrailers
    }

    /// How a stored request's delivery went, by this answer.
    pub fn delivery(&self) -> Delivery {
        let status = self.status;
        if status.is_success() {
            Delivery::Delivered
        } else if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            Delivery::Again
        } else {
            Delivery::Refused
        }
    }
}

/// How an answer's body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Whole, with nothing more to say (a gRPC status in it, if any, healthy
    /// or not, is in `Status`).
    Whole,
    /// Whole, with a gRPC status in its trailers.
    Status(Verdict),
    /// Cut off, reset or stalled by the upstream, or a gRPC body that ended
    /// without the status it owed: the upstream failed.
    Broken,
}

/// How a body ended: `whole` when it reached its end, with `trailers` if
/// any, for an answer that owed its gRPC status in them when
/// `grpc_trailers`.
pub fn body_end(whole: bool, trailers: Option<&HeaderMap>, grpc_trailers: bool) -> BodyEnd {
    if !whole {
        return BodyEnd::Broken;
    }
    match trailers.and_then(grpc_verdict) {
        Some(verdict) => BodyEnd::Status(verdict),
        None if grpc_trailers => BodyEnd::Broken,
        None => BodyEnd::Whole,
    }
}

/// `Retry-After` as seconds or an HTTP date (a date passed is zero).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests;
