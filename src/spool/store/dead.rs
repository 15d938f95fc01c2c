//! The dead letters: requests the upstream refused for good, or past
//! `max_attempts`, kept as one file each until an operator resurrects or
//! forgets them (admin `/spool`).

use super::*;

impl Store {
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
}

pub(super) fn dead_letter(b: &Buried, file_bytes: u64) -> DeadLetter {
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
