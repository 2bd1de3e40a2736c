//! `bench`: runs the registry benchmarks and prints Markdown tables.
//!
//! `cargo run --release -p bench -- all` builds registry-server in the same
//! profile, runs it as a separate process per scenario, and writes the
//! tables to target/bench/results.md (server logs beside it).

// mimalloc, as the registry uses: with glibc's malloc the simulated fleet
// spent ~20 % of its CPU in malloc/free during registration storms, CPU the
// registry it measures shares on a small machine (docs/PERF-NOTES.md item 4).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bench::plan::Plan;
use bench::server::Launcher;
use bench::{BenchError, Scenario};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Benchmarks of one registry: scale, throughput, detection, reads, restart,
/// change feed.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about)]
struct Cli {
    /// The registry-server binary; by default the one next to this binary,
    /// rebuilt first when run through `cargo run`.
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,

    /// Where server logs and results.md go.
    #[arg(long, global = true, default_value = "target/bench")]
    out: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every scenario with the published parameters (about 16 minutes).
    All,
    /// Every scenario with 200 nodes and second-long phases (CI).
    Quick,
    /// Some scenarios with the published parameters.
    Run {
        /// The scenarios, in order.
        #[arg(required = true, value_enum)]
        scenarios: Vec<Scenario>,

        /// Only the scale steps with these node counts (comma-separated); a
        /// count the plan lacks becomes a step of its own, with 100 nodes
        /// per connection past 19,000 nodes (the open-file limit) and one
        /// connection per node below.
        #[arg(long, value_delimiter = ',')]
        scale_nodes: Vec<usize>,

        /// Heartbeat interval of the scale steps (node timeout 3x).
        #[arg(long, value_parser = humantime::parse_duration)]
        scale_interval: Option<std::time::Duration>,

        /// Registrations per second while a scale step's fleet comes up.
        #[arg(long)]
        scale_ramp: Option<f64>,

        /// Length of each scale step's measured window.
        #[arg(long, value_parser = humantime::parse_duration)]
        scale_window: Option<std::time::Duration>,

        /// Nodes of the feed scenario (a smaller validation run).
        #[arg(long)]
        feed_nodes: Option<usize>,

        /// Length of each of the feed scenario's three phases.
        #[arg(long, value_parser = humantime::parse_duration)]
        feed_phase: Option<std::time::Duration>,

        /// The arrival scenario's admission limits for its run with
        /// admission control, RUNNING,QUEUED (the registry's
        /// `--max-concurrent-registrations` and
        /// `--max-queued-registrations`); its defaults otherwise.
        #[arg(long, value_name = "RUNNING,QUEUED", value_parser = running_and_queued)]
        arrival_admission: Option<(usize, usize)>,
    },
}

/// `RUNNING,QUEUED`: two counts.
fn running_and_queued(value: &str) -> Result<(usize, usize), String> {
    let (running, queued) = value
        .split_once(',')
        .ok_or("expected RUNNING,QUEUED (two counts)")?;
    let count = |n: &str| n.trim().parse::<usize>().map_err(|e| format!("{n:?}: {e}"));
    Ok((count(running)?, count(queued)?))
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
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "bench failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), BenchError> {
    let server_bin = match cli.server_bin {
        Some(bin) => bin,
        None => sibling_server()?,
    };
    let (plan, scenarios, name) = match cli.command {
        Command::All => (Plan::full(), Scenario::ALL.to_vec(), "all"),
        Command::Quick => (Plan::quick(true), Scenario::ALL.to_vec(), "quick"),
        Command::Run {
            scenarios,
            scale_nodes,
            scale_window,
            scale_interval,
            scale_ramp,
            feed_nodes,
            feed_phase,
            arrival_admission,
        } => {
            let mut plan = Plan::full();
            if !scale_nodes.is_empty() {
                plan.scale = scale_nodes
                    .iter()
                    .map(|&nodes| {
                        plan.scale
                            .iter()
                            .find(|step| step.nodes == nodes)
                            .copied()
                            .unwrap_or(bench::plan::ScaleStep {
                                nodes,
                                connections: if nodes > 19_000 {
                                    nodes.div_ceil(100)
                                } else {
                                    0
                                },
                                ramp: 2_000.0,
                            })
                    })
                    .collect();
            }
            if let Some(interval) = scale_interval {
                plan.scale_interval = interval;
                plan.scale_timeout = interval * 3;
            }
            if let Some(ramp) = scale_ramp {
                for step in &mut plan.scale {
                    step.ramp = ramp;
                }
            }
            if let Some(window) = scale_window {
                plan.scale_window = window;
            }
            if let Some(nodes) = feed_nodes {
                plan.feed.nodes = nodes;
                plan.feed.connections = plan.feed.connections.min(nodes);
            }
            if let Some(phase) = feed_phase {
                plan.feed.phase = phase;
            }
            if arrival_admission.is_some() {
                plan.arrival.admission = arrival_admission;
            }
            (plan, scenarios, "run")
        }
    };
    let soft = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| BenchError::Io(format!("raising the open-file limit: {e}")))?;
    tracing::info!(open_files = soft, server = %server_bin.display(), "bench starting");
    let launcher = Launcher::Process {
        bin: server_bin,
        log_dir: cli.out.join("logs"),
    };
    let machine = bench::machine();
    tracing::info!(machine = %machine, "machine");
    let results = bench::run(&launcher, &plan, &scenarios, true).await?;
    let report = format!(
        "# bench {name}\n\nmachine: {machine}\n\n{}",
        bench::table::all(&results)
    );
    println!("{report}");
    let path = cli.out.join(format!("results-{name}.md"));
    std::fs::write(&path, report)
        .map_err(|e| BenchError::Io(format!("{}: {e}", path.display())))?;
    tracing::info!(path = %path.display(), "results written");
    Ok(())
}

/// registry-server next to this binary. Under `cargo run` (which sets
/// CARGO) it is built first in this binary's profile, so the bench never
/// measures a stale server.
fn sibling_server() -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Io(format!("current exe: {e}")))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let bin = dir.join("registry-server");
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "-p", "registry-server", "--bin", "registry-server"]);
        // `cargo run` hands this process the bench package's CARGO_PKG_*,
        // CARGO_MANIFEST_* ... variables; build scripts that watch them
        // (ring's does) would otherwise rebuild on every run, in both this
        // build and the next `cargo run`.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let from_cargo_run = key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || matches!(
                    &*key,
                    "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
                );
            if from_cargo_run {
                build.env_remove(&*key);
            }
        }
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let status = build
            .status()
            .map_err(|e| BenchError::Io(format!("cargo build -p registry-server: {e}")))?;
        if !status.success() {
            return Err(BenchError::Io(format!(
                "cargo build -p registry-server failed: {status}"
            )));
        }
    }
    if !bin.exists() {
        return Err(BenchError::Io(format!(
            "{} not found: build it (cargo build --release -p registry-server) or pass --server-bin",
            bin.display()
        )));
    }
    Ok(bin)
}
