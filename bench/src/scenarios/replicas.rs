//! Scenario 9, several replicas on etcd (issue 12): three registry replicas
//! on a 3-member etcd cluster, then one registry with the embedded store
//! for comparison, each under the same fleet:
//! - a registration storm (every node registers at the plan's ramp, each
//!   Register answered once its record is committed: through etcd for the
//!   replicas);
//! - a steady window: the leader's CPU and memory, heartbeats acked, and
//!   what etcd did meanwhile (write transactions, keys written, raft
//!   proposals, the members' CPU): heartbeats are never written, so a
//!   quiet fleet should cost etcd ~0 writes;
//! - the leader SIGKILLed (replicas only): time until a new leader serves
//!   (its `registry.v1.NodeRegistry` health SERVING), and until every node
//!   heartbeats to it again; how many nodes had to register again, and how
//!   many the new leader lists OFFLINE.
//!
//! Skipped, with a line saying so, where etcd is not installed (outside
//! CI; see `test_support::etcd`).

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_sim::{Fleet, LatencySummary};
use test_support::etcd::EtcdCluster;
use test_support::health::leads;
use tokio::time::{Instant, sleep};
use tracing::info;

use super::{Window, fleet_config, measure, wait_attached};
use crate::plan::{Plan, ReplicasPlan};
use crate::server::{EtcdTarget, Launcher, Server, ServerSpec, StopMode};
use crate::{BenchError, inspect, procfs};

/// What the scenario measured.
#[derive(Debug, Clone)]
pub struct ReplicasResult {
    /// The plan it ran.
    pub plan: ReplicasPlan,
    /// Connections the nodes shared.
    pub connections: usize,
    /// Three replicas on etcd, then one registry with the embedded store.
    pub rows: Vec<SetupRow>,
    /// The leader SIGKILL (replicas only).
    pub failover: Failover,
}

/// One set-up's storm and steady window.
#[derive(Debug, Clone)]
pub struct SetupRow {
    /// "3 replicas on etcd" or "1 registry, embedded store".
    pub setup: &'static str,
    /// From the fleet's start until every node was attached.
    pub storm: Duration,
    /// Registrations per second over the storm (first call to last answer).
    pub registrations_per_sec: f64,
    /// Register latency (call to answer).
    pub register: LatencySummary,
    /// Register calls answered with an error.
    pub register_failures: u64,
    /// The leader's (the registry's) steady window.
    pub window: Window,
    /// etcd in that window (replicas only).
    pub etcd: Option<EtcdWindow>,
}

/// What etcd did in a window.
#[derive(Debug, Clone, Copy)]
pub struct EtcdWindow {
    /// Write transactions per second (`etcd_mvcc_txn_total`: the leader's
    /// batches, elections).
    pub txn_per_sec: f64,
    /// Keys put or deleted per second.
    pub keys_per_sec: f64,
    /// Raft proposals committed per second (writes, lease grants and
    /// revocations).
    pub proposals_per_sec: f64,
    /// CPU of the three members together, % of one core.
    pub cpu_percent: f64,
    /// Resident memory of the three members together, bytes.
    pub rss: u64,
}

/// The leader SIGKILL.
#[derive(Debug, Clone)]
pub struct Failover {
    /// SIGKILL until another replica's leader health said SERVING.
    pub to_serving: Duration,
    /// SIGKILL until every node was attached to the new leader.
    pub to_all_heartbeating: Duration,
    /// Nodes whose session changed: they had to register again.
    pub reregistered: usize,
    /// Nodes the new leader listed.
    pub listed: usize,
    /// Nodes the new leader listed other than ONLINE.
    pub offline: usize,
    /// Errors the fleet saw meanwhile (streams the kill broke, refusals).
    pub errors: BTreeMap<String, u64>,
}

