//! Taking a refused request's body into the spool without ever holding it
//! whole in memory.
//!
//! A body whose declared length the spool has no room for is refused at
//! once, before a byte of it is read; room is then reserved as the bytes
//! arrive, so a client that declares a large body and sends nothing holds
//! nothing (silent uploads cannot fill `max_bytes` and shut spooling off). A body up to
//! [`INLINE`] bytes is kept in memory until it is written; a larger one is
//! streamed to a temporary file in the spool's `incoming/` directory in
//! chunks of about that size, and the writer copies it into the log the same
//! way. At most [`AT_ONCE`] requests hold body bytes in a spool's memory at
//! once (a place is taken with the first bytes, not before), so whatever the
//! clients do, the bodies being spooled hold at most `AT_ONCE × (INLINE + a
//! chunk)` bytes of memory per spool (32 MiB).

use std::io::Write;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

use super::Spool;
use super::record::{Stored, StoredHead};
use super::store::{Reservation, SpoolError, Store};
use crate::body::BoxError;

/// Bodies up to this many bytes stay in memory until written; larger ones
/// are streamed to disk in chunks of about this size.
pub(super) const INLINE: usize = 64 * 1024;

/// Requests taken into one spool at once. Each holds at most [`INLINE`]
/// bytes and one body chunk (64 KiB at most: the listener's read buffer, or
/// an HTTP/2 frame) in memory.
pub(super) const AT_ONCE: usize = 256;

/// Why a request was not spooled.
#[derive(Debug)]
pub(super) enum NotTaken {
    /// The client's body failed (over its limit, stalled, cut short,
    /// malformed): the client's own answer, as without a spool.
    Client(BoxError),
    /// Heavier than the route could ever admit (`max_inflight_bytes`).
    Undeliverable,
    /// The spool cannot keep it (full, a write failed): the refusal stands.
    CannotKeep(SpoolError),
    /// [`AT_ONCE`] requests are being taken in already: the refusal stands.
    Busy,
}

impl From<SpoolError> for NotTaken {
    fn from(e: SpoolError) -> Self {
        NotTaken::CannotKeep(e)
    }
}

impl From<std::io::Error> for NotTaken {
    fn from(e: std::io::Error) -> Self {
        NotTaken::CannotKeep(SpoolError::Io(e))
    }
}

/// Reads `body` into `spool` as the request `head`, and resolves once it is
/// durable. `deliverable`: the heaviest body the route could ever admit.
pub(super) async fn take_in<B>(
    spool: &Spool,
    head: StoredHead,
    body: B,
    deliverable: Option<u64>,
) -> Result<(), NotTaken>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = body.size_hint().exact();
    if deliverable.is_some_and(|max| declared.is_some_and(|len| len > max)) {
        return Err(NotTaken::Undeliverable);
    }
    let store = spool.store();
    if let Some(len) = declared
        && !store.has_room(need(&head, len)?)
    {
        return Err(SpoolError::Full.into());
    }
    let mut reservation = store.reserve(need(&head, 0)?)?;
    let mut taking = None;
    let mut body = std::pin::pin!(body);
    let mut pending = BytesMut::new();
    let mut total = 0u64;
    let mut incoming: Option<Incoming> = None;
    loop {
        // Converted at once: the client's error type need not be Send.
        let frame = match body.frame().await {
            None => break,
            Some(frame) => frame.map_err(|e| NotTaken::Client(e.into()))?,
        };
        let Ok(data) = frame.into_data() else {
            // Trailers: a spooled request has none.
            continue;
        };
        if taking.is_none() {
            // A place among those holding bytes in memory, with the first.
            taking = Some(spool.taking().try_acquire().map_err(|_| NotTaken::Busy)?);
        }
        total += data.len() as u64;
        if deliverable.is_some_and(|max| total > max) {
            return Err(NotTaken::Undeliverable);
        }
        cover(&mut reservation, &head, total)?;
        pending.extend_from_slice(&data);
        if pending.len() > INLINE || incoming.is_some() {
            let file = match &mut incoming {
                Some(file) => file,
                None => incoming.insert(Incoming::create(store, &head.id).await?),
            };
            if pending.len() >= INLINE {
                file.write(pending.split().freeze()).await?;
            }
        }
    }
    match incoming {
        None => {
            let stored = Stored::from_parts(head, pending.freeze());
            store.append_reserved(stored, reservation).await?;
        }
        Some(mut file) => {
            if !pending.is_empty() {
                file.write(pending.split().freeze()).await?;
            }
            let path = file.close().await?;
            let appended = store
                .append_file(head, path.clone(), total, reservation)
                .await;
            if appended.is_err() {
                // Not taken by the writer (which removes it once copied).
                let _ = std::fs::remove_file(&path);
            }
            appended?;
        }
    }
    Ok(())
}

/// A body's room on disk: its frame, and while it streams, its temporary
/// file too.
fn need(head: &StoredHead, body: u64) -> std::io::Result<u64> {
    let temp = if body > INLINE as u64 { body } else { 0 };
    Ok(head.frame_len(body)? + temp)
}

/// Grows `reservation` to cover a body of `total` bytes so far.
fn cover(reservation: &mut Reservation<'_>, head: &StoredHead, total: u64) -> Result<(), NotTaken> {
    let need = need(head, total)?;
    if need > reservation.bytes() {
        reservation.grow(need - reservation.bytes())?;
    }
    Ok(())
}

/// A body streamed to its temporary file; the file is removed when this is
/// dropped before the writer has taken it (a refusal, a client gone).
struct Incoming {
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl Incoming {
    async fn create(store: &Store, id: &str) -> std::io::Result<Self> {
        let path = store.incoming(id)?;
        let open = path.clone();
        let file = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(open)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Self {
            file: Some(file),
            path,
        })
    }

    async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        let Some(mut file) = self.file.take() else {
            return Err(std::io::Error::other("spool file closed"));
        };
        let file = tokio::task::spawn_blocking(move || file.write_all(&chunk).map(|()| file))
            .await
            .map_err(std::io::Error::other)??;
        self.file = Some(file);
        Ok(())
    }

    /// The file, whole, for the writer to copy (it removes it then).
    async fn close(mut self) -> std::io::Result<PathBuf> {
        if let Some(file) = self.file.take() {
            tokio::task::spawn_blocking(move || drop(file))
                .await
                .map_err(std::io::Error::other)?;
        }
        Ok(std::mem::take(&mut self.path))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
