//! `fleet-sim`: runs N virtual node-agents against a registry and prints a
//! report (registrations/s, heartbeats sent and acked, ack latency, errors).

// mimalloc, as the registry uses: with glibc's malloc the simulated fleet
// spent ~20 % of its CPU in malloc/free during registration storms, CPU the
// registry it measures shares on a small machine (docs/PERF-NOTES.md item 4).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fleet_sim::FleetConfig;
use tracing_subscriber::EnvFilter;

/// Simulates a fleet of GPU nodes against a registry.
#[derive(Debug, Parser)]
#[command(name = "fleet-sim", version, about)]
struct Cli {
    #[command(flatten)]
    fleet: FleetConfig,

    /// How often to log progress.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    progress: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(err) = fleet_sim::limits::small_pages() {
        tracing::warn!(error = %err, "huge pages stay as the system's policy says");
    }
    let interrupt = async {
        // If no handler can be installed, only the duration ends the run.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match fleet_sim::run(cli.fleet, cli.progress, interrupt).await {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "fleet-sim failed");
            ExitCode::FAILURE
        }
    }
}
