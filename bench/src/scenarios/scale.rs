//! Scenario 1, scale: N nodes at the production interval for a steady
//! window; server CPU and memory, ack latency, and no false OFFLINE.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use fleet_sim::LatencySummary;
use tracing::info;

use super::{fleet_config, measure, start_fleet};
use crate::BenchError;
use crate::inspect;
use crate::plan::{Plan, ScaleStep};
use crate::server::{Launcher, ServerSpec};

/// One scale step's figures.
#[derive(Debug, Clone)]
pub struct ScaleRow {
    /// Virtual nodes.
    pub nodes: usize,
    /// Connections they shared.
    pub connections: usize,
    /// Heartbeat interval (node timeout 3x).
    pub interval: Duration,
    /// Registrations per second achieved while ramping.
    pub registrations_per_sec: f64,
    /// Acks per second in the window.
    pub heartbeats_per_sec: f64,
    /// Server CPU, percent of one core.
    pub server_cpu_percent: f64,
    /// Simulator (this process) CPU, percent of one core.
    pub sim_cpu_percent: f64,
    /// Server RSS at the end of the window, bytes.
    pub rss: u64,
    /// Server peak RSS, bytes.
    pub peak_rss: u64,
    /// (RSS - RSS of the idle server) / nodes, bytes.
    pub rss_per_node: u64,
    /// Ack latency in the window.
    pub ack: LatencySummary,
    /// Simulator timer lateness in the window.
    pub wake_lag: LatencySummary,
    /// Errors in the window.
    pub errors: BTreeMap<String, u64>,
    /// Nodes ever marked OFFLINE although none was silenced.
    pub false_offline: usize,
    /// Nodes the registry listed at the end.
    pub listed: usize,
}

/// Runs every scale step of `plan`.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<Vec<ScaleRow>, BenchError> {
    let mut rows = Vec::new();
    for step in &plan.scale {
        let row = step_run(launcher, plan, step).await?;
        info!(
            nodes = row.nodes,
            server_cpu_percent = row.server_cpu_percent,
            rss_mib = row.rss >> 20,
            ack_p99_us = row.ack.p99.as_micros() as u64,
            false_offline = row.false_offline,
            "scale step done"
        );
        rows.push(row);
    }
    Ok(rows)
}

async fn step_run(
    launcher: &Launcher,
    plan: &Plan,
    step: &ScaleStep,
) -> Result<ScaleRow, BenchError> {
    let mut spec = ServerSpec::new(format!("scale-{}", step.nodes))
        .timing(plan.scale_timeout, plan.scale_interval);
    let connections = if step.connections == 0 {
        step.nodes
    } else {
        step.connections
    };
    spec.max_streams_per_connection = spec
        .max_streams_per_connection
        .max((step.nodes / connections + 1) as u32);
    spec.max_connections = spec.max_connections.max(connections + 64);
    spec.max_nodes = spec.max_nodes.max(step.nodes + 1_000);
    let server = launcher.start(&spec).await?;
    let idle = server.sample()?;
    let config = fleet_config("scale", step.nodes, step.connections, step.ramp);
    let ramp_time = Duration::from_secs_f64(step.nodes as f64 / step.ramp.max(1.0));
    let fleet = start_fleet(&server, config, ramp_time * 3 + Duration::from_secs(60)).await?;
    let registrations_per_sec = fleet
        .stats()
        .report(step.nodes, connections)
        .registrations_per_sec;
    // One full interval more, so every node is in its steady rhythm.
    tokio::time::sleep(plan.scale_interval + plan.scale_interval / 10).await;
    let window = measure(&server, &fleet, plan.scale_window).await?;
    let mut client = inspect::client(&server.url()).await?;
    let census = inspect::census(&mut client, &HashSet::new()).await?;
    drop(client);
    fleet.stop().await;
    server.stop().await?;
    let rss = window.server_after.rss;
    Ok(ScaleRow {
        nodes: step.nodes,
        connections,
        interval: plan.scale_interval,
        registrations_per_sec,
        heartbeats_per_sec: window.ack_rate(),
        server_cpu_percent: window.server_cpu_percent(),
        sim_cpu_percent: window.sim_cpu_percent(),
        rss,
        peak_rss: window.server_after.hwm,
        rss_per_node: rss.saturating_sub(idle.rss) / step.nodes as u64,
        ack: window.ack,
        wake_lag: window.wake_lag,
        errors: window.errors(),
        false_offline: census.false_offline + step.nodes.saturating_sub(census.listed),
        listed: census.listed,
    })
}
