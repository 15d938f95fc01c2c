//! Blame the right party: the circuit breaker and the adaptive limit learn only
//! the upstream's own outcomes. Through the real proxy against real upstreams
//! on 127.0.0.1, raw TCP where a client must misbehave, paused clock where
//! time matters.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use http::{Request, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, advance};

/// Opens on one failure, probes after 1 s, closes after two successes.
const CIRCUIT: &str = "[route.circuit]\nfailure_threshold = 1\nopen_ms = 1000\n\
     success_threshold = 2\nmin_half_open_ms = 0\n";

async fn route(admin: SocketAddr) -> Value {
    json(&get(&format!("http://{admin}/status")).await.1)["routes"][0].clone()
}

async fn metrics(admin: SocketAddr) -> String {
    String::from_utf8_lossy(&get(&format!("http://{admin}/metrics")).await.1).into_owned()
}

async fn outcome(admin: SocketAddr, outcome: &str) -> f64 {
    let series = format!(r#"sluicegate_requests_total{{route="test",outcome="{outcome}"}}"#);
    metric(&metrics(admin).await, &series).unwrap_or(0.0)
}

/// Waits (on the paused clock) until `check` holds; panics after 5 s.
async fn until<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < Duration::from_secs(5), "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

async fn send_method(method: &str, url: &str) -> StatusCode {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .body(full(""))
        .unwrap();
    send(&client(), req).await.0.status()
}

// === Outcomes the breaker must hear about ===

#[tokio::test(start_paused = true)]
async fn bodyless_successes_close_a_half_open_circuit() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", CIRCUIT))
        .await
        .unwrap();
    let (base, admin) = (format!("http://{}", proxy.proxy_addr()), proxy.admin_addr());
    // 204, 304, a 202 with Content-Length 0, and any answer to HEAD: hyper
    // never polls such a body.
    for (method, path, code) in [
        ("GET", "/status/204", 204),
        ("GET", "/status/304", 304),
        ("POST", "/empty/202", 202),
        ("HEAD", "/x", 200),
    ] {
        assert_eq!(send_method("GET", &format!("{base}/status/500")).await, 500);
        assert_eq!(route(admin).await["circuit"]["state"], "open");
        advance(Duration::from_millis(1000)).await;
        for _ in 0..2 {
            let status = send_method(method, &format!("{base}{path}")).await;
            assert_eq!(status.as_u16(), code, "{method} {path}");
        }
        let circuit = route(admin).await["circuit"].clone();
        assert_eq!(circuit["state"], "closed", "{method} {path}: {circuit}");
    }
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn bodyless_successes_reset_the_consecutive_failure_count() {
    let (up, _) = spawn_upstream().await;
    let circuit = CIRCUIT.replace("failure_threshold = 1", "failure_threshold = 3");
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", &circuit))
        .await
        .unwrap();
    let (base, admin) = (format!("http://{}", proxy.proxy_addr()), proxy.admin_addr());
    for path in [
        "/status/500",
        "/status/500",
        "/status/204",
        "/status/500",
        "/status/500",
        "/empty/202",
        "/status/500",
        "/status/500",
    ] {
        send_method("GET", &format!("{base}{path}")).await;
    }
    let circuit = route(admin).await["circuit"].clone();
    assert_eq!(circuit["state"], "closed", "{circuit}");
    assert_eq!(circuit["consecutive_failures"], 2, "{circuit}");
    proxy.shutdown().await;
}

/// A raw upstream: `/trailers` answers a chunked body that ends with
/// trailers, anything else `500`.
async fn trailer_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer: &[u8] = if head.starts_with(b"GET /trailers ") {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\
                      connection: close\r\n\r\n2\r\nok\r\n0\r\nx-sum: 1\r\n\r\n"
                } else {
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\
                      connection: close\r\n\r\n"
                };
                let _ = stream.write_all(answer).await;
            });
        }
    });
    addr
}

