//! Helpers shared by the scenario benchmarks: child processes that are killed
//! when dropped, the release binary, peak RSS, a tiny blocking HTTP GET.

#![allow(clippy::disallowed_types)] // wall-clock time of real processes: benchmarks measure it
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

/// The release binary (`cargo build --release` first), or `BENCH_BIN` to
/// measure another build in the same conditions.
pub fn bin() -> String {
    std::env::var("BENCH_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/sluicegate").to_string()
    })
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

/// The number in environment variable `name` (a run's length), or `default`.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `cargo test --benches` and `cargo bench -- --list` run bench binaries too;
/// the scenario benches do nothing then.
pub fn only_listing() -> bool {
    std::env::args().any(|a| a == "--list" || a == "--test")
}

/// A fresh scratch folder for one run's config files.
pub fn work_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluicegate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The load generator's runtime: one worker, leaving the other core to the
/// processes under test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// The machine's core count, for the report.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Writes [`proxy_config`] with `route` to `dir/<name>.toml` and starts the
/// release proxy on it.
pub fn start_proxy(dir: &std::path::Path, name: &str, route: &str, ports: (u16, u16, u16)) -> Proc {
    let (proxy, admin, sim) = ports;
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, proxy_config(proxy, admin, sim, route)).unwrap();
    spawn(&bin(), &["-c", path.to_str().unwrap()], proxy)
}

/// Writes `benches/results/<name>` and says where.
pub fn write_result(name: &str, content: &str) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/results");
    std::fs::create_dir_all(dir).unwrap();
    let out = format!("{dir}/{name}");
    std::fs::write(&out, content).unwrap();
    eprintln!("plot written to {out}");
}

/// Polls `sample` every `every` on a thread of its own, stamping each value
/// with the seconds since `start`, until [`Sampler::finish`].
pub struct Sampler<T> {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, T)>>,
}

impl<T: Send + 'static> Sampler<T> {
    /// Starts polling.
    pub fn start(
        start: std::time::Instant,
        every: Duration,
        mut sample: impl FnMut() -> Option<T> + Send + 'static,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(v) = sample() {
                    samples.push((start.elapsed().as_secs_f64(), v));
                }
                std::thread::sleep(every);
            }
            samples
        });
        Self { stop, thread }
    }

    /// Stops polling; the samples taken.
    pub fn finish(self) -> Vec<(f64, T)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The pieces every benchmark chart is drawn from (plain SVG text).
pub mod svg {
    use std::fmt::Write as _;

    /// An `<svg>` opening tag of `width` × `height`, in the charts' font.
    pub fn open(width: f64, height: f64) -> String {
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
        )
    }

    /// A line through `points` (`"x,y"` each).
    pub fn polyline(points: &[String], color: &str) -> String {
        format!(
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"/>"#,
            points.join(" ")
        )
    }

    /// A legend of `(name, color)` lines from (`x`, `y`) down.
    pub fn legend(svg: &mut String, x: f64, y: f64, items: &[(&str, &str)]) {
        for (i, (name, color)) in items.iter().enumerate() {
            let _ = write!(
                svg,
                r#"<text x="{x}" y="{}" fill="{color}">{name}</text>"#,
                y + 14.0 * i as f64
            );
        }
    }

    /// Time labels under a panel, every `step` seconds from 0 to `end`.
    pub fn time_axis(svg: &mut String, end: usize, step: usize, y: f64, px: impl Fn(f64) -> f64) {
        for t in (0..=end).step_by(step) {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{y}" text-anchor="middle">{t}s</text>"#,
                px(t as f64)
            );
        }
    }
}
