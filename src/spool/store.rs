//! The spool's storage: an append-only log of segment files with a CRC per
//! record, and a directory of dead letters (README "Store and forward").
//!
//! One writer thread owns the file being written: it appends accepted
//! requests, makes them durable (an fsync per request, or one per group
//! commit), and only then makes them visible to the replayer and answers the
//! waiting request. Delivered requests get a `Done` record; a segment is
//! deleted once it and every older one hold nothing left to deliver, so the
//! `Done` records that cancel an older segment's requests are never deleted
//! before it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::metrics::SpoolMetrics;
use super::record::{self, Buried, Entry, FileKey, Format, PutFrame, Stored, StoredHead};
use super::{Durability, SpoolSettings};

/// Why a request could not be spooled; it gets the refusal it would have had.
#[derive(Debug)]
pub enum SpoolError {
    /// `max_bytes` or `max_requests` reached.
    Full,
    /// Writing or syncing failed (disk full, I/O error).
    Io(io::Error),
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::Full => f.write_str("spool full"),
            SpoolError::Io(e) => write!(f, "spool write failed: {e}"),
        }
    }
}

impl std::error::Error for SpoolError {}

/// A spooled request waiting for delivery.
#[derive(Debug, Clone)]
struct Pending {
    id: Arc<str>,
    segment: u64,
    offset: u64,
    len: u32,
    created_ms: u64,
    attempts: u16,
}

/// Room on disk for a request being spooled ([`Store::reserve`]).
#[derive(Debug)]
pub struct Reservation<'a> {
    store: &'a Store,
    bytes: u64,
    /// Whether it holds a place among `max_requests`.
    request: bool,
}

impl Reservation<'_> {
    /// `more` bytes, as a body of unknown length turns out longer.
    pub fn grow(&mut self, more: u64) -> Result<(), SpoolError> {
        let mut state = self.store.lock();
        if state.bytes + more > self.store.max_bytes {
            return Err(SpoolError::Full);
        }
        state.bytes += more;
        self.bytes += more;
        Ok(())
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn release(&mut self, bytes: u64) {
        self.store.lock().bytes -= bytes;
        self.bytes -= bytes;
    }

    /// Taken over by the writer: nothing to give back.
    fn taken(&mut self) {
        self.bytes = 0;
        self.request = false;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 || self.request {
            let mut state = self.store.lock();
            state.bytes -= self.bytes;
            if self.request {
                state.requests -= 1;
            }
        }
    }
}

/// A request handed to the replayer: where it is, and how often it was tried.
#[derive(Debug, Clone)]
pub struct Next {
    seq: u64,
    segment: u64,
    offset: u64,
    len: u32,
    /// Deliveries tried before this one.
    pub attempts: u16,
    /// Its frame's length (what admission weighs is its body, a little less).
    pub bytes: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Segment {
    bytes: u64,
    /// Its requests not yet delivered nor buried.
    live: usize,
}

/// A dead letter, as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// The request's id.
    pub id: String,
    /// Its method.
    pub method: String,
    /// Its path and query.
    pub uri: String,
    /// Its body's length.
    pub body_bytes: usize,
    /// The upstream's last status.
    pub status: Option<u16>,
    /// The start of the upstream's last answer, or what went wrong.
    pub excerpt: String,
    /// Deliveries tried.
    pub attempts: u16,
    /// When it was accepted (Unix ms).
    pub created_ms: u64,
    /// When it was dead-lettered (Unix ms).
    pub buried_ms: u64,
    #[serde(skip)]
    file_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    pending: BTreeMap<u64, Pending>,
    /// Pending requests that may be delivered now, oldest first (neither
    /// being delivered nor waiting out a backoff of their own).
    ready: BTreeSet<u64>,
    /// Pending requests waiting out a backoff of their own, by when it ends:
    /// one request's refusals never hold up the others.
    delayed: BTreeSet<(Instant, u64)>,
    segments: BTreeMap<u64, Segment>,
    dead: BTreeMap<String, DeadLetter>,
    /// Segments, dead letters and writes reserved but not yet committed.
    bytes: u64,
    /// Pending requests and writes reserved.
    requests: usize,
    next_seq: u64,
    /// Damaged records skipped at recovery.
    damaged: u64,
}

/// What `GET /spool` shows of one spool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpoolSnapshot {
    /// Requests waiting for delivery.
    pub requests: usize,
    /// Bytes on disk (segments and dead letters).
    pub bytes: u64,
    /// `max_bytes`.
    pub max_bytes: u64,
    /// Age of the oldest waiting request, in seconds.
    pub oldest_age_s: f64,
    /// Requests in the dead-letter store.
    pub dead_letters: usize,
    /// Damaged records skipped when the spool was recovered.
    pub damaged_records: u64,
}