#[tokio::test(start_paused = true)]
async fn a_chunked_body_ending_with_trailers_is_a_success() {
    let proxy = sluicegate::start(config(trailer_upstream().await, "/", CIRCUIT))
        .await
        .unwrap();
    let (base, admin) = (format!("http://{}", proxy.proxy_addr()), proxy.admin_addr());
    assert_eq!(send_method("GET", &format!("{base}/fail")).await, 500);
    assert_eq!(route(admin).await["circuit"]["state"], "open");
    advance(Duration::from_millis(1000)).await;
    for _ in 0..2 {
        let (res, body) = get(&format!("{base}/trailers")).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(&body[..], b"ok");
    }
    assert_eq!(route(admin).await["circuit"]["state"], "closed");
    proxy.shutdown().await;
}

// === Client faults are not upstream faults ===

/// Circuit opening on one failure, and an adaptive limit that halves on any
/// overload sample: one misattributed fault shows in either.
const WATCHFUL: &str = "[route.admission]\nmax_inflight = \"adaptive\"\n\
     [route.admission.adaptive]\nalgorithm = \"aimd\"\ninitial_limit = 16\nmin_limit = 1\n\
     window_ms = 1\nmin_samples = 1\nbackoff = 0.5\n\
     [route.circuit]\nfailure_threshold = 1\n";

/// Sends `head` and `body` raw, then ends the connection: FIN, or RST when
/// `reset`. Returns what came back (possibly nothing).
async fn raw_then_close(proxy: SocketAddr, bytes: &[u8], reset: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    // Let the proxy forward what it has, so the cut comes mid-upload.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if reset {
        stream.set_zero_linger().unwrap();
        drop(stream);
        return Vec::new();
    }
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    answer
}

