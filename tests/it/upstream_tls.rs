//! TLS to upstreams: a private CA and SNI, mutual TLS, refusal of an
//! upstream that the CA did not sign, and gRPC over h2 chosen by ALPN.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use crate::support::process::scratch_dir;
use crate::support::tls::{Ca, Leaf, serve_tls, server_config};
use crate::support::*;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// An HTTPS echo: the version and Host it was asked with.
fn echo() -> tower::util::ServiceFn<fn(Request<hyper::body::Incoming>) -> Answer> {
    tower::service_fn(|req: Request<hyper::body::Incoming>| -> Answer {
        let body = serde_json::json!({
            "version": format!("{:?}", req.version()),
            "host": req.headers().get("host").map(|h| h.to_str().unwrap().to_string()),
            "authority": req.uri().authority().map(|a| a.to_string()),
            "proto": req.headers().get("x-forwarded-proto").map(|h| h.to_str().unwrap().to_string()),
        });
        std::future::ready(Ok(Response::new(Full::new(Bytes::from(body.to_string())))))
    })
}

fn write_pem(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn route(upstream: std::net::SocketAddr, tls: &str, protocol: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [[route]]\nupstream = \"https://{upstream}\"\nupstream_protocol = \"{protocol}\"\n\
         connect_timeout_ms = 2000\n[route.upstream_tls]\n{tls}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_and_sni_over_http1_and_h2() {
    let ca = Ca::new("upstream CA");
    let leaf: Leaf = ca.issue(&["upstream.test"]);
    let dir = scratch_dir("upstream-tls");
    let ca_file = write_pem(&dir, "ca.pem", &ca.pem);
    for (protocol, alpn, version) in [
        ("http1", &b"http/1.1"[..], "HTTP/1.1"),
        ("http2", &b"h2"[..], "HTTP/2.0"),
    ] {
        let config = server_config(&leaf, &ca, &[alpn], None);
        let (addr, seen) = serve_tls(config, echo()).await;
        let text = route(
            addr,
            &format!("ca_file = \"{ca_file}\"\nserver_name = \"upstream.test\"\n"),
            protocol,
        );
        let proxy = sluicegate::start(sluicegate::config::Config::parse("t.toml", &text).unwrap())
            .await
            .unwrap();
        for _ in 0..3 {
            let (res, body) = get(&format!("http://{}/x", proxy.proxy_addr())).await;
            assert_eq!(res.status(), StatusCode::OK, "{protocol}: {body:?}");
            let echo = json(&body);
            assert_eq!(echo["version"], version, "{echo}");
            // The name the client asked for travels on, as Host or :authority.
            let asked = format!("{}", proxy.proxy_addr());
            let named = echo["host"].as_str().or(echo["authority"].as_str());
            assert_eq!(named, Some(asked.as_str()), "{echo}");
        }
        let sni = seen.sni.lock().unwrap().clone();
        assert!(!sni.is_empty());
        assert!(
            sni.iter().all(|s| s.as_deref() == Some("upstream.test")),
            "{sni:?}"
        );
        // Pooled (HTTP/1.1) or multiplexed (h2): one handshake for three requests.
        assert_eq!(sni.len(), 1, "{protocol}: {sni:?}");
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_the_ca_did_not_sign_is_never_sent_to() {
    let ca = Ca::new("upstream CA");
    let impostor = Ca::new("someone else");
    let leaf = impostor.issue(&["upstream.test"]);
    let dir = scratch_dir("upstream-tls-bad");
    let ca_file = write_pem(&dir, "ca.pem", &ca.pem);
    let (addr, seen) = serve_tls(
        server_config(&leaf, &impostor, &[b"http/1.1"], None),
        echo(),
    )
    .await;
    let text = route(
        addr,
        &format!("ca_file = \"{ca_file}\"\nserver_name = \"upstream.test\"\n"),
        "http1",
    );
    let proxy = sluicegate::start(sluicegate::config::Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    let (res, body) = get(&format!("http://{}/x", proxy.proxy_addr())).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY, "{body:?}");
    assert_eq!(json(&body)["reason"], "upstream_unavailable");
    assert!(seen.sni.lock().unwrap().is_empty());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_the_upstream() {
    let ca = Ca::new("upstream CA");
    let leaf = ca.issue(&["upstream.test"]);
    let client = ca.issue(&["sluicegate.test"]);
    let dir = scratch_dir("upstream-mtls");
    let ca_file = write_pem(&dir, "ca.pem", &ca.pem);
    let cert_file = write_pem(&dir, "client.pem", &client.cert_pem);
    let key_file = write_pem(&dir, "client.key", &client.key_pem);
    let config = server_config(&leaf, &ca, &[b"http/1.1"], Some(&ca));
    let (addr, seen) = serve_tls(config, echo()).await;
    let base = format!("ca_file = \"{ca_file}\"\nserver_name = \"upstream.test\"\n");
    for (extra, expect) in [
        (String::new(), StatusCode::BAD_GATEWAY),
        (
            format!("cert_file = \"{cert_file}\"\nkey_file = \"{key_file}\"\n"),
            StatusCode::OK,
        ),
    ] {
        let text = route(addr, &format!("{base}{extra}"), "http1");
        let proxy = sluicegate::start(sluicegate::config::Config::parse("t.toml", &text).unwrap())
            .await
            .unwrap();
        let (res, _) = get(&format!("http://{}/x", proxy.proxy_addr())).await;
        assert_eq!(res.status(), expect, "with `{extra}`");
        proxy.shutdown().await;
    }
    assert!(seen.refused.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_alpn_h2() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let ca = Ca::new("upstream CA");
    let leaf = ca.issue(&["collector.test"]);
    let dir = scratch_dir("upstream-grpc-tls");
    let ca_file = write_pem(&dir, "ca.pem", &ca.pem);
    let (receiver, service) = crate::support::grpc::receiver_service();
    let (addr, _) = serve_tls(
        server_config(&leaf, &ca, &[b"h2"], None),
        TraceServiceServer::new(service),
    )
    .await;
    let text = route(
        addr,
        &format!("ca_file = \"{ca_file}\"\nserver_name = \"collector.test\"\n"),
        "http2",
    );
    let proxy = sluicegate::start(sluicegate::config::Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    let mut client = TraceServiceClient::connect(format!("http://{}", proxy.proxy_addr()))
        .await
        .unwrap();
    client.export(crate::support::grpc::spans(3)).await.unwrap();
    assert_eq!(receiver.spans.load(Ordering::SeqCst), 3);
    receiver.answer(crate::support::grpc::Answer::InvalidArgument);
    let status = client
        .export(crate::support::grpc::spans(1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    proxy.shutdown().await;
}
