//! The `sluicegate` binary as a child process, with the addresses it logged.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

/// The lines `child` writes to its (piped) stderr, as they come, read by a
/// thread of their own so that the child never blocks on a full pipe.
pub fn log_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Writes `text` as config file `name` in the test's temporary directory.
pub fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluicegate-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The binary, running, with the addresses it logged.
pub struct Proc {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub path: std::path::PathBuf,
}

impl Proc {
    pub fn start(config: &str) -> Self {
        let path = write_config(&format!("run-{}.toml", rand_name()), config);
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let rx = log_lines(&mut child);
        let line = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("sluicegate did not log its addresses");
            if line.contains("sluicegate listening") {
                break line;
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr = |k: &str| v[k].as_str().unwrap().parse().unwrap();
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Proc {
            proxy: addr("proxy_addr"),
            admin: addr("admin_addr"),
            child,
            path,
        }
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    // A real child process: its deadline is wall-clock time.
    #[allow(clippy::disallowed_types)]
    pub fn wait(mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("sluicegate did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

pub fn rand_name() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// A directory under the target dir, fresh for each test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        rand_name()
    ));
    // Private, as a spool folder must be.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&dir)
        .unwrap();
    dir
}
