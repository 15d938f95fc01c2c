//! gRPC status codes, and which the proxy answers for each of its refusals.

use http::HeaderName;

use crate::error::Reason;

/// `grpc-message`.
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-timeout`: the client's deadline, relative.
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

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
