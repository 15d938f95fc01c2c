//! The store on a real directory: what is acknowledged survives a reopen,
//! what is delivered does not, damage costs only the damaged record.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};

use super::record::{Buried, Stored, StoredHead};
use super::store::{SpoolError, Store};
use super::{Durability, SpoolMetrics, SpoolSettings};
use crate::error::Reason;
use crate::metrics::Registry;

/// A directory removed when dropped.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluicegate-spool-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(dir: &Path, max_bytes: u64, durability: Durability) -> SpoolSettings {
    SpoolSettings {
        dir: dir.to_path_buf(),
        max_bytes,
        max_requests: 10_000,
        methods: vec![Method::POST],
        on: vec![Reason::QueueFull],
        max_attempts: 3,
        idempotency_header: http::HeaderName::from_static("idempotency-key"),
        durability,
    }
}

/// Opens the store in `dir`, once the writer of the last one there has
/// finished.
fn open(dir: &Path, max_bytes: u64) -> Arc<Store> {
    for _ in 0..1000 {
        let metrics = SpoolMetrics::new("t", &Registry::new());
        match Store::open(&settings(dir, max_bytes, Durability::Always), metrics) {
            Ok(store) => return store,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the last store's writer never finished")
}

/// Drops `store` once its writer has let go of it (it holds it only while
/// writing).
fn close(store: Arc<Store>) {
    for _ in 0..1000 {
        if Arc::strong_count(&store) == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(Arc::strong_count(&store), 1, "store still shared");
    drop(store);
}

fn request(store: &Store, body: &str) -> Stored {
    Stored {
        head: StoredHead {
            id: store.new_id(),
            created_ms: 1,
            client: None,
            tls: false,
            method: Method::POST,
            uri: "/ingest".into(),
            headers: HeaderMap::new(),
        },
        body: Bytes::from(body.to_string()),
    }
}

async fn append_all(store: &Store, bodies: impl Iterator<Item = String>) {
    for body in bodies {
        store.append(&request(store, &body)).await.unwrap();
    }
}

/// Takes every deliverable request's body, oldest first.
async fn bodies(store: &Store) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(next) = store.next() {
        let stored = store.read(&next).await.unwrap();
        out.push(String::from_utf8(stored.body.to_vec()).unwrap());
    }
    out
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn acknowledged_requests_survive_a_reopen_in_order() {
    let dir = TempDir::new("reopen");
    let store = open(dir.path(), 1 << 20);
    append_all(&store, (0..5).map(|i| format!("r{i}"))).await;
    assert_eq!(store.snapshot().requests, 5);
    close(store);
    let store = open(dir.path(), 1 << 20);
    let got = bodies(&store).await;
    assert_eq!(got, ["r0", "r1", "r2", "r3", "r4"]);
}

#[tokio::test]
async fn delivered_requests_are_gone_and_their_segments_deleted() {
    let dir = TempDir::new("delivered");
    // 4 KiB segments: many of them.
    let store = open(dir.path(), 64 * 1024);
    append_all(&store, (0..40).map(|i| format!("{i:0>200}"))).await;
    assert!(segments(dir.path()).len() > 2);
    let mut delivered = 0;
    while let Some(next) = store.next() {
        store.read(&next).await.unwrap();
        store.delivered(&next);
        delivered += 1;
    }
    assert_eq!(delivered, 40);
    // The writer records the deliveries, then starts a new segment.
    for _ in 0..100 {
        if segments(dir.path()).len() == 1 && store.snapshot().bytes < 4096 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(segments(dir.path()).len(), 1, "{:?}", segments(dir.path()));
    let sizes: Vec<u64> = segments(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    assert!(
        store.snapshot().bytes < 4096,
        "{:?} {sizes:?} {:?}",
        store.snapshot(),
        segments(dir.path())
    );
    close(store);
    let store = open(dir.path(), 64 * 1024);
    assert_eq!(store.snapshot().requests, 0);
}

#[tokio::test]
async fn a_full_spool_refuses_and_takes_again_once_delivered() {
    let dir = TempDir::new("full");
    let store = open(dir.path(), 16 * 1024);
    let body = "x".repeat(1000);
    let mut accepted = 0;
    loop {
        match store.append(&request(&store, &body)).await {
            Ok(()) => accepted += 1,
            Err(SpoolError::Full) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!((10..=16).contains(&accepted), "{accepted}");
    assert!(store.snapshot().bytes <= 16 * 1024);
    while let Some(next) = store.next() {
        store.delivered(&next);
    }
    let mut again = false;
    for _ in 0..100 {
        if store.append(&request(&store, &body)).await.is_ok() {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        again,
        "space freed by delivery is not reused: {:?}",
        store.snapshot()
    );
}

#[tokio::test]
async fn a_flipped_byte_costs_one_record() {
    let dir = TempDir::new("corrupt");
    let store = open(dir.path(), 1 << 20);
    for i in 0..10 {
        store
            .append(&request(&store, &format!("body-{i}-{}", "y".repeat(100))))
            .await
            .unwrap();
    }
    close(store);
    let file = &segments(dir.path())[0];
    let mut bytes = std::fs::read(file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.snapshot().damaged_records, 1);
    assert_eq!(store.snapshot().requests, 9);
}

#[tokio::test]
async fn a_torn_tail_is_skipped_and_never_appended_to() {
    let dir = TempDir::new("torn");
    let store = open(dir.path(), 1 << 20);
    append_all(&store, (0..3).map(|i| format!("t{i}"))).await;
    close(store);
    let file = &segments(dir.path())[0];
    let len = std::fs::metadata(file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len - 4)
        .unwrap();
    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.snapshot().requests, 2);
    store.append(&request(&store, "after")).await.unwrap();
    close(store);
    let store = open(dir.path(), 1 << 20);
    let got = bodies(&store).await;
    assert_eq!(got, ["t0", "t1", "after"]);
}

#[tokio::test]
async fn dead_letters_are_kept_listed_sent_back_and_deleted() {
    let dir = TempDir::new("dead");
    let store = open(dir.path(), 1 << 20);
    append_all(&store, (0..3).map(|i| format!("d{i}"))).await;
    for _ in 0..2 {
        let next = store.next().unwrap();
        let stored = store.read(&next).await.unwrap();
        let buried = Buried {
            request: stored,
            status: Some(400),
            excerpt: "bad event".into(),
            attempts: 1,
            buried_ms: 2,
        };
        store.bury(&next, buried).await.unwrap();
    }
    assert_eq!(store.snapshot().requests, 1);
    let dead = store.dead_letters(None, 10);
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].status, Some(400));
    assert_eq!(dead[0].excerpt, "bad event");
    // Paged by id.
    let second = store.dead_letters(Some(&dead[0].id), 10);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, dead[1].id);
    close(store);

    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.snapshot().dead_letters, 2);
    assert_eq!(
        store.snapshot().requests,
        1,
        "buried requests are not delivered again"
    );
    assert!(store.resurrect(&dead[0].id).await.unwrap());
    assert!(store.forget(&dead[1].id).await.unwrap());
    assert!(!store.forget(&dead[1].id).await.unwrap());
    assert!(!store.resurrect("../../etc").await.unwrap());
    assert_eq!(store.snapshot().dead_letters, 0);
    let got = bodies(&store).await;
    assert_eq!(got, ["d2", "d0"]);
}

#[tokio::test]
async fn one_process_per_directory() {
    let dir = TempDir::new("lock");
    let _store = open(dir.path(), 1 << 20);
    let metrics = SpoolMetrics::new("t", &Registry::new());
    let err = Store::open(&settings(dir.path(), 1 << 20, Durability::Always), metrics).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[tokio::test]
async fn group_commit_answers_each_request_after_one_sync() {
    let dir = TempDir::new("batch");
    let metrics = SpoolMetrics::new("t", &Registry::new());
    let store = Store::open(
        &settings(
            dir.path(),
            1 << 20,
            Durability::Batch(Duration::from_millis(20)),
        ),
        metrics,
    )
    .unwrap();
    let writes = (0..50).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { store.append(&request(&store, &format!("b{i}"))).await })
    });
    for w in writes {
        w.await.unwrap().unwrap();
    }
    assert_eq!(store.snapshot().requests, 50);
    close(store);
    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.snapshot().requests, 50);
}

