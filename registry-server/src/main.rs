use clap::Parser;

// mimalloc instead of glibc malloc: profiles showed 15-35 % of server CPU in
// glibc's malloc/free (docs/PERF-NOTES.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use registry_server::config::Cli;
use tokio::net::TcpListener;
use tracing::{error, info};

/// Exit status for a configuration that cannot work (a bad value, a
/// combination, an address that cannot be bound); 1 is a failure while
/// running.
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    registry_server::telemetry::init_logging(cli.log_format);
    let settings = cli.settings();
    // Every setting is checked before anything is bound, so a mistake is
    // reported once, with the flag to change.
    let exposure = settings.check_exposure(cli.listen, settings.has_no_token_source());
    if let Err(why) = settings.check().and(exposure) {
        error!("invalid settings: {why}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let metrics_addr = cli.metrics_addr();
    if let Some(addr) = metrics_addr {
        if let Err(err) = registry_server::metrics::install_prometheus(addr) {
            error!(
                addr = %addr,
                error = %err,
                "cannot serve metrics on {addr}: choose another address with --metrics-listen (or `off`)"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        info!(addr = %addr, "metrics at http://{addr}/metrics");
    }
    let listener = match bind(cli.listen) {
        Ok(listener) => listener,
        Err(err) => {
            error!(
                addr = %cli.listen,
                error = %err,
                "cannot listen on {}: choose another address with --listen",
                cli.listen
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match registry_server::run(listener, settings, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(error = %err, "registry failed");
            if err.is_configuration() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
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
