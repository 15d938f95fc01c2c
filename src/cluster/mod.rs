//! `[cluster]`: state shared by every replica, on Redis (README "[cluster]").
//!
//! One multiplexed connection per process (redis-rs's `ConnectionManager`:
//! commands from every request pipelined on it, reconnecting by itself). A
//! prober pings Redis twice a second and keeps an up/down state: while
//! Redis is down, requests do not try it (each would wait `timeout_ms` for
//! nothing) and their route's fallback decides. Commands that fail or time
//! out [`DOWN_AFTER`] times in a row turn it down too (one slow command, which
//! a client can provoke, does not switch the shared limit off for everyone);
//! a failed probe does at once. Each switch is logged once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use metrics::Gauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Script};
use serde::Serialize;

use crate::metrics::{CLUSTER_UP, Registry};

/// The GCRA script.
const GCRA: &str = include_str!("gcra.lua");

/// How often the prober pings.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Where the shared state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `redis://[user:password@]host:port/db`.
    pub redis_url: String,
    /// Longest a request waits on Redis.
    pub timeout: Duration,
    /// Prefix of every key.
    pub key_prefix: String,
}

/// Why Redis gave no answer.
#[derive(Debug)]
pub enum ClusterError {
    /// Known to be down: not tried.
    Down,
    /// No answer within `timeout_ms`.
    Timeout,
    /// An error from Redis or the connection.
    Redis(redis::RedisError),
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterError::Down => f.write_str("redis is down"),
            ClusterError::Timeout => f.write_str("redis did not answer in time"),
            ClusterError::Redis(e) => write!(f, "redis: {e}"),
        }
    }
}

impl std::error::Error for ClusterError {}

/// One GCRA decision from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraReply {
    /// Requests granted (of the `n` asked): 0 is a refusal.
    pub granted: u32,
    /// Refused: how long until it would be allowed.
    pub wait: Duration,
    /// The theoretical arrival time after the decision, from now.
    pub tat_ahead: Duration,
}

impl GcraReply {
    /// Whether at least one request was granted.
    pub fn allowed(&self) -> bool {
        self.granted > 0
    }
}

/// What `/status` shows of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSnapshot {
    /// Redis answered the last probe or command.
    pub up: bool,
    /// The address (without credentials).
    pub redis: String,
    /// `timeout_ms`.
    pub timeout_ms: u64,
}

/// Commands failed or timed out in a row that mark Redis down.
pub const DOWN_AFTER: u32 = 3;

