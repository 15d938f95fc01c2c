//! The spool across `kill -9`: the binary is killed at random points while
//! it spools and while it replays; every request it acknowledged reaches the
//! upstream, and a request reaches it twice only if it was in flight at a
//! kill. And a spool file with flipped bytes loses only what they hit.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::keys::{reserve_addr, serve_keys};
use crate::support::process::Proc;
use crate::support::*;
use http::{Request, StatusCode};
use sluicegate::jitter::Jitter;
use tokio::task::JoinSet;

/// What the replayer sends at once, at most (`spool::replay::MAX_INFLIGHT`).
const REPLAY_INFLIGHT: usize = sluicegate::spool::replay::MAX_INFLIGHT;

fn spool_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluicegate-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn proc_config(upstream: SocketAddr, dir: &Path, fsync: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworker_threads = 2\n\
         [[route]]\nname = \"t\"\nupstream = \"http://{upstream}\"\nconnect_timeout_ms = 200\n\
         [route.spool]\ndir = \"{}\"\nmax_bytes = 67108864\nfsync = \"{fsync}\"\n",
        dir.display()
    )
}

async fn spool_status(admin: SocketAddr) -> serde_json::Value {
    let (_, body) = get(&format!("http://{admin}/spool")).await;
    json(&body)["routes"][0].clone()
}

/// Kills the process the hard way and waits for it to be gone.
fn kill_9(mut proc: Proc) {
    proc.child.kill().unwrap();
    proc.child.wait().unwrap();
}

async fn post(proxy: SocketAddr, key: String) -> (String, Option<StatusCode>) {
    let req = Request::post(format!("http://{proxy}/ingest"))
        .header("idempotency-key", &key)
        .body(full(format!("{{\"event\":\"{key}\"}}")))
        .unwrap();
    let status = client().request(req).await.ok().map(|r| r.status());
    (key, status)
}

