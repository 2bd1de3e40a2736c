//! A rolling restart of every registry replica, one by one, on a real
//! 3-member etcd cluster, under fleet-sim's 1,000 virtual nodes (in this
//! test process, so the processes restarted are the replicas only): no
//! node is ever listed OFFLINE by any replica, no node registers again, and
//! the only failed streams are those the restarts ended.
//!
//! Skips (with a line saying so) where etcd is not installed, except under
//! CI=true, where `.ci/run` installs it.

use std::time::Duration;

use integration_tests::Timing;
use integration_tests::replicas::{OfflineWatch, ReplicaSet, wait_listed_online};

const NODES: usize = 1000;
/// The etcd lease of the leadership.
const TTL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_replica_under_1000_nodes_marks_none_offline() {
    // Slower beats than the other replica tests: 1,000 nodes, three
    // replicas and three etcd members share a small machine.
    let timing = Timing {
        node_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(1),
    };
    let Some(mut set) = ReplicaSet::start("replicas-rolling", 3, timing, TTL, Vec::new())
        .await
        .expect("the replica set starts")
    else {
        return;
    };
    let leader = set.wait_leader(Duration::from_secs(30)).await;
    let mut config = fleet_sim::FleetConfig::new(set.registry_arg(), NODES);
    config.connections = 100;
    config.gpus = 1;
    config.pools = 1;
    config.duration = Duration::from_secs(600);
    // As node-agent: a silent stream is given up after half a node timeout.
    config.ack_timeout = timing.node_timeout / 2;
    let fleet = fleet_sim::Fleet::start(config).expect("the fleet starts");
    let leader_url = set.replica(leader).url();
    wait_listed_online(&leader_url, NODES, true, Duration::from_secs(60)).await;
    test_support::eventually(
        "every Register answered",
        Duration::from_secs(30),
        || async {
            match fleet.stats().snapshot().registrations {
                n if n == NODES as u64 => Ok(()),
                n => Err(format!("{n} registered")),
            }
        },
    )
    .await;
    let watch = OfflineWatch::start(set.urls());

    // One by one, as an operator does: SIGTERM (a leader resigns, so the
    // next replica leads at once), start again, wait until the restarted
    // replica has every node and the leader hears every node, then the
    // next.
    let mut leader_changes = 0u64;
    for i in 0..3 {
        let was_leader = set.leaders().await == vec![i];
        set.replica(i)
            .restart_gracefully(Duration::from_secs(15))
            .await
            .expect("the replica restarts");
        if was_leader {
            leader_changes += 1;
        }
        let now = set.wait_leader(TTL + Duration::from_secs(10)).await;
        let now_url = set.replica(now).url();
        wait_listed_online(&now_url, NODES, true, Duration::from_secs(30)).await;
        let restarted = set.replica(i).url();
        wait_listed_online(&restarted, NODES, false, Duration::from_secs(30)).await;
        test_support::eventually(
            "every simulated node streams again",
            Duration::from_secs(30),
            || async {
                match fleet.stats().attached() {
                    n if n == NODES as i64 => Ok(()),
                    n => Err(format!("{n} streams acknowledged")),
                }
            },
        )
        .await;
    }
    assert!(leader_changes >= 1, "the leader was restarted too");
    // A node timeout more: a node the restarts left silent would go
    // OFFLINE now.
    tokio::time::sleep(timing.node_timeout + Duration::from_secs(1)).await;
    let watched = watch.finish();
    let stats = fleet.stats().snapshot();
    let report = fleet.stop().await;
    println!(
        "rolling restart: {leader_changes} leader change(s); {} beats sent, {} acked; failures {:?}; ListNodes polls answered {:?}",
        stats.sent, stats.acked, stats.errors, watched.answered
    );
    watched.assert_none_offline(5);

    // No node registered again: every session survived every restart.
    assert_eq!(stats.registrations, NODES as u64, "{report:?}");
    // The only failures are the streams the restarts ended (a resigning
    // leader's UNAVAILABLE, a closed stream or connection), a few per node
    // per leader change at most; no ack went missing on a live stream.
    for (kind, count) in &stats.errors {
        assert!(
            kind == "heartbeat UNAVAILABLE" || kind == "heartbeat stream closed",
            "{kind}: {count} (all: {:?})",
            stats.errors
        );
    }
    let failures: u64 = stats.errors.values().sum();
    assert!(
        failures <= 3 * NODES as u64 * leader_changes,
        "{failures} failed streams for {leader_changes} leader change(s): {:?}",
        stats.errors
    );
    // Beats in flight when a stream ended are the only ones unacknowledged.
    assert!(
        stats.sent - stats.acked <= NODES as u64 * (leader_changes + 1),
        "{} beats sent, {} acked",
        stats.sent,
        stats.acked
    );
}