/// The process's connection to the shared state.
pub struct Cluster {
    conn: ConnectionManager,
    settings: ClusterSettings,
    address: String,
    up: AtomicBool,
    /// Whether Redis has answered or failed once yet: the first verdict is
    /// logged whichever it is, so that Redis down at start is not silent.
    known: AtomicBool,
    /// Commands failed or timed out in a row.
    failing: AtomicU32,
    up_gauge: Gauge,
    gcra: Script,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &self.address)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A connection to `settings.redis_url`, made lazily (the proxy starts
    /// whether Redis is up or not). The password comes from the URL, or
    /// else from `REDIS_PASSWORD`.
    pub fn new(settings: ClusterSettings, registry: &Registry) -> Result<Arc<Self>, String> {
        let mut info = settings
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("cluster.redis_url: {e}"))?;
        if info.redis_settings().password().is_none()
            && let Ok(password) = std::env::var("REDIS_PASSWORD")
        {
            let redis = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis);
        }
        let address = info.addr().to_string();
        let client = redis::Client::open(info).map_err(|e| format!("cluster.redis_url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.timeout))
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(100))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("cluster.redis_url: {e}"))?;
        let up_gauge = registry.gauge(CLUSTER_UP, &[]);
        up_gauge.set(0.0);
        Ok(Arc::new(Self {
            conn,
            settings,
            address,
            up: AtomicBool::new(false),
            known: AtomicBool::new(false),
            failing: AtomicU32::new(0),
            up_gauge,
            gcra: Script::new(GCRA),
        }))
    }

    /// Pings Redis every [`PROBE_EVERY`] until the cluster is dropped.
    pub fn spawn_prober(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                let mut conn = cluster.conn.clone();
                // A probe may take longer than a request may wait.
                let ping = redis::cmd("PING");
                let probe = ping.query_async::<String>(&mut conn);
                let ok = tokio::time::timeout(cluster.settings.timeout * 10, probe)
                    .await
                    .is_ok_and(|r| r.is_ok());
                if ok {
                    cluster.failing.store(0, Ordering::Relaxed);
                }
                cluster.set_up(ok, "probe");
            }
        });
    }

    fn set_up(&self, up: bool, by: &str) {
        let first = !self.known.swap(true, Ordering::SeqCst);
        if self.up.swap(up, Ordering::SeqCst) != up || first {
            self.up_gauge.set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!(redis = %self.address, "cluster: redis is up; quotas are shared again");
            } else {
                tracing::warn!(
                    redis = %self.address,
                    by,
                    "cluster: redis is down; routes use their fallback until it is back"
                );
            }
        }
    }

    /// Whether Redis answered last.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The key of `client` in `route`'s bucket `bucket`.
    pub fn key(&self, route: &str, bucket: &str, client: &[u8]) -> Vec<u8> {
        let prefix = &self.settings.key_prefix;
        let mut key =
            Vec::with_capacity(prefix.len() + route.len() + bucket.len() + client.len() + 8);
        for part in [
            prefix.as_bytes(),
            b"rl",
            route.as_bytes(),
            bucket.as_bytes(),
        ] {
            key.extend_from_slice(part);
            key.push(b':');
        }
        key.extend_from_slice(client);
        key
    }

    /// Counts up to `n` requests of `key` (as many as fit) at `t` per request
    /// with a tolerance of `tau` (governor's GCRA), on Redis's clock or at
    /// `now` when given (for tests). Never waits longer than `timeout_ms`.
    pub async fn gcra(
        &self,
        key: &[u8],
        t: Duration,
        tau: Duration,
        n: u32,
        now: Option<Duration>,
    ) -> Result<GcraReply, ClusterError> {
        if !self.is_up() {
            return Err(ClusterError::Down);
        }
        let mut conn = self.conn.clone();
        let now = now.map_or_else(String::new, |n| n.as_micros().to_string());
        let command = |name: &str, script: &str| {
            let mut cmd = redis::cmd(name);
            cmd.arg(script)
                .arg(1)
                .arg(key)
                .arg(t.as_micros() as u64)
                .arg(tau.as_micros() as u64)
                .arg(n)
                .arg(&now);
            cmd
        };
        // EVALSHA, and EVAL (which caches the script) after a NOSCRIPT.
        let call = async {
            let evalsha = command("EVALSHA", self.gcra.get_hash());
            match evalsha.query_async::<(i64, i64, i64)>(&mut conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    command("EVAL", GCRA).query_async(&mut conn).await
                }
                other => other,
            }
        };
        let result = match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(ClusterError::Redis(e)),
            Err(_) => Err(ClusterError::Timeout),
        };
        match result {
            Ok((granted, wait, ahead)) => {
                self.failing.store(0, Ordering::Relaxed);
                self.set_up(true, "command");
                let us = |v: i64| Duration::from_micros(v.max(0) as u64);
                Ok(GcraReply {
                    granted: granted.clamp(0, i64::from(n)) as u32,
                    wait: us(wait),
                    tat_ahead: us(ahead),
                })
            }
            Err(e) => {
                if self.failing.fetch_add(1, Ordering::Relaxed) + 1 >= DOWN_AFTER {
                    self.set_up(false, "commands failing");
                }
                Err(e)
            }
        }
    }

    /// The live state.
    pub fn snapshot(&self) -> ClusterSnapshot {
        ClusterSnapshot {
            up: self.is_up(),
            redis: self.address.clone(),
            timeout_ms: self.settings.timeout.as_millis() as u64,
        }
    }
}
