use clap::Parser;
use registry_server::config::Cli;
use tokio::net::TcpListener;
use tracing::{error, info};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    registry_server::telemetry::init_logging(cli.log_format);
    if let Some(addr) = cli.metrics_listen.0 {
        if let Err(err) = registry_server::metrics::install_prometheus(addr) {
            error!(addr = %addr, error = %err, "cannot serve metrics");
            return std::process::ExitCode::FAILURE;
        }
        info!(addr = %addr, "metrics at http://{addr}/metrics");
    }
    let listener = match TcpListener::bind(cli.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            error!(addr = %cli.listen, error = %err, "cannot listen");
            return std::process::ExitCode::FAILURE;
        }
    };
    match registry_server::run(listener, cli.settings, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            error!(error = %err, "registry failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}
