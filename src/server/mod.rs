//! Starting and stopping a proxy: the proxy listener, the admin listener and the
//! graceful drain.

pub mod admin;
mod client_io;
mod connection;
mod drain;
mod framing;
mod history;
mod listener;
mod reload;
pub mod signals;
mod streams;
pub mod tls;

pub use crate::stack::{RouteChanges, rebuild};
pub use reload::{ReloadError, Reloader};

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use admin::AdminState;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::metrics::{
    CONNECTIONS_CLOSED_TOTAL, FRAMING_REFUSED_TOTAL, Registry, SEND_TIMEOUT_TOTAL,
    TLS_HANDSHAKE_FAILURES_TOTAL,
};
use crate::proxy::Forward;
use crate::spool;
use crate::stack::{self, Opened, RouteInfo, RouteProxy};

/// How often histogram samples are folded into buckets and the process's
/// resources read.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A running proxy. Dropping it does not stop it; call [`Running::shutdown`].
#[derive(Debug)]
pub struct Running {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<DrainReport>,
    shared: Arc<Shared>,
}

/// What the running proxy's parts share: one value, so that the admin
/// listener, the reloader and [`Running`] see the same routes.
#[derive(Debug)]
pub(crate) struct Shared {
    registry: Arc<Registry>,
    /// The routing layer, whose generation is the live routes.
    proxy: RouteProxy<Forward>,
    /// Set once the drain starts (`/readyz` turns 503).
    draining: AtomicBool,
    reloader: Reloader,
    /// The cluster's Redis, with `[cluster]`.
    cluster: Option<Arc<Cluster>>,
    /// The routes' last minutes, for the dashboard.
    history: history::History,
}

/// How the drain went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReport {
    /// Every connection finished within `drain_timeout_ms`.
    Drained,
    /// The drain timeout passed with connections still open; they were closed.
    TimedOut,
}

/// Binds both listeners and starts serving `config`, which cannot be reloaded
/// (there is no file behind it).
pub async fn start(config: Config) -> io::Result<Running> {
    start_from(config, None).await
}

/// Binds both listeners and starts serving `config`, read from `path`: SIGHUP
/// (in the binary) and `POST /reload` read it again.
pub async fn start_from(config: Config, path: Option<PathBuf>) -> io::Result<Running> {
    let registry = Arc::new(Registry::new());
    let spools = stack::open_spools(&config, &registry)?;
    let cluster = match &config.cluster {
        Some(c) => {
            let cluster = Cluster::new(c.into(), &registry).map_err(io::Error::other)?;
            cluster.spawn_prober();
            Some(cluster)
        }
        None => None,
    };
    let opened = Opened {
        spools: &spools,
        cluster: cluster.as_ref(),
    };
    let built = stack::build(&config, &registry, opened);
    let tls = match &config.server.tls {
        Some(files) => {
            Some(Arc::new(tls::TlsListener::new(files).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidInput, e)
            })?))
        }
        None => None,
    };
    let listener = bind(config.server.listen, "server.listen").await?;
    let admin_listener = bind(config.server.admin_listen, "server.admin_listen").await?;
    let proxy_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let shared = Arc::new(Shared {
        registry: registry.clone(),
        proxy: built.proxy.clone(),
        draining: AtomicBool::new(false),
        reloader: Reloader::new(
            path,
            config.clone(),
            registry.clone(),
            built.proxy,
            spools.clone(),
            cluster.clone(),
            tls.clone(),
        ),
        cluster,
        history: history::History::default(),
    });
    let admin_state = AdminState::new(
        shared.clone(),
        admin::Access::new(&config.server, admin_addr),
    );
    let counters = listener::Counters {
        framing_refused: registry.counter(FRAMING_REFUSED_TOTAL, &[]),
        send_timeouts: registry.counter(SEND_TIMEOUT_TOTAL, &[]),
        tls_failed: registry.counter(TLS_HANDSHAKE_FAILURES_TOTAL, &[]),
        closed: connection::Closed::ALL
            .map(|why| registry.counter(CONNECTIONS_CLOSED_TOTAL, &[("reason", why.as_str())])),
    };
    let (stop, stop_rx) = watch::channel(false);
    for spool in spools.iter() {
        tokio::spawn(spool::replay::run(
            spool.clone(),
            replay_target(shared.proxy.clone(), spool.route().to_string()),
            stop_rx.clone(),
        ));
    }
    let server = config.server.clone();
    let serving = shared.clone();
    let task = tokio::spawn(async move {
        // The admin listener outlives the drain, so that probes see /readyz 503.
        let (admin_stop, admin_stop_rx) = watch::channel(false);
        let admin = tokio::spawn(admin::serve(
            admin_listener,
            admin_state,
            server.header_read_timeout_ms.get(),
            admin_stop_rx,
        ));
        let upkeep = tokio::spawn(upkeep(registry));
        let sampler = tokio::spawn(sample_history(serving.clone()));
        let drain_signal = drain::Drain::new();
        listener::accept_loop(
            listener,
            built.service,
            &server,
            &drain_signal,
            stop_rx,
            counters,
            tls.as_ref(),
        )
        .await;
        serving.draining.store(true, Ordering::SeqCst);
        let report = drain(drain_signal, Duration::from_millis(server.drain_timeout_ms)).await;
        upkeep.abort();
        sampler.abort();
        admin_stop.send_replace(true);
        // Admin requests are short; do not let a stuck scraper hold the exit.
        let admin_abort = admin.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), admin)
            .await
            .is_err()
        {
            admin_abort.abort();
        }
        report
    });
    tracing::info!(%proxy_addr, %admin_addr, "sluicegate listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        stop,
        task,
        shared,
    })
}

