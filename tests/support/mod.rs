//! Shared test parts: a real upstream on 127.0.0.1:0, the real proxy, clients.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod grpc;
pub mod keys;
pub mod process;
pub mod redis;
pub mod tls;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sluicegate::config::Config;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

pub type TestBody = BoxBody<Bytes, Infallible>;

/// A stable checksum of a byte stream (FNV-1a over every byte, chunking-independent).
#[derive(Default)]
pub struct Checksum(u64, u64);

impl Checksum {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325, 0)
    }
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self.1 += data.len() as u64;
    }
    pub fn hex(&self) -> String {
        format!("{:016x}:{}", self.0, self.1)
    }
}

impl Hasher for Checksum {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.update(bytes)
    }
}

/// What the echo upstream saw, and switches for it.
#[derive(Default)]
pub struct Upstream {
    pub addr: Option<SocketAddr>,
    /// Work requests received (not counting `/hold` releases).
    pub requests: AtomicU64,
    /// `/hold` requests wait for this.
    pub release: Notify,
    /// `/hold` requests announce themselves here.
    held: tokio::sync::Mutex<Option<mpsc::UnboundedSender<()>>>,
}

/// An HTTP/1.1 upstream on 127.0.0.1:0.
///
/// - `/hang`: never answers.
/// - `/hold`: answers 200 once `release` is notified; each arrival is announced.
/// - `/status/NNN`: answers NNN (`?retry_after=S` adds `Retry-After: S`).
/// - `/empty/NNN`: answers NNN with an empty body (`Content-Length: 0`).
/// - `/big/N`: answers 200 with N bytes, streamed in 64 KiB frames.
/// - anything else: streams the body through a checksum and answers 200 with a
///   JSON echo of method, path and query, headers, body length and checksum, and
///   hop-by-hop headers of its own (which the proxy must strip).
pub async fn spawn_upstream() -> (Arc<Upstream>, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (held_tx, held_rx) = mpsc::unbounded_channel();
    let state = Arc::new(Upstream {
        addr: Some(listener.local_addr().unwrap()),
        held: tokio::sync::Mutex::new(Some(held_tx)),
        ..Default::default()
    });
    serve_http1(listener, state.clone(), handle);
    (state, held_rx)
}

/// An HTTP/1.1 upstream of `n` workers, each request taking one for
/// `service` (the rest wait for a worker); `/bad` is refused at once with a
/// 500, without a worker (an application's input check).
pub async fn workers(n: usize, service: std::time::Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pool = Arc::new((tokio::sync::Semaphore::new(n), service));
    serve_http1(listener, pool, |pool, req| async move {
        if req.uri().path() == "/bad" {
            let res = Response::builder().status(500).body(full("bad input"));
            return Ok(res.unwrap());
        }
        let _worker = pool.0.acquire().await.unwrap();
        tokio::time::sleep(pool.1).await;
        Ok(Response::new(full("ok")))
    });
    addr
}

/// Serves HTTP/1.1 on `listener` until it fails, each request answered by
/// `handle` with the shared `state`.
pub fn serve_http1<S, F, B>(
    listener: TcpListener,
    state: Arc<S>,
    handle: fn(Arc<S>, Request<Incoming>) -> F,
) where
    S: Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

async fn handle(
    state: Arc<Upstream>,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    if path == "/hang" {
        std::future::pending::<()>().await;
    }
    if path == "/hold" {
        if let Some(tx) = &*state.held.lock().await {
            let _ = tx.send(());
        }
        state.release.notified().await;
        return Ok(Response::new(full("released")));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        let mut res = Response::builder().status(status);
        if let Some(secs) = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("retry_after="))
        {
            res = res.header("retry-after", secs);
        }
        return Ok(res.body(full("status")).unwrap());
    }
    if let Some(code) = path.strip_prefix("/empty/") {
        let status = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        return Ok(Response::builder().status(status).body(full("")).unwrap());
    }
    if let Some(n) = path.strip_prefix("/big/") {
        let body = Zeros {
            remaining: n.parse().unwrap(),
        };
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    let method = req.method().to_string();
    let path_and_query = req.uri().path_and_query().map(|p| p.to_string());
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in req.headers() {
        headers
            .entry(name.to_string())
            .or_default()
            .push(value.to_str().unwrap_or("<binary>").to_string());
    }
    let mut body = req.into_body();
    let mut sum = Checksum::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    sum.update(data);
                }
            }
            Err(_) => {
                return Ok(Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .body(full("broken body"))
                    .unwrap());
            }
        }
    }
    let echo = json!({
        "method": method,
        "path": path_and_query,
        "headers": headers,
        "body": sum.hex(),
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("x-upstream", "echo")
        .header("connection", "x-upstream-hop")
        .header("x-upstream-hop", "1")
        .header("keep-alive", "timeout=5")
        .body(full(echo.to_string()))
        .unwrap())
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).boxed()
}

