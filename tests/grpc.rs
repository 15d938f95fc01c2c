//! gRPC spoken natively: the proxy's refusals of gRPC calls arrive as gRPC
//! statuses (trailers-only, HTTP 200) with the pushback a gRPC retry policy
//! obeys; other clients keep the JSON answers.

mod support;

use http::{Request, StatusCode};
use support::*;

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
    let dir = support::process::scratch_dir("grpc-spool");
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
