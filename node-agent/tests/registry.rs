//! The agent, run in-process, against a real registry-server on
//! 127.0.0.1:0: registration, live pool status, self-recovery after a
//! registry restart, and graceful deregistration.

mod common;

use std::time::{Duration, Instant};

use common::{Agent, FakeEngine, NodeCondition, agent_config, get_node, registry_settings};
use node_agent::pools::{ConfiguredState, PoolConfig};
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use test_support::{TestRegistry, eventually};
use tokio::net::TcpListener;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);

fn pool_state(node: &pb::Node, pool_id: &str) -> Option<pb::PoolState> {
    node.pool_status
        .iter()
        .find(|p| p.pool_id == pool_id)
        .map(|p| p.state())
}

/// The node as ListNodes shows it (what orchestrators read).
async fn listed_node(client: &mut NodeRegistryClient<Channel>, node_id: &str) -> Option<pb::Node> {
    let listed = client
        .list_nodes(pb::ListNodesRequest {
            pool_id: "pool-0".into(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    listed.nodes.into_iter().find(|n| n.node_id == node_id)
}

#[tokio::test]
async fn agent_registers_and_is_online_with_gpus_and_pools() {
    test_support::init_logs();
    let registry = TestRegistry::start(registry_settings()).await;
    let mut config = agent_config(&registry.url(), "n1");
    let mut pool = PoolConfig::new("pool-0");
    pool.slots = Some(4);
    pool.model = Some("llama-3.1-8b".into());
    pool.engine = Some("llamacpp".into());
    pool.gpus = Some(vec![1]);
    config.pools = vec![pool, PoolConfig::new("pool-1")];
    config.labels.insert("zone".into(), "eu-1".into());
    config.address = "http://10.0.0.5:9200".into();
    let agent = Agent::start(config);

    let mut client = registry.client().await;
    let node = eventually("n1 online with pool status", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n1")
                .await
                .matching(|n| n.status() == pb::NodeStatus::Online && n.pool_status.len() == 2)
        }
    })
    .await;

    let caps = node.capabilities.clone().unwrap();
    assert_eq!(caps.gpus.len(), 2);
    assert_eq!(caps.gpus[0].name, "NVIDIA H100 80GB HBM3");
    assert_eq!(caps.gpus[0].compute_capability, "9.0");
    assert_eq!(caps.gpus[0].memory_total_bytes, 80 << 30);
    assert_ne!(caps.gpus[0].uuid, caps.gpus[1].uuid);
    assert_eq!(caps.driver_version, "550.54.15");
    assert_eq!(caps.cuda_version, "12.4");
    assert!(caps.cpu_cores > 0);
    assert!(node.agent_version.starts_with("node-agent "));
    assert_eq!(node.address, "http://10.0.0.5:9200");
    assert_eq!(node.labels["zone"], "eu-1");
    assert!(!node.machine_id.is_empty());

    let spec = node.pools.iter().find(|p| p.pool_id == "pool-0").unwrap();
    assert_eq!(spec.slots_total, 4);
    assert_eq!(spec.model, "llama-3.1-8b");
    assert_eq!(spec.gpu_indices, [1]);
    let status = node
        .pool_status
        .iter()
        .find(|p| p.pool_id == "pool-0")
        .unwrap();
    assert_eq!(status.state(), pb::PoolState::Ready);
    assert_eq!((status.slots_total, status.slots_free), (4, 4));
    // Only GPU 1's free memory counts for pool-0.
    assert_eq!(status.vram_free_bytes, (80 << 30) - (512 << 20));
    let node = eventually("gpu stats", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n1")
                .await
                .matching(|n| n.gpu_stats.len() == 2)
        }
    })
    .await;
    assert!(
        node.gpu_stats
            .iter()
            .all(|g| g.temperature_celsius.is_some())
    );

    agent.stop().await.unwrap();
    assert!(get_node(&mut client, "n1").await.is_none());
    registry.stop().await;
}

