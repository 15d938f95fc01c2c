//! A real redis-server on a free loopback port, for the cluster tests.
//! Debian's `redis-server` (CI installs it); without it the tests say so and
//! pass, unless `SLUICEGATE_REQUIRE_REDIS` is set (as CI does).

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running redis-server, killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl RedisServer {
    /// Starts one on a free port, or `None` (after saying why) where
    /// redis-server is not installed and CI does not require it.
    pub fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match Self::spawn(addr) {
            Some(server) => Some(server),
            None if std::env::var_os("SLUICEGATE_REQUIRE_REDIS").is_some() => {
                panic!("redis-server is required here (apt-get install redis-server)")
            }
            None => {
                eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
                None
            }
        }
    }

    fn spawn(addr: SocketAddr) -> Option<Self> {
        let server = Self {
            child: Some(Self::child(addr)?),
            addr,
        };
        server.wait_listening();
        Some(server)
    }

    fn child(addr: SocketAddr) -> Option<Child> {
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    }

    fn wait_listening(&self) {
        for _ in 0..500 {
            if TcpStream::connect(self.addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not listen on {}", self.addr);
    }

    /// `redis://` URL of it.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Kills it (the data goes with it).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(Self::child(self.addr).expect("redis-server started before"));
        self.wait_listening();
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{name} {pid}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused server would not die of SIGKILL's delivery otherwise
            // promptly enough for the next test's port.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}
