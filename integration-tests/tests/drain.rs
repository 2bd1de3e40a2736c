//! Cordon and drain across the three real binaries (issue 11): a
//! registry-server, one node-agent with fake GPUs whose pool has drain and
//! resume commands (each appends a line to a file in a temp dir), and
//! `registry-ctl cordon/uncordon/drain/undrain` as an operator runs them.
//!
//! Node timeout 2 s and heartbeat interval 500 ms (the harness's default
//! timing); every wait has a deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{AgentSpec, Cluster, Timing, expect_status};
use nix::sys::signal::Signal;
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use test_support::eventually;

const NODE: &str = "drain-node";
const POOL: &str = "pool-0";
const MODEL: &str = "llama-e2e";

/// How long the agent may take to start and register (process start
/// included, on a busy two-core machine).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a registry-ctl run may take before the test calls it hung;
/// above `drain --wait-timeout 30s`.
const CTL_TIMEOUT: Duration = Duration::from_secs(40);

/// How long a change may take to go registry → agent → registry: a few
/// heartbeat intervals plus process scheduling on a busy machine.
const ROUND_TRIP: Duration = Duration::from_secs(10);

/// The agent's config: one pool without a probe (so READY, and idle as soon
/// as it is DRAINING), whose drain and resume commands append a line to
/// `actions`.
fn write_config(dir: &Path, actions: &Path) -> PathBuf {
    let actions = actions.display();
    let config = format!(
        r#"[[pools]]
id = "{POOL}"
engine = "vllm"
model = "{MODEL}"
slots = 4
endpoint = "http://{NODE}.e2e.invalid:8081"
state = "ready"
drain = {{ command = ["sh", "-c", "echo drain >> '{actions}'"] }}
resume = {{ command = ["sh", "-c", "echo resume >> '{actions}'"] }}
"#
    );
    let path = dir.join("node-agent.toml");
    std::fs::write(&path, config).expect("writing the agent's config");
    path
}

/// A registry and the one agent, its actions file in `dir`.
async fn start(test: &str, dir: &Path) -> (Cluster, PathBuf) {
    let actions = dir.join("actions.log");
    let mut spec = AgentSpec::new(NODE, 2, POOL);
    // The pool comes from the config file, with its actions.
    spec.pools.clear();
    spec.config = Some(write_config(dir, &actions));
    let cluster = Cluster::start(test, Timing::default(), vec![spec])
        .await
        .expect("starting the registry and the agent");
    cluster.wait_all_online(REGISTER_TIMEOUT).await;
    wait_pool_state(&cluster, "the pool is READY", pb::PoolState::Ready).await;
    (cluster, actions)
}

/// The lines the agent's actions wrote so far.
fn action_lines(actions: &Path) -> Vec<String> {
    match std::fs::read_to_string(actions) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => panic!("reading {}: {err}", actions.display()),
    }
}

/// Waits until the actions file has exactly `want` lines.
async fn wait_actions(actions: &Path, want: &[&str]) {
    eventually(
        &format!("the actions file reads {want:?}"),
        ROUND_TRIP,
        || {
            let lines = action_lines(actions);
            async move {
                if lines == want {
                    Ok(())
                } else {
                    Err(format!("it reads {lines:?}"))
                }
            }
        },
    )
    .await;
}

/// The node through GetNode.
async fn get_node(cluster: &Cluster) -> pb::Node {
    let mut client = NodeRegistryClient::connect(cluster.url())
        .await
        .expect("connecting");
    client
        .get_node(pb::GetNodeRequest {
            node_id: NODE.into(),
        })
        .await
        .expect("GetNode")
        .into_inner()
}

/// The pool's state as the node's last heartbeat reported it.
fn pool_state(node: &pb::Node) -> Option<pb::PoolState> {
    node.pool_status
        .iter()
        .find(|pool| pool.pool_id == POOL)
        .map(pb::PoolStatus::state)
}

/// Waits until the node is ONLINE with the pool in `want`; returns it.
async fn wait_pool_state(cluster: &Cluster, what: &str, want: pb::PoolState) -> pb::Node {
    cluster
        .wait_nodes(what, ROUND_TRIP, |nodes| {
            let node = expect_status(nodes, NODE, pb::NodeStatus::Online)?;
            match pool_state(node) {
                Some(state) if state == want => Ok(node.clone()),
                other => Err(format!("{POOL} is {other:?}")),
            }
        })
        .await
}

