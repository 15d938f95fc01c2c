//! Live reload: read and validate the config file again and swap the routes in
//! without dropping a connection or a request in flight.
//!
//! Routes whose configuration did not change keep their stack, and with it
//! their counters, circuit state, rate-limit buckets and adaptive limit; new
//! and changed routes start fresh. An invalid file is refused with the same
//! message `check-config` prints, and the running config keeps serving.
//! `[server]` settings (listeners, timeouts, limits of the listener) need a
//! restart: a reload that changes them is refused, naming the key. The one
//! exception is `[server.tls]`'s files: every reload reads them again, so a
//! rotated certificate serves new connections (turning TLS on or off needs a
//! restart).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use metrics::Counter;

use crate::cluster::Cluster;
use crate::config::{Config, ConfigError, RouteConfig, ServerConfig};
use crate::metrics::{CONFIG_RELOAD_TOTAL, Registry};
use crate::proxy::Forward;
use crate::spool::Spools;
use crate::stack::{self, Opened, RouteChanges, RouteProxy};

use super::tls::{self, TlsError, TlsListener};

/// Why a reload was refused; the running config stays in every case.
#[derive(Debug)]
pub enum ReloadError {
    /// Started with the embedded default config: there is no file to read.
    NoFile,
    /// The file cannot be read or is invalid: the message `check-config`
    /// prints.
    Invalid(ConfigError),
    /// A route's `[route.spool]` was added, changed or removed: a spool is
    /// opened once per process, so that two never write one directory.
    SpoolNeedsRestart {
        /// The file.
        path: PathBuf,
        /// The route.
        route: String,
    },
    /// `[server.tls]`'s files cannot be read or do not make a certificate.
    Tls {
        /// The file.
        path: PathBuf,
        /// The key, the file and the problem.
        error: TlsError,
    },
    /// A `[server]` key changed, which needs a restart.
    NeedsRestart {
        /// The file.
        path: PathBuf,
        /// The first `[server]` key that differs.
        key: &'static str,
    },
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoFile => f.write_str(
                "started with the embedded default config (no --config): there is no file to reload",
            ),
            Self::Invalid(e) => write!(f, "{e}"),
            Self::SpoolNeedsRestart { path, route } => write!(
                f,
                "{}: route `{route}`: [route.spool] cannot be added, changed or removed without a \
                 restart (the running config stays)",
                path.display()
            ),
            Self::Tls { path, error } => write!(
                f,
                "{}: {error} (the running config and certificate stay)",
                path.display()
            ),
            Self::NeedsRestart { path, key } => write!(
                f,
                "{}: server.{key}: cannot change without a restart (the running config stays)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for ReloadError {}

/// Re-reads the config file on demand (SIGHUP, `POST /reload`).
pub struct Reloader {
    path: Option<PathBuf>,
    config: Mutex<Config>,
    registry: Arc<Registry>,
    proxy: RouteProxy<Forward>,
    /// What the process opened once; reloads keep it.
    spools: Spools,
    cluster: Option<Arc<Cluster>>,
    /// The listener's TLS, with `[server.tls]`.
    tls: Option<Arc<TlsListener>>,
    ok: Counter,
    refused: Counter,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    pub(super) fn new(
        path: Option<PathBuf>,
        config: Config,
        registry: Arc<Registry>,
        proxy: RouteProxy<Forward>,
        spools: Spools,
        cluster: Option<Arc<Cluster>>,
        tls: Option<Arc<TlsListener>>,
    ) -> Self {
        let result = |r: &str| registry.counter(CONFIG_RELOAD_TOTAL, &[("result", r)]);
        Self {
            ok: result("ok"),
            refused: result("error"),
            path,
            config: Mutex::new(config),
            registry,
            proxy,
            spools,
            cluster,
            tls,
        }
    }

    /// Reloads the file; on success says what changed, on failure why (and the
    /// running config stays). Logged and counted either way.
    pub fn reload(&self) -> Result<RouteChanges, ReloadError> {
        self.reload_with(Config::load)
    }

    /// [`Reloader::reload`], reading the file with `read`.
    fn reload_with(
        &self,
        read: impl FnOnce(&Path) -> Result<Config, ConfigError>,
    ) -> Result<RouteChanges, ReloadError> {
        let result = self.try_reload(read);
        match &result {
            Ok(changes) => {
                self.ok.increment(1);
                tracing::info!(
                    kept = ?changes.kept,
                    added = ?changes.added,
                    changed = ?changes.changed,
                    removed = ?changes.removed,
                    "config reloaded"
                );
            }
            Err(error) => {
                self.refused.increment(1);
                tracing::warn!(%error, "config reload refused; the running config stays");
            }
        }
        result
    }

    fn try_reload(
        &self,
        read: impl FnOnce(&Path) -> Result<Config, ConfigError>,
    ) -> Result<RouteChanges, ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        // One reload at a time, reading the file under the lock: concurrent
        // reloads apply files in the order they were read, so the last one
        // applied is the newest file, never an older read applied late. The
        // lock also guards the config in force.
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let new = read(path).map_err(ReloadError::Invalid)?;
        if let Some(key) = server_change(&current.server, &new.server) {
            return Err(ReloadError::NeedsRestart {
                path: path.clone(),
                key,
            });
        }
        if current.cluster != new.cluster {
            return Err(ReloadError::NeedsRestart {
                path: path.clone(),
                key: "cluster",
            });
        }
        if let Some(route) = spool_change(&current, &new) {
            return Err(ReloadError::SpoolNeedsRestart {
                path: path.clone(),
                route,
            });
        }
        // Built before anything is swapped: a broken certificate refuses the
        // whole reload.
        let tls = match (&self.tls, &new.server.tls) {
            (Some(_), Some(files)) => {
                Some(tls::server_config(files).map_err(|error| ReloadError::Tls {
                    path: path.clone(),
                    error,
                })?)
            }
            _ => None, // server_change refused turning TLS on or off
        };
        let opened = Opened {
            spools: &self.spools,
            cluster: self.cluster.as_ref(),
        };
        let (generation, changes) = stack::rebuild(
            &new,
            &self.registry,
            &self.proxy.generation(),
            opened,
            stack::forward,
        );
        self.proxy.swap(generation);
        if let (Some(listener), Some(config)) = (&self.tls, tls) {
            listener.install(config);
        }
        *current = new;
        Ok(changes)
    }
}

/// The first route whose `[route.spool]` differs between `old` and `new`.
fn spool_change(old: &Config, new: &Config) -> Option<String> {
    let spool_of = |config: &Config, name: &str| {
        config
            .routes
            .iter()
            .find(|r| r.display_name() == name)
            .and_then(|r| r.spool.clone())
    };
    let names = old
        .routes
        .iter()
        .chain(&new.routes)
        .map(RouteConfig::display_name);
    for name in names {
        if spool_of(old, name) != spool_of(new, name) {
            return Some(name.to_string());
        }
    }
    None
}

/// The first `[server]` key that differs.
fn server_change(old: &ServerConfig, new: &ServerConfig) -> Option<&'static str> {
    // Every key is named below: a new one fails to compile here until it is
    // (a key a reload ignored would silently do nothing).
    let ServerConfig {
        listen: _,
        admin_listen: _,
        drain_timeout_ms: _,
        worker_threads: _,
        max_connections: _,
        header_read_timeout_ms: _,
        body_read_timeout_ms: _,
        body_min_bytes_per_s: _,
        send_timeout_ms: _,
        send_min_bytes_per_s: _,
        max_header_bytes: _,
        http2_max_concurrent_streams: _,
        http2_idle_timeout_ms: _,
        admin_token: _,
        tls: _,
    } = old;
    macro_rules! first_diff {
        ($($field:ident),* $(,)?) => {
            $( if old.$field != new.$field { return Some(stringify!($field)); } )*
        };
    }
    first_diff!(
        listen,
        admin_listen,
        drain_timeout_ms,
        worker_threads,
        max_connections,
        header_read_timeout_ms,
        body_read_timeout_ms,
        body_min_bytes_per_s,
        send_timeout_ms,
        send_min_bytes_per_s,
        max_header_bytes,
        http2_max_concurrent_streams,
        http2_idle_timeout_ms,
        admin_token,
    );
    if old.tls.is_some() != new.tls.is_some() {
        return Some("tls");
    }
    None
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn config(timeout_ms: u64) -> Config {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[route]]\nupstream = \"http://127.0.0.1:9\"\ntimeout_ms = {timeout_ms}\n"
        );
        Config::parse("t.toml", &text).unwrap()
    }

    fn reloader() -> Arc<Reloader> {
        let registry = Arc::new(Registry::new());
        let built = stack::build(&config(1000), &registry, Opened::none());
        Arc::new(Reloader::new(
            Some(PathBuf::from("t.toml")),
            config(1000),
            registry,
            built.proxy,
            Spools::default(),
            None,
            None,
        ))
    }

    /// Reload A starts reading the file (and sees version 2000); reload B
    /// starts after it (and sees the newer 3000). Whatever the timing, B's
    /// newer read must be the one in force at the end.
    #[test]
    fn a_later_read_is_never_overwritten_by_an_earlier_one() {
        let reloader = reloader();
        let (reading, a_is_reading) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let a = {
            let reloader = reloader.clone();
            std::thread::spawn(move || {
                reloader.reload_with(|_| {
                    reading.send(()).unwrap();
                    released.recv().unwrap();
                    Ok(config(2000))
                })
            })
        };
        a_is_reading.recv().unwrap();
        let (b_done, b_finished) = mpsc::channel();
        let b = {
            let reloader = reloader.clone();
            std::thread::spawn(move || {
                let result = reloader.reload_with(|_| Ok(config(3000)));
                b_done.send(()).unwrap();
                result
            })
        };
        // B cannot finish while A holds the reload: it waits for A's read,
        // then reads after it. (Before the fix it finished here, and A then
        // applied its older read over B's.)
        assert!(
            b_finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "a reload applied while an earlier one was still reading"
        );
        release.send(()).unwrap();
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
        let routes = &reloader.proxy.generation().routes;
        assert_eq!(
            routes[0].config.timeout_ms.get(),
            Duration::from_millis(3000)
        );
    }

    /// Each refusal says what to do, and leaves the running routes alone.
    #[test]
    fn refusals_are_typed_and_keep_the_running_config() {
        let reloader = reloader();
        let mut restart = config(2000);
        restart.server.drain_timeout_ms += 1;
        let err = reloader.reload_with(|_| Ok(restart)).unwrap_err();
        assert!(
            matches!(
                err,
                ReloadError::NeedsRestart {
                    key: "drain_timeout_ms",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("server.drain_timeout_ms: cannot change")
        );
        let bad = Config::parse("t.toml", "[[route]]\nupstream = 3\n").unwrap_err();
        let err = reloader.reload_with(|_| Err(bad)).unwrap_err();
        assert!(matches!(err, ReloadError::Invalid(_)), "{err:?}");
        let timeout = reloader.proxy.generation().routes[0]
            .config
            .timeout_ms
            .get();
        assert_eq!(timeout, Duration::from_millis(1000));

        let registry = Arc::new(Registry::new());
        let built = stack::build(&config(1000), &registry, Opened::none());
        let embedded = Reloader::new(
            None,
            config(1000),
            registry,
            built.proxy,
            Spools::default(),
            None,
            None,
        );
        let err = embedded.reload_with(|_| Ok(config(2000))).unwrap_err();
        assert!(matches!(err, ReloadError::NoFile), "{err:?}");
    }
}
