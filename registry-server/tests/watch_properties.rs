//! The change feed's promise, as a property: a watcher that disconnects at
//! random and resumes from the last revision it saw, while nodes register,
//! re-register, beat with random pool status, deregister and go OFFLINE on
//! tokio's paused clock, ends with exactly the registry's final ListNodes
//! (for its filter), and never sees a revision twice.
//!
//! It drives the registry core and the watch service in-process (no
//! network), so clock advances are exact and each case is fast.
//! `PROPTEST_CASES` sets the number of cases (default 256).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use proptest::prelude::*;
use registry_proto::pb;
use registry_server::registry::{
    Beat, Liveness, NewRegistration, NodeFilter, Now, Options, Registered, Registration, Registry,
    Timing,
};
use registry_server::watch::{WatchStream, Watchers};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const NODES: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    /// Register (or re-register) node i with label variant v.
    Register(usize, u8),
    /// One heartbeat of node i: pool state, free slots.
    Beat(usize, i32, u32),
    /// Deregister node i.
    Deregister(usize),
    /// Move the clock (seconds): nodes go OFFLINE at 10 s, leave at 40 s.
    Advance(u64),
    /// Read at most this many messages that are ready.
    Read(usize),
    /// Drop the watch and resume from the last revision seen.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..NODES, 0..2u8).prop_map(|(i, v)| Op::Register(i, v)),
        4 => (0..NODES, 1..=5i32, 0..=4u32).prop_map(|(i, s, f)| Op::Beat(i, s, f)),
        1 => (0..NODES).prop_map(Op::Deregister),
        2 => (1..25u64).prop_map(Op::Advance),
        3 => (1..6usize).prop_map(Op::Read),
        1 => Just(Op::Reconnect),
    ]
}

fn registration(i: usize, variant: u8) -> Registration {
    Registration::from(NewRegistration {
        node_id: format!("n{i}"),
        machine_id: format!("machine-{i}"),
        address: format!("http://n{i}:9200"),
        pools: vec![pb::PoolSpec {
            pool_id: "pool-0".into(),
            model: "m".into(),
            ..Default::default()
        }]
        .into(),
        capabilities: Default::default(),
        agent_version: format!("v{variant}"),
        metrics_address: String::new(),
        models_available: Vec::new(),
        labels: Default::default(),
    })
}

/// The fields the change feed publishes (not those that move on every
/// beat without an event).
fn published(mut node: pb::Node) -> pb::Node {
    node.last_heartbeat_at = None;
    node.agent_time = None;
    node.gpu_stats.clear();
    node
}

/// The client side: what it holds, where it is, what it has seen.
struct Client {
    /// The nodes it holds, rebuilt from events.
    state: BTreeMap<String, pb::Node>,
    /// The revision it has seen everything up to (0 before a snapshot).
    last: u64,
    /// Whether it is inside a snapshot (before SNAPSHOT_COMPLETE).
    in_snapshot: bool,
    /// Revisions of change events seen, across reconnects.
    seen: HashSet<u64>,
}

impl Client {
    fn take(&mut self, event: pb::WatchNodesResponse) -> Result<(), TestCaseError> {
        use pb::WatchEventType as T;
        let kind = event.r#type();
        match kind {
            T::SnapshotComplete => {
                self.in_snapshot = false;
                self.last = event.revision;
            }
            T::Progress => {
                prop_assert!(event.revision >= self.last);
                self.last = event.revision;
            }
            T::Added | T::Modified | T::Deleted => {
                let node = event.node.expect("a change carries its node");
                if !self.in_snapshot {
                    prop_assert!(
                        event.revision > self.last,
                        "revision {} after {}",
                        event.revision,
                        self.last
                    );
                    prop_assert!(
                        self.seen.insert(event.revision),
                        "revision {} seen twice",
                        event.revision
                    );
                    self.last = event.revision;
                }
                if kind == T::Deleted {
                    self.state.remove(&node.node_id);
                } else {
                    self.state.insert(node.node_id.clone(), node);
                }
            }
            T::Unspecified => prop_assert!(false, "an unspecified event"),
        }
        Ok(())
    }
}

