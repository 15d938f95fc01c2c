//! gRPC spoken natively: the proxy's refusals of gRPC calls arrive as gRPC
//! statuses (trailers-only, HTTP 200) with the pushback a gRPC retry policy
//! obeys; other clients keep the JSON answers.

use std::sync::atomic::Ordering;

use crate::support::grpc::{Answer, spans, spawn_receiver};
use crate::support::*;
use http::{Request, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use tonic::Code;

fn grpc_call(url: String) -> Request<TestBody> {
    Request::post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(&b"\0\0\0\0\0"[..]))
        .unwrap()
}

// Real time: the bucket refills in a second, far longer than two calls take
// (a paused clock would jump ahead while the calls wait on sockets).
#[tokio::test]
async fn a_rate_limited_call_gets_resource_exhausted_with_pushback() {
    let (up, _) = spawn_upstream().await;
    let limit = "[route.rate_limit]\nkey = \"ip\"\nper_second = 1\nburst = 1\n";
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/", limit))
        .await
        .unwrap();
    let url = format!("http://{}/pkg.Ingest/Push", proxy.proxy_addr());
    let h2 = h2c_client();
    let (first, _) = send(&h2, grpc_call(url.clone())).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert!(
        first.headers().get("grpc-status").is_none(),
        "the upstream's answer"
    );
    let (res, body) = send(&h2, grpc_call(url.clone())).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("8"),
        "{:?}",
        res.headers()
    );
    assert_eq!(res.headers()["content-type"], "application/grpc");
    let pushback: u64 = res.headers()["grpc-retry-pushback-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pushback, retry_after * 1000, "the same computation");
    assert!(
        res.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .contains("rate_limited")
    );
    assert!(body.is_empty(), "trailers-only: {body:?}");
    // The same refusal to a JSON client stays a 429.
    let (res, _) = send(&h2, Request::post(&url).body(full("{}")).unwrap()).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // Counted as what it was.
    let (_, metrics) = get(&format!("http://{}/metrics", proxy.admin_addr())).await;
    let text = String::from_utf8_lossy(&metrics);
    let limited = metric(
        &text,
        r#"sluicegate_requests_total{route="test",outcome="rate_limited"}"#,
    );
    assert_eq!(limited, Some(2.0));
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_unavailable() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    // With a spool on the route: a 202 cannot carry a gRPC response
    // message, so gRPC calls keep their refusal while JSON posts are spooled.
    let dir = crate::support::process::scratch_dir("grpc-spool");
    let spool = format!(
        "[route.spool]\ndir = \"{}\"\nmax_bytes = 1048576\n",
        dir.display()
    );
    let proxy = sluicegate::start(config(addr, "/", &spool)).await.unwrap();
    let url = format!("http://{}/pkg.Ingest/Push", proxy.proxy_addr());
    let (res, _) = send(&h2c_client(), grpc_call(url.clone())).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "14");
    assert!(res.headers().get("grpc-retry-pushback-ms").is_none());
    let (res, _) = send(&h2c_client(), Request::post(&url).body(full("{}")).unwrap()).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Refused before any route (no route for the method, a path above the
/// root): a gRPC call still gets a gRPC status, UNIMPLEMENTED and INTERNAL
/// as README promises, not an HTTP 404 with a JSON body its library cannot
/// read.
#[tokio::test]
async fn a_call_refused_before_any_route_is_answered_in_grpc() {
    let (up, _) = spawn_upstream().await;
    let proxy = sluicegate::start(config(up.addr.unwrap(), "/only", ""))
        .await
        .unwrap();
    let base = format!("http://{}", proxy.proxy_addr());
    let (res, _) = send(&h2c_client(), grpc_call(format!("{base}/pkg.Other/Method"))).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "12");
    assert_eq!(res.headers()["content-type"], "application/grpc");
    let (res, _) = send(&h2c_client(), grpc_call(format!("{base}/../x"))).await;
    assert_eq!(res.headers()["grpc-status"], "13");
    // An HTTP client keeps its JSON answer.
    let (res, _) = send(
        &h2c_client(),
        Request::post(format!("{base}/x")).body(full("{}")).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    proxy.shutdown().await;
}

fn http2_route(extra: &str) -> String {
    format!("upstream_protocol = \"http2\"\n{extra}")
}

async fn otlp_client(
    proxy: &sluicegate::server::Running,
) -> TraceServiceClient<tonic::transport::Channel> {
    let url = format!("http://{}", proxy.proxy_addr());
    TraceServiceClient::connect(url).await.unwrap()
}

#[tokio::test]
async fn grpc_calls_pass_over_h2c_with_trailers_intact() {
    let (receiver, addr) = spawn_receiver().await;
    let proxy = sluicegate::start(config(addr, "/", &http2_route("")))
        .await
        .unwrap();
    let mut client = otlp_client(&proxy).await;
    let res = client.export(spans(5)).await.unwrap();
    assert_eq!(res.metadata().get("x-receiver").unwrap(), "stub");
    assert_eq!(receiver.spans.load(Ordering::SeqCst), 5);
    // An error status travels in the trailers: it must arrive as sent.
    receiver.answer(Answer::InvalidArgument);
    let status = client.export(spans(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "bad spans");
    // Many calls at once share few connections.
    receiver.answer(Answer::Ok);
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.export(spans(2)).await.map(|_| ()) })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(receiver.spans.load(Ordering::SeqCst), 105);
    proxy.shutdown().await;
}