#[tokio::test]
async fn probed_pool_state_change_shows_in_list_nodes_within_one_interval() {
    test_support::init_logs();
    let registry = TestRegistry::start(registry_settings()).await;
    let engine = FakeEngine::start().await;
    engine.set_slots(r#"[{"id":0,"is_processing":true},{"id":1,"is_processing":false}]"#);
    let mut config = agent_config(&registry.url(), "n2");
    let interval = config.heartbeat_interval.unwrap();
    let mut pool = PoolConfig::new("pool-0");
    pool.probe = Some(engine.health_url());
    pool.slots = Some(8);
    config.pools = vec![pool];
    let agent = Agent::start(config);
    let client = registry.client().await;

    let node = eventually("pool-0 ready", WAIT, || {
        let mut client = client.clone();
        async move {
            listed_node(&mut client, "n2")
                .await
                .matching(|n| pool_state(n, "pool-0") == Some(pb::PoolState::Ready))
        }
    })
    .await;
    // Slots come from the engine's /slots, not the configured 8.
    let status = &node.pool_status[0];
    assert_eq!((status.slots_total, status.slots_free), (2, 1));

    // One interval until the next beat, plus as much again for the probe,
    // the RPC and a busy CI machine.
    let bound = interval * 2;
    for (change, want) in [
        (503, pb::PoolState::Initializing),
        (500, pb::PoolState::Failed),
        (200, pb::PoolState::Ready),
    ] {
        engine.set_health(change);
        let changed_at = Instant::now();
        eventually(&format!("pool-0 {want:?}"), WAIT, || {
            let mut client = client.clone();
            async move {
                listed_node(&mut client, "n2")
                    .await
                    .matching(|n| pool_state(n, "pool-0") == Some(want))
            }
        })
        .await;
        let took = changed_at.elapsed();
        assert!(took <= bound, "{want:?} took {took:?}, more than {bound:?}");
    }

    engine.kill();
    eventually("pool-0 offline", WAIT, || {
        let mut client = client.clone();
        async move {
            listed_node(&mut client, "n2")
                .await
                .matching(|n| pool_state(n, "pool-0") == Some(pb::PoolState::Offline))
        }
    })
    .await;

    agent.stop().await.unwrap();
    registry.stop().await;
}

#[tokio::test]
async fn handoff_files_update_pools_within_two_seconds() {
    test_support::init_logs();
    let registry = TestRegistry::start(registry_settings()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = agent_config(&registry.url(), "n3");
    config.handoff_dir = Some(dir.path().to_owned());
    config.pools = vec![PoolConfig::new("static-0")];
    let agent = Agent::start(config);
    let client = registry.client().await;
    eventually("n3 online", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n3")
                .await
                .matching(|n| pool_state(n, "static-0").is_some())
        }
    })
    .await;

    // A new file: a new pool, so the agent registers again with its spec.
    std::fs::write(
        dir.path().join("pool-h.json"),
        r#"{"pool_id":"pool-h","engine":"llamacpp","engine_version":"b4000","slots":3,
            "device_mask":[0],"state":"initializing"}"#,
    )
    .unwrap();
    let written = Instant::now();
    let node = eventually("pool-h registered and reported", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n3").await.matching(|n| {
                n.pools.iter().any(|p| p.pool_id == "pool-h")
                    && pool_state(n, "pool-h") == Some(pb::PoolState::Initializing)
            })
        }
    })
    .await;
    assert!(
        written.elapsed() < Duration::from_secs(2),
        "took {:?}",
        written.elapsed()
    );
    let spec = node.pools.iter().find(|p| p.pool_id == "pool-h").unwrap();
    assert_eq!(spec.engine_version, "b4000");
    assert_eq!(spec.slots_total, 3);
    assert_eq!(spec.gpu_indices, [0]);

    // A changed file: only the state changes.
    std::fs::write(
        dir.path().join("pool-h.json"),
        r#"{"pool_id":"pool-h","engine":"llamacpp","engine_version":"b4000","slots":3,
            "device_mask":[0],"state":"ready"}"#,
    )
    .unwrap();
    let written = Instant::now();
    eventually("pool-h ready", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n3")
                .await
                .matching(|n| pool_state(n, "pool-h") == Some(pb::PoolState::Ready))
        }
    })
    .await;
    assert!(
        written.elapsed() < Duration::from_secs(2),
        "took {:?}",
        written.elapsed()
    );

    // A removed file: the pool goes.
    std::fs::remove_file(dir.path().join("pool-h.json")).unwrap();
    eventually("pool-h gone", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n3").await.matching(|n| {
                !n.pools.iter().any(|p| p.pool_id == "pool-h") && pool_state(n, "pool-h").is_none()
            })
        }
    })
    .await;

    agent.stop().await.unwrap();
    registry.stop().await;
}