/// Polls `check` every 10 ms for at most `limit` (a real child process).
async fn eventually(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..limit.as_millis() / 10 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within {limit:?}: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_across_kill_9() {
    let upstream = reserve_addr();
    let dir = spool_dir("kill");
    let config = proc_config(upstream, &dir, "always");
    let mut jitter = Jitter::from_entropy();
    let total = 500;
    // Two kills while spooling, at random points.
    let mut kills = vec![
        50 + (jitter.unit() * 150.0) as usize,
        250 + (jitter.unit() * 150.0) as usize,
    ];
    let mut proc = Proc::start(&config);
    let mut acked: HashSet<String> = HashSet::new();
    let mut in_flight_at_kills: HashSet<String> = HashSet::new();
    let mut to_send: Vec<String> = (0..total).rev().map(|i| format!("key-{i}")).collect();
    let mut sending = JoinSet::new();
    while acked.len() < total {
        while sending.len() < 16
            && let Some(key) = to_send.pop()
        {
            sending.spawn(post(proc.proxy, key));
        }
        let (key, status) = sending.join_next().await.unwrap().unwrap();
        match status {
            Some(StatusCode::ACCEPTED) => {
                acked.insert(key);
            }
            other => panic!("{key}: {other:?} while the proxy was up"),
        }
        if kills.first().is_some_and(|k| acked.len() >= *k) {
            kills.remove(0);
            kill_9(proc);
            // What was in flight: acknowledged or not, and sent again if not.
            while let Some(done) = sending.join_next().await {
                let (key, status) = done.unwrap();
                if status == Some(StatusCode::ACCEPTED) {
                    acked.insert(key);
                } else {
                    in_flight_at_kills.insert(key.clone());
                    to_send.push(key);
                }
            }
            proc = Proc::start(&config);
        }
    }
    assert_eq!(spool_status(proc.admin).await["damaged_records"], 0);

    // The upstream comes back, slow enough that replay takes a while; the
    // proxy is killed mid-replay.
    let keys = serve_keys(upstream).await;
    *keys.delay.lock().unwrap() = Duration::from_millis(20);
    eventually(Duration::from_secs(30), "replay starts", async || {
        keys.distinct() >= 100
    })
    .await;
    kill_9(proc);
    // Answers the upstream is still writing reach no one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen_before_kill: HashSet<String> = keys.counts().into_keys().collect();
    assert!(
        seen_before_kill.len() < total,
        "replay ended before the kill"
    );

    let proc = Proc::start(&config);
    eventually(Duration::from_secs(60), "the spool empties", async || {
        spool_status(proc.admin).await["requests"] == 0
    })
    .await;
    let counts = keys.counts();
    let lost: Vec<&String> = acked.iter().filter(|k| !counts.contains_key(*k)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}"
    );
    let twice: Vec<&String> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    for key in &twice {
        assert!(
            in_flight_at_kills.contains(*key) || seen_before_kill.contains(*key),
            "{key} delivered twice but was never in flight at a kill"
        );
    }
    let replay_twice = twice
        .iter()
        .filter(|k| !in_flight_at_kills.contains(**k))
        .count();
    // In flight at the replay kill: up to REPLAY_INFLIGHT at the upstream,
    // and as many answered whose delivery the writer had not yet recorded.
    assert!(
        replay_twice <= 2 * REPLAY_INFLIGHT,
        "{replay_twice} delivered twice: more than were in flight"
    );
    eprintln!(
        "kill -9: {} acknowledged, {} in flight at spool kills, {} delivered twice",
        acked.len(),
        in_flight_at_kills.len(),
        twice.len()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_a_spool_file_cost_only_their_record() {
    let upstream = reserve_addr();
    let dir = spool_dir("flip");
    let config = proc_config(upstream, &dir, "batch");
    let proc = Proc::start(&config);
    for i in 0..10 {
        let (_, status) = post(proc.proxy, format!("flip-{i}")).await;
        assert_eq!(status, Some(StatusCode::ACCEPTED));
    }
    proc.signal("TERM");
    assert!(proc.wait(Duration::from_secs(10)).success());
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    bytes[middle + 1] ^= 0x5a;
    std::fs::write(&segment, bytes).unwrap();

    let keys = serve_keys(upstream).await;
    let proc = Proc::start(&config);
    assert_eq!(spool_status(proc.admin).await["damaged_records"], 1);
    eventually(Duration::from_secs(30), "the spool empties", async || {
        spool_status(proc.admin).await["requests"] == 0
    })
    .await;
    assert_eq!(keys.distinct(), 9, "{:?}", keys.counts());
    let (_, metrics) = get(&format!("http://{}/metrics", proc.admin)).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(
        metric(
            &metrics,
            r#"sluicegate_spool_damaged_records_total{route="t"}"#
        ),
        Some(1.0)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A tmpfs of `size`, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// `None` where this process may not mount (not root, no CAP_SYS_ADMIN).
    fn mount(name: &str, size: &str) -> Option<Self> {
        let dir = spool_dir(name);
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The disk fills before `max_bytes`: the write fails, the client gets the
/// refusal it would have had without a spool (503 + Retry-After), and every
/// request acknowledged before is delivered after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_as_without_a_spool_and_loses_nothing() {
    let Some(disk) = SmallDisk::mount("disk", "256k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let upstream = reserve_addr();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworker_threads = 2\n\
         [[route]]\nname = \"t\"\nupstream = \"http://{upstream}\"\n\
         [route.circuit]\nfailure_threshold = 1\nopen_ms = 600000\nmax_open_ms = 600000\n\
         [route.spool]\ndir = \"{}\"\nmax_bytes = 104857600\n",
        disk.0.join("spool").display()
    );
    let proc = Proc::start(&config);
    let client = client();
    let mut acked = Vec::new();
    let refusal = loop {
        let key = format!("disk-{}", acked.len());
        let req = Request::post(format!("http://{}/ingest", proc.proxy))
            .header("idempotency-key", &key)
            .body(full("e".repeat(4096)))
            .unwrap();
        let (res, body) = send(&client, req).await;
        if res.status() != StatusCode::ACCEPTED {
            break (res, body);
        }
        acked.push(key);
        assert!(
            acked.len() < 200,
            "a 256 KiB disk took {} requests",
            acked.len()
        );
    };
    let (res, body) = refusal;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(json(&body)["reason"], "circuit_open");
    assert!(acked.len() > 10, "{}", acked.len());
    proc.signal("TERM");
    assert!(proc.wait(Duration::from_secs(10)).success());

    let keys = serve_keys(upstream).await;
    let proc = Proc::start(&config);
    eventually(Duration::from_secs(30), "the spool empties", async || {
        spool_status(proc.admin).await["requests"] == 0
    })
    .await;
    let counts = keys.counts();
    for key in &acked {
        assert_eq!(counts.get(key), Some(&1), "{key}");
    }
    drop(proc);
}