/// Runs the scenario; `None` when etcd is not installed.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<Option<ReplicasResult>, BenchError> {
    let p = &plan.replicas;
    // The members run with the system's huge page policy, as in production
    // and in the tables before the bench's own fleet took 4 KiB pages: a
    // child inherits the switch when it is started, so it is flipped for
    // the start only (no fleet runs meanwhile).
    let etcd = tokio::task::spawn_blocking(|| {
        let system = fleet_sim::limits::system_pages();
        let etcd = EtcdCluster::start(3);
        if system.is_ok() {
            let _ = fleet_sim::limits::small_pages();
        }
        etcd
    })
    .await
    .map_err(|e| BenchError::Server(format!("starting etcd: {e}")))?;
    let Some(etcd) = etcd else {
        info!("etcd is not installed; the replicas scenario is skipped");
        return Ok(None);
    };
    let connections = if p.connections == 0 {
        p.nodes
    } else {
        p.connections.min(p.nodes)
    };
    let target = EtcdTarget {
        endpoints: etcd.endpoints_arg(),
        prefix: "/bench-replicas".into(),
        lease_ttl: p.lease_ttl,
    };
    let mut servers = Vec::new();
    for i in 0..3 {
        let spec = ServerSpec::new(format!("replicas-{i}"))
            .timing(p.node_timeout, p.interval)
            .etcd(target.clone());
        servers.push(launcher.start(&spec).await?);
    }
    let urls: Vec<String> = servers.iter().map(Server::url).collect();
    let leader = wait_leader(&urls, p.limit).await?;
    let (fleet, stormed) = storm(p, connections, &urls.join(","), "replicas").await?;
    sleep(Duration::from_secs(2)).await;
    let etcd_before = EtcdSample::take(&etcd)?;
    let window = measure(&servers[leader], &fleet, p.window).await?;
    let etcd_after = EtcdSample::take(&etcd)?;
    let etcd_window = etcd_after.since(&etcd_before, window.wall);
    info!(
        txn_per_sec = etcd_window.txn_per_sec,
        keys_per_sec = etcd_window.keys_per_sec,
        etcd_cpu = etcd_window.cpu_percent,
        "replicas: steady window done"
    );
    let mut rows = vec![SetupRow {
        setup: "3 replicas on etcd",
        etcd: Some(etcd_window),
        window,
        ..stormed
    }];

    // The leader dies; the fleet follows the next one.
    let stats = fleet.stats();
    let sessions_before = inspect::sessions(&urls[leader]).await?;
    let before = stats.snapshot();
    let killed = servers.remove(leader);
    let mut others = urls.clone();
    others.remove(leader);
    let start = Instant::now();
    killed.stop_with(StopMode::Crash).await?;
    let new_leader = wait_leader(&others, p.limit).await?;
    let to_serving = start.elapsed();
    // Every stream of the dead leader fails now or soon: wait until the
    // fleet noticed before waiting for it to be whole.
    let noticed = Instant::now() + p.node_timeout;
    while stats.attached() >= p.nodes as i64 && Instant::now() < noticed {
        sleep(Duration::from_millis(5)).await;
    }
    wait_attached(&fleet, p.nodes, p.limit).await?;
    let to_all_heartbeating = start.elapsed();
    let errors = stats.snapshot().errors_since(&before);
    let sessions_after = inspect::sessions(&others[new_leader]).await?;
    let mut client = inspect::client(&others[new_leader]).await?;
    let listed =
        inspect::list_all(&mut client, registry_proto::pb::NodeStatus::Unspecified).await?;
    let failover = Failover {
        to_serving,
        to_all_heartbeating,
        reregistered: sessions_before
            .iter()
            .filter(|(id, session)| sessions_after.get(*id) != Some(*session))
            .count(),
        listed: listed.len(),
        offline: listed
            .iter()
            .filter(|n| n.status() != registry_proto::pb::NodeStatus::Online)
            .count(),
        errors,
    };
    info!(
        to_serving_ms = to_serving.as_millis() as u64,
        to_all_ms = to_all_heartbeating.as_millis() as u64,
        offline = failover.offline,
        reregistered = failover.reregistered,
        "replicas: failover done"
    );
    fleet.stop().await;
    for server in servers {
        server.stop().await?;
    }
    drop(etcd);

    // The same fleet against one registry with the embedded store.
    let spec = ServerSpec::new("replicas-single")
        .timing(p.node_timeout, p.interval)
        .embedded(launcher.data_dir("replicas-single")?);
    let server = launcher.start(&spec).await?;
    let (fleet, stormed) = storm(p, connections, &server.url(), "single").await?;
    sleep(Duration::from_secs(2)).await;
    let window = measure(&server, &fleet, p.window).await?;
    rows.push(SetupRow {
        setup: "1 registry, embedded store",
        window,
        ..stormed
    });
    fleet.stop().await;
    server.stop().await?;
    Ok(Some(ReplicasResult {
        plan: p.clone(),
        connections,
        rows,
        failover,
    }))
}

