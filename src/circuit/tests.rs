//! The state machine, table-driven, and the flapping simulation.

use std::time::Duration;

use tokio::time::Instant;

use super::*;

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Ask to call; expect a normal call, a probe, or a refusal with this wait (ms).
    Call,
    Probe,
    Refused(u64),
    /// Answer the n-th ticket handed out.
    Pass(usize),
    Fail(usize),
    /// A failure carrying the upstream's Retry-After (ms).
    FailHint(usize, u64),
    Cancel(usize),
}
use CircuitState::{Closed, HalfOpen, Open};
use Step::*;

fn settings() -> CircuitSettings {
    CircuitSettings {
        failure_threshold: 3,
        failure_rate: None,
        open: Duration::from_millis(5_000),
        max_open: Duration::from_millis(30_000),
        half_open_max_probes: 1,
        success_threshold: 3,
        min_half_open: Duration::from_millis(1_000),
        probe_timeout: Duration::from_millis(10_000),
        min_failing_clients: 3,
    }
}

#[test]
fn failures_open_only_when_enough_of_the_clients_fail() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut b = Breaker::new(settings(), t0);
    let call = |b: &mut Breaker, client: u8, ms: u64, failed: bool| {
        let client = std::net::IpAddr::from([10, 0, 0, client]);
        let ticket = b.try_acquire_as(client, at(ms)).0.unwrap();
        let outcome = match failed {
            true => CallOutcome::Failure { retry_after: None },
            false => CallOutcome::Success,
        };
        b.record(ticket, outcome, at(ms))
    };
    // Client 1 called (and was served); client 2 fails on and on alone.
    call(&mut b, 1, 0, false);
    for ms in 1..=10 {
        assert_eq!(call(&mut b, 2, ms, true), None);
    }
    assert_eq!(b.state(), Closed);
    // Once client 1 fails too, every client that called has failed: open.
    let t = call(&mut b, 1, 11, true).expect("opens");
    assert_eq!(t.to, Open);
    // With three or more callers, three distinct failing clients are enough.
    let mut b = Breaker::new(settings(), t0);
    for client in 10..20 {
        call(&mut b, client, 0, false);
    }
    call(&mut b, 1, 1, true);
    call(&mut b, 2, 2, true);
    assert_eq!(b.state(), Closed);
    assert_eq!(call(&mut b, 3, 3, true).map(|t| t.to), Some(Open));
    // Clients that called longer ago than the window are not waited for.
    let mut b = Breaker::new(settings(), t0);
    call(&mut b, 1, 0, false);
    for ms in 0..3 {
        call(&mut b, 2, 20_000 + ms, true);
    }
    assert_eq!(b.state(), Open);
}

/// Runs `(at ms, step, state after)` rows and checks each.
fn run(name: &str, settings: CircuitSettings, rows: &[(u64, Step, CircuitState)]) {
    let t0 = Instant::now();
    let mut breaker = Breaker::new(settings, t0);
    let mut tickets = Vec::new();
    for (row, &(at, step, expect)) in rows.iter().enumerate() {
        let now = t0 + Duration::from_millis(at);
        let ctx = format!("{name}, row {row} ({step:?} at {at} ms)");
        match step {
            Call | Probe | Refused(_) => match (breaker.try_acquire(now).0, step) {
                (Ok(t), Call) if !t.is_probe() => tickets.push(t),
                (Ok(t), Probe) if t.is_probe() => tickets.push(t),
                (Err(wait), Refused(ms)) => {
                    assert_eq!(wait, Duration::from_millis(ms), "{ctx}: wait")
                }
                (got, _) => panic!("{ctx}: got {got:?}"),
            },
            Pass(i) => {
                let _ = breaker.record(tickets[i], CallOutcome::Success, now);
            }
            Fail(i) => {
                let _ = breaker.record(tickets[i], CallOutcome::Failure { retry_after: None }, now);
            }
            FailHint(i, ms) => {
                let hint = Some(Duration::from_millis(ms));
                {
                    let _ =
                        breaker.record(tickets[i], CallOutcome::Failure { retry_after: hint }, now);
                }
            }
            Cancel(i) => breaker.cancel(tickets[i]),
        }
        assert_eq!(breaker.state(), expect, "{ctx}: state");
    }
}

