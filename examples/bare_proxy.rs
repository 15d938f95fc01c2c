//! The floor a hyper proxy cannot go below: hyper's HTTP/1 server, hyper-util's
//! pooled client, nothing else (no routing, no header rewriting, no limits).
//! `benches/instructions.sh` measures it beside sluicegate and HAProxy, so that
//! what sluicegate adds on top of hyper is a number, not a guess.
//!
//!   cargo run --release --example bare_proxy -- 127.0.0.1:8080 127.0.0.1:9000
//!
//! Serves on the first address, forwards every request to the second; one
//! thread (tokio's current-thread runtime, as sluicegate with
//! `worker_threads = 1`); exits on SIGTERM or SIGINT so that profilers see a
//! normal exit.

use std::net::SocketAddr;

use http::Uri;
use http::uri::{Authority, Scheme};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        return Err("usage: bare_proxy LISTEN_ADDR UPSTREAM_ADDR".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: Authority = upstream.parse()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(listen, upstream))
}

async fn serve(listen: SocketAddr, upstream: Authority) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(listen).await?;
    let client: Upstream = Client::builder(TokioExecutor::new()).build_http();
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut stop => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        let service = service_fn(move |req: Request<Incoming>| {
            forward(client.clone(), upstream.clone(), req)
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Upstream = Client<HttpConnector, Incoming>;

/// Sends `req` on to `upstream`, answer as it comes.
async fn forward(
    client: Upstream,
    upstream: Authority,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, BoxError> {
    let (mut parts, body) = req.into_parts();
    let mut uri = parts.uri.into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(upstream);
    parts.uri = Uri::from_parts(uri)?;
    Ok(client.request(Request::from_parts(parts, body)).await?)
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