#[tokio::test]
async fn agent_reregisters_after_registry_restart_on_same_address() {
    test_support::init_logs();
    let registry = TestRegistry::start(registry_settings()).await;
    let addr = registry.addr;
    let mut config = agent_config(&registry.url(), "n4");
    let mut pool = PoolConfig::new("pool-0");
    pool.state = Some(ConfiguredState::Ready);
    config.pools = vec![pool];
    let agent = Agent::start(config);
    let client = registry.client().await;
    let first = eventually("n4 online", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n4")
                .await
                .matching(|n| !n.pool_status.is_empty())
        }
    })
    .await;
    drop(client);
    registry.stop().await;

    // A new, empty registry on the same address: the agent must notice
    // (stream ends, heartbeat gets NOT_FOUND) and register by itself.
    let registry = TestRegistry::restart_on(addr, registry_settings()).await;
    let mut client = registry.client().await;
    let again = eventually("n4 registered again", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n4").await.matching(|n| {
                n.status() == pb::NodeStatus::Online
                    && pool_state(n, "pool-0") == Some(pb::PoolState::Ready)
            })
        }
    })
    .await;
    assert_eq!(again.capabilities.unwrap().gpus.len(), 2);
    assert_eq!(again.machine_id, first.machine_id);

    agent.stop().await.unwrap();
    assert!(get_node(&mut client, "n4").await.is_none());
    registry.stop().await;
}

#[tokio::test]
async fn agent_resumes_its_session_when_the_restarted_registry_kept_it() {
    test_support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let settings = || test_support::registry::durable(registry_settings(), dir.path());
    let registry = TestRegistry::start(settings()).await;
    let addr = registry.addr;
    let mut config = agent_config(&registry.url(), "n6");
    let mut pool = PoolConfig::new("pool-0");
    pool.state = Some(ConfiguredState::Ready);
    config.pools = vec![pool];
    let agent = Agent::start(config);
    let client = registry.client().await;
    let first = eventually("n6 online", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n6")
                .await
                .matching(|n| !n.pool_status.is_empty())
        }
    })
    .await;
    drop(client);
    registry.stop().await;

    // The registry loads n6 and its session from the store: the agent's
    // reconnecting stream is accepted, no Register needed.
    let registry = TestRegistry::restart_on(addr, settings()).await;
    let mut client = registry.client().await;
    let again = eventually("n6 heard from after the restart", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n6")
                .await
                .matching(|n| !n.suspect && pool_state(n, "pool-0") == Some(pb::PoolState::Ready))
        }
    })
    .await;
    assert_eq!(again.session_id, first.session_id, "the same session");
    assert_eq!(again.registered_at, first.registered_at);

    agent.stop().await.unwrap();
    assert!(get_node(&mut client, "n6").await.is_none());
    registry.stop().await;
}

#[tokio::test]
async fn agent_stopped_gracefully_removes_the_node() {
    test_support::init_logs();
    let registry = TestRegistry::start(registry_settings()).await;
    let agent = Agent::start(agent_config(&registry.url(), "n5"));
    let mut client = registry.client().await;
    // Heard from by a beat, so the agent holds its registration's reply
    // (the node is listed as soon as the registry has taken it) and stops
    // with a session to deregister.
    eventually("n5 online and beating", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n5").await.matching(|n| {
                n.status() == pb::NodeStatus::Online && n.last_heartbeat_at != n.registered_at
            })
        }
    })
    .await;
    let stopping = Instant::now();
    agent.stop().await.unwrap();
    // Deregister is awaited before the agent returns: gone at once.
    assert!(stopping.elapsed() < Duration::from_secs(2));
    let listed = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.nodes.iter().all(|n| n.node_id != "n5"));
    registry.stop().await;
}

#[tokio::test]
async fn agent_retries_until_the_registry_answers() {
    test_support::init_logs();
    // The test holds the listener first and drops the agent's first two
    // connections (a registry that is up but broken), then hands the
    // listener to a real registry: the agent must keep retrying.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let agent = Agent::start(agent_config(&url, "n6"));
    for _ in 0..2 {
        let (connection, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("the agent connects")
            .unwrap();
        drop(connection);
    }
    let registry = TestRegistry::serve(listener, registry_settings());
    let mut client = registry.client().await;
    // Heard from by a beat, so the agent holds its registration's reply
    // (the node is listed as soon as the registry has taken it) and stops
    // with a session to deregister.
    eventually("n6 online and beating", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "n6").await.matching(|n| {
                n.status() == pb::NodeStatus::Online && n.last_heartbeat_at != n.registered_at
            })
        }
    })
    .await;
    agent.stop().await.unwrap();
    assert!(get_node(&mut client, "n6").await.is_none());
    registry.stop().await;
}

#[tokio::test]
async fn agent_stops_promptly_while_the_registry_is_down() {
    test_support::init_logs();
    // Every connection is dropped at once: the registry is unusable.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let agent = Agent::start(agent_config(&url, "n7"));
    for _ in 0..3 {
        let (connection, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("the agent keeps retrying")
            .unwrap();
        drop(connection);
    }
    let stopping = Instant::now();
    agent.stop().await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "took {:?}",
        stopping.elapsed()
    );
}
