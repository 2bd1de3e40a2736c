//! A registry process that is stopped (SIGSTOP) for three node timeouts
//! while 50 agents keep heartbeating must, once continued (SIGCONT), mark
//! no node OFFLINE: its deadline loop notices it woke far later than it
//! asked and gives every node a fresh grace instead of expiring them all on
//! the spot (README, "When the registry doubts itself").
//!
//! The agents are fleet-sim's virtual nodes in this test's process, so the
//! one process stopped is the registry. The mass-failure guard is switched
//! off here (`--mass-offline-threshold 0`): the stall detection alone must
//! keep every node ONLINE.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_sim::{Fleet, FleetConfig};
use integration_tests::cluster::listed;
use integration_tests::{Cluster, Nodes, Timing, list_nodes};
use nix::sys::signal::Signal;
use registry_proto::pb;
use test_support::eventually;
use test_support::http::sample;

const AGENTS: usize = 50;

/// The body of `GET path` on the metrics port.
fn http_get(addr: SocketAddr, path: &str) -> String {
    test_support::http::get(addr, path).expect("the metrics port answers")
}

/// `Ok` when all agents are listed ONLINE.
fn all_online(nodes: &Nodes) -> Result<Nodes, String> {
    let online = nodes
        .values()
        .filter(|n| n.status() == pb::NodeStatus::Online)
        .count();
    if nodes.len() == AGENTS && online == AGENTS {
        Ok(nodes.clone())
    } else {
        Err(format!(
            "{online} of {} ONLINE: {}",
            nodes.len(),
            listed(nodes)
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_stopped_for_three_node_timeouts_marks_no_node_offline() {
    // A 2 s timeout leaves the simulated agents (in this test's own
    // process) slack to be late on a loaded machine after the stall.
    let timing = Timing {
        node_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(500),
    };
    let args = [
        "--mass-offline-threshold",
        "0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut cluster = Cluster::start_with_args(
        "registry_stall",
        timing,
        Vec::new(),
        args.iter().map(|a| (*a).to_owned()).collect(),
    )
    .await
    .expect("starting the registry");
    let metrics = cluster.registry().metrics_addr().expect("the metrics port");
    let url = cluster.registry().url();
    let fleet =
        Fleet::start(FleetConfig::new(url.clone(), AGENTS)).expect("starting 50 virtual agents");
    let before = cluster
        .wait_nodes(
            "all 50 agents are ONLINE",
            Duration::from_secs(20),
            all_online,
        )
        .await;

    let registry = cluster.registry().process().expect("the registry runs");
    registry.signal(Signal::SIGSTOP).expect("SIGSTOP");
    tokio::time::sleep(3 * timing.node_timeout).await;
    registry.signal(Signal::SIGCONT).expect("SIGCONT");

    // For two node timeouts after the stall, every poll sees all 50 ONLINE
    // and none of them changed status meanwhile (an OFFLINE and back would
    // move status_changed_at).
    let watch_until = tokio::time::Instant::now() + 2 * timing.node_timeout;
    while tokio::time::Instant::now() < watch_until {
        let nodes = list_nodes(&url).await.expect("ListNodes");
        let now = all_online(&nodes).unwrap_or_else(|reason| panic!("after SIGCONT: {reason}"));
        for (id, node) in &now {
            assert_eq!(
                node.status_changed_at, before[id].status_changed_at,
                "{id} changed status during or after the stall"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The registry saw the stall, and counted no OFFLINE transition.
    let text = eventually(
        "the stall is in /metrics",
        Duration::from_secs(5),
        || async {
            let text = http_get(metrics, "/metrics");
            match sample(&text, "registry_stalls_total") {
                Some(n) if n >= 1.0 => Ok(text),
                other => Err(format!("registry_stalls_total = {other:?}")),
            }
        },
    )
    .await;
    assert_eq!(
        sample(&text, "registry_offline_transitions_total"),
        Some(0.0)
    );
    let log = std::fs::read_to_string(cluster.registry().log()).expect("the registry's log");
    assert!(
        log.contains("the registry was stalled"),
        "no stall warning in the log"
    );
    assert!(!log.contains("node offline"), "a node went OFFLINE");
    // Heartbeats cleared the stall's suspect flags: health is ok again.
    eventually("/health is ok", Duration::from_secs(5), || async {
        let body = http_get(metrics, "/health");
        if body == r#"{"status":"ok"}"# {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;
    let report = fleet.stop().await;
    drop(report);
}
