//! The spool's files: where they are, how they are made private and
//! durable, and how a spool opened after a stop or a crash recovers what
//! they hold.

use super::dead::dead_letter;
use super::writer::Active;
use super::*;

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
}

/// A segment file's size before the writer starts the next one: small
/// enough that delivering frees space steadily, large enough that files stay
/// few.
pub(super) fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 16).clamp(4 * 1024, 64 * 1024 * 1024)
}

pub(super) fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:020}.seg"))
}

pub(super) fn dead_dir(dir: &Path) -> PathBuf {
    dir.join("dead")
}

pub(super) fn incoming_dir(dir: &Path) -> PathBuf {
    dir.join("incoming")
}

pub(super) fn dead_path(dir: &Path, id: &str) -> PathBuf {
    dead_dir(dir).join(format!("{id}.dead"))
}

/// A spool holds requests as they came, credentials included (an
/// `Authorization` header, a token in a body): its folders are its owner's
/// alone (0700), whatever the umask, and a folder that already lets others
/// in is refused rather than used. A folder sluicegate creates is private
/// from the start, so pointing `dir` below a shared mount works.
pub(super) fn private_dir(dir: &Path) -> io::Result<()> {
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
pub(super) fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.create(true).mode(0o600);
    options
}

/// Writes `bytes` to `path` so that it is whole or absent after a crash.
pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
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

pub(super) fn delete_segments(dir: &Path, numbers: &[u64]) {
    for &no in numbers {
        if let Err(e) = std::fs::remove_file(segment_path(dir, no)) {
            tracing::warn!(error = %e, segment = no, "spool: cannot delete a delivered segment");
        }
    }
}

pub(super) fn open_segment(dir: &Path, no: u64) -> io::Result<(File, FileKey)> {
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
pub(super) fn recover_segments(dir: &Path, state: &mut State) -> io::Result<u64> {
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

pub(super) fn forget_pending(state: &mut State, seq: u64) {
    state.ready.remove(&seq);
    if let Some(p) = state.pending.remove(&seq)
        && let Some(seg) = state.segments.get_mut(&p.segment)
    {
        seg.live -= 1;
    }
}

pub(super) fn recover_dead(dir: &Path, state: &mut State) -> io::Result<()> {
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
