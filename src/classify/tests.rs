use super::*;
use crate::body::BoxError;
use crate::error::ClientBodyError;

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
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

fn res(status: u16, pairs: &[(&'static str, &'static str)]) -> Response<()> {
    let mut res = Response::new(());
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    *res.headers_mut() = headers(pairs);
    res
}

const GRPC: (&str, &str) = ("content-type", "application/grpc");

#[test]
fn server_codes_fail_client_codes_do_not() {
    let of = |code| grpc_verdict(&headers(&[("grpc-status", code)]));
    assert_eq!(of("0"), Some(Verdict::Healthy));
    assert_eq!(of("3"), Some(Verdict::Healthy)); // INVALID_ARGUMENT
    assert_eq!(of("5"), Some(Verdict::Healthy)); // NOT_FOUND
    assert_eq!(of("14"), Some(Verdict::Unavailable));
    assert_eq!(of("4"), Some(Verdict::Unavailable));
    assert_eq!(of("13"), Some(Verdict::Failing));
    assert_eq!(of("8"), Some(Verdict::Healthy)); // a quota, no pushback
    let pushed = headers(&[("grpc-status", "8"), ("grpc-retry-pushback-ms", "2500")]);
    assert_eq!(
        grpc_verdict(&pushed),
        Some(Verdict::Backpressure(Duration::from_millis(2500)))
    );
    assert_eq!(grpc_verdict(&headers(&[])), None);
}

#[test]
fn retry_after_in_seconds_or_as_a_date() {
    let mut h = HeaderMap::new();
    h.insert(header::RETRY_AFTER, "3".parse().unwrap());
    assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    h.insert(
        header::RETRY_AFTER,
        httpdate::fmt_http_date(later).parse().unwrap(),
    );
    let d = retry_after(&h).unwrap();
    assert!(d > Duration::from_secs(50) && d <= Duration::from_secs(60));
    // A date passed still says "backpressure", with nothing left to wait.
    let earlier = std::time::SystemTime::now() - Duration::from_secs(60);
    h.insert(
        header::RETRY_AFTER,
        httpdate::fmt_http_date(earlier).parse().unwrap(),
    );
    assert_eq!(retry_after(&h), Some(Duration::ZERO));
    h.insert(header::RETRY_AFTER, "soon".parse().unwrap());
    assert_eq!(retry_after(&h), None);
}

#[test]
fn errors_are_blamed_once() {
    let of = |err: BoxError| failure(err.as_ref());
    // The client's doing, however deep in the chain.
    let cut = Rejection::new(Reason::UpstreamUnavailable).with_cause(ClientBodyError::new(
        std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into(),
    ));
    assert_eq!(of(cut.into()), Failure::Client(Reason::ClientClosed));
    let paused = Rejection::new(Reason::RequestTimeout);
    assert_eq!(of(paused.into()), Failure::Client(Reason::RequestTimeout));
    // The client's deadline: answered as a timeout, blamed on no one.
    let deadline = Rejection::new(Reason::UpstreamTimeout).with_cause(ClientDeadline);
    let deadline = of(deadline.into());
    assert_eq!(deadline, Failure::ClientDeadline);
    assert_eq!(deadline.reason(), Reason::UpstreamTimeout);
    assert!(!deadline.upstream_failed());
    assert_eq!(deadline.load(), Load::Unrelated);
    // The proxy's own refusal, with what it told the client.
    let full = of(Rejection::new(Reason::QueueFull).with_retry_after(4).into());
    assert_eq!(
        full,
        Failure::Refused {
            reason: Reason::QueueFull,
            retry_after: Some(Duration::from_secs(4))
        }
    );
    assert!(!full.upstream_failed() && full.held_back());
    // The upstream's failure: sent or provably not.
    let unsent = Rejection::new(Reason::UpstreamUnavailable)
        .with_cause(NotSent(std::io::Error::other("refused").into()));
    let unsent = of(unsent.into());
    assert_eq!(
        unsent,
        Failure::Upstream {
            reason: Reason::UpstreamUnavailable,
            sent: false
        }
    );
    assert!(unsent.upstream_failed() && unsent.held_back());
    assert_eq!(unsent.load(), Load::Overload);
    let elapsed = of(tower::timeout::error::Elapsed::new().into());
    assert_eq!(
        elapsed,
        Failure::Upstream {
            reason: Reason::UpstreamTimeout,
            sent: true
        }
    );
    assert!(!elapsed.held_back());
    let broken = of(std::io::Error::other("reset").into());
    assert_eq!(broken.reason(), Reason::UpstreamUnavailable);
    assert!(broken.upstream_failed());
}

