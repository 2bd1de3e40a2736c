use clap::Parser;

// mimalloc instead of glibc malloc: profiles showed 15-35 % of server CPU in
// glibc's malloc/free (docs/PERF-NOTES.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let listener = match bind(cli.listen) {
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

/// Binds with a deep accept queue: after a registry restart every agent
/// reconnects at once, and tokio's default backlog (1024) would drop SYNs
/// (capped by net.core.somaxconn).
fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(16_384)
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