/// Looks `route` up in the live routes at each delivery, keeping one
/// forwarder (one connection pool) while the route's settings stay.
fn replay_target(
    proxy: RouteProxy<Forward>,
    route: String,
) -> impl FnMut() -> Option<spool::replay::Target> + Send {
    let mut forward: Option<(crate::config::RouteConfig, Forward)> = None;
    move || {
        let generation = proxy.generation();
        let info = generation
            .routes
            .iter()
            .find(|r| r.config.display_name() == route)?;
        let current = match &forward {
            Some((config, f)) if *config == info.config => f.clone(),
            _ => {
                let f = stack::forward(&info.config);
                forward = Some((info.config.clone(), f.clone()));
                f
            }
        };
        Some(stack::replay_target(info, current))
    }
}

async fn bind(addr: SocketAddr, key: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("{key} = \"{addr}\": cannot bind: {e}")))
}

async fn drain(graceful: drain::Drain, timeout: Duration) -> DrainReport {
    let open = graceful.count();
    tracing::info!(open_connections = open, ?timeout, "draining");
    match tokio::time::timeout(timeout, graceful.shutdown()).await {
        Ok(()) => {
            tracing::info!("drained");
            DrainReport::Drained
        }
        Err(_) => {
            tracing::warn!("drain timeout passed; closing the remaining connections");
            DrainReport::TimedOut
        }
    }
}

async fn upkeep(registry: Arc<Registry>) {
    let process = crate::observe::ProcessMetrics::new(&registry);
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        registry.run_upkeep();
        process.update();
    }
}

/// Samples every route into the history each [`history::SAMPLE_INTERVAL`].
async fn sample_history(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(history::SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        shared
            .history
            .sample(&shared.proxy.generation().routes, unix);
    }
}

impl Running {
    /// The proxy listener's address (useful with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The routes in force, with their live counters and protections.
    pub fn routes(&self) -> Vec<RouteInfo> {
        self.shared.proxy.generation().routes.clone()
    }

    /// Reloads the config file (what SIGHUP and `POST /reload` do).
    pub fn reload(&self) -> Result<RouteChanges, ReloadError> {
        self.shared.reloader.reload()
    }

    /// Drains: `/readyz` turns 503, the listener stops accepting, requests in flight
    /// get `drain_timeout_ms` to finish. Resolves when the proxy has stopped.
    pub async fn shutdown(self) -> DrainReport {
        // The receiver lives in the serving task; if it is gone, so is the server.
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(DrainReport::TimedOut)
    }
}
