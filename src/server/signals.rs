//! The process's signals, registered before the listeners open: SIGTERM,
//! SIGINT and SIGHUP kill a process by default, so one that arrives while
//! the proxy starts (a pod deleted at once, a reload sent by a config
//! watcher) must already find a handler, or requests in flight are cut
//! instead of drained.

use super::Running;

#[cfg(unix)]
use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGTERM or SIGINT: drain and stop.
#[derive(Debug)]
pub struct Shutdown {
    #[cfg(unix)]
    term: Option<Signal>,
    #[cfg(unix)]
    int: Option<Signal>,
}

/// SIGHUP: reload the configuration.
#[derive(Debug)]
pub struct Reload {
    #[cfg(unix)]
    hup: Option<Signal>,
}

/// Registers the handlers now (inside a tokio runtime): a signal from this
/// moment on is delivered to the returned halves, never to its default action.
pub fn install() -> (Shutdown, Reload) {
    #[cfg(unix)]
    {
        let on = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, signal = name, "cannot listen for a signal");
                None
            }
        };
        (
            Shutdown {
                term: on(SignalKind::terminate(), "SIGTERM"),
                int: on(SignalKind::interrupt(), "SIGINT"),
            },
            Reload {
                hup: on(SignalKind::hangup(), "SIGHUP"),
            },
        )
    }
    #[cfg(not(unix))]
    {
        (Shutdown {}, Reload {})
    }
}

impl Shutdown {
    /// Resolves on SIGTERM or SIGINT (Ctrl-C).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(signal: &mut Option<Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut self.term) => tracing::info!("SIGTERM received"),
                () = next(&mut self.int) => tracing::info!("SIGINT received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

impl Reload {
    /// Reloads `running` on every SIGHUP until the future is dropped.
    pub async fn serve(&mut self, running: &Running) {
        #[cfg(unix)]
        if let Some(hup) = &mut self.hup {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP received: reloading the config");
                let _ = running.reload();
            }
        }
        let _ = running;
        std::future::pending::<()>().await
    }
}
