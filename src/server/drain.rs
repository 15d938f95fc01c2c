//! [`Drain`]: tells the listener's connections to finish, and waits for
//! them.

use tokio::sync::watch;

/// Tells connections to finish, and waits for them: hyper-util's
/// `GracefulShutdown`, whose watch cannot be combined with bounds of our own.
#[derive(Debug)]
pub(super) struct Drain {
    tx: watch::Sender<()>,
}

impl Drain {
    pub(super) fn new() -> Self {
        Self {
            tx: watch::Sender::new(()),
        }
    }

    /// A connection's end of the drain signal.
    pub(super) fn watcher(&self) -> watch::Receiver<()> {
        self.tx.subscribe()
    }

    /// Connections still open.
    pub(super) fn count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Tells every connection to finish and resolves once all have.
    pub(super) async fn shutdown(self) {
        self.tx.send_replace(());
        self.tx.closed().await;
    }
}
