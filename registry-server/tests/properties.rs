//! Property tests (the project's fuzzing: cargo fuzz needs a nightly
//! toolchain, which this project's machines do not have).
//!
//! - Validation never panics on arbitrary requests, and whatever it accepts
//!   satisfies the documented rules.
//! - The registry's state machine, driven by arbitrary sequences of
//!   register / heartbeat / stale heartbeat / deregister / clock advances on
//!   tokio's paused clock, always agrees with a simple reference model.
//!
//! `PROPTEST_CASES` sets the number of cases per property (default 256);
//! `.ci/run` runs a longer, time-bounded pass.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use proptest::prelude::*;
use registry_proto::convert::to_proto_timestamp;
use registry_proto::pb;
use registry_server::RegistryError;
use registry_server::registry::{Beat, Now, Registration, Registry, Timing};
use registry_server::validate;

/// Strings that are mostly near the rules' edges, plus arbitrary text.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{0,70}",
        "[A-Za-z0-9._/ -]{0,70}",
        "https?://[a-z0-9.-]{0,20}(:[0-9]{1,6})?(/[a-z]{0,5})?",
        any::<String>(),
        Just(String::new()),
    ]
}

fn pool_spec() -> impl Strategy<Value = pb::PoolSpec> {
    (
        text(),
        text(),
        text(),
        any::<u32>(),
        prop::collection::vec(any::<u32>(), 0..70),
    )
        .prop_map(
            |(pool_id, engine, model, slots_total, gpu_indices)| pb::PoolSpec {
                pool_id,
                engine,
                model,
                slots_total,
                gpu_indices,
                engine_version: String::new(),
            },
        )
}

fn gpu_info() -> impl Strategy<Value = pb::GpuInfo> {
    (
        0u32..80,
        text(),
        text(),
        "[0-9]{0,3}(\\.[0-9]{0,3})?|.{0,6}",
    )
        .prop_map(|(index, uuid, name, compute_capability)| pb::GpuInfo {
            index,
            uuid,
            name,
            memory_total_bytes: 80 << 30,
            compute_capability,
            pci_bus_id: String::new(),
            mig_enabled: false,
        })
}

fn register_request() -> impl Strategy<Value = pb::RegisterRequest> {
    (
        text(),
        text(),
        text(),
        prop::collection::vec(pool_spec(), 0..70),
        prop::option::of(prop::collection::vec(gpu_info(), 0..70)),
        text(),
        prop::collection::hash_map(text(), text(), 0..70),
    )
        .prop_map(
            |(node_id, machine_id, address, pools, gpus, agent_version, labels)| {
                pb::RegisterRequest {
                    node_id,
                    machine_id,
                    address,
                    pools,
                    capabilities: gpus.map(|gpus| pb::Capabilities {
                        gpus,
                        ..Default::default()
                    }),
                    agent_version,
                    labels,
                }
            },
        )
}

fn pool_status() -> impl Strategy<Value = pb::PoolStatus> {
    (text(), -2i32..8, any::<u32>(), any::<u32>()).prop_map(
        |(pool_id, state, slots_total, slots_free)| pb::PoolStatus {
            pool_id,
            state,
            slots_total,
            slots_free,
            vram_free_bytes: 0,
            model: String::new(),
            engine: String::new(),
        },
    )
}

