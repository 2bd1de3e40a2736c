//! The change feed and placement together, end to end (issue 10): three
//! real node-agents serving the same model, a running `registry-ctl watch`,
//! and FindPools, while one pool leaves READY and comes back.
//!
//! The pool state is switched through the agent's HTTP health probe
//! (`probe=URL` in `--pool`): each pool's probe points at a
//! [`FakeEngine`] of the test, which answers 200 (READY) or 503
//! (INITIALIZING). The agent probes at every beat, so a switch reaches
//! the registry at the next beat, within one heartbeat interval, with no
//! second poll period on top (a handoff file would add
//! `--handoff-poll-interval`, and a rewrite of a file a test races with).
//!
//! Logs stay in `target/e2e-logs/<test>/`, the watch's stderr included;
//! a failing test prints the watch's last lines.

use std::time::{Duration, Instant};

use integration_tests::{AgentSpec, Cluster, FakeEngine, Timing, WatchProcess, find_pools};
use registry_proto::pb;
use test_support::eventually;

/// How long agents may take to start, register and report READY (process
/// start included, on a busy two-core machine).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `registry-ctl watch` may take to start and print its snapshot.
const WATCH_START_TIMEOUT: Duration = Duration::from_secs(20);

/// The model every pool serves.
const MODEL: &str = "m";

/// The three nodes; `SWITCHED` is the one whose pool changes state.
const NODES: [&str; 3] = ["gpu-a", "gpu-b", "gpu-c"];
const SWITCHED: &str = "gpu-b";

/// What the slack over one heartbeat interval covers: the probe's HTTP
/// round trip, the heartbeat's trip to the registry and the change feed's
/// delivery to the watch process, the FindPools call and the test's own
/// 20 ms polling, all on a shared two-core machine.
const SLACK: Duration = Duration::from_millis(1000);

/// The bound for a pool's change to show in FindPools and in the watch,
/// counted from the moment the engine's answer changed: the agent probes
/// at every beat, so the next beat (at most one heartbeat interval away)
/// carries it; there is no separate probe poll period. Plus [`SLACK`].
fn change_bound(timing: Timing) -> Duration {
    timing.heartbeat_interval + SLACK
}

/// The node ids FindPools offers for [`MODEL`], sorted.
async fn offered(url: &str) -> Result<Vec<String>, String> {
    let candidates = find_pools(url, MODEL, 10)
        .await
        .map_err(|err| err.to_string())?;
    let mut nodes: Vec<String> = candidates.into_iter().map(|c| c.node_id).collect();
    nodes.sort();
    Ok(nodes)
}

/// Waits until FindPools offers exactly `want` (sorted node ids).
async fn wait_offered(url: &str, want: &[&str], timeout: Duration) {
    eventually(
        &format!("FindPools offers {}", want.join(", ")),
        timeout,
        || async {
            let nodes = offered(url).await?;
            if nodes == want {
                Ok(())
            } else {
                Err(format!("offered: {}", nodes.join(", ")))
            }
        },
    )
    .await;
}

/// Whether a `-o json watch` line is a MODIFIED event of `node_id` whose
/// (only) pool reports `state`. The lines are compact proto3 JSON.
fn is_modified(line: &str, node_id: &str, state: pb::PoolState) -> bool {
    line.contains(r#""type":"WATCH_EVENT_TYPE_MODIFIED""#)
        && line.contains(&format!(r#""nodeId":"{node_id}""#))
        && line.contains(&format!(r#""state":"{}""#, state.as_str_name()))
}

/// Switches the engine of [`SWITCHED`] and asserts that within the bound
/// FindPools offers `want` and the watch printed the node as MODIFIED with
/// the pool in `state`. Returns how long both took.
async fn switch_and_expect(
    engine: &FakeEngine,
    ready: bool,
    url: &str,
    watch: &WatchProcess,
    bound: Duration,
    want: &[&str],
    state: pb::PoolState,
) -> Duration {
    let from = watch.line_count();
    engine.set_ready(ready);
    let switched = Instant::now();
    wait_offered(url, want, bound).await;
    watch
        .wait_line(
            &format!(
                "the watch shows {SWITCHED} MODIFIED with {}",
                state.as_str_name()
            ),
            from,
            bound.saturating_sub(switched.elapsed()),
            |line| is_modified(line, SWITCHED, state),
        )
        .await;
    let took = switched.elapsed();
    assert!(
        took <= bound + test_support::wait::POLL_INTERVAL,
        "took {took:?}, over the {bound:?} bound"
    );
    took
}

#[tokio::test]
async fn a_pool_leaving_ready_leaves_find_pools_and_shows_as_modified_in_the_watch() {
    // Declared first so they are dropped last, after the agents probing
    // them.
    let engines: Vec<FakeEngine> = NODES
        .iter()
        .map(|_| FakeEngine::start().expect("starting a fake engine"))
        .collect();
    let specs = NODES
        .iter()
        .zip(&engines)
        .map(|(node, engine)| {
            let pool = format!(
                "pool-0,model={MODEL},endpoint={},probe={}",
                engine.url(),
                engine.health_url()
            );
            AgentSpec::new(node, 1, &pool)
        })
        .collect();
    let timing = Timing::default();
    let mut cluster = Cluster::start("feed-and-placement", timing, specs)
        .await
        .expect("starting the registry and three agents");
    cluster.wait_all_online(REGISTER_TIMEOUT).await;
    let url = cluster.registry().url();

    let mut watch = cluster.start_watch().expect("starting registry-ctl watch");
    watch
        .wait_line(
            "the watch prints SNAPSHOT_COMPLETE",
            0,
            WATCH_START_TIMEOUT,
            |line| line.contains(r#""type":"WATCH_EVENT_TYPE_SNAPSHOT_COMPLETE""#),
        )
        .await;

    // Every pool READY after its first probed beat.
    wait_offered(&url, &NODES, REGISTER_TIMEOUT).await;
    let candidates = find_pools(&url, MODEL, 10).await.expect("FindPools");
    for (node, engine) in NODES.iter().zip(&engines) {
        let candidate = candidates
            .iter()
            .find(|c| c.node_id == *node)
            .unwrap_or_else(|| panic!("{node} is not offered"));
        assert_eq!(candidate.pool_id, "pool-0");
        assert_eq!(candidate.endpoint, engine.url(), "{node}'s endpoint");
        assert_eq!(candidate.model, MODEL);
    }

    let bound = change_bound(timing);
    let engine = &engines[1];
    assert_eq!(NODES[1], SWITCHED);

    let down = switch_and_expect(
        engine,
        false,
        &url,
        &watch,
        bound,
        &["gpu-a", "gpu-c"],
        pb::PoolState::Initializing,
    )
    .await;
    let up = switch_and_expect(
        engine,
        true,
        &url,
        &watch,
        bound,
        &NODES,
        pb::PoolState::Ready,
    )
    .await;
    eprintln!(
        "{SWITCHED} not READY seen after {down:?}, READY again after {up:?} (bound {bound:?})"
    );

    // The watch ran throughout: it never exited (an error would end it).
    assert!(
        watch
            .process()
            .try_exit_status()
            .expect("polling the watch")
            .is_none(),
        "registry-ctl watch exited"
    );
    // Dropping `watch`, `cluster` and `engines` kills and reaps every
    // process and stops the engines.
}