#[tokio::test]
async fn refusals_reach_a_tonic_client_as_grpc_statuses_with_pushback() {
    let (receiver, addr) = spawn_receiver().await;
    let limit = "[route.rate_limit]\nkey = \"ip\"\nper_second = 1\nburst = 1\n";
    let proxy = sluicegate::start(config(addr, "/", &http2_route(limit)))
        .await
        .unwrap();
    let mut client = otlp_client(&proxy).await;
    client.export(spans(1)).await.unwrap();
    let status = client.export(spans(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let pushback: u64 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("pushback")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1000..=60_000).contains(&pushback), "{pushback}");
    assert!(status.message().contains("rate_limited"), "{status:?}");
    assert_eq!(receiver.calls.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn unavailable_opens_the_circuit_and_invalid_argument_does_not() {
    let (receiver, addr) = spawn_receiver().await;
    let circuit = "[route.circuit]\nfailure_threshold = 3\nopen_ms = 60000\n";
    let proxy = sluicegate::start(config(addr, "/", &http2_route(circuit)))
        .await
        .unwrap();
    let mut client = otlp_client(&proxy).await;
    // The client's own faults, however many: the upstream is healthy.
    receiver.answer(Answer::InvalidArgument);
    for _ in 0..10 {
        let status = client.export(spans(1)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let (_, body) = get(&format!("http://{}/status", proxy.admin_addr())).await;
    assert_eq!(json(&body)["routes"][0]["circuit"]["state"], "closed");
    // UNAVAILABLE in the trailers: failures, and the circuit opens.
    receiver.answer(Answer::Unavailable);
    for _ in 0..3 {
        let status = client.export(spans(1)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "receiver down",
            "the upstream's own answer"
        );
    }
    let calls = receiver.calls.load(Ordering::SeqCst);
    let status = client.export(spans(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("circuit_open"), "{status:?}");
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
    assert_eq!(
        receiver.calls.load(Ordering::SeqCst),
        calls,
        "refused before the upstream"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_clients_grpc_timeout_bounds_the_upstream_call() {
    let (receiver, addr) = spawn_receiver().await;
    // One failure would open the circuit: a client's short deadline must
    // not count as one.
    let circuit = "[route.circuit]\nfailure_threshold = 1\nopen_ms = 60000\n";
    let proxy = sluicegate::start(config(addr, "/", &http2_route(circuit)))
        .await
        .unwrap();
    let mut client = otlp_client(&proxy).await;
    receiver.answer(Answer::Slow);
    // The deadline as the wire carries it, from a client without a timer
    // of its own (tonic's would race the proxy's answer).
    let url = format!(
        "http://{}/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        proxy.proxy_addr()
    );
    let mut call = grpc_call(url);
    call.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("200m"));
    let start = tokio::time::Instant::now();
    let (res, _) = send(&h2c_client(), call).await;
    assert_eq!(res.headers()["grpc-status"], "4", "{:?}", res.headers());
    assert!(
        start.elapsed() < std::time::Duration::from_millis(1500),
        "the call outlived the client's deadline: {:?}",
        start.elapsed()
    );
    let (_, body) = get(&format!("http://{}/status", proxy.admin_addr())).await;
    let status = json(&body);
    assert_eq!(
        status["routes"][0]["circuit"]["state"], "closed",
        "{status}"
    );
    // Without a deadline the slow call completes.
    client.export(spans(1)).await.unwrap();
    proxy.shutdown().await;
}

/// A bidirectional streaming echo served by tonic (its generic server, as
/// generated code uses it): each message is answered as it arrives, then the
/// stream ends with ABORTED in the trailers, after the data.
async fn spawn_streaming_echo() -> std::net::SocketAddr {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest as Msg;
    use tokio_stream::StreamExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let echo = tower::service_fn(
                            |req: tonic::Request<tonic::Streaming<Msg>>| async move {
                                let replies = req.into_inner().map(|m| m).chain(
                                    tokio_stream::once(Err(tonic::Status::aborted("stream done"))),
                                );
                                let stream: std::pin::Pin<
                                    Box<
                                        dyn tokio_stream::Stream<Item = Result<Msg, tonic::Status>>
                                            + Send,
                                    >,
                                > = Box::pin(replies);
                                Ok::<_, tonic::Status>(tonic::Response::new(stream))
                            },
                        );
                        let mut grpc = tonic::server::Grpc::new(
                            tonic_prost::ProstCodec::<Msg, Msg>::default(),
                        );
                        Ok::<_, std::convert::Infallible>(grpc.streaming(echo, req).await)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_bidirectional_stream_passes_message_by_message_with_its_trailers() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest as Msg;
    let addr = spawn_streaming_echo().await;
    let circuit = "[route.circuit]\nfailure_threshold = 1\n";
    let proxy = sluicegate::start(config(addr, "/", &http2_route(circuit)))
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.proxy_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Stream");
    tx.send(spans(1)).await.unwrap();
    let res = grpc
        .streaming(
            tonic::Request::new(outbound),
            path,
            tonic_prost::ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .unwrap();
    let mut inbound = res.into_inner();
    // Ping-pong: each reply comes before the next message is sent, which a
    // proxy buffering either body would deadlock.
    for n in 1..=5usize {
        let reply = tokio::time::timeout(std::time::Duration::from_secs(5), inbound.message())
            .await
            .expect("a reply per message, as it is sent")
            .unwrap()
            .unwrap();
        assert_eq!(reply.resource_spans[0].scope_spans[0].spans.len(), n);
        if n < 5 {
            tx.send(spans(n + 1)).await.unwrap();
        }
    }
    drop(tx);
    // The status after the data, in the trailers, as the upstream sent it.
    let end = inbound.message().await.unwrap_err();
    assert_eq!(end.code(), Code::Aborted);
    assert_eq!(end.message(), "stream done");
    // ABORTED is the application's word, not a failure of the upstream.
    let (_, body) = get(&format!("http://{}/status", proxy.admin_addr())).await;
    assert_eq!(json(&body)["routes"][0]["circuit"]["state"], "closed");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_grpc_timeout_shorter_than_the_predicted_wait_is_refused_at_once() {
    let (receiver, addr) = spawn_receiver().await;
    // One call at a time, 100 ms each: 10 calls a second, and a queue that
    // would let a call wait up to 10 s.
    let route =
        "[route.admission]\nmax_inflight = 1\nqueue_capacity = 40\nqueue_timeout_ms = 10000\n";
    let proxy = sluicegate::start(config(addr, "/", &http2_route(route)))
        .await
        .unwrap();
    receiver.answer(Answer::Busy);
    let client = otlp_client(&proxy).await;
    // A standing line: the drain rate is learnt (a prediction may refuse
    // once 16 completions were counted, 1.6 s), and a newcomer's predicted
    // wait is still over half a second.
    let line: Vec<_> = (0..32)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.export(spans(1)).await.map(|_| ()) })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    // 50 ms left to wait: refused now, not queued to time out later.
    let url = format!(
        "http://{}{}",
        proxy.proxy_addr(),
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    );
    let mut call = grpc_call(url.clone());
    call.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("50m"));
    let (res, _) = send(&h2c_client(), call).await;
    assert_eq!(res.headers()["grpc-status"], "8", "{:?}", res.headers());
    let message = res.headers()["grpc-message"].to_str().unwrap().to_string();
    assert!(
        message.contains("queue_full"),
        "refused at once, not after waiting: {message}"
    );
    assert!(res.headers().contains_key("grpc-retry-pushback-ms"));
    // A deadline the line fits in is queued and served.
    let mut call = grpc_call(url);
    call.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("30S"));
    let (res, _) = send(&h2c_client(), call).await;
    assert!(
        res.headers().get("grpc-status").is_none_or(|s| s == "0"),
        "{:?}",
        res.headers()
    );
    for call in line {
        call.await.unwrap().unwrap();
    }
    proxy.shutdown().await;
}

/// An h2c upstream that answers with the request's trailers as its own.
async fn spawn_trailer_echo() -> std::net::SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let collected = req.into_body().collect().await?;
                        let trailers = collected.trailers().cloned().unwrap_or_default();
                        let data = collected.to_bytes();
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(data)),
                            Ok(hyper::body::Frame::trailers(trailers)),
                        ];
                        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
                        Ok::<_, hyper::Error>(http::Response::new(body))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn trailers_travel_both_ways_over_http2() {
    use http_body_util::BodyExt;
    let addr = spawn_trailer_echo().await;
    let proxy = sluicegate::start(config(addr, "/", &http2_route("")))
        .await
        .unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static("c0ffee"));
    let frames = vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"payload",
        ))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let body: TestBody = http_body_util::StreamBody::new(tokio_stream::iter(frames)).boxed();
    let req = Request::post(format!("http://{}/upload", proxy.proxy_addr()))
        .body(body)
        .unwrap();
    let res = h2c_client().request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let collected = res.into_body().collect().await.unwrap();
    let back = collected.trailers().cloned().expect("response trailers");
    assert_eq!(
        back["x-checksum"], "c0ffee",
        "the request's trailers reached the upstream"
    );
    assert_eq!(collected.to_bytes(), "payload");
    proxy.shutdown().await;
}