/// FindPools for the model pinned to the node: the candidates, or the
/// refusal.
async fn find_on_node(cluster: &Cluster) -> Result<Vec<pb::PoolCandidate>, tonic::Status> {
    let mut client = NodeRegistryClient::connect(cluster.url())
        .await
        .expect("connecting");
    client
        .find_pools(pb::FindPoolsRequest {
            model: MODEL.into(),
            node_id: NODE.into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .map(|found| found.into_inner().candidates)
}

/// Waits until FindPools pinned to the node offers its pool.
async fn wait_offered(cluster: &Cluster, what: &str) {
    eventually(what, ROUND_TRIP, || async {
        match find_on_node(cluster).await {
            Ok(found) if found.iter().any(|c| c.node_id == NODE && c.pool_id == POOL) => Ok(()),
            Ok(found) => Err(format!("{} candidates, not {NODE}/{POOL}", found.len())),
            Err(status) => Err(format!("refused: {status}")),
        }
    })
    .await;
}

/// Runs registry-ctl and asserts its exit code.
async fn ctl(cluster: &Cluster, args: &[&str], want: i32) -> String {
    let output = cluster
        .ctl(args, CTL_TIMEOUT)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(output.code, Some(want), "registry-ctl {args:?}: {output}");
    output.stdout
}

/// A protobuf timestamp in nanoseconds since the epoch.
fn nanos(at: &prost_types::Timestamp) -> i128 {
    i128::from(at.seconds) * 1_000_000_000 + i128::from(at.nanos)
}

fn admin(node: &pb::Node) -> pb::AdminState {
    node.admin.clone().expect("the node has its admin state")
}

#[tokio::test]
async fn drain_wait_runs_the_action_once_and_undrain_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, actions) = start("drain-undrain", dir.path()).await;
    wait_offered(&cluster, "the READY pool is offered").await;
    assert!(action_lines(&actions).is_empty(), "an action ran unasked");

    let printed = ctl(
        &cluster,
        &[
            "drain",
            NODE,
            "--reason",
            "kernel upgrade",
            "--wait",
            "--wait-timeout",
            "30s",
        ],
        0,
    )
    .await;
    eprintln!("drain --wait printed:\n{printed}");
    // The drain action ran exactly once, although the command may have
    // arrived more than once.
    wait_actions(&actions, &["drain"]).await;

    let node = get_node(&cluster).await;
    assert_eq!(node.status(), pb::NodeStatus::Online);
    assert_eq!(pool_state(&node), Some(pb::PoolState::Draining), "{node:?}");
    let state = admin(&node);
    let drain = state.drain.expect("the drain is on the node");
    assert!(drain.acknowledged, "{drain:?}");
    assert!(drain.drained, "{drain:?}");
    assert_eq!(drain.reason, "kernel upgrade");
    assert!(!state.schedulable, "a draining node is schedulable");
    match find_on_node(&cluster).await {
        Ok(found) => assert!(
            found.iter().all(|c| c.node_id != NODE),
            "FindPools still offers the draining node: {found:?}"
        ),
        Err(status) => assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}"),
    }

    // Three more beats on: the drain action is not run again.
    let beat_then = nanos(node.last_heartbeat_at.as_ref().expect("last_heartbeat_at"));
    let three_beats = cluster.timing().heartbeat_interval * 3;
    cluster
        .wait_nodes("three more heartbeats", ROUND_TRIP, |nodes| {
            let beat = nodes
                .get(NODE)
                .and_then(|node| node.last_heartbeat_at.as_ref())
                .map(nanos)
                .ok_or("no heartbeat listed")?;
            if beat - beat_then >= i128::try_from(three_beats.as_nanos()).unwrap_or(i128::MAX) {
                Ok(())
            } else {
                Err(format!(
                    "{} ms of beats since",
                    (beat - beat_then) / 1_000_000
                ))
            }
        })
        .await;
    assert_eq!(action_lines(&actions), ["drain"]);

    ctl(&cluster, &["undrain", NODE], 0).await;
    wait_actions(&actions, &["drain", "resume"]).await;
    let node = wait_pool_state(&cluster, "the resumed pool is READY", pb::PoolState::Ready).await;
    let state = admin(&node);
    assert!(state.drain.is_none(), "{state:?}");
    assert!(state.schedulable, "{state:?}");
    wait_offered(&cluster, "the resumed pool is offered again").await;
}

