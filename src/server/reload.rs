//! Live reload: read and validate the config file again and swap the routes in
//! without dropping a connection or a request in flight.
//!
//! Routes whose configuration did not change keep their stack, and with it
//! their counters, circuit state, rate-limit buckets and adaptive limit; new
//! and changed routes start fresh. An invalid file is refused with the same
//! message `check-config` prints, and the running config keeps serving.
//! `[server]` settings (listeners, timeouts, limits of the listener) need a
//! restart: a reload that changes them is refused, naming the key.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use metrics::Counter;

use crate::config::{Config, ServerConfig};
use crate::metrics::{CONFIG_RELOAD_TOTAL, Registry};
use crate::proxy::Forward;
use crate::route::Proxy;
use crate::stack::{self, RouteChanges, RouteInfo, RouteStack};

/// Re-reads the config file on demand (SIGHUP, `POST /reload`).
pub struct Reloader {
    path: Option<PathBuf>,
    config: Mutex<Config>,
    registry: Arc<Registry>,
    proxy: Proxy<RouteStack<Forward>>,
    routes: Arc<RwLock<Vec<RouteInfo>>>,
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
        proxy: Proxy<RouteStack<Forward>>,
        routes: Arc<RwLock<Vec<RouteInfo>>>,
    ) -> Self {
        let result = |r: &str| registry.counter(CONFIG_RELOAD_TOTAL, &[("result", r)]);
        Self {
            ok: result("ok"),
            refused: result("error"),
            path,
            config: Mutex::new(config),
            registry,
            proxy,
            routes,
        }
    }

    /// Reloads the file; on success says what changed, on failure why (and the
    /// running config stays). Logged and counted either way.
    pub fn reload(&self) -> Result<RouteChanges, String> {
        let result = self.try_reload();
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

    fn try_reload(&self) -> Result<RouteChanges, String> {
        let path = self.path.as_ref().ok_or_else(|| {
            "started with the embedded default config (no --config): there is no file to reload"
                .to_string()
        })?;
        let new = Config::load(path).map_err(|e| e.to_string())?;
        // One reload at a time; the lock also guards the config in force.
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = server_change(&current.server, &new.server) {
            return Err(format!(
                "{}: server.{key}: cannot change without a restart (the running config stays)",
                path.display()
            ));
        }
        let routes_now = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (table, routes, changes) =
            stack::rebuild(&new, &self.registry, &routes_now, &self.proxy.table());
        for route in &routes {
            let fresh = changes
                .kept
                .iter()
                .all(|k| k != route.config.display_name());
            if let (true, Some(limiter)) = (fresh, &route.protections.rate_limit) {
                limiter.spawn_pruner(super::RATE_LIMIT_PRUNE_INTERVAL);
            }
        }
        self.proxy.swap(table);
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = routes;
        *current = new;
        Ok(changes)
    }
}

/// The first `[server]` key that differs.
fn server_change(old: &ServerConfig, new: &ServerConfig) -> Option<&'static str> {
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
        send_timeout_ms,
        max_header_bytes,
        http2_max_concurrent_streams,
        admin_token,
    );
    None
}
