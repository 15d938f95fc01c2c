//! Helpers shared by the scenario benchmarks: child processes that are killed
//! when dropped, the release binary, peak RSS, a tiny blocking HTTP GET.

#![allow(dead_code)] // each bench uses its own subset

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process, killed and reaped when dropped (a bench that panics must
/// not leave a proxy listening).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The release binary (`cargo build --release` first).
pub fn bin() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/sluicegate").to_string()
}

/// Starts `cmd` and waits until it listens on 127.0.0.1:`port`.
pub fn spawn(cmd: &str, args: &[&str], port: u16) -> Proc {
    let proc = Proc(
        Command::new(cmd)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd}: {e}")),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..200 {
        if TcpStream::connect(addr).is_ok() {
            return proc;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{cmd} did not listen on {port}");
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`), or 0.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The process's peak resident set (VmHWM), in KiB.
pub fn peak_rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmHWM:")
}

/// Starts `sluicegate sim` on 127.0.0.1:`port`.
pub fn spawn_sim(port: u16, workers: usize, service_ms: u64) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let (workers, service_ms) = (workers.to_string(), service_ms.to_string());
    let args = [
        "sim",
        "--listen",
        &listen,
        "--workers",
        &workers,
        "--service-ms",
        &service_ms,
    ];
    spawn(&bin(), &args, port)
}

/// A proxy config on the given ports with one route `bench` to the simulator,
/// one worker thread, and `route` appended inside the route.
pub fn proxy_config(proxy: u16, admin: u16, sim: u16, route: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{proxy}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         worker_threads = 1\n[[route]]\nname = \"bench\"\nupstream = \"http://127.0.0.1:{sim}\"\n{route}"
    )
}

/// `GET path` on 127.0.0.1:`port`; the body, or `None`.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http(port, "GET", path, "")
}

/// `POST path` with a JSON `body` on 127.0.0.1:`port`; the answer's body.
pub fn http_post(port: u16, path: &str, body: &str) -> Option<String> {
    http(port, "POST", path, body)
}

fn http(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}