fn is_dns_label(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

proptest! {
    #[test]
    fn registration_validation_never_panics_and_accepts_only_valid_input(
        request in register_request()
    ) {
        if let Ok(reg) = validate::registration(request) {
            prop_assert!(is_dns_label(&reg.node_id));
            prop_assert!(!reg.machine_id.is_empty() && reg.machine_id.len() <= 128);
            prop_assert!(reg.address.starts_with("http://") || reg.address.starts_with("https://"));
            prop_assert!(reg.pools.len() <= validate::MAX_POOLS);
            let mut ids: Vec<_> = reg.pools.iter().map(|p| &p.pool_id).collect();
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids.len(), reg.pools.len());
            prop_assert!(reg.capabilities.gpus.len() <= validate::MAX_GPUS);
            prop_assert!(reg.labels.len() <= validate::MAX_LABELS);
            prop_assert!(reg.labels.values().all(|v| v.len() <= validate::MAX_TEXT_LEN));
        }
    }

    #[test]
    fn beat_validation_never_panics_and_accepts_only_valid_input(
        pools in prop::collection::vec(pool_status(), 0..70),
        skew_secs in -10_000i64..10_000,
        nanos in -5i32..1_000_000_005,
        utilization in 0u32..200,
    ) {
        let now = Utc::now();
        let mut request = pb::HeartbeatRequest {
            sent_at: Some(prost_types::Timestamp { seconds: now.timestamp() + skew_secs, nanos }),
            pools,
            gpus: vec![pb::GpuStats { utilization_percent: utilization, ..Default::default() }],
            ..Default::default()
        };
        if let Ok(beat) = validate::beat(&mut request, now, Duration::from_secs(3600)) {
            prop_assert!(beat.pools.len() <= validate::MAX_POOLS);
            for pool in &beat.pools {
                prop_assert!(pool.slots_free <= pool.slots_total);
                prop_assert!((1..=5).contains(&pool.state));
            }
            prop_assert!(utilization <= 100);
            prop_assert!((beat.sent_at - now).num_seconds().abs() <= 3600);
        }
    }
}

const TIMEOUT_MS: u64 = 1000;
const RETENTION_MS: u64 = 3000;
/// Timer resolution: a node's status is not checked this close after a
/// deadline, where either answer is correct.
const SLACK_MS: u64 = 3;

#[derive(Debug, Clone)]
enum Op {
    /// Register node `n` from machine `m`.
    Register { n: usize, m: usize },
    /// A heartbeat on node `n`'s current session.
    Beat { n: usize },
    /// A heartbeat naming node `n`'s previous session.
    StaleBeat { n: usize },
    /// Deregister node `n` with its session.
    Deregister { n: usize },
    /// Move the paused clock.
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..4, 0usize..2).prop_map(|(n, m)| Op::Register { n, m }),
        (0usize..4).prop_map(|n| Op::Beat { n }),
        (0usize..4).prop_map(|n| Op::StaleBeat { n }),
        (0usize..4).prop_map(|n| Op::Deregister { n }),
        prop_oneof![1u64..50, 200u64..1500, 2000u64..4000].prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What the model believes about one node.
#[derive(Debug, Clone)]
struct ModelNode {
    machine: usize,
    /// Model time (ms) of the last sign of life.
    last_seen: u64,
    session: (u64, String),
    previous: Option<(u64, String)>,
}

impl ModelNode {
    fn deadline(&self) -> u64 {
        self.last_seen + TIMEOUT_MS
    }
    fn online(&self, now: u64) -> bool {
        now < self.deadline()
    }
    fn removed(&self, now: u64) -> bool {
        now >= self.deadline() + RETENTION_MS
    }
    /// Within timer resolution after the deadline or the removal time.
    fn at_edge(&self, now: u64) -> bool {
        let edge = |t: u64| (t..t + SLACK_MS).contains(&now);
        edge(self.deadline()) || edge(self.deadline() + RETENTION_MS)
    }
}

