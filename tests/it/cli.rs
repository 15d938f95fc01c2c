//! The `sluicegate` binary as users run it: check-config, signals, memory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::process::{BIN, Proc, log_lines, rand_name, write_config};
use crate::support::*;
use http::{Request, StatusCode};

fn check_config(name: &str, text: &str) -> (i32, String) {
    let path = write_config(name, text);
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn check_config_accepts_the_shipped_config() {
    let out = Command::new(BIN)
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

#[test]
fn check_config_names_file_key_and_problem() {
    let route = "[[route]]\nupstream = \"http://127.0.0.1:9000\"\n";
    let cases: &[(&str, String, &str, &str)] = &[
        (
            "syntax.toml",
            "[server\nlisten = 1\n".into(),
            "syntax.toml:1:",
            "TOML syntax error",
        ),
        (
            "unknown.toml",
            format!("{route}timeot_ms = 5\n"),
            "route[0].timeot_ms",
            "unknown field",
        ),
        (
            "section.toml",
            format!("{route}[route.admision]\n"),
            "route[0].admision",
            "unknown field",
        ),
        (
            "addr.toml",
            format!("[server]\nlisten = \"localhost:80\"\n{route}"),
            "server.listen",
            "IP:port",
        ),
        (
            "admin.toml",
            format!("[server]\nadmin_listen = \"1.2.3.4\"\n{route}"),
            "server.admin_listen",
            "IP:port",
        ),
        (
            "url.toml",
            "[[route]]\nupstream = \"htp:/nowhere\"\n".into(),
            "route[0].upstream",
            "expected http://host:port",
        ),
        (
            "zero.toml",
            format!("{route}timeout_ms = 0\n"),
            "route[0].timeout_ms",
            "greater than 0",
        ),
        (
            "negative.toml",
            format!("{route}max_body_bytes = -10\n"),
            "route[0].max_body_bytes",
            "greater than 0",
        ),
        (
            "conns.toml",
            format!("[server]\nmax_connections = 0\n{route}"),
            "server.max_connections",
            "greater than 0",
        ),
    ];
    for (file, text, key, problem) in cases {
        let (code, stderr) = check_config(file, text);
        assert_eq!(code, 1, "{file}: {stderr}");
        assert!(stderr.contains(file), "{file}: file not named: {stderr}");
        assert!(
            stderr.contains(key),
            "{file}: key `{key}` not named: {stderr}"
        );
        assert!(
            stderr.contains(problem),
            "{file}: problem not said: {stderr}"
        );
    }
}

#[test]
fn run_refuses_a_bad_config_with_exit_1() {
    let path = write_config("bad-run.toml", "[[route]]\nupstream = \"nope\"\n");
    let out = Command::new(BIN).arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("route[0].upstream"));
}

fn proc_config(upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworker_threads = 2\n\
         drain_timeout_ms = 10000\n\n[[route]]\nname = \"t\"\nupstream = \"http://{upstream}\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let (up, mut held) = spawn_upstream().await;
    let proc = Proc::start(&proc_config(up.addr.unwrap(), ""));
    let target = format!("http://{}/hold", proc.proxy);
    let pending = tokio::spawn(async move { get(&target).await });
    held.recv().await.unwrap();

    proc.signal("TERM");
    let readyz = format!("http://{}/readyz", proc.admin);
    let mut tries = 0;
    while get(&readyz).await.0.status() != StatusCode::SERVICE_UNAVAILABLE {
        tries += 1;
        assert!(tries < 500, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The listener is closed to new connections while the held request goes on.
    assert!(tokio::net::TcpStream::connect(proc.proxy).await.is_err());
    up.release.notify_waiters();
    let (res, body) = pending.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(&body[..], b"released");
    let status = tokio::task::spawn_blocking(move || proc.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// SIGTERM, SIGINT and SIGHUP kill a process by default: their handlers
/// must be in place before the listeners open, or a signal sent as the proxy
/// starts (a pod deleted at once) cuts requests instead of draining them.
/// Seen once in four runs of the suite: a SIGTERM right after the first
/// request killed the process. Checked at the first moment the proxy's port
/// takes a connection (its signal mask read from /proc; with the handlers
/// registered after start-up, as before, this failed every other run), then
/// a SIGTERM must still end it with 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_caught_from_the_moment_the_proxy_listens() {
    let (up, _) = spawn_upstream().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config =
        proc_config(up.addr.unwrap(), "").replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1);
    let path = write_config(&format!("signals-{}.toml", rand_name()), &config);
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Spin until the proxy's port takes a connection, then look at once.
    let caught = tokio::task::spawn_blocking(move || {
        let start = tokio::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "never listened");
            std::hint::spin_loop();
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .unwrap();
        u64::from_str_radix(mask.trim(), 16).unwrap()
    })
    .await
    .unwrap();
    for (signal, name) in [(1, "SIGHUP"), (2, "SIGINT"), (15, "SIGTERM")] {
        assert!(caught & (1 << (signal - 1)) != 0, "{name} not caught yet");
    }
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_0() {
    let (up, _) = spawn_upstream().await;
    let proc = Proc::start(&proc_config(up.addr.unwrap(), ""));
    assert_eq!(
        get(&format!("http://{}/x", proc.proxy)).await.0.status(),
        StatusCode::OK
    );
    proc.signal("INT");
    let status = tokio::task::spawn_blocking(move || proc.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_of_20_mb_streams_without_growing_memory_by_its_size() {
    const SIZE: usize = 20 * 1024 * 1024;
    let (up, _) = spawn_upstream().await;
    let proc = Proc::start(&proc_config(up.addr.unwrap(), "max_body_bytes = 50000000"));
    let url = format!("http://{}/upload", proc.proxy);
    // Warm up connections, pools and allocator arenas before the baseline.
    for _ in 0..3 {
        let (body, _) = streamed(256 * 1024, 64 * 1024);
        let req = Request::post(&url).body(body).unwrap();
        assert_eq!(send(&client(), req).await.0.status(), StatusCode::OK);
    }
    let before = proc.peak_rss();
    let (body, sum) = streamed(SIZE, 64 * 1024);
    let req = Request::post(&url).body(body).unwrap();
    let (res, echo) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(json(&echo)["body"], sum, "upload arrived altered");
    let grown = proc.peak_rss().saturating_sub(before);
    eprintln!("peak RSS before {before} B, grown by {grown} B for {SIZE} B");
    assert!(
        grown < (SIZE / 4) as u64,
        "peak RSS grew by {grown} bytes for a {SIZE}-byte upload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_and_refuses_a_broken_one() {
    let (up, _) = spawn_upstream().await;
    let upstream = up.addr.unwrap();
    let proc = Proc::start(&proc_config(upstream, ""));
    let url = |path: &str| format!("http://{}{path}", proc.proxy);
    assert_eq!(get(&url("/x")).await.0.status(), StatusCode::OK);

    // Same listeners, the route moved to /v2.
    let moved = proc_config(upstream, "path_prefix = \"/v2\"");
    std::fs::write(&proc.path, moved).unwrap();
    proc.signal("HUP");
    let mut tries = 0;
    while get(&url("/x")).await.0.status() != StatusCode::NOT_FOUND {
        tries += 1;
        assert!(tries < 500, "the reload never took effect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(get(&url("/v2/x")).await.0.status(), StatusCode::OK);

    // A broken file is refused; the running config keeps serving.
    std::fs::write(&proc.path, "[[route]]\nupstream = 42\n").unwrap();
    proc.signal("HUP");
    let metrics = format!("http://{}/metrics", proc.admin);
    let series = "sluicegate_config_reload_total{result=\"error\"}";
    let mut tries = 0;
    loop {
        let text = get(&metrics).await.1;
        if metric(&String::from_utf8_lossy(&text), series) == Some(1.0) {
            break;
        }
        tries += 1;
        assert!(tries < 500, "the broken reload was not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(get(&url("/v2/x")).await.0.status(), StatusCode::OK);
    proc.signal("TERM");
    let status = tokio::task::spawn_blocking(move || proc.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let (up, _) = spawn_upstream().await;
    let path = write_config(
        &format!("plain-{}.toml", rand_name()),
        &proc_config(up.addr.unwrap(), ""),
    );
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("sluicegate listening"))
    })
    .await
    .unwrap()
    .expect("sluicegate did not log its addresses");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    assert!(
        !line.contains('\x1b'),
        "escape codes in a piped log: {line:?}"
    );
    assert!(line.contains("INFO"), "{line:?}");
}

/// Redis down when the proxy starts: requests fall back as they should,
/// and the operator reads why, once, at warn (README "[cluster]"): the
/// first probe's verdict is logged whichever it is, not only a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_is_logged_once_at_warn() {
    let (up, _) = spawn_upstream().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redis = closed.local_addr().unwrap();
    drop(closed);
    let extra = "[route.rate_limit]\nper_second = 100\nburst = 100\nscope = \"cluster\"\n";
    let config = format!(
        "{}\n[cluster]\nredis_url = \"redis://{redis}\"\n",
        proc_config(up.addr.unwrap(), extra)
    );
    let path = write_config(&format!("redis-down-{}.toml", rand_name()), &config);
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let rx = log_lines(&mut child);
    // The first probe goes at once; three more follow in 1.5 s: one line.
    let lines = tokio::task::spawn_blocking(move || {
        let mut down = Vec::new();
        let mut until = None;
        loop {
            let wait = until.map_or(Duration::from_secs(20), |u: tokio::time::Instant| {
                u.saturating_duration_since(tokio::time::Instant::now())
            });
            match rx.recv_timeout(wait) {
                Ok(line) if line.contains("redis is down") => {
                    down.push(line);
                    until.get_or_insert(tokio::time::Instant::now() + Duration::from_millis(1500));
                }
                Ok(_) => {}
                Err(_) => return down,
            }
        }
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("WARN"), "{lines:?}");
}
