//! Multi-process end-to-end scenarios (CLOUD-13001 to CLOUD-13004): the real
//! registry-server and three real node-agents with fake GPUs on loopback,
//! node timeout 2 s and heartbeat interval 500 ms.
//!
//! Each test owns its registry and agents (four processes), so the tests
//! run in parallel; every child is killed when its test ends, passed or
//! failed. Logs stay in `target/e2e-logs/<test>/`.

use std::time::{Duration, Instant};

use integration_tests::cluster::listed;
use integration_tests::{AgentSpec, Cluster, Nodes, Timing, expect_status};
use nix::sys::signal::Signal;
use registry_proto::pb;

/// How long agents may take to start and register (process start included,
/// on a busy two-core machine).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(20);

/// Slack over the node timeout for the registry to mark a silent node
/// OFFLINE and for the test to see it.
const EXPIRY_SLACK: Duration = Duration::from_secs(3);

fn three_agents() -> Vec<AgentSpec> {
    let mut first = AgentSpec::new("node-1", 1, "pool-0");
    first
        .pools
        .push("pool-1,slots=8,model=llama-3.1-8b,engine=vllm".into());
    vec![
        first,
        AgentSpec::new("node-2", 2, "pool-0"),
        AgentSpec::new("node-3", 4, "pool-2"),
    ]
}

async fn start(test: &str) -> (Cluster, Nodes) {
    let cluster = Cluster::start(test, Timing::default(), three_agents())
        .await
        .expect("starting the registry and three agents");
    let nodes = cluster.wait_all_online(REGISTER_TIMEOUT).await;
    (cluster, nodes)
}

/// The pool ids a spec's `--pool` values name.
fn pool_ids(spec: &AgentSpec) -> Vec<String> {
    spec.pools
        .iter()
        .map(|pool| pool.split(',').next().unwrap_or_default().to_owned())
        .collect()
}