#[test]
#[rustfmt::skip]
fn closed_opens_on_consecutive_failures_only() {
    run("consecutive", settings(), &[
        (0, Call, Closed), (0, Fail(0), Closed),
        (0, Call, Closed), (0, Fail(1), Closed),
        (0, Call, Closed), (0, Pass(2), Closed), // a success resets the count
        (0, Call, Closed), (0, Fail(3), Closed),
        (0, Call, Closed), (0, Fail(4), Closed),
        (0, Call, Closed), (0, Fail(5), Open),
        (2_000, Refused(3_000), Open),
        (4_999, Refused(1), Open),
    ]);
}

#[test]
#[rustfmt::skip]
fn open_becomes_half_open_and_admits_only_the_probes() {
    let two_probes = CircuitSettings { half_open_max_probes: 2, ..settings() };
    run("half-open", two_probes, &[
        (0, Call, Closed), (0, Call, Closed), (0, Call, Closed),
        (0, Fail(0), Closed), (0, Fail(1), Closed), (0, Fail(2), Open),
        (5_000, Probe, HalfOpen),
        (5_000, Probe, HalfOpen),
        (5_200, Refused(800), HalfOpen), // both probe slots taken
        (5_300, Cancel(3), HalfOpen),    // a cancelled probe frees its slot...
        (5_300, Probe, HalfOpen),        // ...without counting either way
    ]);
}

#[test]
#[rustfmt::skip]
fn a_probe_held_past_its_lease_gives_its_slot_to_another() {
    run("lease", settings(), &[
        (0, Call, Closed), (0, Call, Closed), (0, Call, Closed),
        (0, Fail(0), Closed), (0, Fail(1), Closed), (0, Fail(2), Open),
        (5_000, Probe, HalfOpen),          // a client holds this one...
        (9_000, Refused(0), HalfOpen),     // ...its slot taken meanwhile
        (14_999, Refused(0), HalfOpen),
        (15_000, Probe, HalfOpen),         // ...until its 10 s lease ran out
        (15_100, Pass(4), HalfOpen),
        (15_200, Pass(3), HalfOpen),       // a late success still counts
        (15_300, Probe, HalfOpen), (15_400, Pass(5), Closed),
    ]);
    run("late failure", settings(), &[
        (0, Call, Closed), (0, Call, Closed), (0, Call, Closed),
        (0, Fail(0), Closed), (0, Fail(1), Closed), (0, Fail(2), Open),
        (5_000, Probe, HalfOpen),
        (15_000, Probe, HalfOpen),
        // A hung upstream: the released probe's timeout still reopens.
        (35_000, Fail(3), Open),
        (35_000, Pass(4), Open),           // a straggler of the old state
    ]);
}

#[test]
#[rustfmt::skip]
fn closes_after_consecutive_successes_and_min_half_open() {
    run("close", settings(), &[
        (0, Call, Closed), (0, Call, Closed), (0, Call, Closed),
        (0, Fail(0), Closed), (0, Fail(1), Closed), (0, Fail(2), Open),
        (5_000, Probe, HalfOpen), (5_010, Pass(3), HalfOpen),
        (5_020, Probe, HalfOpen), (5_030, Pass(4), HalfOpen),
        (5_040, Probe, HalfOpen), (5_050, Pass(5), HalfOpen), // 3 successes, only 50 ms in
        (5_060, Probe, HalfOpen), (5_900, Pass(6), HalfOpen),
        (6_000, Call, Closed), // min_half_open is up: the next request closes it
        // The open duration was reset: failing again opens for 5 s, not 10.
        (6_000, Call, Closed), (6_000, Call, Closed),
        (6_000, Fail(7), Closed), (6_000, Fail(8), Closed), (6_000, Fail(9), Open),
        (6_000, Refused(5_000), Open),
    ]);
    run("close on a success", settings(), &[
        (0, Call, Closed), (0, Call, Closed), (0, Call, Closed),
        (0, Fail(0), Closed), (0, Fail(1), Closed), (0, Fail(2), Open),
        (5_000, Probe, HalfOpen), (5_400, Pass(3), HalfOpen),
        (5_500, Probe, HalfOpen), (5_800, Pass(4), HalfOpen),
        (5_900, Probe, HalfOpen), (6_100, Pass(5), Closed),
    ]);
}

