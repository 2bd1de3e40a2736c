//! Scenario 7, drain (issue 11): the drain round trip. A fleet of `nodes`
//! heartbeating every `interval`; `drains` of them are drained one by one.
//! For each: the time from calling DrainNode to a WatchNodes event showing
//! the node's drain acknowledged (the registry pushed DrainCommand on the
//! node's open Heartbeat stream, the simulated agent reported its pools
//! DRAINING on a beat sent at once, and the registry published the
//! acknowledgement); then, after CancelDrain, the time until an event
//! shows no pool DRAINING (ResumeCommand pushed and carried out).
//!
//! The heartbeat interval is long on purpose (10 s in the published plan):
//! a round trip far below it shows the command was pushed, not picked up
//! on the next heartbeat. One watcher on its own connection, started from
//! the current revision; both clocks are this process's monotonic clock.

use std::time::Duration;

use fleet_sim::LatencySummary;
use hdrhistogram::Histogram;
use registry_proto::pb;
use tokio::time::{Instant, timeout};
use tonic::Streaming;

use super::{fleet_config, start_fleet};
use crate::BenchError;
use crate::inspect;
use crate::plan::Plan;
use crate::server::{Launcher, ServerSpec};

/// The scenario's figures.
#[derive(Debug, Clone)]
pub struct DrainResult {
    /// Virtual nodes heartbeating.
    pub nodes: usize,
    /// Nodes drained, one after another.
    pub drains: usize,
    /// Heartbeat interval.
    pub interval: Duration,
    /// DrainNode call → event with the drain acknowledged.
    pub drain: LatencySummary,
    /// CancelDrain call → event with no pool DRAINING.
    pub resume: LatencySummary,
    /// Round trips that did not finish within the limit.
    pub timed_out: usize,
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Runs the scenario.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<DrainResult, BenchError> {
    let p = &plan.drain;
    let mut spec = ServerSpec::new("drain").timing(p.interval * 3, p.interval);
    spec.max_connections = spec.max_connections.max(p.nodes + 16);
    let server = launcher.start(&spec).await?;
    let config = fleet_config("drain", p.nodes, p.connections, 2_000.0);
    let ids: Vec<String> = (0..p.drains.min(p.nodes))
        .map(|i| config.node_id(i * p.nodes / p.drains.max(1)))
        .collect();
    let fleet = start_fleet(&server, config, Duration::from_secs(120)).await?;

    let mut client = inspect::client(&server.url()).await?;
    let revision = client
        .list_nodes(pb::ListNodesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .map_err(|s| BenchError::Server(format!("ListNodes: {}", s.message())))?
        .into_inner()
        .revision;
    let mut watcher = inspect::client(&server.url()).await?;
    let mut events = watcher
        .watch_nodes(pb::WatchNodesRequest {
            start_revision: revision,
            ..Default::default()
        })
        .await
        .map_err(|s| BenchError::Server(format!("WatchNodes: {}", s.message())))?
        .into_inner();

    let (mut drain_h, mut resume_h) = (histogram(), histogram());
    let mut timed_out = 0;
    for id in &ids {
        let started = Instant::now();
        client
            .drain_node(pb::DrainNodeRequest {
                node_id: id.clone(),
                reason: "bench".into(),
                ..Default::default()
            })
            .await
            .map_err(|s| BenchError::Server(format!("DrainNode {id}: {}", s.message())))?;
        match until(&mut events, id, p.limit, acknowledged).await? {
            true => drain_h.saturating_record(micros(started.elapsed())),
            false => timed_out += 1,
        }
        let started = Instant::now();
        client
            .cancel_drain(pb::CancelDrainRequest {
                node_id: id.clone(),
            })
            .await
            .map_err(|s| BenchError::Server(format!("CancelDrain {id}: {}", s.message())))?;
        match until(&mut events, id, p.limit, resumed).await? {
            true => resume_h.saturating_record(micros(started.elapsed())),
            false => timed_out += 1,
        }
    }
    fleet.stop().await;
    server.stop().await?;
    Ok(DrainResult {
        nodes: p.nodes,
        drains: ids.len(),
        interval: p.interval,
        drain: LatencySummary::of(&drain_h),
        resume: LatencySummary::of(&resume_h),
        timed_out,
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// The node's drain is acknowledged by its agent.
fn acknowledged(node: &pb::Node) -> bool {
    node.admin
        .as_ref()
        .and_then(|a| a.drain.as_ref())
        .is_some_and(|d| d.acknowledged)
}

/// No drain requested and no pool reported DRAINING.
fn resumed(node: &pb::Node) -> bool {
    node.admin.as_ref().is_some_and(|a| a.drain.is_none())
        && !node.pool_status.is_empty()
        && node
            .pool_status
            .iter()
            .all(|p| p.state != pb::PoolState::Draining as i32)
}

/// Reads events until one of node `id` passes `done` (true) or `limit`
/// passes (false).
async fn until(
    events: &mut Streaming<pb::WatchNodesResponse>,
    id: &str,
    limit: Duration,
    done: fn(&pb::Node) -> bool,
) -> Result<bool, BenchError> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match timeout(left, events.message()).await {
            Err(_) => return Ok(false),
            Ok(m) => m.map_err(|s| BenchError::Server(format!("WatchNodes: {}", s.message())))?,
        };
        let Some(event) = message else {
            return Err(BenchError::Server("WatchNodes ended".into()));
        };
        if event
            .node
            .as_ref()
            .is_some_and(|n| n.node_id == id && done(n))
        {
            return Ok(true);
        }
    }
}
