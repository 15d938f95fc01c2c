//! Store and forward when nobody helps: no live traffic after a restart, a
//! fragile upstream that falls over under a burst, one client's request the
//! upstream refuses for quota, a request admission can never take, a disk
//! that will not take dead letters. The spool must drain by itself, one
//! request must never hold up the others, and nothing may turn into a storm.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::time::{Instant, sleep};

use crate::support::keys::reserve_addr;
use crate::support::process::Proc;
use crate::support::*;

/// An upstream that takes at most 4 requests at once (a small worker pool:
/// the rest get 503, no Retry-After), counts deliveries by idempotency key,
/// answers `/quota...` with 429 + `Retry-After: 300` (that client's quota)
/// and `/bad...` with 400, and notes each request's `x-forwarded-proto`.
#[derive(Default)]
struct Fragile {
    running: AtomicUsize,
    peak: AtomicUsize,
    seen: Mutex<HashMap<String, u32>>,
    by_path: Mutex<HashMap<String, u32>>,
    protos: Mutex<Vec<String>>,
    /// Each delivered body's checksum, by key.
    sums: Mutex<HashMap<String, String>>,
}

impl Fragile {
    fn delivered(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn hits(&self, prefix: &str) -> u32 {
        let by_path = self.by_path.lock().unwrap();
        by_path
            .iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }
}

const CAPACITY: usize = 4;

async fn fragile(
    fragile: Arc<Fragile>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    *fragile
        .by_path
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_default() += 1;
    if let Some(proto) = req.headers().get("x-forwarded-proto") {
        fragile
            .protos
            .lock()
            .unwrap()
            .push(proto.to_str().unwrap().to_string());
    }
    let key = req
        .headers()
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_string());
    let mut body = req.into_body();
    let mut sum = Checksum::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            sum.update(data);
        }
    }
    let answer = |status: StatusCode| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    if path.starts_with("/quota") {
        let mut res = answer(StatusCode::TOO_MANY_REQUESTS);
        res.headers_mut()
            .insert("retry-after", "300".parse().unwrap());
        return Ok(res);
    }
    if path.starts_with("/bad") {
        return Ok(answer(StatusCode::BAD_REQUEST));
    }
    let running = fragile.running.fetch_add(1, Ordering::SeqCst) + 1;
    fragile.peak.fetch_max(running, Ordering::SeqCst);
    let res = if running > CAPACITY {
        answer(StatusCode::SERVICE_UNAVAILABLE)
    } else {
        sleep(Duration::from_millis(5)).await;
        if let Some(key) = key {
            fragile.sums.lock().unwrap().insert(key.clone(), sum.hex());
            *fragile.seen.lock().unwrap().entry(key).or_default() += 1;
        }
        answer(StatusCode::OK)
    };
    fragile.running.fetch_sub(1, Ordering::SeqCst);
    Ok(res)
}

async fn serve_fragile(addr: SocketAddr) -> Arc<Fragile> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let state = Arc::new(Fragile::default());
    serve_http1(listener, state.clone(), fragile);
    state
}

fn spool_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluicegate-adv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn route(dir: &std::path::Path, extra: &str) -> String {
    format!(
        "[route.circuit]\nfailure_threshold = 3\nopen_ms = 500\nmax_open_ms = 2000\n\
         min_half_open_ms = 0\nsuccess_threshold = 2\n{extra}\
         [route.spool]\ndir = \"{}\"\nmax_bytes = 67108864\n",
        dir.display()
    )
}

/// The proxy's two addresses, in process or as a child.
trait Addrs {
    fn proxy(&self) -> SocketAddr;
    fn admin(&self) -> SocketAddr;
}

impl Addrs for sluicegate::Running {
    fn proxy(&self) -> SocketAddr {
        self.proxy_addr()
    }
    fn admin(&self) -> SocketAddr {
        self.admin_addr()
    }
}

impl Addrs for Proc {
    fn proxy(&self) -> SocketAddr {
        self.proxy
    }
    fn admin(&self) -> SocketAddr {
        self.admin
    }
}

/// The binary on `upstream` with `route`: killed and started again like a
/// real deployment (a process holds its spool directory).
fn binary(upstream: SocketAddr, route: &str) -> Proc {
    Proc::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"test\"\nupstream = \"http://{upstream}\"\n{route}"
    ))
}

async fn spool_post(proxy: &impl Addrs, path: &str, key: &str, body: Vec<u8>) -> StatusCode {
    let req = Request::post(format!("http://{}{path}", proxy.proxy()))
        .header("idempotency-key", key)
        .body(full(body))
        .unwrap();
    send(&client(), req).await.0.status()
}