/// A body of `total` bytes sent in `chunk`-sized frames without a length, so it
/// goes out chunked and never exists whole in memory. Returns the checksum the
/// receiver must see.
pub fn streamed(total: usize, chunk: usize) -> (TestBody, String) {
    let mut sum = Checksum::new();
    let mut source = Generated {
        remaining: total,
        chunk,
        counter: 0,
    };
    while let Some(data) = source.next_chunk() {
        sum.update(&data);
    }
    let body = Generated {
        remaining: total,
        chunk,
        counter: 0,
    };
    (BodyExt::boxed(body), sum.hex())
}

/// Deterministic bytes, generated chunk by chunk; content depends on position so
/// that a lost or reordered chunk changes the checksum.
struct Generated {
    remaining: usize,
    chunk: usize,
    counter: u8,
}

impl Generated {
    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.remaining == 0 {
            return None;
        }
        let n = self.chunk.min(self.remaining);
        self.remaining -= n;
        let data: Vec<u8> = (0..n)
            .map(|_| {
                self.counter = self.counter.wrapping_add(7);
                self.counter
            })
            .collect();
        Some(Bytes::from(data))
    }
}

/// `remaining` zero bytes in 64 KiB frames, never all in memory.
struct Zeros {
    remaining: usize,
}

impl http_body::Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        static CHUNK: [u8; 64 * 1024] = [0; 64 * 1024];
        let n = self.remaining.min(CHUNK.len());
        self.remaining -= n;
        std::task::Poll::Ready((n > 0).then(|| Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }
}

impl http_body::Body for Generated {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.next_chunk().map(|d| Ok(Frame::data(d))))
    }
}

/// A config with one route `name` on `prefix` to `upstream`, both listeners on
/// port 0; `extra` is appended inside the route table.
pub fn config(upstream: SocketAddr, prefix: &str, extra: &str) -> Config {
    config_text(upstream, "", prefix, extra)
}

/// Like [`config`] on `/`, with `server` appended to the `[server]` section.
pub fn config_with(upstream: SocketAddr, server: &str, route: &str) -> Config {
    config_text(upstream, server, "/", route)
}

fn config_text(upstream: SocketAddr, server: &str, prefix: &str, route: &str) -> Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
drain_timeout_ms = 5000
{server}

[[route]]
name = "test"
path_prefix = "{prefix}"
upstream = "http://{upstream}"
{route}
"#
    );
    Config::parse("test.toml", &text).unwrap()
}

/// `chunks` one-byte frames, one every `every` (on tokio's clock): a slow
/// uplink. Sent chunked.
pub fn trickle(chunks: u32, every: std::time::Duration) -> TestBody {
    BodyExt::boxed(Trickle {
        chunks,
        every,
        sleep: Box::pin(tokio::time::sleep(every)),
    })
}

struct Trickle {
    chunks: u32,
    every: std::time::Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        use std::future::Future;
        if self.chunks == 0 {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        self.chunks -= 1;
        let next = tokio::time::Instant::now() + self.every;
        self.sleep.as_mut().reset(next);
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
    }
}

/// An HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// Sends `req` and reads the whole response.
pub async fn send(
    client: &Client<HttpConnector, TestBody>,
    req: Request<TestBody>,
) -> (Response<()>, Bytes) {
    let res = client.request(req).await.expect("response");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (Response::from_parts(parts, ()), body)
}

/// GET `url`, whole response.
pub async fn get(url: &str) -> (Response<()>, Bytes) {
    let req = Request::get(url).body(full("")).unwrap();
    send(&client(), req).await
}

/// Parses a JSON body.
pub fn json(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// The value of one sample in Prometheus text, e.g.
/// `sluicegate_requests_total{route="test",outcome="2xx"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
