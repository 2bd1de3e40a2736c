//! Scenario 5, restart storm: stop the registry under a fleet and start it
//! again on the same address; time until every node is registered and
//! heartbeating again, how many had to register again (with the embedded
//! store: none should), and whether anyone was marked OFFLINE.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use tokio::time::{Instant, sleep};
use tracing::info;

use super::{fleet_config, start_fleet, wait_attached};
use crate::BenchError;
use crate::plan::{Plan, RestartStore};
use crate::server::{Launcher, ServerSpec, StopMode};
use crate::{inspect, procfs};

/// One restart's figures.
#[derive(Debug, Clone)]
pub struct RestartRow {
    /// The registry's store.
    pub store: RestartStore,
    /// How the registry was stopped.
    pub mode: StopMode,
    /// Virtual nodes.
    pub nodes: usize,
    /// Connections they used.
    pub connections: usize,
    /// From the stop signal until the new server listened.
    pub down: Duration,
    /// From the stop signal until every node was attached again.
    pub all_back: Duration,
    /// Nodes the new registry listed ONLINE at the end.
    pub online: usize,
    /// Nodes whose session changed across the restart: they had to
    /// register again.
    pub reregistered: usize,
    /// Nodes marked OFFLINE by the new registry, or missing from it.
    pub false_offline: usize,
    /// Connections the kernel dropped because the registry's accept queue
    /// was full (TcpExt ListenOverflows during the storm); each costs its
    /// client a SYN retransmit (1 s, then 3 s ...). None if unreadable.
    pub listen_overflows: Option<u64>,
    /// Errors the fleet saw during the storm (expected: UNAVAILABLE and
    /// NOT_FOUND while the registry was away and after it came back).
    pub errors: BTreeMap<String, u64>,
}

/// Runs one restart per mode in `plan` for each store, one fleet each.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<Vec<RestartRow>, BenchError> {
    let mut rows = Vec::new();
    for &store in &plan.restart.stores {
        rows.extend(run_with(launcher, plan, store).await?);
    }
    Ok(rows)
}

/// One fleet, one restart per mode, with `store`.
async fn run_with(
    launcher: &Launcher,
    plan: &Plan,
    store: RestartStore,
) -> Result<Vec<RestartRow>, BenchError> {
    let p = &plan.restart;
    let spec = match store {
        RestartStore::Memory => ServerSpec::new("restart-memory"),
        RestartStore::Embedded => {
            ServerSpec::new("restart-embedded").embedded(launcher.data_dir("restart")?)
        }
    };
    let connections = if p.connections == 0 {
        p.nodes
    } else {
        p.connections
    };
    let mut server = launcher.start(&spec).await?;
    let config = fleet_config("restart", p.nodes, p.connections, 2_000.0);
    let fleet = start_fleet(&server, config, Duration::from_secs(120)).await?;
    let stats = fleet.stats();
    let mut rows = Vec::new();
    for &mode in &p.modes {
        sleep(Duration::from_secs(1)).await;
        let before = stats.snapshot();
        let sessions_before = inspect::sessions(&server.url()).await?;
        let overflows_before = procfs::listen_overflows();
        let start = Instant::now();
        server.restart(mode).await?;
        let down = start.elapsed();
        // Every stream of the old server has failed by now or fails soon;
        // wait until the fleet noticed before waiting for it to be whole.
        let noticed = Instant::now() + Duration::from_secs(5);
        while stats.attached() >= p.nodes as i64 && Instant::now() < noticed {
            sleep(Duration::from_millis(5)).await;
        }
        wait_attached(&fleet, p.nodes, p.limit).await?;
        let all_back = start.elapsed();
        let listen_overflows = overflows_before
            .zip(procfs::listen_overflows())
            .map(|(before, after)| after.saturating_sub(before));
        let errors = stats.snapshot().errors_since(&before);
        let mut client = inspect::client(&server.url()).await?;
        let census = inspect::census(&mut client, &HashSet::new()).await?;
        let sessions_after = inspect::sessions(&server.url()).await?;
        let reregistered = sessions_before
            .iter()
            .filter(|(id, session)| sessions_after.get(*id) != Some(*session))
            .count();
        let row = RestartRow {
            store,
            reregistered,
            mode,
            nodes: p.nodes,
            connections,
            down,
            all_back,
            online: census.online,
            false_offline: census.false_offline + p.nodes.saturating_sub(census.listed),
            listen_overflows,
            errors,
        };
        info!(mode = ?mode, down_ms = down.as_millis() as u64, all_back_ms = all_back.as_millis() as u64, false_offline = row.false_offline, "restart done");
        rows.push(row);
    }
    fleet.stop().await;
    server.stop().await?;
    Ok(rows)
}
