//! Scenario 3, detection: silence a fraction of a fleet (streams stay
//! open) and read, for each silent node, how long after its deadline
//! (last heartbeat + node timeout) the registry marked it OFFLINE.

use std::collections::HashSet;
use std::time::Duration;

use fleet_sim::LatencySummary;
use hdrhistogram::Histogram;
use registry_proto::pb;
use tracing::info;

use super::{fleet_config, start_fleet};
use crate::BenchError;
use crate::inspect;
use crate::plan::Plan;
use crate::server::{Launcher, ServerSpec};

/// The scenario's figures.
#[derive(Debug, Clone)]
pub struct DetectionResult {
    /// Virtual nodes.
    pub nodes: usize,
    /// Nodes silenced.
    pub silenced: usize,
    /// Silenced nodes the registry marked OFFLINE.
    pub detected: usize,
    /// Silenced nodes still ONLINE at the end (should be none).
    pub missed: usize,
    /// Nodes that never stopped sending but were marked OFFLINE.
    pub false_offline: usize,
    /// Offline lag of the detected nodes.
    pub lag: LatencySummary,
    /// Node timeout used.
    pub node_timeout: Duration,
    /// Heartbeat interval used.
    pub interval: Duration,
}

/// Runs the scenario.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<DetectionResult, BenchError> {
    let p = &plan.detection;
    let spec = ServerSpec::new("detection").timing(p.node_timeout, p.interval);
    let server = launcher.start(&spec).await?;
    let mut config = fleet_config("detect", p.nodes, p.connections, 5_000.0);
    config.silence_fraction = p.fraction;
    let silenced: HashSet<String> = config.silenced_ids().into_iter().collect();
    let fleet = start_fleet(&server, config, Duration::from_secs(120)).await?;
    tokio::time::sleep(p.steady).await;
    fleet.silence();
    // Every silent node's deadline is at most one interval (plus jitter)
    // plus the timeout away; a second more for the last ones.
    tokio::time::sleep(p.node_timeout + p.interval.mul_f64(1.2) + Duration::from_secs(1)).await;

    let mut client = inspect::client(&server.url()).await?;
    let offline = inspect::list_all(&mut client, pb::NodeStatus::Offline).await?;
    let census = inspect::census(&mut client, &silenced).await?;
    drop(client);
    fleet.stop().await;
    server.stop().await?;

    let mut lags =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
    let mut detected = 0;
    for node in offline.iter().filter(|n| silenced.contains(&n.node_id)) {
        detected += 1;
        if let Some(lag) = inspect::offline_lag(node, p.node_timeout) {
            lags.saturating_record((lag.as_micros() as u64).max(1));
        }
    }
    let result = DetectionResult {
        nodes: p.nodes,
        silenced: silenced.len(),
        detected,
        missed: silenced.len() - detected,
        false_offline: census.false_offline,
        lag: LatencySummary::of(&lags),
        node_timeout: p.node_timeout,
        interval: p.interval,
    };
    info!(
        detected,
        missed = result.missed,
        false_offline = result.false_offline,
        lag_p99_us = result.lag.p99.as_micros() as u64,
        "detection done"
    );
    Ok(result)
}