/// Where a PUT's body is.
enum PutBody {
    /// In memory, with the rest of the entry.
    Inline(Box<Entry>),
    /// Streamed to a temporary file, `len` bytes, ahead of its head: copied
    /// into the log in chunks, then deleted, and its reserved bytes given
    /// back.
    File {
        head: Box<StoredHead>,
        path: PathBuf,
        len: u64,
    },
}

enum Job {
    Put {
        body: PutBody,
        len: u64,
        id: Arc<str>,
        created_ms: u64,
        ack: oneshot::Sender<io::Result<()>>,
    },
    Done(String),
    /// Segments with nothing left to deliver, to delete.
    Delete(Vec<u64>),
}

/// One route's spool on disk.
pub struct Store {
    dir: PathBuf,
    max_bytes: u64,
    max_requests: usize,
    state: Mutex<State>,
    jobs: mpsc::Sender<Job>,
    /// The segment the writer appends to: never deleted.
    active: AtomicU64,
    /// Told when a request becomes deliverable.
    ready: Notify,
    ids: Ids,
    metrics: SpoolMetrics,
    /// A failing disk, on demand (tests).
    #[cfg(test)]
    pub(super) faults: Arc<Faults>,
}

/// Faults a test can switch on.
#[cfg(test)]
#[derive(Debug, Default)]
pub(super) struct Faults {
    /// The next sync of a batch fails (as fsync does on an I/O error).
    pub(super) fail_sync: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Unique, time-ordered ids: the process's start (µs) and a counter.
#[derive(Debug)]
struct Ids {
    epoch: u64,
    next: AtomicU64,
}

impl Ids {
    fn new() -> Self {
        Self {
            epoch: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:013x}{n:07x}", self.epoch)
    }
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A segment file's size before the writer starts the next one: small
/// enough that delivering frees space steadily, large enough that files stay
/// few.
fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 16).clamp(4 * 1024, 64 * 1024 * 1024)
}

fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:020}.seg"))
}

fn dead_dir(dir: &Path) -> PathBuf {
    dir.join("dead")
}

fn incoming_dir(dir: &Path) -> PathBuf {
    dir.join("incoming")
}

fn dead_path(dir: &Path, id: &str) -> PathBuf {
    dead_dir(dir).join(format!("{id}.dead"))
}

use record::valid_id;

