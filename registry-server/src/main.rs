use clap::Parser;

// mimalloc instead of glibc malloc: profiles showed 15-35 % of server CPU in
// glibc's malloc/free (docs/PERF-NOTES.md). The `system-allocator` feature
// leaves it out so a heap profiler that hooks malloc (heaptrack) sees every
// allocation.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use registry_server::config::Cli;
use registry_server::metrics_port::MetricsEndpoint;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

/// Exit status for a configuration that cannot work (a bad value, a
/// combination, an address that cannot be bound); 1 is a failure while
/// running.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Built by hand rather than by `#[tokio::main]` so the thread count
    // is a flag; tokio's own default (one per core, or
    // TOKIO_WORKER_THREADS) applies without it.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads {
        runtime.worker_threads(threads.get());
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(serve(cli)),
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Everything after the command line: logging, checks, binding, serving.
async fn serve(cli: Cli) -> ExitCode {
    registry_server::telemetry::init_logging(cli.log_format);
    if let Err(err) = registry_server::huge_pages::apply(cli.huge_pages) {
        warn!(error = %err, huge_pages = ?cli.huge_pages, "cannot switch transparent huge pages; the system's policy applies");
    }
    let settings = cli.settings();
    // Every setting is checked before anything is bound, so a mistake is
    // reported once, with the flag to change.
    let exposure = settings.check_exposure(cli.listen, settings.has_no_token_source());
    if let Err(why) = settings.check().and(exposure) {
        error!("invalid settings: {why}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let metrics = match cli.metrics_addr() {
        None => None,
        Some(addr) => match metrics_endpoint(addr) {
            Ok(endpoint) => {
                // The bound address: the port chosen when port 0 was asked for.
                let bound = endpoint.listener.local_addr().unwrap_or(addr);
                info!(addr = %bound, "metrics at http://{bound}/metrics, service discovery at /sd/nodes and /sd/pools, health at /health");
                Some(endpoint)
            }
            Err(why) => {
                error!(
                    addr = %addr,
                    error = %why,
                    "cannot serve metrics on {addr}: choose another address with --metrics-listen (or `off`)"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
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
    let served = if settings.store == registry_server::config::StoreKind::Etcd {
        // One replica of several: its URL for clients sent to the leader.
        let advertise = match advertise_url(&settings, &listener) {
            Ok(url) => url,
            Err(why) => {
                error!("invalid settings: {why}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        info!(advertise = %advertise, "a replica on etcd: clients are sent to the leader's advertised URL");
        match registry_server::store::etcd::replicas(&settings, advertise).await {
            Ok(replicas) => {
                registry_server::run_replica(
                    listener,
                    settings,
                    replicas,
                    metrics,
                    shutdown_signal(),
                )
                .await
            }
            Err(err) => Err(registry_server::ServerError::Store(err)),
        }
    } else {
        match metrics {
            Some(metrics) => {
                registry_server::run_with_metrics(listener, settings, metrics, shutdown_signal())
                    .await
            }
            None => registry_server::run(listener, settings, shutdown_signal()).await,
        }
    };
    match served {
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

/// The URL other replicas hand to clients for this one: --advertise-url,
/// else `http://` and the bound address unless that is a wildcard.
fn advertise_url(
    settings: &registry_server::config::Settings,
    listener: &TcpListener,
) -> Result<String, String> {
    if let Some(url) = &settings.advertise_url {
        return Ok(url.clone());
    }
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    if bound.ip().is_unspecified() {
        return Err(format!(
            "--advertise-url is needed with --store etcd when listening on {bound}: name the URL clients reach this replica at (e.g. http://registry-1:50051)"
        ));
    }
    let scheme = if settings.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    Ok(format!("{scheme}://{bound}"))
}

/// Binds the metrics port and installs the recorder it renders.
fn metrics_endpoint(addr: std::net::SocketAddr) -> Result<MetricsEndpoint, String> {
    let std_listener = std::net::TcpListener::bind(addr).map_err(|e| e.to_string())?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let listener = TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
    let handle = registry_server::metrics::install_prometheus().map_err(|e| e.to_string())?;
    Ok(MetricsEndpoint { listener, handle })
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
