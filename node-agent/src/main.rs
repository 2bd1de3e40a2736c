//! The `node-agent` binary: flags and environment, logging, signals.
//! Exit status: 0 after a graceful stop (SIGTERM/SIGINT), 2 for an unusable
//! configuration (flags, or a token or TLS file that cannot be used), 1 when
//! GPUs are required and missing or start-up fails.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use node_agent::{AgentConfig, AgentError, Cli, LogFormat};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match AgentConfig::from_cli(Cli::parse()) {
        Ok(config) => config,
        Err(e) => {
            // Logging is not set up yet (its format is part of the config).
            eprintln!("node-agent: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);

    // Two workers are plenty for one stream and a few probes, and keep the
    // agent's footprint small on a host whose cores belong to the engines.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Installed before anything else runs, so a signal that arrives
        // during start-up is not lost to the default (kill) action.
        let shutdown = match shutdown_signal() {
            Ok(shutdown) => shutdown,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            node_id = %config.node_id,
            registry = %config.registry,
            version = env!("CARGO_PKG_VERSION"),
            "node-agent starting"
        );
        match node_agent::run(config, shutdown).await {
            Ok(()) => {
                tracing::info!("node-agent stopped");
                ExitCode::SUCCESS
            }
            // Token and TLS files are read here, not while parsing flags:
            // still a configuration problem, so no restart loop.
            Err(AgentError::Config(e)) => {
                tracing::error!(error = %e, "unusable configuration");
                ExitCode::from(2)
            }
            Err(e) => {
                tracing::error!(error = %e, "node-agent cannot run");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "sigterm",
            _ = int.recv() => "sigint",
        };
        tracing::info!(signal = name, "shutting down");
    })
}

/// `RUST_LOG` filters (default `info`); logs go to stderr, where systemd's
/// journal and container runtimes collect them.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
