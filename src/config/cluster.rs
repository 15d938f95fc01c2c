//! `[cluster]`: the Redis that replicas share state on.

use serde::Deserialize;

use super::values::Millis;

/// `[cluster]`: the Redis that replicas share quotas on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port/db`; the password may come from
    /// `REDIS_PASSWORD` instead.
    pub redis_url: String,
    /// Longest a request waits on Redis before its route's fallback decides.
    #[serde(default = "default_cluster_timeout")]
    pub timeout_ms: Millis,
    /// Prefix of every key the proxy writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_cluster_timeout() -> Millis {
    Millis::from_ms(20)
}

fn default_key_prefix() -> String {
    "sluicegate".into()
}

impl ClusterConfig {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.redis_url.starts_with("rediss://") {
            return Err((
                "cluster.redis_url".into(),
                "rediss:// (TLS) is not built in: use redis:// on a private network or a \
                 TLS-terminating sidecar"
                    .into(),
            ));
        }
        if !self.redis_url.starts_with("redis://") {
            return Err((
                "cluster.redis_url".into(),
                format!("`{}`: expected redis://host:port/db", self.redis_url),
            ));
        }
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(self.redis_url.as_str()) {
            return Err(("cluster.redis_url".into(), e.to_string()));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains([' ', ':']) {
            return Err((
                "cluster.key_prefix".into(),
                "must be a non-empty word without spaces or colons".into(),
            ));
        }
        Ok(())
    }
}

impl From<&ClusterConfig> for crate::cluster::ClusterSettings {
    fn from(c: &ClusterConfig) -> Self {
        Self {
            redis_url: c.redis_url.clone(),
            timeout: c.timeout_ms.get(),
            key_prefix: c.key_prefix.clone(),
        }
    }
}
