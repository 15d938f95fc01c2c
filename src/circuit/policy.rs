//! [`FailurePolicy`]: which results of the services below count as failures.

use std::time::Duration;

use http::{Response, StatusCode};

use super::breaker::CallOutcome;
use crate::body::BoxError;
use crate::classify::{self, BodyEnd, GrpcStatus, Verdict};
use crate::exchange::{QueueWait, UpstreamLatency};

/// Failure = connect error, timeout, a status in `statuses`, a status in
/// `backpressure` carrying `Retry-After` (explicit, route-wide backpressure),
/// or a call slower than `slow_call`. The proxy's own refusals further down (a
/// full queue, a body too large) and the client's faults (an upload cut short
/// or malformed) are neither success nor failure: they say nothing of the
/// upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct FailurePolicy {
    /// Statuses that count as failures.
    pub statuses: Vec<StatusCode>,
    /// Statuses that, with a `Retry-After`, are backpressure: a failure that
    /// holds an open circuit open at least that long.
    pub backpressure: Vec<StatusCode>,
    /// When set, a slower upstream call (queue wait and upload excluded) is a
    /// failure.
    pub slow_call: Option<Duration>,
}

impl Default for FailurePolicy {
    /// 500, 502, 503 and 504; 503 with `Retry-After` is backpressure; no
    /// slow-call rule.
    fn default() -> Self {
        Self::new(&Self::DEFAULT_STATUSES, &Self::DEFAULT_BACKPRESSURE, None)
    }
}

impl FailurePolicy {
    /// Upstream statuses that count as failures unless configured.
    pub const DEFAULT_STATUSES: [u16; 4] = [500, 502, 503, 504];
    /// Statuses that, with a `Retry-After`, are backpressure unless configured.
    pub const DEFAULT_BACKPRESSURE: [u16; 1] = [503];

    /// A policy over status codes (codes outside 100..=599 are ignored).
    pub fn new(statuses: &[u16], backpressure: &[u16], slow_call: Option<Duration>) -> Self {
        let codes = |codes: &[u16]| {
            codes
                .iter()
                .filter_map(|s| StatusCode::from_u16(*s).ok())
                .collect()
        };
        Self {
            statuses: codes(statuses),
            backpressure: codes(backpressure),
            slow_call,
        }
    }

    /// Classifies a response that took `elapsed` since the breaker let it
    /// through, as an answer to a gRPC call (the content type tells).
    pub fn classify<B>(&self, res: &Response<B>, elapsed: Duration) -> CallOutcome {
        self.judge(&classify::answer(res, true), upstream_time(res, elapsed))
    }

    /// Judges an upstream's answer whose head the classifier read, the
    /// upstream having taken `upstream_time` for it.
    ///
    /// A gRPC answer says how the call went in `grpc-status`: in its headers
    /// when trailers-only (decided here), else in its trailers (decided by
    /// [`CircuitBody`](super::CircuitBody) at the body's end, through
    /// [`of_verdict`](Self::of_verdict)).
    pub fn judge(&self, answer: &classify::Answer, upstream_time: Duration) -> CallOutcome {
        if let GrpcStatus::InHeaders(verdict) = answer.grpc {
            let outcome = Self::of_verdict(verdict);
            if outcome != CallOutcome::Success {
                return outcome;
            }
        }
        let status = answer.status;
        let retry_after = if self.backpressure.contains(&status) {
            answer.retry_after
        } else {
            None
        };
        if retry_after.is_some() || self.statuses.contains(&status) {
            return CallOutcome::Failure { retry_after };
        }
        if let Some(slow) = self.slow_call
            && upstream_time > slow
        {
            return CallOutcome::Failure { retry_after: None };
        }
        CallOutcome::Success
    }

    /// The outcome a gRPC status says.
    pub fn of_verdict(verdict: Verdict) -> CallOutcome {
        match verdict {
            Verdict::Healthy => CallOutcome::Success,
            Verdict::Failing | Verdict::Unavailable => CallOutcome::Failure { retry_after: None },
            Verdict::Backpressure(d) => CallOutcome::Failure {
                retry_after: Some(d),
            },
        }
    }