impl Store {
    /// Opens (creating) the spool in `settings.dir` and recovers what is in
    /// it: every intact request waits for delivery again, damaged records
    /// are skipped, logged and counted.
    pub fn open(settings: &SpoolSettings, metrics: SpoolMetrics) -> io::Result<Arc<Self>> {
        let dir = settings.dir.clone();
        let context = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("spool {}: {what}: {e}", dir.display()))
        };
        private_dir(&dir).map_err(|e| context("cannot use", e))?;
        private_dir(&dead_dir(&dir)).map_err(|e| context("cannot create", e))?;
        // Bodies being streamed when the process stopped were never
        // acknowledged: their requests got their refusal, or nothing.
        let _ = std::fs::remove_dir_all(incoming_dir(&dir));
        private_dir(&incoming_dir(&dir)).map_err(|e| context("cannot create", e))?;
        let lock = private_file()
            .write(true)
            .truncate(false)
            .open(dir.join("LOCK"))
            .map_err(|e| context("cannot create LOCK", e))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("spool {}: in use by another process", dir.display()),
            )
        })?;
        let mut state = State::default();
        let last = recover_segments(&dir, &mut state).map_err(|e| context("cannot read", e))?;
        recover_dead(&dir, &mut state).map_err(|e| context("cannot read dead letters", e))?;
        if state.damaged > 0 {
            tracing::error!(
                dir = %dir.display(),
                damaged = state.damaged,
                "spool: damaged records skipped at recovery (torn writes or corrupted files)"
            );
            metrics.damaged.increment(state.damaged);
        }
        let active = last + 1;
        let (file, key) =
            open_segment(&dir, active).map_err(|e| context("cannot create a segment", e))?;
        state.segments.insert(active, Segment::default());
        let recovered = state.pending.len();
        let (tx, rx) = mpsc::channel();
        let store = Arc::new(Self {
            dir,
            max_bytes: settings.max_bytes,
            max_requests: settings.max_requests,
            state: Mutex::new(state),
            jobs: tx,
            active: AtomicU64::new(active),
            ready: Notify::new(),
            ids: Ids::new(),
            metrics,
            #[cfg(test)]
            faults: Arc::default(),
        });
        let delivered = store.prune(&mut store.lock());
        delete_segments(&store.dir, &delivered);
        if recovered > 0 {
            tracing::info!(dir = %store.dir.display(), requests = recovered, "spool recovered");
        }
        store.refresh();
        let writer = Writer {
            _lock: lock,
            unsynced_done: Vec::new(),
            #[cfg(test)]
            faults: store.faults.clone(),
            store: Arc::downgrade(&store),
            dir: store.dir.clone(),
            durability: settings.durability,
            segment_bytes: segment_bytes(settings.max_bytes),
            active: Active {
                no: active,
                file,
                key,
                len: 0,
                unsynced: false,
                puts: 0,
            },
        };
        std::thread::Builder::new()
            .name("sluicegate-spool".into())
            .spawn(move || writer.run(rx))?;
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, job: Job) {
        // The writer lives as long as the store; a send fails only while the
        // process exits.
        let _ = self.jobs.send(job);
    }

    /// A new id (and idempotency key).
    pub fn new_id(&self) -> String {
        self.ids.next()
    }

    /// Room for one request of `bytes` on disk (`max_bytes`,
    /// `max_requests`), taken before its body is read; given back when
    /// dropped unless a write takes it.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation<'_>, SpoolError> {
        let mut state = self.lock();
        if state.bytes + bytes > self.max_bytes || state.requests >= self.max_requests {
            return Err(SpoolError::Full);
        }
        state.bytes += bytes;
        state.requests += 1;
        Ok(Reservation {
            store: self,
            bytes,
            request: true,
        })
    }

    /// Whether there is room for one more request of `bytes` now (nothing
    /// reserved).
    pub fn has_room(&self, bytes: u64) -> bool {
        let state = self.lock();
        state.bytes + bytes <= self.max_bytes && state.requests < self.max_requests
    }

    /// Where a body being spooled is streamed to before it joins the log.
    pub fn incoming(&self, id: &str) -> io::Result<PathBuf> {
        if !valid_id(id) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a spool id"));
        }
        Ok(incoming_dir(&self.dir).join(format!("{id}.part")))
    }

    /// Writes `request` and resolves once it is durable and deliverable.
    pub async fn append(&self, request: &Stored) -> Result<(), SpoolError> {
        let len = Entry::Put(request.clone())
            .frame_len()
            .map_err(SpoolError::Io)?;
        let reservation = self.reserve(len)?;
        self.append_reserved(request.clone(), reservation).await
    }

    /// Writes `request`, whose room `reservation` holds.
    pub async fn append_reserved(
        &self,
        request: Stored,
        reservation: Reservation<'_>,
    ) -> Result<(), SpoolError> {
        let entry = Box::new(Entry::Put(request));
        let len = entry.frame_len().map_err(SpoolError::Io)?;
        let Entry::Put(request) = &*entry else {
            unreachable!("a PUT")
        };
        let (id, created_ms) = (request.id.as_str().into(), request.created_ms);
        self.put(PutBody::Inline(entry), len, id, created_ms, reservation)
            .await
    }

    /// Writes the request `head` whose `len`-byte body was streamed to
    /// `path` ([`Store::incoming`]); `reservation` holds its room and the
    /// temporary file's.
    pub async fn append_file(
        &self,
        head: StoredHead,
        path: PathBuf,
        len: u64,
        reservation: Reservation<'_>,
    ) -> Result<(), SpoolError> {
        let frame = head.frame_len(len).map_err(SpoolError::Io)?;
        let (id, created_ms) = (head.id.as_str().into(), head.created_ms);
        let body = PutBody::File {
            head: Box::new(head),
            path,
            len,
        };
        self.put(body, frame, id, created_ms, reservation).await
    }

    async fn put(
        &self,
        body: PutBody,
        len: u64,
        id: Arc<str>,
        created_ms: u64,
        mut reservation: Reservation<'_>,
    ) -> Result<(), SpoolError> {
        // The reservation must cover the frame (and a temporary file); the
        // writer takes it over from here.
        let temp = match &body {
            PutBody::File { len, .. } => *len,
            PutBody::Inline(_) => 0,
        };
        if reservation.bytes < len + temp {
            reservation.grow(len + temp - reservation.bytes)?;
        }
        reservation.release(reservation.bytes - len - temp);
        reservation.taken();
        let (ack, done) = oneshot::channel();
        self.send(Job::Put {
            body,
            len,
            id,
            created_ms,
            ack,
        });
        let result = match done.await {
            Ok(result) => result,
            Err(_) => Err(io::Error::other("the spool writer stopped")),
        };
        result.map_err(SpoolError::Io)
    }

    /// The oldest request that may be delivered now (none being delivered,
    /// none waiting out its backoff), marked as being delivered.
    pub fn next(&self) -> Option<Next> {
        let mut state = self.lock();
        let now = Instant::now();
        while let Some(&(at, seq)) = state.delayed.first()
            && at <= now
        {
            state.delayed.pop_first();
            state.ready.insert(seq);
        }
        let seq = state.ready.pop_first()?;
        let p = state.pending.get(&seq)?;
        Some(Next {
            seq,
            segment: p.segment,
            offset: p.offset,
            len: p.len,
            attempts: p.attempts,
            bytes: u64::from(p.len),
        })
    }

    /// Resolves when a request may have become deliverable: one was
    /// written or handed back, or a backoff ended.
    pub async fn ready(&self) {
        let due = self.lock().delayed.first().map(|(at, _)| *at);
        match due {
            Some(at) => {
                tokio::select! {
                    () = self.ready.notified() => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => self.ready.notified().await,
        }
    }

    /// Reads `next` back from its segment.
    pub async fn read(&self, next: &Next) -> io::Result<Stored> {
        let path = segment_path(&self.dir, next.segment);
        let (offset, len) = (next.offset, next.len as usize);
        let entry = tokio::task::spawn_blocking(move || -> io::Result<Entry> {
            let file = File::open(&path)?;
            let mut start = [0; record::FILE_HEADER];
            let n = file.read_at(&mut start, 0)?;
            let format = Format::of(&start[..n])
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "segment damaged"))?;
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, offset)?;
            format
                .frame_at(&buf)
                .map(|(_, entry)| entry)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "record damaged"))
        })
        .await
        .map_err(io::Error::other)??;
        match entry {
            Entry::Put(stored) => Ok(stored),
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "not a request")),
        }
    }

    /// `next` was delivered: gone from the spool.
    pub fn delivered(&self, next: &Next) {
        self.remove(next.seq);
    }

    /// `next` failed and will be tried again (counted as an attempt when
    /// `attempted`, not when the proxy held it back itself), not before
    /// `after` when given (a backoff of its own).
    pub fn retry(&self, next: &Next, attempted: bool, after: Option<Instant>) {
        let mut state = self.lock();
        let Some(p) = state.pending.get_mut(&next.seq) else {
            return;
        };
        if attempted {
            p.attempts = p.attempts.saturating_add(1);
        }
        match after {
            Some(at) if at > Instant::now() => {
                state.delayed.insert((at, next.seq));
            }
            _ => {
                state.ready.insert(next.seq);
            }
        }
        drop(state);
        self.ready.notify_one();
    }

    fn remove(&self, seq: u64) {
        let mut state = self.lock();
        let Some(p) = state.pending.remove(&seq) else {
            return;
        };
        state.ready.remove(&seq);
        state.requests -= 1;
        if let Some(seg) = state.segments.get_mut(&p.segment) {
            seg.live -= 1;
        }
        let delivered = self.prune(&mut state);
        drop(state);
        self.send(Job::Done(p.id.to_string()));
        if !delivered.is_empty() {
            // Deleted by the writer thread, not on the request's worker.
            self.send(Job::Delete(delivered));
        }
        self.refresh();
    }

    /// Forgets the oldest segments while they hold nothing to deliver, and
    /// returns them for deleting ([`delete_segments`]).
    fn prune(&self, state: &mut State) -> Vec<u64> {
        let active = self.active.load(Ordering::SeqCst);
        let mut delivered = Vec::new();
        while let Some((&no, seg)) = state.segments.first_key_value() {
            if no == active || seg.live > 0 {
                break;
            }
            state.bytes -= seg.bytes;
            state.segments.remove(&no);
            delivered.push(no);
        }
        delivered
    }

    /// Moves `next` (read as `request`) to the dead-letter store.
    pub async fn bury(&self, next: &Next, buried: Buried) -> io::Result<()> {
        // Ids become file names: only the spool's own (hex) ever do.
        if !valid_id(&buried.request.id) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a spool id"));
        }
        let path = dead_path(&self.dir, &buried.request.id);
        let frame = record::encode_file(&Entry::Dead(buried.clone()))?;
        let file_bytes = frame.len() as u64;
        tokio::task::spawn_blocking(move || write_durably(&path, &frame))
            .await
            .map_err(io::Error::other)??;
        let letter = dead_letter(&buried, file_bytes);
        {
            let mut state = self.lock();
            state.bytes += file_bytes;
            state.dead.insert(letter.id.clone(), letter);
        }
        self.metrics.dead_lettered.increment(1);
        self.remove(next.seq);
        Ok(())
    }

    /// Dead letters after `after` (by id, oldest first), at most `limit`.
    pub fn dead_letters(&self, after: Option<&str>, limit: usize) -> Vec<DeadLetter> {
        let state = self.lock();
        let from = match after {
            Some(id) => std::ops::Bound::Excluded(id.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        state
            .dead
            .range((from, std::ops::Bound::Unbounded))
            .take(limit)
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// Whether dead letter `id` is here.
    pub fn has_dead(&self, id: &str) -> bool {
        self.lock().dead.contains_key(id)
    }

    /// Sends dead letter `id` back to be delivered: `Ok(false)` when there
    /// is none.
    pub async fn resurrect(&self, id: &str) -> Result<bool, SpoolError> {
        if !valid_id(id) || !self.lock().dead.contains_key(id) {
            return Ok(false);
        }
        let path = dead_path(&self.dir, id);
        let read = path.clone();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(read))
            .await
            .map_err(|e| SpoolError::Io(io::Error::other(e)))?
            .map_err(SpoolError::Io)?;
        let Some(Entry::Dead(buried)) = record::read_file(&bytes) else {
            return Err(SpoolError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "dead letter damaged",
            )));
        };
        self.append(&buried.request).await?;
        self.forget(id).await.map_err(SpoolError::Io)?;
        Ok(true)
    }

    /// Deletes dead letter `id`: `Ok(false)` when there is none.
    pub async fn forget(&self, id: &str) -> io::Result<bool> {
        if !valid_id(id) {
            return Ok(false);
        }
        let Some(letter) = self.lock().dead.remove(id) else {
            return Ok(false);
        };
        let path = dead_path(&self.dir, id);
        tokio::task::spawn_blocking(move || std::fs::remove_file(path))
            .await
            .map_err(io::Error::other)??;
        self.lock().bytes -= letter.file_bytes;
        self.refresh();
        Ok(true)
    }

    /// The spool's counts.
    pub fn snapshot(&self) -> SpoolSnapshot {
        let state = self.lock();
        let oldest = state.pending.values().next().map(|p| p.created_ms);
        SpoolSnapshot {
            requests: state.pending.len(),
            bytes: state.bytes,
            max_bytes: self.max_bytes,
            oldest_age_s: oldest.map_or(0.0, |t| now_ms().saturating_sub(t) as f64 / 1000.0),
            dead_letters: state.dead.len(),
            damaged_records: state.damaged,
        }
    }

    /// Sets the gauges from the state.
    pub fn refresh(&self) {
        let snapshot = self.snapshot();
        self.metrics.requests.set(snapshot.requests as f64);
        self.metrics.bytes.set(snapshot.bytes as f64);
        self.metrics.oldest_age.set(snapshot.oldest_age_s);
        self.metrics.dead_letters.set(snapshot.dead_letters as f64);
        self.metrics.max_bytes.set(snapshot.max_bytes as f64);
    }

    /// The spool's metrics.
    pub fn metrics(&self) -> &SpoolMetrics {
        &self.metrics
    }
}