/// Time between two protobuf timestamps.
fn between(from: &prost_types::Timestamp, to: &prost_types::Timestamp) -> Duration {
    let nanos = (i128::from(to.seconds) - i128::from(from.seconds)) * 1_000_000_000
        + i128::from(to.nanos - from.nanos);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

/// Asserts that a node went OFFLINE because it was silent for the whole
/// node timeout, not earlier (the registry's own timestamps).
fn assert_expired_after_timeout(node: &pb::Node, timing: Timing) {
    let last = node.last_heartbeat_at.as_ref().expect("last_heartbeat_at");
    let changed = node.status_changed_at.as_ref().expect("status_changed_at");
    let silence = between(last, changed);
    assert!(
        silence + Duration::from_millis(20) >= timing.node_timeout,
        "{} went OFFLINE after {silence:?} of silence, before the {:?} timeout",
        node.node_id,
        timing.node_timeout
    );
}

/// Asserts that the nodes in `ids` are ONLINE in `after` with the same
/// session and an unchanged status since `before`: nothing happened to them.
fn assert_untouched(before: &Nodes, after: &Nodes, ids: &[&str]) {
    for id in ids {
        let old = &before[*id];
        let new = expect_status(after, id, pb::NodeStatus::Online)
            .unwrap_or_else(|reason| panic!("{reason}"));
        assert_eq!(new.session_id, old.session_id, "{id} re-registered");
        assert_eq!(
            new.status_changed_at, old.status_changed_at,
            "{id} changed status in between"
        );
    }
}

#[tokio::test]
async fn all_agents_register_with_their_gpus_and_pools() {
    let (cluster, nodes) = start("register").await;

    assert_eq!(nodes.len(), 3, "listed: {}", listed(&nodes));
    for agent in cluster.agents() {
        let spec = &agent.spec;
        let node = &nodes[&spec.node_id];
        assert_eq!(node.status(), pb::NodeStatus::Online);
        assert_eq!(node.machine_id, spec.machine_id());
        assert_eq!(node.address, spec.address());
        assert!(node.session_id != 0, "{} has no session", spec.node_id);
        assert!(
            node.agent_version.starts_with("node-agent"),
            "agent_version {:?}",
            node.agent_version
        );
        assert_eq!(node.labels.get("suite").map(String::as_str), Some("e2e"));

        let gpus = &node.capabilities.as_ref().expect("capabilities").gpus;
        assert_eq!(gpus.len(), spec.fake_gpus as usize, "{} GPUs", spec.node_id);
        let indices: Vec<u32> = gpus.iter().map(|gpu| gpu.index).collect();
        assert_eq!(indices, (0..spec.fake_gpus).collect::<Vec<_>>());
        assert!(
            gpus.iter().all(|gpu| !gpu.uuid.is_empty()),
            "GPUs without uuid"
        );

        let registered: Vec<String> = node.pools.iter().map(|p| p.pool_id.clone()).collect();
        assert_eq!(registered, pool_ids(spec), "{} pools", spec.node_id);
    }
    let pool1 = nodes["node-1"]
        .pools
        .iter()
        .find(|pool| pool.pool_id == "pool-1")
        .expect("node-1 registers pool-1");
    assert_eq!(pool1.slots_total, 8);
    assert_eq!(pool1.model, "llama-3.1-8b");
    assert_eq!(pool1.engine, "vllm");

    // Heartbeats carry the pools' status, and keep arriving.
    let first_beats: Vec<_> = nodes.values().map(|node| node.last_heartbeat_at).collect();
    cluster
        .wait_nodes(
            "every node reported pool status in a later heartbeat",
            REGISTER_TIMEOUT,
            |now| {
                for (node, before) in now.values().zip(&first_beats) {
                    if node.pool_status.is_empty() {
                        return Err(format!("{} has no pool status yet", node.node_id));
                    }
                    if node.last_heartbeat_at == *before {
                        return Err(format!("{} sent no heartbeat since", node.node_id));
                    }
                    expect_status(now, &node.node_id, pb::NodeStatus::Online)?;
                }
                Ok(())
            },
        )
        .await;
}

#[tokio::test]
async fn a_frozen_agent_goes_offline_and_back_online_without_reregistering() {
    let (mut cluster, before) = start("sigstop").await;
    let timing = cluster.timing();

    cluster
        .agent("node-2")
        .process
        .signal(Signal::SIGSTOP)
        .expect("SIGSTOP");
    let offline = cluster
        .wait_nodes(
            "the frozen node-2 is OFFLINE",
            timing.node_timeout + EXPIRY_SLACK,
            |nodes| expect_status(nodes, "node-2", pb::NodeStatus::Offline).cloned(),
        )
        .await;
    assert_expired_after_timeout(&offline, timing);
    // Its connection stayed open: a stopped process still holds its sockets.
    assert!(
        cluster
            .agent("node-2")
            .process
            .try_exit_status()
            .unwrap()
            .is_none(),
        "the frozen agent exited"
    );

    cluster
        .agent("node-2")
        .process
        .signal(Signal::SIGCONT)
        .expect("SIGCONT");
    let back = cluster
        .wait_nodes(
            "the thawed node-2 is ONLINE again",
            timing.node_timeout + EXPIRY_SLACK,
            |nodes| expect_status(nodes, "node-2", pb::NodeStatus::Online).cloned(),
        )
        .await;
    let old = &before["node-2"];
    assert_eq!(
        back.session_id, old.session_id,
        "node-2 re-registered instead of resuming its heartbeat stream"
    );
    assert_eq!(back.registered_at, old.registered_at);

    let nodes = cluster.nodes().await.expect("ListNodes");
    assert_untouched(&before, &nodes, &["node-1", "node-3"]);
}

/// `--worker-threads 1` (the cheaper setting for a registry that uses less
/// than a core): the one thread runs the agents' streams and the expiry
/// timer alike, so a silent node still goes OFFLINE on time and the others
/// keep heartbeating.
#[tokio::test]
async fn a_registry_on_one_worker_thread_serves_agents_and_expires_a_silent_one() {
    serves_agents_and_expires_a_silent_one(
        "one_worker_thread",
        &["--worker-threads", "1"],
        "\"worker_threads\":1,",
    )
    .await;
}

/// `--connection-threads 2`: the agents' connections are served on threads
/// of their own while the expiry timer runs on the main runtime (here one
/// worker), so a silent node goes OFFLINE on time, the others keep
/// heartbeating, and the silent one's stream resumes when it speaks again.
#[tokio::test]
async fn a_registry_on_connection_threads_serves_agents_and_expires_a_silent_one() {
    serves_agents_and_expires_a_silent_one(
        "connection_threads",
        &["--connection-threads", "2", "--worker-threads", "1"],
        "\"connection_threads\":2,",
    )
    .await;
}

/// Starts the registry with `args` and three agents, checks its start-up
/// line holds `logged`, freezes node-3 until it is OFFLINE (after the whole
/// node timeout, the others untouched and heartbeating) and thaws it until
/// it is ONLINE again.
async fn serves_agents_and_expires_a_silent_one(test: &str, args: &[&str], logged: &str) {
    let mut cluster = Cluster::start_with_args(
        test,
        Timing::default(),
        three_agents(),
        args.iter().map(|a| (*a).to_owned()).collect(),
    )
    .await
    .expect("starting the registry and three agents");
    let before = cluster.wait_all_online(REGISTER_TIMEOUT).await;
    let timing = cluster.timing();
    let log = std::fs::read_to_string(cluster.registry().log()).expect("the registry's log");
    assert!(
        log.lines()
            .any(|l| l.contains("registry listening") && l.contains(logged)),
        "no start-up line with {logged} in:\n{log}"
    );

    cluster
        .agent("node-3")
        .process
        .signal(Signal::SIGSTOP)
        .expect("SIGSTOP");
    let offline = cluster
        .wait_nodes(
            "the frozen node-3 is OFFLINE",
            timing.node_timeout + EXPIRY_SLACK,
            |nodes| expect_status(nodes, "node-3", pb::NodeStatus::Offline).cloned(),
        )
        .await;
    assert_expired_after_timeout(&offline, timing);
    let nodes = cluster.nodes().await.expect("ListNodes");
    assert_untouched(&before, &nodes, &["node-1", "node-2"]);
    for id in ["node-1", "node-2"] {
        assert_ne!(
            nodes[id].last_heartbeat_at, before[id].last_heartbeat_at,
            "{id} sent no heartbeat while node-3 expired"
        );
    }
    cluster
        .agent("node-3")
        .process
        .signal(Signal::SIGCONT)
        .expect("SIGCONT");
    cluster
        .wait_nodes(
            "the thawed node-3 is ONLINE again",
            REGISTER_TIMEOUT,
            |nodes| expect_status(nodes, "node-3", pb::NodeStatus::Online).cloned(),
        )
        .await;
}

#[tokio::test]
async fn a_killed_agent_goes_offline_and_the_others_are_untouched() {
    let (mut cluster, before) = start("sigkill").await;
    let timing = cluster.timing();

    cluster
        .agent("node-3")
        .process
        .kill()
        .expect("SIGKILL node-3");
    let offline = cluster
        .wait_nodes(
            "the killed node-3 is OFFLINE",
            timing.node_timeout + EXPIRY_SLACK,
            |nodes| expect_status(nodes, "node-3", pb::NodeStatus::Offline).cloned(),
        )
        .await;
    assert_expired_after_timeout(&offline, timing);
    assert_eq!(offline.session_id, before["node-3"].session_id);

    // Another full timeout later, the others are still ONLINE, on the same
    // session, and never changed status.
    let settle_until = Instant::now() + timing.node_timeout;
    let nodes = cluster
        .wait_nodes(
            "a node timeout has passed with node-1 and node-2 ONLINE",
            timing.node_timeout + EXPIRY_SLACK,
            |nodes| {
                expect_status(nodes, "node-1", pb::NodeStatus::Online)?;
                expect_status(nodes, "node-2", pb::NodeStatus::Online)?;
                if Instant::now() < settle_until {
                    return Err("waiting one more node timeout".into());
                }
                Ok(nodes.clone())
            },
        )
        .await;
    assert_untouched(&before, &nodes, &["node-1", "node-2"]);
    expect_status(&nodes, "node-3", pb::NodeStatus::Offline).unwrap();
}

#[tokio::test]
async fn a_terminated_agent_is_deregistered_at_once() {
    let (mut cluster, before) = start("sigterm").await;
    let timing = cluster.timing();

    for (node_id, signal) in [("node-1", Signal::SIGTERM), ("node-2", Signal::SIGINT)] {
        let sent = Instant::now();
        cluster
            .agent(node_id)
            .process
            .signal(signal)
            .expect("signalling the agent");
        // Gone from the list, not OFFLINE: a removal, well before the node
        // timeout could have done anything.
        cluster
            .wait_nodes(
                &format!("{node_id} is deregistered after {signal}"),
                timing.node_timeout,
                |nodes| {
                    if let Some(node) = nodes.get(node_id) {
                        return Err(format!(
                            "{node_id} is still listed, {}",
                            node.status().as_str_name()
                        ));
                    }
                    Ok(())
                },
            )
            .await;
        let status = cluster
            .agent(node_id)
            .process
            .wait_exit(Duration::from_secs(5))
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        assert!(status.success(), "{node_id} exited with {status}");
        eprintln!("{node_id} deregistered {:?} after {signal}", sent.elapsed());
    }

    let nodes = cluster.nodes().await.expect("ListNodes");
    assert_eq!(nodes.len(), 1, "listed: {}", listed(&nodes));
    assert_untouched(&before, &nodes, &["node-3"]);
}

#[tokio::test]
async fn agents_come_back_by_themselves_after_a_registry_restart() {
    let (mut cluster, before) = start("registry-restart").await;
    let timing = cluster.timing();
    let addr = cluster.registry().addr();

    cluster.registry().kill().expect("SIGKILL the registry");
    cluster
        .registry()
        .restart()
        .await
        .expect("restarting the registry");
    assert_eq!(cluster.registry().addr(), addr);
    let restarted = Instant::now();

    // The new registry starts empty; the agents must notice and register
    // again without help, within a few heartbeat intervals.
    let nodes = cluster
        .wait_all_online(timing.heartbeat_interval * 10)
        .await;
    eprintln!(
        "all agents back {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(nodes.len(), 3, "listed: {}", listed(&nodes));
    for agent in cluster.agents() {
        let node = &nodes[&agent.spec.node_id];
        assert_eq!(
            node.capabilities.as_ref().unwrap().gpus.len(),
            agent.spec.fake_gpus as usize
        );
        assert_eq!(node.machine_id, before[&agent.spec.node_id].machine_id);
    }
    // The same agent processes did it: none exited.
    for node_id in ["node-1", "node-2", "node-3"] {
        let exited = cluster.agent(node_id).process.try_exit_status().unwrap();
        assert!(exited.is_none(), "agent {node_id} exited: {exited:?}");
    }
}

/// `--huge-pages` (docs/PERF-NOTES.md item 10): the registry runs on 4 KiB
/// pages unless asked, so a connection's unwritten buffers cost no memory;
/// `--huge-pages on` leaves the system's policy. Read back from the
/// kernel (`/proc/PID/status`) and from the start-up line.
#[tokio::test]
async fn the_registry_runs_without_huge_pages_unless_asked() {
    let bins = integration_tests::binaries::binaries().expect("the binaries build");
    let dir = bins.target_dir.join("e2e-logs").join("huge-pages");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (args, expected) in [(vec![], "off"), (vec!["--huge-pages", "on"], "on")] {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let log = dir.join(format!("registry-{expected}.log"));
        let mut registry = integration_tests::RegistryProcess::start_with_args(
            &bins.registry_server,
            &log,
            Timing::default(),
            args,
        )
        .await
        .expect("the registry starts");
        let written = std::fs::read_to_string(&log).expect("the registry's log");
        assert!(
            written.lines().any(|l| l.contains("registry listening")
                && l.contains(&format!("\"huge_pages\":\"{expected}\""))),
            "no start-up line with huge_pages {expected} in:\n{written}"
        );
        let pid = registry.process().expect("running").pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        // The kernel shows the line where it has transparent huge pages.
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            let enabled = if expected == "on" { "1" } else { "0" };
            assert_eq!(line.split_whitespace().nth(1), Some(enabled), "{line}");
        }
        registry.kill().expect("SIGKILL the registry");
    }
}