#[test]
#[rustfmt::skip]
fn any_probe_failure_reopens_with_a_doubled_capped_duration() {
    run("backoff", settings(), &[
        (0, Call, Closed), (0, Call, Closed), (0, Call, Closed),
        (0, Fail(0), Closed), (0, Fail(1), Closed), (0, Fail(2), Open),
        (5_000, Probe, HalfOpen), (5_000, Pass(3), HalfOpen),
        (5_000, Probe, HalfOpen), (5_000, Fail(4), Open), // successes do not protect
        (14_999, Refused(1), Open),                      // 10 s
        (15_000, Probe, HalfOpen), (15_000, Fail(5), Open),
        (35_000, Probe, HalfOpen), (35_000, Fail(6), Open), // 20 s
        (64_999, Refused(1), Open),                      // 40 s capped at 30 s
        (65_000, Probe, HalfOpen), (65_000, Fail(7), Open),
        (94_999, Refused(1), Open),                      // still 30 s
    ]);
}

#[test]
#[rustfmt::skip]
fn upstream_retry_after_keeps_it_open_longer_within_the_cap() {
    run("hint", settings(), &[
        (0, Call, Closed), (0, Call, Closed), (0, Call, Closed),
        (0, Fail(0), Closed), (0, Fail(1), Closed), (0, FailHint(2, 12_000), Open),
        (1_000, Refused(11_000), Open),
        (12_000, Probe, HalfOpen), (12_000, FailHint(3, 600_000), Open),
        (12_000, Refused(30_000), Open), // capped at max_open
    ]);
}

#[test]
#[rustfmt::skip]
fn results_of_calls_from_an_earlier_state_are_ignored() {
    run("stale", settings(), &[
        (0, Call, Closed), (0, Call, Closed), (0, Call, Closed), (0, Call, Closed),
        (0, Call, Closed),
        (0, Fail(0), Closed), (0, Fail(1), Closed), (0, Fail(2), Open),
        (100, Fail(3), Open), (100, Pass(4), Open), // stragglers of the burst
        (5_000, Probe, HalfOpen),
        (5_001, Fail(3), HalfOpen), // a closed-era failure does not re-open it
    ]);
}

#[test]
#[rustfmt::skip]
fn failure_rate_over_the_window() {
    let rate = CircuitSettings {
        failure_threshold: 100,
        failure_rate: Some(FailureRate {
            threshold: 0.5,
            window: Duration::from_secs(10),
            min_calls: 4,
        }),
        ..settings()
    };
    run("rate", rate.clone(), &[
        (0, Call, Closed), (0, Fail(0), Closed),
        (0, Call, Closed), (0, Pass(1), Closed),
        (0, Call, Closed), (0, Fail(2), Closed), // 2 of 3: below min_calls
        (0, Call, Closed), (0, Pass(3), Closed),   // 2 of 4, but a success never opens
        (0, Call, Closed), (0, Fail(4), Open),   // 3 of 5
    ]);
    run("rate, old calls forgotten", rate, &[
        (0, Call, Closed), (0, Fail(0), Closed),
        (0, Call, Closed), (0, Fail(1), Closed),
        (11_000, Call, Closed), (11_000, Pass(2), Closed),
        (11_000, Call, Closed), (11_000, Pass(3), Closed),
        (11_000, Call, Closed), (11_000, Pass(4), Closed),
        (11_000, Call, Closed), (11_000, Fail(5), Closed), // 1 of 4 in the window
    ]);
}

/// An upstream that has "recovered" but cannot take the load: it answers a
/// request that finds it rested (nothing received for `REST`), and fails every
/// request that comes sooner after another.
struct Struggling {
    last: Option<Instant>,
}

const REST: Duration = Duration::from_millis(500);

impl Struggling {
    fn call(&mut self, now: Instant) -> CallOutcome {
        let rested = self.last.is_none_or(|last| now - last >= REST);
        self.last = Some(now);
        if rested {
            CallOutcome::Success
        } else {
            CallOutcome::Failure { retry_after: None }
        }
    }
}

#[derive(Debug, Default)]
struct Minute {
    closes: u32,
    opens: u32,
    failed_calls: u32,
}

/// A simulated minute at 100 requests/s, each taking 5 ms at the upstream.
fn simulate(settings: CircuitSettings) -> Minute {
    let t0 = Instant::now();
    let mut breaker = Breaker::new(settings, t0);
    let mut upstream = Struggling { last: None };
    let mut minute = Minute::default();
    let count = |t: Option<Transition>, m: &mut Minute| match t.map(|t| t.to) {
        Some(Closed) => m.closes += 1,
        Some(Open) => m.opens += 1,
        _ => {}
    };
    for i in 0..6_000u64 {
        let now = t0 + Duration::from_millis(i * 10);
        let (ticket, t) = breaker.try_acquire(now);
        count(t, &mut minute);
        let Ok(ticket) = ticket else { continue };
        let outcome = upstream.call(now);
        if outcome != CallOutcome::Success {
            minute.failed_calls += 1;
        }
        let t = breaker.record(ticket, outcome, now + Duration::from_millis(5));
        count(t, &mut minute);
    }
    minute
}

