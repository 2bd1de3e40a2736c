//! Scenario 2, throughput: one fleet whose interval shrinks step by step;
//! the highest heartbeat rate whose ack p99 stays under the limit.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_sim::LatencySummary;
use tracing::info;

use super::{fleet_config, measure, start_fleet};
use crate::BenchError;
use crate::plan::Plan;
use crate::server::{Launcher, ServerSpec};

/// One offered rate's figures.
#[derive(Debug, Clone)]
pub struct ThroughputRow {
    /// Heartbeats per second the fleet was asked to send.
    pub offered: u64,
    /// Acks per second received.
    pub achieved: f64,
    /// Ack latency at this rate.
    pub ack: LatencySummary,
    /// Simulator timer lateness at this rate.
    pub wake_lag: LatencySummary,
    /// Server CPU, percent of one core.
    pub server_cpu_percent: f64,
    /// Server CPU-seconds per 100k acknowledged heartbeats.
    pub cpu_seconds_per_100k: f64,
    /// Simulator CPU, percent of one core.
    pub sim_cpu_percent: f64,
    /// Errors at this rate.
    pub errors: BTreeMap<String, u64>,
    /// Whether the rate was sustained: p99 under the limit, at least 95% of
    /// the offered rate acknowledged, no errors.
    pub sustained: bool,
    /// Whether the registry kept up at all: at least 95% of the offered
    /// rate acknowledged, no errors (latency aside).
    pub kept_up: bool,
}

/// The search's figures.
#[derive(Debug, Clone)]
pub struct ThroughputResult {
    /// Virtual nodes.
    pub nodes: usize,
    /// Connections they shared.
    pub connections: usize,
    /// The p99 limit.
    pub p99_limit: Duration,
    /// Every rate tried, ascending.
    pub rows: Vec<ThroughputRow>,
}

impl ThroughputResult {
    /// The highest sustained rate's row.
    pub fn best(&self) -> Option<&ThroughputRow> {
        self.rows
            .iter()
            .filter(|r| r.sustained)
            .max_by(|a, b| a.achieved.total_cmp(&b.achieved))
    }

    /// The row with the most acks per second, whatever the latency.
    pub fn peak(&self) -> Option<&ThroughputRow> {
        self.rows
            .iter()
            .max_by(|a, b| a.achieved.total_cmp(&b.achieved))
    }
}

/// Runs the search.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<ThroughputResult, BenchError> {
    let p = &plan.throughput;
    let mut spec = ServerSpec::new("throughput");
    spec.max_streams_per_connection = spec
        .max_streams_per_connection
        .max((p.nodes / p.connections.max(1) + 1) as u32);
    let server = launcher.start(&spec).await?;
    let mut config = fleet_config("tput", p.nodes, p.connections, 5_000.0);
    let first_rate = p.rates.first().copied().unwrap_or(1000).max(1);
    config.interval = Some(Duration::from_secs_f64(p.nodes as f64 / first_rate as f64));
    let fleet = start_fleet(&server, config, Duration::from_secs(120)).await?;
    let mut rows = Vec::new();
    let mut previous = Duration::from_secs_f64(p.nodes as f64 / first_rate as f64);
    for &offered in &p.rates {
        let interval = Duration::from_secs_f64(p.nodes as f64 / offered as f64);
        fleet.set_interval(interval);
        // Sleeps of the previous interval end first, then the new rate holds.
        tokio::time::sleep(previous.mul_f64(1.1) + p.warmup).await;
        previous = interval;
        let window = measure(&server, &fleet, p.window).await?;
        let achieved = window.ack_rate();
        let acked = window.acked().max(1);
        let errors = window.errors();
        let row = ThroughputRow {
            offered,
            achieved,
            ack: window.ack,
            wake_lag: window.wake_lag,
            server_cpu_percent: window.server_cpu_percent(),
            cpu_seconds_per_100k: window.server_cpu().as_secs_f64() * 100_000.0 / acked as f64,
            sim_cpu_percent: window.sim_cpu_percent(),
            sustained: window.ack.p99 < p.p99_limit
                && achieved >= offered as f64 * 0.95
                && errors.is_empty(),
            kept_up: achieved >= offered as f64 * 0.95 && errors.is_empty(),
            errors,
        };
        info!(
            offered,
            achieved = achieved as u64,
            ack_p99_us = row.ack.p99.as_micros() as u64,
            server_cpu_percent = row.server_cpu_percent as u64,
            sustained = row.sustained,
            "throughput step done"
        );
        let kept_up = row.kept_up;
        rows.push(row);
        if !kept_up {
            break;
        }
    }
    fleet.stop().await;
    server.stop().await?;
    Ok(ThroughputResult {
        nodes: p.nodes,
        connections: p.connections,
        p99_limit: p.p99_limit,
        rows,
    })
}
