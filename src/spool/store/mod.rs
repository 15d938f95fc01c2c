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

use record::valid_id;

impl Store {
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

mod dead;
mod files;
mod writer;

use files::*;
use writer::Writer;
