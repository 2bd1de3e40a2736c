//! A simulated fleet against registry replicas: a follower stand-in listed
//! first and a real registry as the leader. The nodes find the leader by
//! its health, and after the leader goes and a new one appears where the
//! follower points, they resume their sessions there without registering
//! again.

use std::time::Duration;

use fleet_sim::{Fleet, FleetConfig};
use registry_proto::pb;
use test_support::{Follower, TestRegistry, eventually};

const NODES: usize = 20;
const WAIT: Duration = Duration::from_secs(20);

fn settings(dir: &std::path::Path) -> registry_server::Settings {
    test_support::registry::durable(
        registry_server::Settings {
            node_timeout: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(200),
            ..registry_server::Settings::default()
        },
        dir,
    )
}

/// Waits until `registry` lists every node ONLINE, not suspect.
async fn all_online(registry: &TestRegistry) {
    let client = registry.client().await;
    eventually(
        &format!("{NODES} nodes online at {}", registry.url()),
        WAIT,
        || {
            let mut client = client.clone();
            async move {
                let nodes = client
                    .list_nodes(pb::ListNodesRequest::default())
                    .await
                    .map_err(|status| status.to_string())?
                    .into_inner()
                    .nodes;
                let online = nodes
                    .iter()
                    .filter(|n| n.status() == pb::NodeStatus::Online && !n.suspect)
                    .count();
                if online == NODES {
                    Ok(())
                } else {
                    Err(format!(
                        "{online} of {} listed are online and trusted",
                        nodes.len()
                    ))
                }
            }
        },
    )
    .await;
}

/// Waits until every node of the fleet has an acked heartbeat stream.
async fn all_attached(stats: &fleet_sim::Stats) {
    eventually("every node attached", WAIT, || async {
        let attached = stats.snapshot().attached;
        if attached == NODES as i64 {
            Ok(())
        } else {
            Err(format!("{attached} attached"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_follows_the_leader_and_keeps_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let leader = TestRegistry::start(settings(dir.path())).await;
    let follower = Follower::start(Some(leader.url())).await;
    let mut config = FleetConfig::new(format!("{},{}", follower.url(), leader.url()), NODES);
    config.connections = 2;
    config.interval = Some(Duration::from_millis(200));
    config.ack_timeout = Duration::from_secs(2);
    let fleet = Fleet::start(config).expect("the fleet starts");
    let stats = fleet.stats();
    all_online(&leader).await;
    all_attached(&stats).await;
    assert_eq!(follower.refused(), 0, "the leader was found by its health");
    assert_eq!(stats.snapshot().registrations, NODES as u64);

    // The leader goes; a new one appears where only the follower points.
    leader.stop().await;
    let leader = TestRegistry::start(settings(dir.path())).await;
    follower.point_at(Some(leader.url()));
    all_online(&leader).await;
    all_attached(&stats).await;
    assert!(follower.refused() > 0, "the hint led to the new leader");
    assert_eq!(
        stats.snapshot().registrations,
        NODES as u64,
        "sessions resumed, none registered again"
    );
    fleet.stop().await;
    leader.stop().await;
}

#[test]
fn a_bad_entry_in_the_list_is_refused_naming_it() {
    let config = FleetConfig::new("http://127.0.0.1:1,127.0.0.1:2", 1);
    let err = Fleet::start(config).err().expect("refused").to_string();
    assert!(err.contains("--registry[1]"), "{err}");
}