/// Moves the paused clock and lets the expiry task run.
async fn advance(ms: u64) {
    tokio::time::advance(Duration::from_millis(ms)).await;
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

fn beat_for(n: usize, session: &(u64, String)) -> Beat {
    let mut request = pb::HeartbeatRequest {
        node_id: format!("n{n}"),
        session_id: session.0,
        session_secret: session.1.clone(),
        sent_at: Some(to_proto_timestamp(Utc::now())),
        ..Default::default()
    };
    validate::beat(&mut request, Utc::now(), Duration::from_secs(60)).unwrap()
}

fn registration(n: usize, m: usize) -> Registration {
    validate::registration(pb::RegisterRequest {
        node_id: format!("n{n}"),
        machine_id: format!("machine-{m}"),
        address: "http://node:9200".into(),
        ..Default::default()
    })
    .unwrap()
}

async fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let registry = Registry::new(Timing {
        node_timeout: Duration::from_millis(TIMEOUT_MS),
        heartbeat_interval: Duration::from_millis(100),
        offline_retention: Duration::from_millis(RETENTION_MS),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(registry_server::expiry::run(registry.clone(), stop.clone()));
    let mut model: HashMap<usize, ModelNode> = HashMap::new();
    let mut now = 0u64;

    for op in ops {
        // Right at a deadline either status is correct (timer resolution);
        // act only away from such edges, so every answer is determined.
        if !matches!(op, Op::Advance { .. }) {
            while model.values().any(|node| node.at_edge(now)) {
                advance(SLACK_MS).await;
                now += SLACK_MS;
            }
            model.retain(|_, node| !node.removed(now));
        }
        match op {
            Op::Register { n, m } => {
                let taken = model
                    .get(&n)
                    .is_some_and(|node| node.online(now) && node.machine != m);
                match registry.register(registration(n, m), Now::read()) {
                    Ok(reg) => {
                        prop_assert!(!taken, "took over a live node");
                        let previous = model.get(&n).map(|node| node.session.clone());
                        model.insert(
                            n,
                            ModelNode {
                                machine: m,
                                last_seen: now,
                                session: (reg.session_id, reg.session_secret),
                                previous,
                            },
                        );
                    }
                    Err(RegistryError::NodeTaken { .. }) => prop_assert!(taken),
                    Err(other) => prop_assert!(false, "register failed: {other}"),
                }
            }
            Op::Beat { n } => {
                let id = format!("n{n}");
                match model.get_mut(&n) {
                    Some(node) => {
                        let slot = registry.attach(&id, node.session.0, &node.session.1);
                        prop_assert!(slot.is_ok(), "attach failed: {:?}", slot.err());
                        registry
                            .heartbeat(
                                &slot.unwrap(),
                                node.session.0,
                                beat_for(n, &node.session),
                                tokio::time::Instant::now(),
                            )
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        node.last_seen = now;
                    }
                    None => {
                        let unknown = matches!(
                            registry.attach(&id, 1, "x"),
                            Err(RegistryError::NodeNotFound { .. })
                        );
                        prop_assert!(unknown, "{} should be unknown", id);
                    }
                }
            }
            Op::StaleBeat { n } => {
                if let Some(ModelNode {
                    previous: Some(old),
                    ..
                }) = model.get(&n)
                {
                    let refused = registry.attach(&format!("n{n}"), old.0, &old.1);
                    let superseded =
                        matches!(refused, Err(RegistryError::SessionSuperseded { .. }));
                    prop_assert!(superseded, "stale session accepted");
                }
            }
            Op::Deregister { n } => {
                let id = format!("n{n}");
                match model.remove(&n) {
                    Some(node) => registry
                        .deregister(&id, node.session.0, Some(&node.session.1))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?,
                    None => {
                        let unknown = matches!(
                            registry.deregister(&id, 0, None),
                            Err(RegistryError::NodeNotFound { .. })
                        );
                        prop_assert!(unknown, "{} should be unknown", id);
                    }
                }
            }
            Op::Advance { ms } => {
                advance(ms).await;
                now += ms;
            }
        }

        // Forget nodes the model says retention removed (at the edge the
        // registry may not have yet, which the checks below allow).
        model.retain(|_, node| !node.removed(now) || node.at_edge(now));

        // The registry agrees with the model, away from deadline edges.
        for n in 0..4 {
            let id = format!("n{n}");
            let got = registry.get(&id);
            let Some(node) = model.get(&n) else {
                prop_assert!(got.is_err(), "{id} should be gone at {now} ms");
                continue;
            };
            if node.at_edge(now) {
                continue;
            }
            if node.removed(now) {
                prop_assert!(got.is_err(), "{id} outlived its retention at {now} ms");
                continue;
            }
            let got =
                got.map_err(|e| TestCaseError::fail(format!("{id} missing at {now} ms: {e}")))?;
            let want = if node.online(now) {
                pb::NodeStatus::Online
            } else {
                pb::NodeStatus::Offline
            };
            prop_assert_eq!(
                got.status(),
                want,
                "{} at {} ms, last seen {}",
                id,
                now,
                node.last_seen
            );
            prop_assert_eq!(got.session_id, node.session.0);
        }
        let counts = registry.counts();
        let online = model.values().filter(|node| node.online(now)).count() as u64;
        let near_edge = model.values().any(|node| node.at_edge(now));
        if !near_edge {
            prop_assert_eq!(counts.online, online);
            prop_assert_eq!(counts.online + counts.offline, model.len() as u64);
        }
    }
    stop.cancel();
    Ok(())
}

proptest! {
    #[test]
    fn the_state_machine_agrees_with_a_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run_model(ops))?;
    }
}
