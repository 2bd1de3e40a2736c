//! The agent against registry replicas: a follower stand-in (it refuses
//! writes with the leader's URL and says NOT_SERVING for
//! `registry.v1.NodeRegistry`) in front of a real registry as the leader.
//! The agent finds the leader by health, follows a follower's hint, and
//! after a failover resumes its session on the new leader.

mod common;

use std::time::Duration;

use common::{Agent, NodeCondition, agent_config, get_node, registry_settings};
use node_agent::pools::{ConfiguredState, PoolConfig};
use registry_proto::pb;
use test_support::{Follower, TestRegistry, eventually};

const WAIT: Duration = Duration::from_secs(15);

fn config(registry: &str, node_id: &str) -> node_agent::AgentConfig {
    let mut config = agent_config(registry, node_id);
    let mut pool = PoolConfig::new("pool-0");
    pool.state = Some(ConfiguredState::Ready);
    config.pools = vec![pool];
    config
}

/// Waits until `registry` has `node_id` ONLINE, not suspect, with pool
/// status, and returns it.
async fn heartbeating(registry: &TestRegistry, node_id: &str) -> pb::Node {
    let client = registry.client().await;
    eventually(
        &format!("{node_id} heartbeating at {}", registry.url()),
        WAIT,
        || {
            let mut client = client.clone();
            async move {
                get_node(&mut client, node_id).await.matching(|n| {
                    n.status() == pb::NodeStatus::Online && !n.suspect && !n.pool_status.is_empty()
                })
            }
        },
    )
    .await
}

#[tokio::test]
async fn the_agent_finds_the_leader_by_health_and_follows_a_failover() {
    test_support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    // Both leaders keep sessions in the same store, as replicas share etcd.
    let settings = || test_support::registry::durable(registry_settings(), dir.path());
    let leader = TestRegistry::start(settings()).await;
    let follower = Follower::start(Some(leader.url())).await;
    // The follower first: health, not the order, picks the leader.
    let registry = format!("{},{}", follower.url(), leader.url());
    let agent = Agent::start(config(&registry, "r1"));
    let first = heartbeating(&leader, "r1").await;
    assert_eq!(follower.refused(), 0, "the leader was found by its health");

    // The leader goes; a new one appears at an address the agent's list
    // does not hold, and the follower points there.
    leader.stop().await;
    let leader = TestRegistry::start(settings()).await;
    follower.point_at(Some(leader.url()));
    let again = heartbeating(&leader, "r1").await;
    assert!(
        follower.refused() > 0,
        "the agent reached the new leader through the follower's hint"
    );
    assert_eq!(again.session_id, first.session_id, "the same session");
    assert_eq!(again.registered_at, first.registered_at, "no registration");

    // Deregister goes to the leader in use.
    agent.stop().await.unwrap();
    let mut client = leader.client().await;
    assert!(get_node(&mut client, "r1").await.is_none());
    leader.stop().await;
}

#[tokio::test]
async fn a_single_endpoint_that_is_a_follower_redirects_the_registration() {
    test_support::init_logs();
    let leader = TestRegistry::start(registry_settings()).await;
    // One address in front of the replicas (a Kubernetes Service) that
    // happens to reach a follower.
    let follower = Follower::start(Some(leader.url())).await;
    let agent = Agent::start(config(&follower.url(), "r2"));
    heartbeating(&leader, "r2").await;
    assert!(
        follower.refused() >= 1,
        "Register went to the follower first"
    );
    agent.stop().await.unwrap();
    let mut client = leader.client().await;
    assert!(get_node(&mut client, "r2").await.is_none());
    leader.stop().await;
}

#[tokio::test]
async fn no_leader_elected_is_retried_until_one_is() {
    test_support::init_logs();
    let follower = Follower::start(None).await;
    let agent = Agent::start(config(&follower.url(), "r3"));
    eventually("registrations refused", WAIT, || async {
        if follower.refused() >= 2 {
            Ok(())
        } else {
            Err(format!("{} refused so far", follower.refused()))
        }
    })
    .await;
    let leader = TestRegistry::start(registry_settings()).await;
    follower.point_at(Some(leader.url()));
    heartbeating(&leader, "r3").await;
    agent.stop().await.unwrap();
    leader.stop().await;
}

#[test]
fn a_bad_entry_in_the_list_is_a_configuration_error_naming_it() {
    let config = config("http://127.0.0.1:1,127.0.0.1:2", "r4");
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("--registry, NODE_AGENT_REGISTRY, registry"),
        "{err}"
    );
    assert!(err.contains("registry[1]"), "{err}");
    assert!(err.contains("127.0.0.1:2"), "{err}");
}

#[tokio::test]
async fn a_host_name_is_dialled_by_its_addresses_skipping_those_not_served() {
    test_support::init_logs();
    // Served on 127.0.0.1 only. Where "localhost" also resolves to ::1 it
    // is two endpoints, and ::1 (nothing listening) is passed over.
    let leader = TestRegistry::start(registry_settings()).await;
    let url = format!("http://localhost:{}", leader.addr.port());
    let agent = Agent::start(config(&url, "r5"));
    heartbeating(&leader, "r5").await;
    agent.stop().await.unwrap();
    leader.stop().await;
}