fn dead_letter(b: &Buried, file_bytes: u64) -> DeadLetter {
    DeadLetter {
        id: b.request.id.clone(),
        method: b.request.method.to_string(),
        uri: b.request.uri.clone(),
        body_bytes: b.request.body.len(),
        status: b.status,
        excerpt: b.excerpt.clone(),
        attempts: b.attempts,
        created_ms: b.request.created_ms,
        buried_ms: b.buried_ms,
        file_bytes,
    }
}

/// A spool holds requests as they came, credentials included (an
/// `Authorization` header, a token in a body): its folders are its owner's
/// alone (0700), whatever the umask, and a folder that already lets others
/// in is refused rather than used. A folder sluicegate creates is private
/// from the start, so pointing `dir` below a shared mount works.
fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} lets other users in (mode {mode:03o}) and spooled requests keep their \
                 credentials: `chmod 700` it, or name a folder that does not exist yet",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Options creating a file only its owner can read (0600).
fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.create(true).mode(0o600);
    options
}

/// Writes `bytes` to `path` so that it is whole or absent after a crash.
fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = private_file().write(true).truncate(true).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn delete_segments(dir: &Path, numbers: &[u64]) {
    for &no in numbers {
        if let Err(e) = std::fs::remove_file(segment_path(dir, no)) {
            tracing::warn!(error = %e, segment = no, "spool: cannot delete a delivered segment");
        }
    }
}