/// Starts the fleet against `registry` and waits until every node is
/// attached: the registration storm. The row's window is a placeholder the
/// caller replaces.
async fn storm(
    p: &ReplicasPlan,
    connections: usize,
    registry: &str,
    prefix: &str,
) -> Result<(Fleet, SetupRow), BenchError> {
    let mut config = fleet_config(prefix, p.nodes, p.connections, p.ramp);
    config.registry = registry.to_owned();
    config.gpus = 1;
    config.pools = 1;
    let me = procfs::sample(std::process::id())?;
    let start = Instant::now();
    let fleet = Fleet::start(config).map_err(|e| BenchError::Sim(e.to_string()))?;
    wait_attached(&fleet, p.nodes, p.limit).await?;
    let storm = start.elapsed();
    let report = fleet.stats().report(p.nodes, connections);
    let register_failures = report.register_failures();
    info!(
        storm_ms = storm.as_millis() as u64,
        register_failures, "registration storm done"
    );
    let placeholder = Window {
        wall: Duration::ZERO,
        server_before: me,
        server_after: me,
        sim_before: me,
        sim_after: me,
        fleet_before: fleet.stats().snapshot(),
        fleet_after: fleet.stats().snapshot(),
        ack: report.ack_latency,
        wake_lag: report.wake_lag,
    };
    let row = SetupRow {
        setup: "",
        storm,
        registrations_per_sec: report.registrations_per_sec,
        register: report.register_latency,
        register_failures,
        window: placeholder,
        etcd: None,
    };
    Ok((fleet, row))
}

/// The index in `urls` of the replica whose leader health is SERVING,
/// waiting up to `limit` for exactly one.
async fn wait_leader(urls: &[String], limit: Duration) -> Result<usize, BenchError> {
    let start = Instant::now();
    loop {
        let mut leading = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            if leads(url).await {
                leading.push(i);
            }
        }
        if let [one] = leading.as_slice() {
            return Ok(*one);
        }
        if start.elapsed() > limit {
            return Err(BenchError::Stalled(format!(
                "no single leader among {urls:?} after {}: leading {leading:?}",
                humantime::format_duration(limit)
            )));
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// etcd's counters and the members' CPU and memory at one instant.
struct EtcdSample {
    txn: f64,
    keys: f64,
    proposals: f64,
    cpu: Duration,
    rss: u64,
}

impl EtcdSample {
    fn take(etcd: &EtcdCluster) -> Result<Self, BenchError> {
        let text = etcd
            .metrics(0)
            .ok_or_else(|| BenchError::Server("etcd member 0 did not answer /metrics".into()))?;
        let mut cpu = Duration::ZERO;
        let mut rss = 0;
        for pid in etcd.pids() {
            let sample = procfs::sample(pid)?;
            cpu += sample.cpu;
            rss += sample.rss;
        }
        Ok(Self {
            txn: counter(&text, "etcd_mvcc_txn_total"),
            keys: counter(&text, "etcd_mvcc_put_total") + counter(&text, "etcd_mvcc_delete_total"),
            proposals: counter(&text, "etcd_server_proposals_committed_total"),
            cpu,
            rss,
        })
    }

    fn since(&self, before: &Self, wall: Duration) -> EtcdWindow {
        let secs = wall.as_secs_f64().max(1e-9);
        EtcdWindow {
            txn_per_sec: (self.txn - before.txn) / secs,
            keys_per_sec: (self.keys - before.keys) / secs,
            proposals_per_sec: (self.proposals - before.proposals) / secs,
            cpu_percent: (self.cpu.saturating_sub(before.cpu)).as_secs_f64() / secs * 100.0,
            rss: self.rss,
        }
    }
}

/// The value of the unlabelled sample `name` (0 when absent).
fn counter(text: &str, name: &str) -> f64 {
    test_support::http::sample(text, name).unwrap_or(0.0)
}
