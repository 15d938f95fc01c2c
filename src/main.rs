//! The `sluicegate` command: run the proxy, check a configuration, run the
//! upstream simulator or the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluicegate::config::Config;
use sluicegate::sim::{self, SimOptions};
use sluicegate::telemetry::{self, LogFormat};
use sluicegate::{demo, server};

/// An HTTP admission-control reverse proxy: backpressure first.
#[derive(Debug, Parser)]
#[command(name = "sluicegate", version, about)]
struct Cli {
    /// Configuration file; without it the embedded default config.toml is used.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log line format on stderr (filter with RUST_LOG).
    #[arg(long, value_enum, default_value_t, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file: exit 0, or name the key and the problem and exit 1.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Run the upstream simulator (a naive app server with a fixed worker pool).
    Sim {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Requests served at once.
        #[arg(long, default_value_t = 16)]
        workers: usize,
        /// Time each request spends in service, in milliseconds.
        #[arg(long, default_value_t = 20)]
        service_ms: u64,
    },
    /// Show overload straight to the simulator and through sluicegate (about 50 s).
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Some(Command::CheckConfig { file }) => match Config::load(&file) {
            Ok(config) => {
                // The certificate files too: a start would read them.
                let tls = config.server.tls.as_ref();
                if let Some(Err(e)) = tls.map(sluicegate::server::tls::server_config) {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
                println!(
                    "{}: configuration OK ({} route(s))",
                    file.display(),
                    config.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Sim {
            listen,
            workers,
            service_ms,
        }) => run_sim(listen, workers, service_ms),
        Some(Command::Demo) => block_on(0, demo::run()),
        None => run_proxy(cli.config),
    }
}

fn run_proxy(file: Option<PathBuf>) -> ExitCode {
    let config = match &file {
        Some(file) => Config::load(file),
        None => Config::embedded_default(),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    block_on(config.server.worker_threads, async move {
        // Before the listeners open: no signal may find its default action.
        let (mut shutdown, mut reload) = server::signals::install();
        let running = server::start_from(config, file).await?;
        tokio::select! {
            () = shutdown.recv() => {}
            () = reload.serve(&running) => {}
        }
        running.shutdown().await;
        Ok(())
    })
}

fn run_sim(listen: SocketAddr, workers: usize, service_ms: u64) -> ExitCode {
    if workers == 0 {
        eprintln!("--workers must be at least 1");
        return ExitCode::FAILURE;
    }
    let options = SimOptions {
        workers,
        service_time: Duration::from_millis(service_ms),
    };
    block_on(0, async move {
        let (mut shutdown, _) = server::signals::install();
        let sim = sim::spawn(listen, options).await?;
        tracing::info!(addr = %sim.addr(), workers, service_ms, "upstream simulator listening");
        shutdown.recv().await;
        Ok(())
    })
}

/// Runs `main` on a multi-thread runtime (`threads` workers, 0 = one per core).
fn block_on(
    threads: usize,
    main: impl std::future::Future<Output = Result<(), Box<dyn std::error::Error>>>,
) -> ExitCode {
    // One thread needs no work stealing: the current-thread scheduler does the
    // same job with fewer atomics and cross-thread wake-ups.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all();
    if threads > 1 {
        builder.worker_threads(threads);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluicegate: {e}");
            ExitCode::FAILURE
        }
    }
}