#[test]
fn consecutive_successes_stop_the_flapping_a_single_success_causes() {
    let spec = CircuitSettings {
        failure_threshold: 5,
        open: Duration::from_secs(5),
        max_open: Duration::from_secs(60),
        ..settings()
    };
    let single = CircuitSettings {
        success_threshold: 1,
        min_half_open: Duration::ZERO,
        ..spec.clone()
    };
    let careful = simulate(spec);
    let naive = simulate(single);
    // Consecutive rule: the first probe succeeds, the second fails, the open
    // duration doubles (5, 10, 20, 40 s): it never closes on the struggler.
    assert_eq!(careful.closes, 0, "{careful:?}");
    assert!(careful.opens <= 5, "{careful:?}");
    // One success closes it, full load fails it, and the open duration resets
    // each time: a cycle every ~5 s, each letting a burst of failures through.
    assert!(naive.closes >= 10, "{naive:?}");
    assert!(
        naive.failed_calls >= 5 * careful.failed_calls,
        "{naive:?} vs {careful:?}"
    );
    eprintln!("consecutive rule: {careful:?}; single success: {naive:?}");
}

#[tokio::test(start_paused = true)]
async fn a_probe_the_client_abandons_frees_its_slot_and_counts_neither_way() {
    use http::{Request, Response};
    use tower::{Layer, ServiceExt, service_fn};

    use crate::body::BoxError;

    let layer = CircuitBreakerLayer::new(CircuitSettings {
        failure_threshold: 1,
        ..settings()
    });
    let circuit = layer.circuit().unwrap().clone();
    let failing = layer.layer(service_fn(|_: Request<()>| async {
        Err::<Response<String>, BoxError>("connection refused".into())
    }));
    assert!(failing.oneshot(Request::new(())).await.is_err());
    assert_eq!(circuit.state(), Open);

    tokio::time::advance(Duration::from_secs(5)).await;
    let hanging = layer.layer(service_fn(|_: Request<()>| {
        std::future::pending::<Result<Response<String>, BoxError>>()
    }));
    let abandoned = hanging.clone().oneshot(Request::new(()));
    // The client gives up while the probe is at the upstream.
    assert!(
        tokio::time::timeout(Duration::from_millis(10), abandoned)
            .await
            .is_err()
    );
    assert_eq!(circuit.state(), HalfOpen);
    // Its slot is free again: the next request is a probe, not a refusal.
    let next = hanging.oneshot(Request::new(()));
    assert!(
        tokio::time::timeout(Duration::from_millis(10), next)
            .await
            .is_err()
    );
    assert_eq!(circuit.state(), HalfOpen, "a cancelled probe is no failure");
    assert_eq!(circuit.snapshot().state, HalfOpen);
}

/// Half-open with `success_threshold` 2, then one call per `answer`.
async fn probes_with(
    answers: Vec<http::Response<ProbeBody>>,
) -> std::sync::Arc<crate::circuit::Circuit> {
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt, service_fn};

    use crate::body::BoxError;

    let layer = CircuitBreakerLayer::new(CircuitSettings {
        failure_threshold: 1,
        success_threshold: 2,
        min_half_open: Duration::ZERO,
        ..settings()
    });
    let circuit = layer.circuit().unwrap().clone();
    let failing = layer.layer(service_fn(|_: Request<()>| async {
        Err::<Response<ProbeBody>, BoxError>("connection refused".into())
    }));
    assert!(failing.oneshot(Request::new(())).await.is_err());
    tokio::time::advance(Duration::from_secs(5)).await;
    for answer in answers {
        let answer = std::sync::Mutex::new(Some(answer));
        let svc = layer.layer(service_fn(move |_: Request<()>| {
            let res = answer.lock().unwrap().take().unwrap();
            async move { Ok::<_, BoxError>(res) }
        }));
        let res = svc.oneshot(Request::new(())).await.unwrap();
        let body = res.into_body();
        if !http_body::Body::is_end_stream(&body) {
            // As hyper does: read frames until the end, or drop it unpolled.
            let _ = body.collect().await;
        }
    }
    circuit
}

type ProbeBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, crate::body::BoxError>;

