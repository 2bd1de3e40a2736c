//! bench: how many nodes one registry holds, and at what cost.
//!
//! Runs the registry as a separate process (its CPU time and memory read
//! from /proc), drives it with an in-process [`fleet_sim`] fleet, and prints
//! Markdown tables. Nothing here asserts a timing: the bench prints, a
//! person reads. The quick plan runs in `cargo test` so the bench cannot rot.
//!
//! Module map:
//! - [`plan`]: scenario parameters, full and quick;
//! - [`server`]: the registry under test (child process or in-process task);
//! - [`scenarios`]: scale, throughput, detection, reads, restart storm,
//!   change feed, drain round trip, store write path, replicas on etcd;
//! - [`inspect`]: the registry's view through ListNodes;
//! - [`procfs`]: CPU and memory of a process;
//! - [`table`]: Markdown output.

pub mod inspect;
pub mod plan;
pub mod procfs;
pub mod scenarios;
pub mod server;
pub mod table;

use scenarios::detection::DetectionResult;
use scenarios::drain::DrainResult;
use scenarios::feed::FeedResult;
use scenarios::reads::ReadsResult;
use scenarios::restart::RestartRow;
use scenarios::scale::ScaleRow;
use scenarios::throughput::ThroughputResult;

use crate::plan::Plan;
use crate::server::Launcher;

/// Why a benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or process operation failed.
    #[error("{0}")]
    Io(String),
    /// /proc could not be read for a process.
    #[error("/proc/{0}: {1}")]
    Proc(u32, String),
    /// The registry failed to start, stop or answer.
    #[error("registry: {0}")]
    Server(String),
    /// The simulator could not start.
    #[error("fleet: {0}")]
    Sim(String),
    /// The fleet did not come up (or back) in time.
    #[error("stalled: {0}")]
    Stalled(String),
}

/// Which scenarios to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 1. Scale steps.
    Scale,
    /// 2. Throughput search.
    Throughput,
    /// 3. Failure detection.
    Detection,
    /// 4. ListNodes under load.
    Reads,
    /// 5. Restart storm.
    Restart,
    /// 6. The change feed under churn (issue 10).
    Feed,
    /// 7. The drain round trip (issue 11).
    Drain,
    /// 8. The store's write path: a Register storm (issue 11).
    Store,
    /// Scenario 9, three replicas on etcd against one registry: storm,
    /// steady state, leader SIGKILL (issue 12; skipped without etcd).
    Replicas,
    /// Scenario 10, agents arriving all at once beside a registered fleet,
    /// with Register's admission control and without (issue 13).
    Arrival,
}

impl Scenario {
    /// Every scenario, in the order they run: scale last, because its 100k
    /// step leaves the simulator's heap large and fragmented, which would
    /// slow the simulator (and inflate latencies) in any scenario after it.
    /// The tables still print in the order.
    pub const ALL: [Scenario; 10] = [
        Scenario::Store,
        Scenario::Arrival,
        Scenario::Replicas,
        Scenario::Throughput,
        Scenario::Detection,
        Scenario::Reads,
        Scenario::Restart,
        Scenario::Feed,
        Scenario::Drain,
        Scenario::Scale,
    ];
}

/// The figures of the scenarios that ran.
#[derive(Debug, Clone, Default)]
pub struct Results {
    /// Scenario 1.
    pub scale: Option<Vec<ScaleRow>>,
    /// Scenario 2.
    pub throughput: Option<ThroughputResult>,
    /// Scenario 3.
    pub detection: Option<DetectionResult>,
    /// Scenario 4.
    pub reads: Option<ReadsResult>,
    /// Scenario 5.
    pub restart: Option<Vec<RestartRow>>,
    /// Scenario 6.
    pub feed: Option<FeedResult>,
    /// Scenario 7.
    pub drain: Option<DrainResult>,
    /// Scenario 8.
    pub store: Option<scenarios::store::StoreResult>,
    /// Scenario 9 (`None` also when skipped for want of etcd).
    pub replicas: Option<scenarios::replicas::ReplicasResult>,
    /// Scenario 10.
    pub arrival: Option<scenarios::arrival::ArrivalResult>,
}

/// Runs `scenarios` of `plan` in order, printing each table to stderr as it
/// is done when `print` is set.
pub async fn run(
    launcher: &Launcher,
    plan: &Plan,
    scenarios: &[Scenario],
    print: bool,
) -> Result<Results, BenchError> {
    let mut results = Results::default();
    for scenario in scenarios {
        tracing::info!(scenario = ?scenario, "scenario starting");
        let table = match scenario {
            Scenario::Scale => {
                let rows = scenarios::scale::run(launcher, plan).await?;
                let table = table::scale(&rows);
                results.scale = Some(rows);
                table
            }
            Scenario::Throughput => {
                let t = scenarios::throughput::run(launcher, plan).await?;
                let table = table::throughput(&t);
                results.throughput = Some(t);
                table
            }
            Scenario::Detection => {
                let d = scenarios::detection::run(launcher, plan).await?;
                let table = table::detection(&d);
                results.detection = Some(d);
                table
            }
            Scenario::Reads => {
                let r = scenarios::reads::run(launcher, plan).await?;
                let table = table::reads(&r);
                results.reads = Some(r);
                table
            }
            Scenario::Restart => {
                let rows = scenarios::restart::run(launcher, plan).await?;
                let table = table::restart(&rows);
                results.restart = Some(rows);
                table
            }
            Scenario::Store => {
                let s = scenarios::store::run(launcher, plan).await?;
                let table = table::store(&s);
                results.store = Some(s);
                table
            }
            Scenario::Feed => {
                let f = scenarios::feed::run(launcher, plan).await?;
                let table = table::feed(&f);
                results.feed = Some(f);
                table
            }
            Scenario::Replicas => match scenarios::replicas::run(launcher, plan).await? {
                Some(r) => {
                    let table = table::replicas(&r);
                    results.replicas = Some(r);
                    table
                }
                None => "Scenario 9 (replicas) skipped: etcd is not installed.\n".to_owned(),
            },
            Scenario::Arrival => {
                let a = scenarios::arrival::run(launcher, plan).await?;
                let table = table::arrival(&a);
                results.arrival = Some(a);
                table
            }
            Scenario::Drain => {
                let d = scenarios::drain::run(launcher, plan).await?;
                let table = table::drain(&d);
                results.drain = Some(d);
                table
            }
        };
        if print {
            eprintln!("\n{table}");
        }
    }
    Ok(results)
}

/// The machine the figures were taken on: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |kib| kib as f64 / (1 << 20) as f64);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, hard)| format!("{soft}/{hard}"))
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {}, open files (soft/hard) {nofile}",
        kernel.trim()
    )
}
