//! The scenarios (five of the first issue, feed of issue 10, drain and
//! store of issue 11, replicas of issue 12, arrival of issue 13), each
//! against a fresh registry,
//! and the
//! helpers they share (start a fleet and wait for it, measure a window).

pub mod arrival;
pub mod detection;
pub mod drain;
pub mod feed;
pub mod reads;
pub mod replicas;
pub mod restart;
pub mod scale;
pub mod store;
pub mod throughput;

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_sim::{Fleet, FleetConfig, LatencySummary, Snapshot};
use tokio::time::{Instant, sleep};

use crate::BenchError;
use crate::procfs::{self, ProcSample};
use crate::server::Server;

/// Starts `config` against `server` and waits until every node has an
/// acknowledged heartbeat stream (or `limit` passes).
pub async fn start_fleet(
    server: &Server,
    mut config: FleetConfig,
    limit: Duration,
) -> Result<Fleet, BenchError> {
    config.registry = server.url();
    let nodes = config.nodes;
    let fleet = Fleet::start(config).map_err(|e| BenchError::Sim(e.to_string()))?;
    wait_attached(&fleet, nodes, limit).await?;
    Ok(fleet)
}

/// Waits until `nodes` nodes of `fleet` are attached.
pub async fn wait_attached(
    fleet: &Fleet,
    nodes: usize,
    limit: Duration,
) -> Result<Duration, BenchError> {
    wait_until(fleet, nodes, limit, "attached", |s| {
        u64::try_from(s.attached).unwrap_or(0)
    })
    .await
}

/// Waits until `fleet` counts `nodes` successful Register calls.
pub async fn wait_registered(
    fleet: &Fleet,
    nodes: usize,
    limit: Duration,
) -> Result<Duration, BenchError> {
    wait_until(fleet, nodes, limit, "registered", |s| s.registrations).await
}

/// Waits until `count` of the fleet's counters reaches `nodes`; the
/// stall error says how far it got (`what`: "attached").
async fn wait_until(
    fleet: &Fleet,
    nodes: usize,
    limit: Duration,
    what: &str,
    count: fn(&Snapshot) -> u64,
) -> Result<Duration, BenchError> {
    let start = Instant::now();
    let stats = fleet.stats();
    loop {
        let snapshot = stats.snapshot();
        if count(&snapshot) >= nodes as u64 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(BenchError::Stalled(format!(
                "{} of {nodes} nodes {what} after {}; errors: {}",
                count(&snapshot),
                humantime::format_duration(limit),
                fleet_sim::stats::fmt_errors(&snapshot.errors)
            )));
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// A fleet config against no registry yet ([`start_fleet`] fills it in).
pub fn fleet_config(prefix: &str, nodes: usize, connections: usize, ramp: f64) -> FleetConfig {
    let mut config = FleetConfig::new("http://127.0.0.1:0", nodes);
    config.id_prefix = prefix.into();
    config.connections = connections;
    config.ramp = ramp;
    config
}

/// What happened during one measured window.
#[derive(Debug, Clone)]
pub struct Window {
    /// Wall time measured.
    pub wall: Duration,
    /// Server CPU and memory at the start.
    pub server_before: ProcSample,
    /// Server CPU and memory at the end.
    pub server_after: ProcSample,
    /// This process's (the simulator's) CPU at the start.
    pub sim_before: ProcSample,
    /// This process's CPU at the end.
    pub sim_after: ProcSample,
    /// Fleet counters at the start.
    pub fleet_before: Snapshot,
    /// Fleet counters at the end.
    pub fleet_after: Snapshot,
    /// Ack latency within the window.
    pub ack: LatencySummary,
    /// How late the simulator's heartbeat timers fired within the window.
    pub wake_lag: LatencySummary,
}

impl Window {
    /// Server CPU as a percentage of one core.
    pub fn server_cpu_percent(&self) -> f64 {
        procfs::cpu_percent(&self.server_before, &self.server_after, self.wall)
    }

    /// Simulator CPU as a percentage of one core.
    pub fn sim_cpu_percent(&self) -> f64 {
        procfs::cpu_percent(&self.sim_before, &self.sim_after, self.wall)
    }

    /// Server CPU time spent in the window.
    pub fn server_cpu(&self) -> Duration {
        self.server_after.cpu.saturating_sub(self.server_before.cpu)
    }

    /// Acks per second.
    pub fn ack_rate(&self) -> f64 {
        self.fleet_after.ack_rate_since(&self.fleet_before)
    }

    /// Acks in the window.
    pub fn acked(&self) -> u64 {
        self.fleet_after.acked - self.fleet_before.acked
    }

    /// Errors in the window.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.fleet_after.errors_since(&self.fleet_before)
    }
}

/// Measures `length` of steady running: server and simulator CPU and
/// memory, acks, errors and ack latency.
pub async fn measure(
    server: &Server,
    fleet: &Fleet,
    length: Duration,
) -> Result<Window, BenchError> {
    let stats = fleet.stats();
    let me = std::process::id();
    let (fleet_before, _) = stats.take_window();
    let server_before = server.sample()?;
    let sim_before = procfs::sample(me)?;
    let start = Instant::now();
    sleep(length).await;
    let (fleet_after, latency) = stats.take_window();
    let server_after = server.sample()?;
    let sim_after = procfs::sample(me)?;
    Ok(Window {
        wall: start.elapsed(),
        server_before,
        server_after,
        sim_before,
        sim_after,
        fleet_before,
        fleet_after,
        ack: latency.ack,
        wake_lag: latency.wake_lag,
    })
}