fn open_segment(dir: &Path, no: u64) -> io::Result<(File, FileKey)> {
    let key = FileKey::generate()?;
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(segment_path(dir, no))?;
    // The new name must survive a crash too.
    File::open(dir)?.sync_all()?;
    Ok((file, key))
}

/// Reads every segment into `state`; returns the newest segment's number.
fn recover_segments(dir: &Path, state: &mut State) -> io::Result<u64> {
    let mut numbers: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    numbers.sort_unstable();
    let mut by_id: HashMap<String, u64> = HashMap::new();
    for &no in &numbers {
        let buf = std::fs::read(segment_path(dir, no))?;
        let scan = record::scan(&buf);
        state.damaged += scan.damaged;
        state.bytes += buf.len() as u64;
        state.segments.insert(
            no,
            Segment {
                bytes: buf.len() as u64,
                live: 0,
            },
        );
        for found in scan.found {
            match found.entry {
                Entry::Put(stored) => {
                    let seq = state.next_seq;
                    state.next_seq += 1;
                    if let Some(old) = by_id.insert(stored.id.clone(), seq) {
                        // The same request spooled twice (a dead letter sent
                        // back): delivered once.
                        forget_pending(state, old);
                    }
                    state.pending.insert(
                        seq,
                        Pending {
                            id: stored.head.id.into(),
                            segment: no,
                            offset: found.offset,
                            len: found.len,
                            created_ms: stored.head.created_ms,
                            attempts: 0,
                        },
                    );
                    state.ready.insert(seq);
                    if let Some(seg) = state.segments.get_mut(&no) {
                        seg.live += 1;
                    }
                }
                Entry::Done(id) => {
                    if let Some(seq) = by_id.remove(&id) {
                        forget_pending(state, seq);
                    }
                }
                Entry::Dead(_) => state.damaged += 1,
            }
        }
    }
    state.requests = state.pending.len();
    Ok(numbers.last().copied().unwrap_or(0))
}