async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

async fn run(ops: Vec<Op>, filtered: bool) -> Result<(), TestCaseError> {
    let registry = Registry::with_options(
        Timing {
            node_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            offline_retention: Duration::from_secs(30),
        },
        Options::default(),
    );
    let stop = CancellationToken::new();
    tokio::spawn(registry_server::expiry::run(registry.clone(), stop.clone()));
    let watchers = Watchers::new(10, Duration::from_secs(1));
    let filter = NodeFilter {
        status: filtered.then_some(Liveness::Online),
        ..NodeFilter::default()
    };
    let open = |client: &mut Client| -> WatchStream {
        if client.last == 0 {
            // No snapshot completed yet: start one afresh.
            client.state.clear();
            client.in_snapshot = true;
        }
        watchers
            .watch(&registry, filter.clone(), client.last, stop.clone())
            .expect("a watch starts")
    };
    let mut client = Client {
        state: BTreeMap::new(),
        last: 0,
        in_snapshot: true,
        seen: HashSet::new(),
    };
    let mut stream = open(&mut client);
    let mut sessions: HashMap<usize, Registered> = HashMap::new();
    for op in ops {
        match op {
            Op::Register(i, v) => {
                if let Ok(registered) = registry.register(registration(i, v), Now::read()) {
                    sessions.insert(i, registered);
                }
            }
            Op::Beat(i, state, free) => {
                let Some(session) = sessions.get(&i) else {
                    continue;
                };
                let id = format!("n{i}");
                if let Ok(slot) = registry.attach(&id, session.session_id, &session.session_secret)
                {
                    let beat = Beat {
                        sent_at: Utc::now(),
                        received_at: Utc::now(),
                        pools: vec![pb::PoolStatus {
                            pool_id: "pool-0".into(),
                            state,
                            slots_total: 4,
                            slots_free: free,
                            model: "m".into(),
                            ..Default::default()
                        }],
                        gpus: vec![],
                    };
                    registry
                        .heartbeat(&slot, session.session_id, beat, Instant::now())
                        .expect("an attached session beats");
                }
            }
            Op::Deregister(i) => {
                let _ = registry.deregister(&format!("n{i}"), 0, None);
            }
            Op::Advance(secs) => {
                tokio::time::advance(Duration::from_secs(secs)).await;
                settle().await;
            }
            Op::Read(n) => {
                for _ in 0..n {
                    match stream.next().now_or_never() {
                        Some(Some(Ok(event))) => client.take(event)?,
                        Some(other) => prop_assert!(false, "the watch ended: {other:?}"),
                        None => break,
                    }
                }
            }
            Op::Reconnect => {
                drop(stream);
                stream = open(&mut client);
            }
        }
    }
    // Drain: until the watcher reports progress at the current revision.
    let mut steps = 0;
    loop {
        steps += 1;
        prop_assert!(steps < 100_000, "the watch never caught up");
        match stream.next().await {
            Some(Ok(event)) => {
                let progress = event.r#type() == pb::WatchEventType::Progress;
                client.take(event)?;
                if progress && client.last == registry.revision() {
                    break;
                }
            }
            other => prop_assert!(false, "the watch ended: {other:?}"),
        }
    }
    let fleet: BTreeMap<String, pb::Node> = registry
        .list(&filter, 0, "")
        .0
        .into_iter()
        .map(|n| (n.node_id.clone(), published(n)))
        .collect();
    let rebuilt: BTreeMap<String, pb::Node> = std::mem::take(&mut client.state)
        .into_iter()
        .map(|(k, n)| (k, published(n)))
        .collect();
    prop_assert_eq!(rebuilt, fleet);
    stop.cancel();
    Ok(())
}

proptest! {
    #[test]
    fn a_resuming_watcher_rebuilds_the_final_fleet(
        ops in prop::collection::vec(op(), 1..80),
        filtered in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(ops, filtered))?;
    }
}
