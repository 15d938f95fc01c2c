//! An HTTP/2 upstream shared by many clients: clients that stop reading
//! large answers must not starve the others on the same upstream
//! connection (nor have the stall blamed on a healthy upstream), and an
//! upstream that takes one stream at a time must get more connections, not
//! a queue that times requests out as its failures.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::time::{sleep, timeout};

use crate::support::*;

/// An h2c upstream: `/big` streams 32 MiB in 16 KiB frames, `/slow` answers
/// after 100 ms, `/hang` never, anything else 100 bytes at once. At most `streams`
/// concurrent streams per connection; counts its connections.
async fn h2_upstream(streams: u32) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let body = match path.as_str() {
                        "/big" => {
                            let chunks = (0..2048).map(|_| {
                                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![0u8; 16 << 10])))
                            });
                            StreamBody::new(tokio_stream::iter(chunks)).boxed()
                        }
                        "/hang" => std::future::pending().await,
                        "/slow" => {
                            sleep(Duration::from_millis(100)).await;
                            full(vec![b's'; 100])
                        }
                        _ => full(vec![b'x'; 100]),
                    };
                    Ok::<_, Infallible>(Response::new(body))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(streams)
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

const ROUTE: &str = "upstream_protocol = \"http2\"\ntimeout_ms = 1000\n\
                     read_timeout_ms = 2000\n\
                     [route.circuit]\nfailure_threshold = 3\nopen_ms = 60000\n";

async fn circuit_state(proxy: &sluicegate::Running) -> serde_json::Value {
    let status = json(
        &get(&format!("http://{}/status", proxy.admin_addr()))
            .await
            .1,
    );
    status["routes"][0]["circuit"]["state"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_do_not_starve_the_others() {
    let (upstream, _) = h2_upstream(100).await;
    let proxy = sluicegate::start(config(upstream, "/", ROUTE))
        .await
        .unwrap();
    let url = |path: &str| format!("http://{}{path}", proxy.proxy_addr());
    // Six clients, each on its own connection, ask for 32 MiB and never read.
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let req = Request::get(url("/big")).body(full("")).unwrap();
        let res = h2c_client().request(req).await.unwrap();
        if res.status() != StatusCode::OK {
            let body = res.into_body().collect().await.unwrap().to_bytes();
            panic!("a /big request refused: {body:?}");
        }
        stalled.push(res);
    }
    sleep(Duration::from_millis(300)).await;
    // Everyone else still gets whole answers, at once.
    let client = h2c_client();
    for _ in 0..10 {
        let req = Request::get(url("/small")).body(full("")).unwrap();
        let (res, body) = timeout(Duration::from_secs(1), send(&client, req))
            .await
            .expect("not held behind the stalled streams");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(body.len(), 100);
    }
    // Nothing was blamed on the healthy upstream.
    assert_eq!(circuit_state(&proxy).await, "closed");
    drop(stalled);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_taking_one_stream_at_a_time_gets_more_connections() {
    let (upstream, conns) = h2_upstream(1).await;
    let proxy = sluicegate::start(config(upstream, "/", ROUTE))
        .await
        .unwrap();
    let url = format!("http://{}/slow", proxy.proxy_addr());
    // Sixteen calls of 100 ms at once: on one connection they would queue
    // 1.6 s, past the 1 s timeout.
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let req = Request::get(url).body(full("")).unwrap();
                send(&client(), req).await.0.status()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), StatusCode::OK);
    }
    let opened = conns.load(Ordering::SeqCst);
    assert!((2..=4).contains(&opened), "{opened} connections");
    assert_eq!(circuit_state(&proxy).await, "closed");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_stream_is_bounded_and_not_the_upstreams_failure() {
    let (upstream, conns) = h2_upstream(1).await;
    let route = format!("connect_timeout_ms = 300\n{ROUTE}");
    let proxy = sluicegate::start(config(upstream, "/", &route))
        .await
        .unwrap();
    let url = |path: &str| format!("http://{}{path}", proxy.proxy_addr());
    // Every stream the upstream allows, on every connection, held.
    let hanging: Vec<_> = (0..4)
        .map(|_| {
            let req = Request::get(url("/hang")).body(full("")).unwrap();
            tokio::spawn(async move { client().request(req).await })
        })
        .collect();
    while conns.load(Ordering::SeqCst) < 4 {
        sleep(Duration::from_millis(10)).await;
    }
    sleep(Duration::from_millis(100)).await;
    // The next waits at most connect_timeout_ms for a stream, then gets a
    // 503 with Retry-After: the upstream is saturated, not failing.
    let (res, body) = timeout(Duration::from_secs(3), get(&url("/small")))
        .await
        .expect("the wait for a stream is bounded");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(json(&body)["reason"], "queue_timeout");
    assert_eq!(circuit_state(&proxy).await, "closed");
    for call in hanging {
        call.abort();
    }
    proxy.shutdown().await;
}
