//! `sluicegate demo`: the proxy in front of the built-in upstream simulator,
//! with the embedded default configuration and nothing else needed.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, UpstreamUrl};
use crate::server;
use crate::sim::{self, SimOptions};

/// The simulated upstream's capacity: 16 workers × 20 ms ≈ 800 requests/s.
pub const DEMO_SIM: SimOptions = SimOptions {
    workers: 16,
    service_time: Duration::from_millis(20),
};

/// Points every route of `config` at `upstream`.
pub fn retarget(config: &mut Config, upstream: SocketAddr) {
    let url = UpstreamUrl::try_from(format!("http://{upstream}"))
        // A socket address always forms a valid http URL.
        .expect("socket address is a valid upstream");
    for route in &mut config.routes {
        route.upstream = url.clone();
    }
}

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::embedded_default()?;
    let sim = sim::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), DEMO_SIM).await?;
    retarget(&mut config, sim.addr());
    let running = server::start(config).await?;
    let proxy = running.proxy_addr();
    let admin = running.admin_addr();
    println!(
        "sluicegate demo\n\
         \n\
         upstream simulator  http://{sim_addr}  ({workers} workers x {ms} ms)\n\
         proxy               http://{proxy}\n\
         admin               http://{admin}  (/metrics /status /healthz /readyz)\n\
         \n\
         try:\n\
         \x20 curl -i http://{proxy}/ingest -d '{{\"event\":1}}'\n\
         \x20 curl -s http://{admin}/status\n\
         \x20 curl -s http://{sim_addr}/_sim/stats\n\
         \x20 curl -s http://{sim_addr}/_sim/config -H 'content-type: application/json' -d '{{\"mode\":\"fail\"}}'\n\
         \n\
         Ctrl-C stops it.",
        sim_addr = sim.addr(),
        workers = DEMO_SIM.workers,
        ms = DEMO_SIM.service_time.as_millis(),
    );
    server::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}