#[tokio::test(start_paused = true)]
async fn uploads_cut_short_or_malformed_are_the_clients_fault() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", WATCHFUL))
        .await
        .unwrap();
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    let declared = b"POST /ingest HTTP/1.1\r\nhost: a\r\ncontent-length: 100000\r\n\r\n";
    let partial = [&declared[..], &[b'x'; 1000][..]].concat();
    let chunked = "POST /ingest HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n";

    // The client goes away mid-body: FIN, then RST.
    let answer = raw_then_close(addr, &partial, false).await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    raw_then_close(addr, &partial, true).await;
    until("two client_closed outcomes", || async {
        outcome(admin, "client_closed").await == 2.0
    })
    .await;

    // Malformed framing: a bad chunk size, and extensions past hyper's limit.
    let bad_size = format!("{chunked}5\r\nhello\r\nzz\r\n");
    let long_ext = format!("{chunked}5;{}\r\nhello\r\n", "e".repeat(20_000));
    for bytes in [bad_size, long_ext] {
        let answer = raw_then_close(addr, bytes.as_bytes(), false).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(r#""reason":"bad_request""#), "{answer}");
    }

    assert_eq!(outcome(admin, "bad_request").await, 2.0);
    assert_eq!(outcome(admin, "upstream_unavailable").await, 0.0);
    assert_eq!(outcome(admin, "5xx").await, 0.0);
    let route = route(admin).await;
    assert_eq!(route["circuit"]["state"], "closed", "{route}");
    assert_eq!(route["circuit"]["consecutive_failures"], 0, "{route}");
    let limit = route["admission"]["adaptive"]["limit"].as_u64().unwrap();
    assert!(
        limit >= 16,
        "client faults lowered the adaptive limit: {route}"
    );
    // Still serving.
    assert_eq!(get(&format!("http://{addr}/x")).await.0.status(), 200);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_upload_is_not_an_upstream_timeout_nor_a_slow_call() {
    let (up, _) = spawn_upstream().await;
    let extra = "timeout_ms = 500\n\
                 [route.admission]\nmax_inflight = \"adaptive\"\n\
                 [route.admission.adaptive]\nwindow_ms = 1\nmin_samples = 1\n\
                 [route.circuit]\nfailure_threshold = 1\nslow_call_ms = 300\n";
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", extra))
        .await
        .unwrap();
    let url = format!("http://{}/ingest", proxy.proxy_addr());
    // Ten chunks 200 ms apart: four times the upstream's deadline in all.
    let req = Request::post(&url)
        .body(trickle(10, Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let (res, body) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::OK, "{body:?}");
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert_eq!(
        json(&body)["body"].as_str().unwrap().split(':').nth(1),
        Some("10")
    );
    let admin = proxy.admin_addr();
    assert_eq!(route(admin).await["circuit"]["state"], "closed");
    // The adaptive limit's sample is the upstream's time, not the upload's.
    let adaptive = route(admin).await["admission"]["adaptive"].clone();
    let current = adaptive["current_ms"].as_f64().unwrap();
    assert!(current < 300.0, "{adaptive}");
    // The upstream-duration histogram times the upstream, not the upload.
    let text = metrics(admin).await;
    let sum = metric(
        &text,
        r#"sluicegate_upstream_duration_seconds_sum{route="test"}"#,
    );
    assert!(sum.is_some_and(|s| s < 0.3), "{sum:?}");
    proxy.shutdown().await;
}

// === A queued client that goes away ===

#[tokio::test(start_paused = true)]
async fn a_queued_post_leaves_the_queue_when_its_client_goes_away() {
    let (up, mut held) = spawn_upstream().await;
    let admission =
        "[route.admission]\nmax_inflight = 1\nqueue_capacity = 4\nqueue_timeout_ms = 60000\n";
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", admission))
        .await
        .unwrap();
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    let hold = format!("http://{addr}/hold");
    let first = tokio::spawn(async move { get(&hold).await });
    held.recv().await.unwrap();

    // Bodies larger than one read: hyper stops reading the socket. A FIN is
    // seen once the body is in the proxy's socket buffer (64 KiB is); an RST
    // at once, even while the client still holds unsent bytes (300 KB does:
    // its FIN would wait behind them for a window the proxy does not open).
    let head = b"POST /ingest HTTP/1.1\r\nhost: a\r\ncontent-length: 1000000\r\n\r\n";
    for (reset, size) in [(false, 64 * 1024), (true, 300_000)] {
        let upload = [&head[..], &vec![b'x'; size]].concat();
        let mut client = TcpStream::connect(addr).await.unwrap();
        // The proxy takes only what it reads: write until queued, no further.
        let queued = || async { route(admin).await["admission"]["queued"] == 1 };
        tokio::select! {
            _ = client.write_all(&upload) => {}
            _ = until("queued", queued) => {}
        }
        until("queued", queued).await;
        if reset {
            client.set_zero_linger().unwrap();
        }
        drop(client);
        let took = until("the queue empties", || async {
            route(admin).await["admission"]["queued"] == 0
        })
        .await;
        assert!(took < Duration::from_secs(1), "left after {took:?}");
    }
    assert_eq!(outcome(admin, "client_closed").await, 2.0);
    assert_eq!(outcome(admin, "queue_timeout").await, 0.0);
    up.release.notify_waiters();
    assert_eq!(first.await.unwrap().0.status(), StatusCode::OK);
    proxy.shutdown().await;
}

// === A client that stops reading ===

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_frees_the_probe_slot_after_send_timeout() {
    let (up, _) = spawn_upstream().await;
    let circuit = CIRCUIT.replace("success_threshold = 2", "success_threshold = 1");
    let config = config_with(up.addr.unwrap(), "send_timeout_ms = 1000", &circuit);
    let proxy = sluicegate::start(config).await.unwrap();
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    assert_eq!(
        send_method("GET", &format!("http://{addr}/status/500")).await,
        500
    );
    advance(Duration::from_millis(1000)).await;

    // The half-open probe asks for 256 MB and never reads a byte of it.
    let mut sloth = TcpStream::connect(addr).await.unwrap();
    sloth
        .write_all(b"GET /big/268435456 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    until("the probe is in flight", || async {
        route(admin).await["admission"]["inflight"] == 1
    })
    .await;
    let (res, body) = get(&format!("http://{addr}/x")).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{body:?}");

    // Past send_timeout_ms the connection is closed and the slot is free.
    let took = until("the slot is freed", || async {
        route(admin).await["admission"]["inflight"] == 0
    })
    .await;
    assert!(took <= Duration::from_millis(1100), "{took:?}");
    let circuit = route(admin).await["circuit"].clone();
    assert_eq!(
        circuit["state"], "half_open",
        "the client's stall is no failure"
    );
    let text = metrics(admin).await;
    assert_eq!(metric(&text, "sluicegate_send_timeout_total"), Some(1.0));
    // The sloth's connection is closed: reading drains what was sent, then ends.
    let mut sink = vec![0u8; 1 << 20];
    loop {
        match sloth.read(&mut sink).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // The next request is a probe, and its success closes the circuit.
    assert_eq!(get(&format!("http://{addr}/x")).await.0.status(), 200);
    assert_eq!(route(admin).await["circuit"]["state"], "closed");
    proxy.shutdown().await;
}

// === README "How an exchange ended" ===

/// README's two tables of how an exchange ended are what the classifier
/// and its readers decide: generated here from `sluicegate::classify`, the
/// circuit's default failure policy and a spool's default `on`, and compared
/// with README's text (on a difference, the generated tables are printed to
/// paste).
#[test]
fn readme_says_how_each_ending_is_judged() {
    use sluicegate::circuit::{CallOutcome, FailurePolicy};
    use sluicegate::classify::{self, Delivery, Failure, Load};
    use sluicegate::error::Reason;

    let config = sluicegate::Config::parse(
        "t.toml",
        "[[route]]\nupstream = \"http://127.0.0.1:9\"\n[route.spool]\ndir = \"/tmp/x\"\nmax_bytes = 1048576\n",
    )
    .unwrap();
    let on = config.routes[0].spool.as_ref().unwrap().on.clone();
    let policy = FailurePolicy::default();
    let circuit = |outcome: Option<CallOutcome>| match outcome {
        None => "neither".to_string(),
        Some(CallOutcome::Success) => "success".to_string(),
        Some(CallOutcome::Failure { retry_after: None }) => "failure".to_string(),
        Some(CallOutcome::Failure {
            retry_after: Some(d),
        }) => format!("failure, open ≥ {} s", d.as_secs()),
    };
    let load = |load: Load| match load {
        Load::Normal => "sample",
        Load::Overload => "overload",
        Load::Unrelated => "no sample",
    };

    // The upstream answered: its head, then (a success so far) its body's end.
    let mut answers = String::from(
        "| the upstream answered | circuit breaker | adaptive limit | spool replay |\n|---|---|---|---|\n",
    );
    let answer = |status: u16, headers: &[(&'static str, &'static str)], grpc: bool| {
        let mut res = http::Response::new(());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            res.headers_mut()
                .insert(*k, http::HeaderValue::from_static(v));
        }
        classify::answer(&res, grpc)
    };
    let grpc = |code: &'static str, pushback: Option<&'static str>| {
        let mut h = vec![("content-type", "application/grpc"), ("grpc-status", code)];
        if let Some(ms) = pushback {
            h.push(("grpc-retry-pushback-ms", ms));
        }
        answer(200, &h, true)
    };
    let rows: Vec<(&str, classify::Answer)> = vec![
        ("`2xx`", answer(200, &[], false)),
        ("`408`, `429`", answer(429, &[], false)),
        ("another `4xx` (`400`, `404`, ...)", answer(404, &[], false)),
        ("`500`, `502` (any other `5xx`)", answer(500, &[], false)),
        ("`503`", answer(503, &[], false)),
        (
            "`503` with `Retry-After: 5`",
            answer(503, &[("retry-after", "5")], false),
        ),
        ("`504`", answer(504, &[], false)),
        (
            "gRPC `OK`, or a client's code (`INVALID_ARGUMENT`, `NOT_FOUND`, `RESOURCE_EXHAUSTED` without pushback, ...)",
            grpc("0", None),
        ),
        ("gRPC `UNAVAILABLE`, `DEADLINE_EXCEEDED`", grpc("14", None)),
        ("gRPC `INTERNAL`, `UNKNOWN`, `DATA_LOSS`", grpc("13", None)),
        (
            "gRPC `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms: 5000`",
            grpc("8", Some("5000")),
        ),
    ];
    for (label, answer) in rows {
        let spool = if label.starts_with("gRPC") {
            "never spooled".to_string()
        } else {
            match answer.delivery() {
                Delivery::Delivered => "delivered".to_string(),
                Delivery::Refused => "dead letter".to_string(),
                Delivery::Again => match answer.retry_after {
                    Some(d) => format!("again, not before {} s", d.as_secs()),
                    None => "again".to_string(),
                },
            }
        };
        let judged = policy.judge(&answer, Duration::ZERO);
        answers += &format!(
            "| {label} | {} | {} | {spool} |\n",
            circuit(Some(judged)),
            load(answer.load()),
        );
    }
    let ends = [
        (
            "a body that ends whole (or no body)",
            classify::body_end(true, None, false),
        ),
        (
            "a gRPC body whose trailers say `UNAVAILABLE`",
            classify::body_end(
                true,
                Some(
                    &[("grpc-status", "14")]
                        .iter()
                        .map(|(k, v)| {
                            (
                                http::HeaderName::from_static(k),
                                http::HeaderValue::from_static(v),
                            )
                        })
                        .collect(),
                ),
                true,
            ),
        ),
        (
            "a gRPC body that ends without a status",
            classify::body_end(true, None, true),
        ),
        (
            "a body the upstream cuts off, resets or stalls",
            classify::body_end(false, None, false),
        ),
    ];
    for (label, end) in ends {
        answers += &format!(
            "| then {label} | {} | {} | |\n",
            circuit(Some(FailurePolicy::of_body_end(end))),
            match end {
                classify::BodyEnd::Status(v) => load(v.load()),
                _ => "as its head said",
            },
        );
    }

    // No answer: an error below, blamed once. A layer's own refusal is not
    // an exchange it judges.
    let mut failures = String::from(
        "| no answer: | the client gets | circuit breaker | adaptive limit | a spool takes it over | spool replay |\n|---|---|---|---|---|---|\n",
    );
    enum Own {
        Neither,
        Admission,
        Circuit,
    }
    let refused = |reason| Failure::Refused {
        reason,
        retry_after: Some(Duration::from_secs(1)),
    };
    let upstream = |reason, sent| Failure::Upstream { reason, sent };
    let rows = [
        (
            "a body over `max_body_bytes`",
            Failure::Client(Reason::BodyTooLarge),
            Own::Neither,
        ),
        (
            "a body paused or too slow",
            Failure::Client(Reason::RequestTimeout),
            Own::Neither,
        ),
        (
            "a body malformed",
            Failure::Client(Reason::BadRequest),
            Own::Neither,
        ),
        (
            "the client gone",
            Failure::Client(Reason::ClientClosed),
            Own::Neither,
        ),
        (
            "the client's deadline (`grpc-timeout`) passed",
            Failure::ClientDeadline,
            Own::Neither,
        ),
        (
            "the circuit open",
            refused(Reason::CircuitOpen),
            Own::Circuit,
        ),
        (
            "admission's queue full",
            refused(Reason::QueueFull),
            Own::Admission,
        ),
        (
            "admission's queue wait over",
            refused(Reason::QueueTimeout),
            Own::Admission,
        ),
        (
            "no free HTTP/2 stream upstream in `connect_timeout_ms`",
            refused(Reason::QueueTimeout),
            Own::Neither,
        ),
        (
            "the upstream unreachable, nothing sent",
            upstream(Reason::UpstreamUnavailable, false),
            Own::Neither,
        ),
        (
            "the upstream broke the connection after the request went out",
            upstream(Reason::UpstreamUnavailable, true),
            Own::Neither,
        ),
        (
            "the upstream timed out (`timeout_ms`, `write_timeout_ms`)",
            upstream(Reason::UpstreamTimeout, true),
            Own::Neither,
        ),
    ];
    for (label, failure, own) in rows {
        let reason = failure.reason();
        let breaker = failure
            .upstream_failed()
            .then_some(CallOutcome::Failure { retry_after: None });
        let (breaker, adaptive) = match own {
            Own::Circuit => ("its own refusal".to_string(), "never admitted"),
            Own::Admission => (circuit(breaker), "its own refusal"),
            Own::Neither => (circuit(breaker), load(failure.load())),
        };
        failures += &format!(
            "| {label} | {} `{}` | {breaker} | {adaptive} | {} | {} |\n",
            reason.status().as_u16(),
            reason.as_str(),
            if failure.spoolable(&on) { "yes" } else { "no" },
            if failure.held_back() {
                "again, the route waits (not an attempt)"
            } else {
                "again (an attempt)"
            },
        );
    }

    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let expected = format!("{answers}\n{failures}");
    assert!(
        readme.contains(&expected),
        "README's \"How an exchange ended\" tables differ from the code; they should read:\n\n{expected}"
    );
}
