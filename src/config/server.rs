//! `[server]`: the listeners, their bounds, TLS and the admin endpoints.

use std::net::SocketAddr;

use serde::Deserialize;

use super::ServerTlsConfig;
use super::values::{self, Limit, Millis};

/// `[server]`: how the proxy listens and shuts down.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the proxy listener.
    #[serde(deserialize_with = "values::socket_addr")]
    pub listen: SocketAddr,
    /// Address of the admin listener (metrics, health, status).
    #[serde(deserialize_with = "values::socket_addr")]
    pub admin_listen: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub drain_timeout_ms: u64,
    /// Tokio worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// Most client connections open at once; the accept loop pauses at the cap.
    pub max_connections: Limit,
    /// Longest time a client may take to send a request's headers.
    pub header_read_timeout_ms: Millis,
    /// Longest pause between two reads of a client's request body; past it
    /// the client gets 408 and its slot is freed.
    pub body_read_timeout_ms: Millis,
    /// The average rate a client must keep up while the proxy waits on its
    /// request body: the waits may add up to `body_read_timeout_ms` and a
    /// second per this many bytes received (Apache's `MinRate`).
    pub body_min_bytes_per_s: Limit,
    /// Longest wait for a client to accept more response bytes; past it the
    /// connection is closed and its slot freed (nginx's `send_timeout`).
    pub send_timeout_ms: Millis,
    /// The average rate a client must keep up while the proxy waits on it to
    /// take response bytes: the waits may add up to `send_timeout_ms` and a
    /// second per this many bytes taken.
    pub send_min_bytes_per_s: Limit,
    /// Largest request head (request line and headers); larger gets 431.
    pub max_header_bytes: Limit,
    /// Concurrent streams per HTTP/2 connection.
    pub http2_max_concurrent_streams: Limit,
    /// An HTTP/2 connection without an open stream is closed (GOAWAY) after
    /// this long.
    pub http2_idle_timeout_ms: Millis,
    /// Bearer token for `/status` and `/reload` when the admin listener is not
    /// on loopback.
    pub admin_token: Option<String>,
    /// `[server.tls]`: TLS on the proxy listener.
    pub tls: Option<ServerTlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            drain_timeout_ms: 10_000,
            worker_threads: 0,
            max_connections: Limit::new(10_000),
            header_read_timeout_ms: Millis::from_ms(10_000),
            body_read_timeout_ms: Millis::from_ms(60_000),
            // Apache mod_reqtimeout's default MinRate.
            body_min_bytes_per_s: Limit::new(500),
            send_min_bytes_per_s: Limit::new(500),
            send_timeout_ms: Millis::from_ms(60_000),
            max_header_bytes: Limit::new(64 * 1024),
            http2_max_concurrent_streams: Limit::new(128),
            // nginx's keepalive_timeout.
            http2_idle_timeout_ms: Millis::from_ms(75_000),
            admin_token: None,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Checks what spans several `[server]` keys, or one key's sense.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if let Some(token) = &self.admin_token
            && (token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err((
                "server.admin_token".into(),
                "must be at least 16 characters, without spaces or control characters".into(),
            ));
        }
        if self.max_header_bytes.get() < 8192 {
            return Err((
                "server.max_header_bytes".into(),
                format!(
                    "must be at least 8192 (got {}): smaller would refuse ordinary browsers and SDKs",
                    self.max_header_bytes.get()
                ),
            ));
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err((
                "server.admin_listen".into(),
                format!("must differ from server.listen ({})", self.listen),
            ));
        }
        Ok(())
    }
}