async fn spool_of(proxy: &impl Addrs) -> Value {
    json(&get(&format!("http://{}/spool", proxy.admin())).await.1)["routes"][0].clone()
}

/// Polls `check` every 50 ms for at most `limit`.
async fn within(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return;
        }
        sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {limit:?}: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_drains_by_itself_after_a_restart_into_a_fragile_upstream() {
    let upstream = reserve_addr();
    let dir = spool_dir("drain");
    let text = route(&dir, "");
    let first = binary(upstream, &text);
    for i in 0..400 {
        let status = spool_post(&first, "/ingest", &format!("k{i}"), vec![b'x'; 100]).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    for i in 0..20 {
        let status = spool_post(&first, "/bad", &format!("b{i}"), vec![b'x'; 10]).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    // Killed (SIGKILL) and started again with the upstream still down, back
    // a second later; no live request ever comes.
    drop(first);
    let second = binary(upstream, &text);
    sleep(Duration::from_secs(1)).await;
    let up = serve_fragile(upstream).await;
    let back = Instant::now();
    within(Duration::from_secs(60), "the spool drains", async || {
        spool_of(&second).await["requests"] == 0
    })
    .await;
    eprintln!(
        "420 spooled requests drained in {:?} after the upstream came back, peak {} at once",
        back.elapsed(),
        up.peak.load(Ordering::SeqCst)
    );
    assert_eq!(up.delivered(), 400, "every acknowledged request delivered");
    assert_eq!(spool_of(&second).await["dead_letters"], 20);
    // Never a burst at an upstream that has just come back: the pace grew
    // from one delivery at a time and fell back whenever it said no.
    let peak = up.peak.load(Ordering::SeqCst);
    assert!(peak <= 12, "peak concurrency at the upstream {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_quota_does_not_hold_up_the_others() {
    let upstream = reserve_addr();
    let dir = spool_dir("quota");
    let proxy = sluicegate::start(config(upstream, "/", &route(&dir, "")))
        .await
        .unwrap();
    // Oldest first: the over-quota request heads the spool.
    assert_eq!(
        spool_post(&proxy, "/quota", "q", b"q".to_vec()).await,
        StatusCode::ACCEPTED
    );
    for i in 0..30 {
        let status = spool_post(&proxy, "/ingest", &format!("k{i}"), b"e".to_vec()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let up = serve_fragile(upstream).await;
    within(
        Duration::from_secs(15),
        "the others delivered",
        async || up.delivered() == 30,
    )
    .await;
    // Its 429 holds back only itself, for its Retry-After.
    sleep(Duration::from_secs(1)).await;
    assert_eq!(up.hits("/quota"), 1);
    assert_eq!(spool_of(&proxy).await["requests"], 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_admission_can_never_take_is_not_spooled_nor_blocks_the_rest() {
    let upstream = reserve_addr();
    let dir = spool_dir("heavy");
    let admission = |bytes: u64| {
        format!(
            "[route.admission]\nmax_inflight = 4\nmax_inflight_bytes = {bytes}\n\
             unknown_length_bytes = 1000\n"
        )
    };
    let first = binary(upstream, &route(&dir, &admission(1_000)));
    // The upstream is down: three requests spooled open the circuit.
    for i in 0..3 {
        let status = spool_post(&first, "/ingest", &format!("k{i}"), b"e".to_vec()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    // Refused by the open circuit, heavier than the route could ever
    // admit: 413 at once, as live, not a 202 that would park it for good.
    let status = spool_post(&first, "/ingest", "heavy", vec![b'x'; 5_000]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    drop(first);
    // Spooled under a larger budget, then the budget shrinks (a restart).
    let roomy = binary(upstream, &route(&dir, &admission(100_000)));
    let status = spool_post(&roomy, "/ingest", "heavy", vec![b'x'; 5_000]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    for i in 3..8 {
        let status = spool_post(&roomy, "/ingest", &format!("k{i}"), b"e".to_vec()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    drop(roomy);
    let tight = binary(upstream, &route(&dir, &admission(1_000)));
    let up = serve_fragile(upstream).await;
    within(
        Duration::from_secs(15),
        "the small ones delivered",
        async || up.delivered() == 8,
    )
    .await;
    within(
        Duration::from_secs(5),
        "the heavy one dead-lettered",
        async || spool_of(&tight).await["dead_letters"] == 1,
    )
    .await;
    assert_eq!(spool_of(&tight).await["requests"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_written_pauses_replay_without_a_storm() {
    let upstream = reserve_addr();
    let dir = spool_dir("dead-fails");
    let proxy = sluicegate::start(config(upstream, "/", &route(&dir, "")))
        .await
        .unwrap();
    assert_eq!(
        spool_post(&proxy, "/bad", "b", b"b".to_vec()).await,
        StatusCode::ACCEPTED
    );
    // Dead letters cannot be written: their directory is a file now.
    let dead = dir.join("dead");
    std::fs::remove_dir_all(&dead).unwrap();
    std::fs::write(&dead, b"not a directory").unwrap();
    let up = serve_fragile(upstream).await;
    let metrics = format!("http://{}/metrics", proxy.admin_addr());
    let paused = || async {
        let text = get(&metrics).await.1;
        metric(
            &String::from_utf8_lossy(&text),
            r#"sluicegate_spool_replay_paused{route="test"}"#,
        )
    };
    within(Duration::from_secs(5), "replay paused", async || {
        paused().await == Some(1.0)
    })
    .await;
    sleep(Duration::from_secs(3)).await;
    // Each failed burial counts as an attempt and pauses the route,
    // doubling: a handful of tries in seconds, not thousands.
    let tries = up.hits("/bad");
    assert!((1..=6).contains(&tries), "{tries} tries");
    // The disk is repaired: the dead letter is written, replay resumes.
    std::fs::remove_file(&dead).unwrap();
    std::fs::create_dir(&dead).unwrap();
    within(
        Duration::from_secs(30),
        "the dead letter written",
        async || spool_of(&proxy).await["dead_letters"] == 1,
    )
    .await;
    assert_eq!(paused().await, Some(0.0));
    proxy.shutdown().await;
}

/// A record in the format of the previous version (`SGS1`, length, CRC-32,
/// payload), as a client can plant one in a body: a `DELETE` with forged
/// credentials, a forwarded-for address and an id that climbs out of the
/// spool's directory.
fn planted_v1_record() -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    let mut payload = vec![1u8]; // a request
    field(&mut payload, b"../../../escaped");
    payload.extend_from_slice(&1_700_000_000_000u64.to_le_bytes());
    field(&mut payload, b"10.6.6.6");
    field(&mut payload, b"DELETE");
    field(&mut payload, b"/admin/users/all");
    payload.extend_from_slice(&2u32.to_le_bytes());
    field(&mut payload, b"authorization");
    field(&mut payload, b"Bearer forged");
    field(&mut payload, b"x-forwarded-for");
    field(&mut payload, b"10.6.6.6");
    field(&mut payload, b"");
    let mut frame = b"SGS1".to_vec();
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_never_yields_one_a_client_planted() {
    let upstream = reserve_addr();
    let dir = spool_dir("forgery");
    let text = route(&dir, "");
    let first = binary(upstream, &text);
    assert_eq!(
        spool_post(&first, "/ingest", "a", b"first".to_vec()).await,
        StatusCode::ACCEPTED
    );
    // The attacker's body: planted records, in the old format and as raw
    // noise with the new magic, between filler.
    let mut body = vec![b'.'; 100];
    for _ in 0..3 {
        body.extend_from_slice(&planted_v1_record());
        body.extend_from_slice(b"SGSEG\x00\x02\x00");
        body.extend_from_slice(&[b'.'; 50]);
    }
    let req = Request::post(format!("http://{}/ingest", first.proxy))
        .header("idempotency-key", "b")
        .body(full(body))
        .unwrap();
    let (res, answer) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let id = json(&answer)["id"].as_str().unwrap().to_string();
    assert_eq!(
        spool_post(&first, "/ingest", "c", b"third".to_vec()).await,
        StatusCode::ACCEPTED
    );
    drop(first);
    // A damaged sector: the head of the attacker's record (its length and
    // checksum) is garbage, so recovery must find the next record without
    // it, across the attacker's body.
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "seg") && std::fs::metadata(p).unwrap().len() > 0
        })
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = bytes
        .windows(id.len())
        .position(|w| w == id.as_bytes())
        .expect("the record is on disk");
    // Its id is the first field of its payload, after its length; the
    // frame's head (17 bytes) comes before that.
    for b in &mut bytes[at - 4 - 17..at - 4] {
        *b ^= 0x5a;
    }
    std::fs::write(&segment, &bytes).unwrap();
    let second = binary(upstream, &text);
    let up = serve_fragile(upstream).await;
    within(
        Duration::from_secs(15),
        "the intact records delivered",
        async || up.delivered() == 2,
    )
    .await;
    sleep(Duration::from_millis(500)).await;
    let seen: Vec<String> = up.seen.lock().unwrap().keys().cloned().collect();
    assert!(
        seen.contains(&"a".to_string()) && seen.contains(&"c".to_string()),
        "{seen:?}"
    );
    assert_eq!(
        up.hits("/admin"),
        0,
        "a planted request reached the upstream"
    );
    let spool = spool_of(&second).await;
    assert_eq!(spool["damaged_records"], 1, "{spool}");
    assert_eq!(spool["requests"], 0, "{spool}");
    // Nothing was written outside the spool's directory.
    assert!(!dir.parent().unwrap().join("escaped.dead").exists());
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_carries_the_https_its_client_used() {
    use crate::support::process::scratch_dir;
    use crate::support::tls::{Ca, connect, connector, write};
    let upstream = reserve_addr();
    let dir = spool_dir("https");
    let ca = Ca::new("test CA");
    let certs = scratch_dir("spool-https");
    write(&certs, &ca.issue(&["localhost"]), &ca);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [[route]]\nname = \"test\"\nupstream = \"http://{upstream}\"\n{}",
        certs.join("cert.pem").display(),
        certs.join("key.pem").display(),
        route(&dir, ""),
    );
    let proxy = sluicegate::start(sluicegate::config::Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    let tls = connect(
        &connector(&ca, &[b"http/1.1"], None),
        proxy.proxy_addr(),
        "localhost",
    )
    .await
    .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/ingest")
        .header("host", "localhost")
        .header("idempotency-key", "tls")
        .body(full("over https"))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let up = serve_fragile(upstream).await;
    within(Duration::from_secs(15), "delivered", async || {
        up.delivered() == 1
    })
    .await;
    assert_eq!(*up.protos.lock().unwrap(), ["https"]);
    proxy.shutdown().await;
}

/// Uploads `body` as key `key` to the proxy at `addr`.
async fn upload(addr: SocketAddr, key: String, body: TestBody) -> StatusCode {
    let req = Request::post(format!("http://{addr}/ingest"))
        .header("idempotency-key", key)
        .body(body)
        .unwrap();
    send(&client(), req).await.0.status()
}

/// A request body of unknown length fed from a channel.
struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_uploads_spool_through_the_disk_not_memory() {
    const SIZE: usize = 8 << 20;
    const CHUNK: usize = 64 << 10;
    let upstream = reserve_addr();
    let dir = spool_dir("large");
    let text = format!(
        "max_body_bytes = 16777216\n[route.spool]\ndir = \"{}\"\nmax_bytes = 536870912\n",
        dir.display()
    );
    let proxy = binary(upstream, &text);
    // Warm up (allocator, thread pools) before the baseline.
    assert_eq!(
        upload(proxy.proxy, "warm".into(), full("w")).await,
        StatusCode::ACCEPTED
    );
    let before = proxy.peak_rss();
    // Twenty 8 MiB uploads of unknown length, all but their last chunk sent
    // at once and held there: 160 MiB being spooled at the same moment.
    let mut feeds = Vec::new();
    let mut uploads = Vec::new();
    for i in 0..20u8 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        uploads.push(tokio::spawn(upload(
            proxy.proxy,
            format!("u{i}"),
            BodyExt::boxed(Fed(rx)),
        )));
        feeds.push(tokio::spawn(async move {
            let mut sum = Checksum::new();
            for n in 0..SIZE / CHUNK - 1 {
                let chunk = Bytes::from(vec![i ^ n as u8; CHUNK]);
                sum.update(&chunk);
                tx.send(chunk).await.unwrap();
            }
            (tx, sum)
        }));
    }
    let mut held = Vec::new();
    for feed in feeds {
        held.push(feed.await.unwrap());
    }
    sleep(Duration::from_millis(500)).await;
    let grown = proxy.peak_rss().saturating_sub(before);
    let mut sums = HashMap::new();
    for (i, (tx, mut sum)) in held.into_iter().enumerate() {
        let last = Bytes::from(vec![0xff; CHUNK]);
        sum.update(&last);
        tx.send(last).await.unwrap();
        sums.insert(format!("u{i}"), sum.hex());
    }
    for u in uploads {
        assert_eq!(u.await.unwrap(), StatusCode::ACCEPTED);
    }
    assert!(
        grown < 48 << 20,
        "peak RSS grew by {grown} bytes with 160 MiB being spooled"
    );
    // Delivered whole once the upstream is back.
    let up = serve_fragile(upstream).await;
    within(Duration::from_secs(60), "all delivered", async || {
        up.delivered() == 21
    })
    .await;
    let got = up.sums.lock().unwrap().clone();
    for (key, sum) in sums {
        assert_eq!(got[&key], sum, "{key} arrived altered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_a_spool_cannot_keep_are_refused_before_they_are_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = reserve_addr();
    let dir = spool_dir("too-big");
    let text = format!(
        "max_body_bytes = 16777216\n[route.spool]\ndir = \"{}\"\nmax_bytes = 1048576\n",
        dir.display()
    );
    let proxy = binary(upstream, &text);
    let before = proxy.peak_rss();
    // Twenty clients declare 8 MiB, send 64 KiB of it and pause: the spool
    // (1 MiB) cannot keep one. Each is answered at once, its body unread.
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let addr = proxy.proxy;
            tokio::spawn(async move {
                let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
                let head = format!(
                    "POST /ingest HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
                    8 << 20
                );
                conn.write_all(head.as_bytes()).await.unwrap();
                conn.write_all(&[b'x'; 64 << 10]).await.unwrap();
                let mut answer = [0u8; 64];
                let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
                    .await
                    .expect("answered while the client pauses")
                    .unwrap();
                String::from_utf8_lossy(&answer[..n]).to_string()
            })
        })
        .collect();
    for c in clients {
        let answer = c.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    }
    let grown = proxy.peak_rss().saturating_sub(before);
    assert!(grown < 16 << 20, "peak RSS grew by {grown} bytes");
    assert_eq!(spool_of(&proxy).await["requests"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_uploads_cannot_fill_the_spool() {
    use tokio::io::AsyncWriteExt;
    let upstream = reserve_addr();
    let dir = spool_dir("silent");
    let text = format!(
        "[route.spool]\ndir = \"{}\"\nmax_bytes = 1048576\n",
        dir.display()
    );
    let proxy = binary(upstream, &text);
    // Ten clients declare 400 kB each (four times the spool between them),
    // send their heads and nothing more.
    let mut silent = Vec::new();
    for _ in 0..10 {
        let mut conn = tokio::net::TcpStream::connect(proxy.proxy).await.unwrap();
        let head = "POST /ingest HTTP/1.1\r\nhost: x\r\ncontent-length: 400000\r\n\r\n";
        conn.write_all(head.as_bytes()).await.unwrap();
        silent.push(conn);
    }
    sleep(Duration::from_millis(300)).await;
    // They hold no room: a real request of 300 kB is still spooled.
    let status = spool_post(&proxy, "/ingest", "real", vec![b'r'; 300_000]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    drop(silent);
}

/// Every file and folder under `dir`, with its permission bits.
fn modes(dir: &std::path::Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = vec![(
        dir.to_path_buf(),
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
    )];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(modes(&path));
        } else {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            out.push((path, mode));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_keeps_its_requests_from_other_local_users() {
    let upstream = reserve_addr();
    let dir = spool_dir("private");
    let proxy = sluicegate::start(config(upstream, "/", &route(&dir, "")))
        .await
        .unwrap();
    for (path, key) in [("/bad", "b"), ("/ok", "o")] {
        let req = Request::post(format!("http://{}{path}", proxy.proxy_addr()))
            .header("idempotency-key", key)
            .header("authorization", "Bearer secret-of-a-client")
            .body(full("{}"))
            .unwrap();
        assert_eq!(send(&client(), req).await.0.status(), StatusCode::ACCEPTED);
    }
    // The upstream is back: one delivered, one a dead letter.
    let _up = serve_fragile(upstream).await;
    within(Duration::from_secs(30), "one dead letter", async || {
        spool_of(&proxy).await["dead_letters"] == 1
    })
    .await;
    let modes = modes(&dir);
    assert!(
        modes
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "seg"))
    );
    assert!(
        modes
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "dead"))
    );
    for (path, mode) in &modes {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} is {mode:03o}", path.display());
    }
    proxy.shutdown().await;

    // A folder others can open is refused, by name.
    let open = spool_dir("shared");
    std::fs::create_dir_all(&open).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let Err(error) = sluicegate::start(config(upstream, "/", &route(&open, ""))).await else {
        panic!("a spool folder other users can read is refused");
    };
    let error = error.to_string();
    assert!(error.contains(&open.display().to_string()), "{error}");
    assert!(error.contains("chmod 700"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&open);
}