fn forget_pending(state: &mut State, seq: u64) {
    state.ready.remove(&seq);
    if let Some(p) = state.pending.remove(&seq)
        && let Some(seg) = state.segments.get_mut(&p.segment)
    {
        seg.live -= 1;
    }
}

fn recover_dead(dir: &Path, state: &mut State) -> io::Result<()> {
    for entry in std::fs::read_dir(dead_dir(dir))? {
        let path = entry?.path();
        match path.extension().and_then(|e| e.to_str()) {
            // Never renamed into place: never acknowledged as buried (the
            // request is still in the log).
            Some("tmp") => {
                let _ = std::fs::remove_file(&path);
            }
            Some("dead") => {
                let bytes = std::fs::read(&path)?;
                state.bytes += bytes.len() as u64;
                match record::read_file(&bytes) {
                    Some(Entry::Dead(buried)) => {
                        let letter = dead_letter(&buried, bytes.len() as u64);
                        state.dead.insert(letter.id.clone(), letter);
                    }
                    _ => {
                        tracing::error!(file = %path.display(), "spool: damaged dead letter kept");
                        state.damaged += 1;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The file the writer appends to.
struct Active {
    no: u64,
    file: File,
    key: FileKey,
    len: u64,
    unsynced: bool,
    /// Requests committed to it.
    puts: usize,
}

/// A request written, waiting for its commit.
struct Written {
    id: Arc<str>,
    created_ms: u64,
    offset: u64,
    len: u32,
    ack: oneshot::Sender<io::Result<()>>,
}

/// A `Done` record written and not yet synced.
struct Marker {
    id: String,
    offset: u64,
    len: u64,
}

struct Writer {
    /// Held until the writer has written everything it was sent: one
    /// process per spool directory.
    _lock: File,
    /// `Done` records written since the last sync.
    unsynced_done: Vec<Marker>,
    #[cfg(test)]
    faults: Arc<Faults>,
    store: std::sync::Weak<Store>,
    dir: PathBuf,
    durability: Durability,
    segment_bytes: u64,
    active: Active,
}

/// The chunks a streamed body is copied into the log in.
const STREAM_CHUNK: usize = 64 * 1024;

/// How long the writer leaves `Done` records unsynced while idle.
const IDLE_SYNC: Duration = Duration::from_secs(1);

impl Writer {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let mut batch: Vec<Written> = Vec::new();
        // The commit deadline of the batch being gathered. The writer thread
        // is not on tokio's clock.
        #[allow(clippy::disallowed_types)]
        let mut deadline: Option<std::time::Instant> = None;
        loop {
            #[allow(clippy::disallowed_types)]
            let wait = deadline.map_or(IDLE_SYNC, |d| {
                d.saturating_duration_since(std::time::Instant::now())
            });
            match jobs.recv_timeout(wait) {
                Ok(Job::Done(id)) => {
                    let drained = match Entry::Done(id.clone()).encode(&self.active.key) {
                        Ok(frame) => self.write_marker(id, &frame),
                        Err(e) => {
                            tracing::warn!(error = %e, "spool: cannot record a delivery");
                            false
                        }
                    };
                    // Nothing left in the file to deliver: a new segment, so
                    // that this one can go.
                    if drained
                        && self.active.puts > 0
                        && batch.is_empty()
                        && let Some(store) = self.store.upgrade()
                    {
                        self.rotate(&store);
                    }
                }
                Ok(Job::Delete(numbers)) => delete_segments(&self.dir, &numbers),
                Ok(Job::Put {
                    body,
                    len: reserved,
                    id,
                    created_ms,
                    ack,
                }) => {
                    let len = reserved as u32;
                    let written = match body {
                        PutBody::Inline(entry) => entry
                            .encode(&self.active.key)
                            .and_then(|frame| self.write(&frame)),
                        PutBody::File { head, path, len } => {
                            let written = self.write_streamed(&head, &path, len);
                            // Copied (or failed): the temporary file and
                            // its room go.
                            let _ = std::fs::remove_file(&path);
                            if let Some(store) = self.store.upgrade() {
                                store.lock().bytes -= len;
                            }
                            written
                        }
                    };
                    let offset = match written {
                        Ok(offset) => offset,
                        Err(e) => {
                            self.fail(std::mem::take(&mut batch), Some((reserved, ack)), e);
                            deadline = None;
                            continue;
                        }
                    };
                    batch.push(Written {
                        id,
                        created_ms,
                        offset,
                        len,
                        ack,
                    });
                    match self.durability {
                        Durability::Always => self.commit(&mut batch),
                        #[allow(clippy::disallowed_types)]
                        Durability::Batch(interval) => {
                            deadline.get_or_insert_with(|| std::time::Instant::now() + interval);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if batch.is_empty() {
                        if self.active.unsynced && self.active.file.sync_data().is_ok() {
                            self.active.unsynced = false;
                            self.unsynced_done.clear();
                        }
                    } else {
                        self.commit(&mut batch);
                    }
                    deadline = None;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if !batch.is_empty() {
                        self.commit(&mut batch);
                    }
                    let _ = self.active.file.sync_data();
                    return;
                }
            }
        }
    }

    /// Appends `frame`, and returns where it starts. A new segment's
    /// header goes with its first record: an empty file takes no space, so
    /// a full disk never keeps the spool from opening.
    fn write(&mut self, frame: &[u8]) -> io::Result<u64> {
        let written = (|| {
            if self.active.len == 0 {
                self.active.file.write_all(&self.active.key.header())?;
                self.active.len = record::FILE_HEADER as u64;
            }
            self.active.file.write_all(frame)
        })();
        if let Err(e) = written {
            // A torn frame must not stay in front of the next one: recovery
            // trusts an intact header's length.
            let _ = self.active.file.set_len(self.active.len);
            return Err(e);
        }
        let offset = self.active.len;
        self.active.len += frame.len() as u64;
        self.active.unsynced = true;
        Ok(offset)
    }

    /// Appends a PUT of `head` whose `len`-byte body is in the file at
    /// `path`, in chunks (never whole in memory); returns where it starts.
    fn write_streamed(&mut self, head: &StoredHead, path: &Path, len: u64) -> io::Result<u64> {
        let (prefix, mut frame) = PutFrame::begin(&self.active.key, head, len)?;
        let mut body = File::open(path)?;
        let start = self.active.len;
        let written = (|| {
            if self.active.len == 0 {
                self.active.file.write_all(&self.active.key.header())?;
                self.active.len = record::FILE_HEADER as u64;
            }
            self.active.file.write_all(&prefix)?;
            let mut chunk = vec![0; STREAM_CHUNK];
            loop {
                let n = io::Read::read(&mut body, &mut chunk)?;
                if n == 0 {
                    break;
                }
                frame.update(&chunk[..n]);
                self.active.file.write_all(&chunk[..n])?;
            }
            self.active.file.write_all(&frame.finish()?)
        })();
        if let Err(e) = written {
            // Cut back: a torn frame must not stay in front of the next.
            let keep = if start == 0 { 0 } else { self.active.len };
            let _ = self.active.file.set_len(keep);
            self.active.len = keep;
            return Err(e);
        }
        let offset = self.active.len;
        self.active.len += (prefix.len() as u64) + len + record::FRAME_TRAILER as u64;
        self.active.unsynced = true;
        Ok(offset)
    }

    /// A `Done` record: synced with the next commit (a killed process loses
    /// nothing the kernel has; a lost one only means a duplicate delivery).
    /// Returns whether the active segment has nothing left to deliver.
    fn write_marker(&mut self, id: String, frame: &[u8]) -> bool {
        match self.write(frame) {
            Ok(offset) => {
                // Kept until synced: a failed sync cuts the file back and
                // they are written again (a lost one would deliver twice).
                self.unsynced_done.push(Marker {
                    id,
                    offset,
                    len: frame.len() as u64,
                });
                // Gone: the process is stopping; the record is written all
                // the same.
                let Some(store) = self.store.upgrade() else {
                    return false;
                };
                let mut state = store.lock();
                state.bytes += frame.len() as u64;
                state.segments.get_mut(&self.active.no).is_some_and(|seg| {
                    seg.bytes += frame.len() as u64;
                    seg.live == 0
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "spool: cannot record a delivery");
                false
            }
        }
    }

    /// Syncs the batch and makes it deliverable, then answers it.
    fn commit(&mut self, batch: &mut Vec<Written>) {
        let written = std::mem::take(batch);
        if let Err(e) = self.sync_batch() {
            self.fail(written, None, e);
            return;
        }
        self.active.unsynced = false;
        self.unsynced_done.clear();
        let Some(store) = self.store.upgrade() else {
            return;
        };
        {
            let mut state = store.lock();
            for w in &written {
                let seq = state.next_seq;
                state.next_seq += 1;
                state.pending.insert(
                    seq,
                    Pending {
                        id: w.id.clone(),
                        segment: self.active.no,
                        offset: w.offset,
                        len: w.len,
                        created_ms: w.created_ms,
                        attempts: 0,
                    },
                );
                state.ready.insert(seq);
                let seg = state.segments.entry(self.active.no).or_default();
                seg.live += 1;
                seg.bytes += u64::from(w.len);
            }
        }
        self.active.puts += written.len();
        store.metrics.spooled.increment(written.len() as u64);
        for w in written {
            let _ = w.ack.send(Ok(()));
        }
        store.ready.notify_one();
        if self.active.len >= self.segment_bytes {
            self.rotate(&store);
        }
        store.refresh();
    }

    /// Syncs the active segment for a commit.
    fn sync_batch(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.faults.fail_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("injected sync failure"));
        }
        self.active.file.sync_data()
    }

    /// The batch is lost: its reservations are returned, its writers told,
    /// the file cut back to its last commit and a new segment started.
    fn fail(
        &mut self,
        written: Vec<Written>,
        unwritten: Option<(u64, oneshot::Sender<io::Result<()>>)>,
        error: io::Error,
    ) {
        tracing::error!(error = %error, "spool: write failed; those requests get their refusal");
        let committed = written.first().map_or(self.active.len, |w| w.offset);
        let _ = self.active.file.set_len(committed);
        self.active.len = committed;
        let Some(store) = self.store.upgrade() else {
            return;
        };
        // `Done` records past the cut are gone with it; all unsynced ones
        // are written again in the next segment, or their requests would be
        // delivered a second time after a restart.
        let markers = std::mem::take(&mut self.unsynced_done);
        let cut: u64 = markers
            .iter()
            .filter(|m| m.offset >= committed)
            .map(|m| m.len)
            .sum();
        let lost = written.iter().map(|w| u64::from(w.len)).sum::<u64>()
            + unwritten.as_ref().map_or(0, |(len, _)| *len);
        let acks: Vec<_> = written
            .into_iter()
            .map(|w| w.ack)
            .chain(unwritten.map(|(_, ack)| ack))
            .collect();
        {
            let mut state = store.lock();
            state.bytes -= lost + cut;
            state.requests -= acks.len();
            if let Some(seg) = state.segments.get_mut(&self.active.no) {
                seg.bytes -= cut;
            }
        }
        for ack in acks {
            let _ = ack.send(Err(io::Error::new(error.kind(), error.to_string())));
        }
        self.rotate(&store);
        for marker in markers {
            if let Ok(frame) = Entry::Done(marker.id.clone()).encode(&self.active.key) {
                self.write_marker(marker.id, &frame);
            }
        }
    }

    fn rotate(&mut self, store: &Store) {
        let no = self.active.no + 1;
        match open_segment(&self.dir, no) {
            Ok((file, key)) => {
                let _ = self.active.file.sync_data();
                self.active = Active {
                    no,
                    file,
                    key,
                    len: 0,
                    unsynced: false,
                    puts: 0,
                };
                let delivered = {
                    let mut state = store.lock();
                    state.segments.insert(no, Segment::default());
                    store.active.store(no, Ordering::SeqCst);
                    store.prune(&mut state)
                };
                delete_segments(&self.dir, &delivered);
            }
            Err(e) => tracing::warn!(error = %e, "spool: cannot start a new segment"),
        }
    }
}