/// A failed group commit cuts the file back to the first request it did not
/// commit; `Done` records written after that request went with the cut and
/// are written again, or their requests would be delivered twice after a
/// restart.
#[tokio::test]
async fn a_failed_sync_loses_no_delivery_record() {
    let dir = TempDir::new("failed-sync");
    let metrics = SpoolMetrics::new("t", &Registry::new());
    let batch = Durability::Batch(Duration::from_millis(200));
    let store = Store::open(&settings(dir.path(), 1 << 20, batch), metrics).unwrap();
    store.append(&request(&store, "a")).await.unwrap();
    // C stays to deliver: the segment stays too.
    store.append(&request(&store, "c")).await.unwrap();
    let a = store.next().unwrap();
    // B is written and waits for its commit; A is delivered meanwhile, so
    // its Done record lands after B in the file; then the commit fails.
    let b = request(&store, "b");
    let pending = tokio::spawn({
        let store = store.clone();
        async move { store.append(&b).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.faults.fail_sync.store(true, Ordering::SeqCst);
    store.delivered(&a);
    assert!(matches!(pending.await.unwrap(), Err(SpoolError::Io(_))));
    close(store);
    let store = open(dir.path(), 1 << 20);
    assert_eq!(bodies(&store).await, ["c"], "A delivered once only");
}
