//! gRPC status codes, and which the proxy answers for each of its refusals.

use http::HeaderName;

use crate::error::Reason;

/// `grpc-status`.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-timeout`: the client's deadline, relative.
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// `grpc-retry-pushback-ms`: how long the client's retry policy waits.
pub static GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// The gRPC status codes sluicegate reads or answers
/// (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// 0: not an error.
    Ok = 0,
    /// 1: the client cancelled.
    Cancelled = 1,
    /// 3: the client's request is invalid.
    InvalidArgument = 3,
    /// 4: the deadline passed.
    DeadlineExceeded = 4,
    /// 8: a quota or a limit: overload, rate limit, message too large.
    ResourceExhausted = 8,
    /// 12: no such method (no route).
    Unimplemented = 12,
    /// 13: an internal error (a malformed request, as gRPC maps HTTP 400).
    Internal = 13,
    /// 14: the service cannot be reached now; retrying may work.
    Unavailable = 14,
}

impl Code {
    /// The code's number, as `grpc-status` carries it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "0",
            Code::Cancelled => "1",
            Code::InvalidArgument => "3",
            Code::DeadlineExceeded => "4",
            Code::ResourceExhausted => "8",
            Code::Unimplemented => "12",
            Code::Internal => "13",
            Code::Unavailable => "14",
        }
    }

    /// The code a refusal for `reason` is answered with: RESOURCE_EXHAUSTED
    /// for the proxy's own limits, UNAVAILABLE for a failing upstream,
    /// DEADLINE_EXCEEDED for a deadline, and the gRPC equivalents of the
    /// client's own faults.
    pub const fn of(reason: Reason) -> Self {
        match reason {
            Reason::QueueFull | Reason::QueueTimeout | Reason::RateLimited => {
                Code::ResourceExhausted
            }
            Reason::BodyTooLarge => Code::ResourceExhausted,
            Reason::CircuitOpen | Reason::UpstreamUnavailable => Code::Unavailable,
            Reason::UpstreamTimeout | Reason::RequestTimeout => Code::DeadlineExceeded,
            Reason::NoRoute => Code::Unimplemented,
            Reason::BadRequest => Code::Internal,
            Reason::ClientClosed => Code::Cancelled,
        }
    }
}

/// `text` as `grpc-message` carries it: percent-encoded outside printable
/// ASCII, and `%` itself (the gRPC HTTP/2 protocol spec).
pub fn encode_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_as_the_issue_says() {
        for (reason, code) in [
            (Reason::QueueFull, "8"),
            (Reason::QueueTimeout, "8"),
            (Reason::RateLimited, "8"),
            (Reason::CircuitOpen, "14"),
            (Reason::UpstreamUnavailable, "14"),
            (Reason::UpstreamTimeout, "4"),
        ] {
            assert_eq!(Code::of(reason).as_str(), code, "{reason}");
        }
        assert_eq!(Code::of(Reason::NoRoute), Code::Unimplemented);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("queue full: 100%"), "queue full: 100%25");
        assert_eq!(encode_message("é\n"), "%C3%A9%0A");
    }
}

/// What a gRPC status says of the upstream's health.
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
    Backpressure(std::time::Duration),
}

/// The verdict of the `grpc-status` in `headers` (a trailers-only response's
/// headers, or a response's trailers); `None` without one.
pub fn verdict(headers: &http::HeaderMap) -> Option<Verdict> {
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
            Some(ms) => Verdict::Backpressure(std::time::Duration::from_millis(ms)),
            None => Verdict::Healthy,
        },
        _ => Verdict::Healthy,
    })
}

/// Whether `headers` say gRPC: `application/grpc`, `application/grpc+proto`,
/// `application/grpc-web`...
pub fn is_grpc_content(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Whether `res` is a gRPC response (its content type).
pub fn is_grpc_response<B>(res: &http::Response<B>) -> bool {
    is_grpc_content(res.headers())
}

#[cfg(test)]
mod verdicts {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn server_codes_fail_client_codes_do_not() {
        let of = |code| verdict(&headers(&[("grpc-status", code)]));
        assert_eq!(of("0"), Some(Verdict::Healthy));
        assert_eq!(of("3"), Some(Verdict::Healthy)); // INVALID_ARGUMENT
        assert_eq!(of("5"), Some(Verdict::Healthy)); // NOT_FOUND
        assert_eq!(of("14"), Some(Verdict::Unavailable));
        assert_eq!(of("4"), Some(Verdict::Unavailable));
        assert_eq!(of("13"), Some(Verdict::Failing));
        assert_eq!(of("8"), Some(Verdict::Healthy)); // a quota, no pushback
        let pushed = headers(&[("grpc-status", "8"), ("grpc-retry-pushback-ms", "2500")]);
        assert_eq!(
            verdict(&pushed),
            Some(Verdict::Backpressure(std::time::Duration::from_millis(
                2500
            )))
        );
        assert_eq!(verdict(&headers(&[])), None);
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`), as the gRPC HTTP/2 protocol spec defines it.
pub fn parse_timeout(value: &http::HeaderValue) -> Option<std::time::Duration> {
    use std::time::Duration;
    let text = value.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod timeouts {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grpc_timeout_values() {
        let t = |s: &'static str| parse_timeout(&http::HeaderValue::from_static(s));
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "123456789S", "1.5S", "-1S", "10x"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }
}