    /// The outcome a body's end says (a success until then).
    pub fn of_body_end(end: BodyEnd) -> CallOutcome {
        match end {
            BodyEnd::Whole => CallOutcome::Success,
            BodyEnd::Status(verdict) => Self::of_verdict(verdict),
            BodyEnd::Broken => CallOutcome::Failure { retry_after: None },
        }
    }

    /// Classifies an error of the services below. `None`: neither (the
    /// client's doing or deadline, the proxy's own refusal further down).
    pub fn classify_error(&self, err: &BoxError) -> Option<CallOutcome> {
        classify::failure(err.as_ref())
            .upstream_failed()
            .then_some(CallOutcome::Failure { retry_after: None })
    }
}

/// The upstream's own time: from the end of the request body to the response
/// headers when the upstream timeout measured it, else the time since the
/// breaker let the call through less the admission queue wait.
pub(super) fn upstream_time<B>(res: &Response<B>, elapsed: Duration) -> Duration {
    let ext = res.extensions();
    match ext.get::<UpstreamLatency>() {
        Some(latency) => latency.0,
        None => elapsed.saturating_sub(ext.get::<QueueWait>().map_or(Duration::ZERO, |w| w.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Reason, Rejection};
    use http::header;

    fn res(status: u16, retry_after: Option<&str>) -> Response<()> {
        let mut r = Response::builder().status(status);
        if let Some(v) = retry_after {
            r = r.header(header::RETRY_AFTER, v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn statuses_and_backpressure() {
        let p = FailurePolicy::default();
        let fast = Duration::from_millis(1);
        assert_eq!(p.classify(&res(200, None), fast), CallOutcome::Success);
        assert_eq!(p.classify(&res(404, None), fast), CallOutcome::Success);
        assert_eq!(p.classify(&res(429, None), fast), CallOutcome::Success);
        // An upstream 429 is one client's quota, not the upstream's health.
        assert_eq!(p.classify(&res(429, Some("7")), fast), CallOutcome::Success);
        assert_eq!(
            p.classify(&res(500, None), fast),
            CallOutcome::Failure { retry_after: None }
        );
        assert_eq!(
            p.classify(&res(503, Some("7")), fast),
            CallOutcome::Failure {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        // Configured as backpressure, it is.
        let with_429 = FailurePolicy::new(&FailurePolicy::DEFAULT_STATUSES, &[429, 503], None);
        assert_eq!(
            with_429.classify(&res(429, Some("7")), fast),
            CallOutcome::Failure {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let CallOutcome::Failure {
            retry_after: Some(d),
        } = p.classify(&res(503, Some(&date)), fast)
        else {
            panic!("503 with a date is a failure with a hint");
        };
        assert!(d > Duration::from_secs(28) && d <= Duration::from_secs(30));
    }

    #[test]
    fn slow_calls_exclude_the_queue_wait() {
        let p = FailurePolicy {
            slow_call: Some(Duration::from_millis(100)),
            ..FailurePolicy::default()
        };
        let mut r = res(200, None);
        assert_eq!(
            p.classify(&r, Duration::from_millis(150)),
            CallOutcome::Failure { retry_after: None }
        );
        r.extensions_mut()
            .insert(QueueWait(Duration::from_millis(80)));
        assert_eq!(
            p.classify(&r, Duration::from_millis(150)),
            CallOutcome::Success
        );
        // The upstream's own time, when measured, wins: uploads excluded too.
        r.extensions_mut()
            .insert(UpstreamLatency(Duration::from_millis(120)));
        assert_eq!(
            p.classify(&r, Duration::from_millis(150)),
            CallOutcome::Failure { retry_after: None }
        );
        r.extensions_mut()
            .insert(UpstreamLatency(Duration::from_millis(20)));
        assert_eq!(
            p.classify(&r, Duration::from_millis(5000)),
            CallOutcome::Success
        );
    }

    #[test]
    fn own_refusals_are_neither() {
        let p = FailurePolicy::default();
        let full: BoxError = Rejection::new(Reason::QueueFull).into();
        assert_eq!(p.classify_error(&full), None);
        let down: BoxError = Rejection::new(Reason::UpstreamUnavailable).into();
        assert!(p.classify_error(&down).is_some());
        let elapsed: BoxError = tower::timeout::error::Elapsed::new().into();
        assert!(p.classify_error(&elapsed).is_some());
    }
}
