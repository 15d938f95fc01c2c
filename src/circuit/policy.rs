//! [`FailurePolicy`]: which results of the services below count as failures.

use std::time::Duration;

use http::{HeaderMap, Response, StatusCode, header};

use super::breaker::CallOutcome;
use crate::admission::QueueWait;
use crate::body::{BoxError, find_cause};
use crate::deadline::ClientDeadline;
use crate::error::{Reason, Rejection, client_fault};
use crate::grpc;
use crate::upstream_timeout::UpstreamLatency;

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

    /// Classifies a response that took `elapsed` since the breaker let it through.
    ///
    /// A gRPC response says how the call went in `grpc-status`: in its headers
    /// when trailers-only (decided here), else in its trailers (decided by
    /// [`CircuitBody`](super::CircuitBody) at the end, from
    /// [`classify_grpc`](Self::classify_grpc)).
    pub fn classify<B>(&self, res: &Response<B>, elapsed: Duration) -> CallOutcome {
        self.classify_call(res, elapsed, true)
    }

    /// As [`classify`](Self::classify), told whether the request was a gRPC
    /// call (only then is the response's content type worth a look).
    pub fn classify_call<B>(
        &self,
        res: &Response<B>,
        elapsed: Duration,
        grpc_call: bool,
    ) -> CallOutcome {
        let status = res.status();
        if grpc_call
            && status == StatusCode::OK
            && grpc::is_grpc_response(res)
            && let Some(outcome) = Self::classify_grpc(res.headers())
            && outcome != CallOutcome::Success
        {
            return outcome;
        }
        let retry_after = if self.backpressure.contains(&status) {
            retry_after(res.headers())
        } else {
            None
        };
        if retry_after.is_some() || self.statuses.contains(&status) {
            return CallOutcome::Failure { retry_after };
        }
        if let Some(slow) = self.slow_call
            && upstream_time(res, elapsed) > slow
        {
            return CallOutcome::Failure { retry_after: None };
        }
        CallOutcome::Success
    }

    /// The outcome a `grpc-status` in `headers` says, if there is one.
    pub fn classify_grpc(headers: &HeaderMap) -> Option<CallOutcome> {
        Some(match grpc::verdict(headers)? {
            grpc::Verdict::Healthy => CallOutcome::Success,
            grpc::Verdict::Failing | grpc::Verdict::Unavailable => {
                CallOutcome::Failure { retry_after: None }
            }
            grpc::Verdict::Backpressure(d) => CallOutcome::Failure {
                retry_after: Some(d),
            },
        })
    }

    /// Classifies an error of the services below. `None`: neither.
    pub fn classify_error(&self, err: &BoxError) -> Option<CallOutcome> {
        let err: &(dyn std::error::Error + 'static) = err.as_ref();
        if client_fault(err).is_some() {
            return None; // the client's body, not the upstream
        }
        if find_cause::<ClientDeadline>(err).is_some() {
            return None; // the client's deadline ran out, not the upstream
        }
        if let Some(rejection) = find_cause::<Rejection>(err) {
            return match rejection.reason() {
                Reason::UpstreamTimeout | Reason::UpstreamUnavailable => {
                    Some(CallOutcome::Failure { retry_after: None })
                }
                _ => None, // the proxy's own refusal (queue full, ...)
            };
        }
        // A timeout, a connect error, or any other failure of the service below.
        Some(CallOutcome::Failure { retry_after: None })
    }
}

/// The upstream's own time: from the end of the request body to the response
/// headers when the upstream timeout measured it, else the time since the
/// breaker let the call through less the admission queue wait.
fn upstream_time<B>(res: &Response<B>, elapsed: Duration) -> Duration {
    let ext = res.extensions();
    match ext.get::<UpstreamLatency>() {
        Some(latency) => latency.0,
        None => elapsed.saturating_sub(ext.get::<QueueWait>().map_or(Duration::ZERO, |w| w.0)),
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
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
mod tests {
    use super::*;

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