fn answer(status: u16, body: ProbeBody) -> http::Response<ProbeBody> {
    let mut res = http::Response::new(body);
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
    res
}

fn empty() -> ProbeBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// One data frame, then trailers, as a chunked upstream body ends.
fn with_trailers() -> ProbeBody {
    use http_body_util::BodyExt;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-sum", http::HeaderValue::from_static("1"));
    Frames(
        [
            Ok(http_body::Frame::data(bytes::Bytes::from_static(b"ok"))),
            Ok(http_body::Frame::trailers(trailers)),
        ]
        .into(),
    )
    .boxed_unsync()
}

/// A body the upstream cuts off after a first frame.
fn cut_off() -> ProbeBody {
    use http_body_util::BodyExt;
    Frames(
        [
            Ok(http_body::Frame::data(bytes::Bytes::from_static(b"par"))),
            Err("upstream reset".into()),
        ]
        .into(),
    )
    .boxed_unsync()
}

type FrameResult = Result<http_body::Frame<bytes::Bytes>, crate::body::BoxError>;

/// A fixed list of frames; at its end once the list is empty.
struct Frames(std::collections::VecDeque<FrameResult>);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<FrameResult>> {
        std::task::Poll::Ready(self.0.pop_front())
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

#[tokio::test(start_paused = true)]
async fn bodyless_successes_close_a_half_open_circuit() {
    // 204, 304 and a HEAD answer: hyper never polls such a body.
    let circuit = probes_with(vec![answer(204, empty()), answer(304, empty())]).await;
    assert_eq!(circuit.state(), Closed);
}

#[tokio::test(start_paused = true)]
async fn a_body_ending_in_trailers_is_a_success() {
    let circuit = probes_with(vec![
        answer(200, with_trailers()),
        answer(200, with_trailers()),
    ])
    .await;
    assert_eq!(circuit.state(), Closed);
}

#[tokio::test(start_paused = true)]
async fn a_body_cut_off_after_a_200_reopens_the_circuit() {
    let circuit = probes_with(vec![answer(200, cut_off())]).await;
    assert_eq!(circuit.state(), Open);
}

#[tokio::test]
async fn bodyless_successes_reset_the_consecutive_failures() {
    use http::Request;
    use tower::{Layer, ServiceExt, service_fn};

    use crate::body::BoxError;

    let layer = CircuitBreakerLayer::new(CircuitSettings {
        failure_threshold: 3,
        ..settings()
    });
    let circuit = layer.circuit().unwrap().clone();
    for status in [500, 500, 202, 500, 500, 204, 500, 500] {
        let svc = layer.layer(service_fn(move |_: Request<()>| async move {
            Ok::<_, BoxError>(answer(status, empty()))
        }));
        drop(svc.oneshot(Request::new(())).await.unwrap());
    }
    assert_eq!(circuit.state(), Closed, "{:?}", circuit.snapshot());
    assert_eq!(circuit.snapshot().consecutive_failures, 2);
}

/// A gRPC answer streamed as a data frame, then trailers with `code`.
struct GrpcBody(std::collections::VecDeque<http_body::Frame<bytes::Bytes>>);

impl http_body::Body for GrpcBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn grpc_answer(code: &'static str) -> http::Response<GrpcBody> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static(code));
    let frames = [
        http_body::Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\0")),
        http_body::Frame::trailers(trailers),
    ];
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(GrpcBody(frames.into_iter().collect()))
        .unwrap()
}

#[tokio::test]
async fn grpc_statuses_in_trailers_are_the_calls_outcome() {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    for (code, opens) in [("14", true), ("4", true), ("3", false), ("0", false)] {
        let layer = CircuitBreakerLayer::new(CircuitSettings {
            failure_threshold: 3,
            ..CircuitSettings::default()
        });
        let circuit = layer.circuit().unwrap().clone();
        let svc = layer.layer(tower::service_fn(move |_: http::Request<()>| async move {
            Ok::<_, crate::body::BoxError>(grpc_answer(code))
        }));
        for _ in 0..3 {
            // Marked as the gRPC layer above marks a gRPC call.
            let mut req = http::Request::new(());
            req.extensions_mut().insert(crate::exchange::GrpcCall);
            let res = svc.clone().oneshot(req).await.unwrap();
            // Decided only once the trailers have passed.
            assert_eq!(circuit.state(), Closed);
            res.into_body().collect().await.unwrap();
        }
        let state = circuit.state();
        assert_eq!(state == Open, opens, "grpc-status {code}: {state:?}");
    }
}