#[tokio::test]
async fn a_cordon_outlives_an_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, actions) = start("cordon-restart", dir.path()).await;
    wait_offered(&cluster, "the READY pool is offered").await;

    ctl(&cluster, &["cordon", NODE, "--reason", "bad fan"], 0).await;
    let refused = find_on_node(&cluster)
        .await
        .expect_err("FindPools pinned to a cordoned node answered");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    let node = get_node(&cluster).await;
    let state = admin(&node);
    assert!(state.cordoned && !state.schedulable, "{state:?}");
    assert_eq!(state.cordon_reason, "bad fan");
    // Cordoned, not drained: the pool still works and no action ran.
    assert_eq!(pool_state(&node), Some(pb::PoolState::Ready));

    // SIGTERM: the agent deregisters; the node is gone from the list.
    cluster
        .agent(NODE)
        .process
        .signal(Signal::SIGTERM)
        .expect("SIGTERM");
    let status = cluster
        .agent(NODE)
        .process
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(status.success(), "the agent exited with {status}");
    cluster
        .wait_nodes(
            "the node is deregistered",
            ROUND_TRIP,
            |nodes| match nodes.get(NODE) {
                Some(node) => Err(format!("still listed, {}", node.status().as_str_name())),
                None => Ok(()),
            },
        )
        .await;

    // Started again, it registers afresh, and the cordon is still there.
    cluster.restart_agent(NODE).expect("restarting the agent");
    let node = wait_pool_state(
        &cluster,
        "the restarted node is READY",
        pb::PoolState::Ready,
    )
    .await;
    let state = admin(&node);
    assert!(state.cordoned && !state.schedulable, "{state:?}");
    assert_eq!(state.cordon_reason, "bad fan");
    let refused = find_on_node(&cluster)
        .await
        .expect_err("FindPools pinned to the restarted cordoned node answered");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");

    ctl(&cluster, &["uncordon", NODE], 0).await;
    wait_offered(&cluster, "the uncordoned node is offered again").await;
    let state = admin(&get_node(&cluster).await);
    assert!(!state.cordoned && state.schedulable, "{state:?}");
    assert!(action_lines(&actions).is_empty(), "a cordon ran an action");
}

#[tokio::test]
async fn a_killed_agent_gets_the_drain_again_after_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, actions) = start("drain-agent-killed", dir.path()).await;

    ctl(&cluster, &["drain", NODE, "--reason", "rma"], 0).await;
    wait_actions(&actions, &["drain"]).await;
    let node = wait_pool_state(&cluster, "the pool is DRAINING", pb::PoolState::Draining).await;
    let first_session = node.session_id;
    assert!(admin(&node).drain.expect("drain").acknowledged);

    // SIGKILL: no Deregister; the registry keeps the node and its drain.
    cluster
        .agent(NODE)
        .process
        .kill()
        .expect("SIGKILL the agent");
    cluster.restart_agent(NODE).expect("restarting the agent");

    // The new agent knows nothing of the drain; the registry sends the
    // DrainCommand on its new stream, so it reports DRAINING again, on a
    // new session, and runs its (idempotent) drain action again.
    let node = cluster
        .wait_nodes(
            "the restarted agent reports the pool DRAINING on a new session",
            ROUND_TRIP + cluster.timing().node_timeout,
            |nodes| {
                let node = expect_status(nodes, NODE, pb::NodeStatus::Online)?;
                if node.session_id == first_session {
                    return Err("still the killed agent's session".into());
                }
                match pool_state(node) {
                    Some(pb::PoolState::Draining) => Ok(node.clone()),
                    other => Err(format!("{POOL} is {other:?}")),
                }
            },
        )
        .await;
    let drain = admin(&node).drain.expect("the drain outlived the agent");
    assert!(drain.acknowledged, "{drain:?}");
    assert_eq!(drain.reason, "rma");
    wait_actions(&actions, &["drain", "drain"]).await;
}
