//! The writer thread: the one owner of the file being written. It appends
//! accepted requests, makes them durable (an fsync per request, or one per
//! group commit), and only then makes them visible to the replayer and
//! answers the waiting request.

use super::*;

/// The file the writer appends to.
pub(super) struct Active {
    pub(super) no: u64,
    pub(super) file: File,
    pub(super) key: FileKey,
    pub(super) len: u64,
    pub(super) unsynced: bool,
    /// Requests committed to it.
    pub(super) puts: usize,
}

/// A request written, waiting for its commit.
pub(super) struct Written {
    pub(super) id: Arc<str>,
    pub(super) created_ms: u64,
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) ack: oneshot::Sender<io::Result<()>>,
}

/// A `Done` record written and not yet synced.
pub(super) struct Marker {
    pub(super) id: String,
    pub(super) offset: u64,
    pub(super) len: u64,
}

pub(super) struct Writer {
    /// Held until the writer has written everything it was sent: one
    /// process per spool directory.
    pub(super) _lock: File,
    /// `Done` records written since the last sync.
    pub(super) unsynced_done: Vec<Marker>,
    #[cfg(test)]
    pub(super) faults: Arc<Faults>,
    pub(super) store: std::sync::Weak<Store>,
    pub(super) dir: PathBuf,
    pub(super) durability: Durability,
    pub(super) segment_bytes: u64,
    pub(super) active: Active,
}

/// The chunks a streamed body is copied into the log in.
pub(super) const STREAM_CHUNK: usize = 64 * 1024;

/// How long the writer leaves `Done` records unsynced while idle.
pub(super) const IDLE_SYNC: Duration = Duration::from_secs(1);

impl Writer {
    pub(super) fn run(mut self, jobs: mpsc::Receiver<Job>) {
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
    pub(super) fn write(&mut self, frame: &[u8]) -> io::Result<u64> {
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
    pub(super) fn write_streamed(
        &mut self,
        head: &StoredHead,
        path: &Path,
        len: u64,
    ) -> io::Result<u64> {
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
    pub(super) fn write_marker(&mut self, id: String, frame: &[u8]) -> bool {
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
    pub(super) fn commit(&mut self, batch: &mut Vec<Written>) {
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
    pub(super) fn sync_batch(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.faults.fail_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("injected sync failure"));
        }
        self.active.file.sync_data()
    }

    /// The batch is lost: its reservations are returned, its writers told,
    /// the file cut back to its last commit and a new segment started.
    pub(super) fn fail(
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

    pub(super) fn rotate(&mut self, store: &Store) {
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