#[test]
fn the_spool_takes_over_only_what_never_reached_the_upstream() {
    let on = [Reason::QueueFull, Reason::UpstreamUnavailable];
    let refused = Failure::Refused {
        reason: Reason::QueueFull,
        retry_after: None,
    };
    assert!(refused.spoolable(&on));
    assert!(!refused.spoolable(&[Reason::CircuitOpen]));
    let unsent = Failure::Upstream {
        reason: Reason::UpstreamUnavailable,
        sent: false,
    };
    assert!(unsent.spoolable(&on));
    let sent = Failure::Upstream {
        reason: Reason::UpstreamUnavailable,
        sent: true,
    };
    assert!(!sent.spoolable(&on), "it may have run: never twice");
    assert!(!Failure::Client(Reason::ClientClosed).spoolable(&on));
    assert!(!Failure::ClientDeadline.spoolable(&[Reason::UpstreamTimeout]));
}

#[test]
fn answers_say_what_they_say_of_load() {
    let load =
        |status, pairs: &[(&'static str, &'static str)]| answer(&res(status, pairs), true).load();
    assert_eq!(load(200, &[]), Load::Normal);
    assert_eq!(load(429, &[]), Load::Normal);
    assert_eq!(load(503, &[]), Load::Overload);
    assert_eq!(load(504, &[]), Load::Overload);
    assert_eq!(load(500, &[]), Load::Unrelated);
    assert_eq!(load(502, &[]), Load::Unrelated);
    assert_eq!(load(200, &[GRPC, ("grpc-status", "14")]), Load::Overload);
    assert_eq!(load(200, &[GRPC, ("grpc-status", "13")]), Load::Unrelated);
    assert_eq!(load(200, &[GRPC, ("grpc-status", "3")]), Load::Normal);
    // Not gRPC content, or not a gRPC call: the HTTP status alone.
    assert_eq!(load(200, &[("grpc-status", "14")]), Load::Normal);
    assert_eq!(
        answer(&res(200, &[GRPC, ("grpc-status", "14")]), false).load(),
        Load::Normal
    );
}

#[test]
fn a_grpc_status_comes_in_the_head_or_at_the_end() {
    let head = answer(&res(200, &[GRPC, ("grpc-status", "0")]), true);
    assert_eq!(head.grpc, GrpcStatus::InHeaders(Verdict::Healthy));
    assert!(!head.trailers_decide());
    let streamed = answer(&res(200, &[GRPC]), true);
    assert!(streamed.trailers_decide());
    // An HTTP-level answer to a gRPC call is judged by its status.
    assert_eq!(answer(&res(503, &[GRPC]), true).grpc, GrpcStatus::None);

    let trailers = headers(&[("grpc-status", "14")]);
    assert_eq!(
        body_end(true, Some(&trailers), true),
        BodyEnd::Status(Verdict::Unavailable)
    );
    assert_eq!(body_end(true, None, true), BodyEnd::Broken);
    assert_eq!(body_end(true, None, false), BodyEnd::Whole);
    assert_eq!(body_end(false, None, false), BodyEnd::Broken);
}

#[test]
fn deliveries() {
    let delivery = |status| answer(&res(status, &[]), false).delivery();
    assert_eq!(delivery(200), Delivery::Delivered);
    assert_eq!(delivery(202), Delivery::Delivered);
    for again in [408, 429, 500, 503] {
        assert_eq!(delivery(again), Delivery::Again, "{again}");
    }
    for refused in [400, 404, 413] {
        assert_eq!(delivery(refused), Delivery::Refused, "{refused}");
    }
}
