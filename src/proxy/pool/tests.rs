//! The pool against a real HTTP/1.1 server on loopback: reuse, what is not
//! given back, the idle bound and the reaper.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::*;

/// Connections the server accepted, and those that have ended.
#[derive(Default)]
struct Seen {
    opened: AtomicUsize,
    closed: AtomicUsize,
}

/// A keep-alive server answering every request with `body`; `close` asks
/// for the connection to be closed after each answer.
async fn upstream(body: &'static str, close: bool) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            s.opened.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    if close {
                        res.headers_mut()
                            .insert(http::header::CONNECTION, "close".parse().unwrap());
                    }
                    Ok::<_, Infallible>(res)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                s.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

fn pool_to(addr: SocketAddr, idle_timeout: Duration, max_idle: usize) -> Pool {
    let target: Uri = format!("http://{addr}/").parse().unwrap();
    let connector = Connector::new(hyper_util::client::legacy::connect::HttpConnector::new());
    Pool::new(connector, target, idle_timeout, max_idle)
}

fn get() -> Request<Reclaim> {
    let mut req = Request::new(Reclaim::empty());
    *req.uri_mut() = Uri::from_static("/");
    req.headers_mut()
        .insert(http::header::HOST, "upstream".parse().unwrap());
    req
}

/// Checks out a connection and sends a GET on it; the response's body.
async fn exchange(pool: &Pool) -> Pooled {
    let mut conn = pool.checkout().await.unwrap();
    let res = conn.tx.send_request(get()).await.unwrap();
    Pooled::new(res.into_body(), conn, pool.clone())
}

/// Lets the connection tasks run until `done` holds (bounded).
async fn until(done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("not reached");
}

#[tokio::test]
async fn a_connection_read_to_the_end_is_used_again() {
    let (addr, seen) = upstream("hello", false).await;
    let pool = pool_to(addr, Duration::from_secs(60), 8);
    for _ in 0..3 {
        let body = exchange(&pool).await.collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        until(|| pool.idle() == 1).await;
    }
    assert_eq!(
        seen.opened.load(Ordering::SeqCst),
        1,
        "one connection, reused"
    );
}

#[tokio::test]
async fn a_response_dropped_unread_takes_its_connection_with_it() {
    let (addr, seen) = upstream("a body that is never read", false).await;
    let pool = pool_to(addr, Duration::from_secs(60), 8);
    let mut conn = pool.checkout().await.unwrap();
    let res = conn.tx.send_request(get()).await.unwrap();
    let body = Pooled::new(res.into_body(), conn, pool.clone());
    drop(body);
    until(|| seen.closed.load(Ordering::SeqCst) == 1).await;
    assert_eq!(pool.idle(), 0);
    // The next request opens a new connection.
    exchange(&pool).await.collect().await.unwrap();
    assert_eq!(seen.opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_not_offered_again() {
    let (addr, seen) = upstream("bye", true).await;
    let pool = pool_to(addr, Duration::from_secs(60), 8);
    for n in 1..=2 {
        exchange(&pool).await.collect().await.unwrap();
        until(|| seen.closed.load(Ordering::SeqCst) == n).await;
        assert!(pool.take_idle().is_none(), "a closed connection offered");
    }
    assert_eq!(seen.opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn at_most_max_idle_wait() {
    let (addr, seen) = upstream("ok", false).await;
    let pool = pool_to(addr, Duration::from_secs(60), 2);
    // Three at once: three connections.
    let bodies = [
        exchange(&pool).await,
        exchange(&pool).await,
        exchange(&pool).await,
    ];
    for body in bodies {
        body.collect().await.unwrap();
    }
    until(|| seen.closed.load(Ordering::SeqCst) == 1).await;
    assert_eq!(pool.idle(), 2);
    assert_eq!(seen.opened.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn idle_connections_are_closed_at_the_idle_timeout() {
    let (addr, seen) = upstream("ok", false).await;
    let pool = pool_to(addr, Duration::from_secs(1), 8);
    exchange(&pool).await.collect().await.unwrap();
    until(|| pool.idle() == 1).await;
    // Nothing else happens: the reaper closes it, not a checkout.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    until(|| seen.closed.load(Ordering::SeqCst) == 1).await;
    assert_eq!(pool.idle(), 0);
    assert!(
        !pool.shared.lock().reaping,
        "the reaper stops with none left"
    );
    // A checkout past the timeout never takes an expired one either.
    exchange(&pool).await.collect().await.unwrap();
    until(|| pool.idle() == 1).await;
    pool.shared.lock().conns[0].0 -= Duration::from_secs(2);
    assert!(pool.take_idle().is_none());
}
