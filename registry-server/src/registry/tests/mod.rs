//! Unit tests of the registry core, on tokio's paused clock: the registry
//! reads no clock itself, so every operation gets the paused clock's time.
//! Liveness, sessions and listing here; bounds, gauges and lock hygiene in
//! [`hygiene`]; revisions, views and the history in [`feed`].

mod admin;
mod consistency;
mod feed;
mod guard;
mod hygiene;
mod mirror;
mod restart;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chrono::Utc;
use registry_proto::pb;
use tokio::time::Instant;

use super::sessions::SessionIds;
use super::*;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(3600);
const MS: Duration = Duration::from_millis(1);

/// A registry with its expiry task running on the paused clock.
fn start() -> (Registry, CancellationToken) {
    start_with(GuardConfig::default())
}

/// [`start`] with the mass-failure guard set by `guard`.
fn start_with(guard: GuardConfig) -> (Registry, CancellationToken) {
    let registry = Registry::with_options(
        Timing {
            node_timeout: TIMEOUT,
            heartbeat_interval: Duration::from_secs(10),
            offline_retention: RETENTION,
        },
        Options {
            guard,
            ..Options::default()
        },
    );
    let stop = CancellationToken::new();
    tokio::spawn(crate::expiry::run(registry.clone(), stop.clone()));
    (registry, stop)
}

/// Moves the paused clock and lets the expiry task run.
async fn advance(by: Duration) {
    tokio::time::advance(by).await;
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// A registration of `node_id` with one pool and one label; shared by the
/// crate's unit tests that need a registered node.
pub(crate) fn registration(node_id: &str) -> Registration {
    new_registration(node_id).into()
}

/// [`registration`]'s fields one by one, for tests that change one.
pub(crate) fn new_registration(node_id: &str) -> NewRegistration {
    NewRegistration {
        node_id: node_id.into(),
        machine_id: format!("machine-{node_id}"),
        address: format!("http://{node_id}:9200"),
        pools: vec![pb::PoolSpec {
            pool_id: "pool-0".into(),
            ..Default::default()
        }]
        .into(),
        capabilities: Default::default(),
        agent_version: "test".into(),
        labels: [("zone".to_string(), "a".to_string())].into(),
        metrics_address: String::new(),
        models_available: Vec::new(),
    }
}

fn beat(pool_state: pb::PoolState) -> Beat {
    Beat {
        sent_at: Utc::now(),
        received_at: Utc::now(),
        pools: vec![pb::PoolStatus {
            pool_id: "pool-0".into(),
            state: pool_state as i32,
            slots_total: 4,
            slots_free: 4,
            ..Default::default()
        }],
        gpus: vec![],
    }
}

fn status(registry: &Registry, id: &str) -> pb::NodeStatus {
    registry.get(id).unwrap().status()
}

#[tokio::test(start_paused = true)]
async fn the_read_view_carries_staged_models_and_reported_endpoints() {
    let (registry, _stop) = start();
    let mut registration = registration("n1");
    registration.models_available = Box::new(["qwen2.5-7b".into()]);
    let reg = registry.register(registration, Now::read()).unwrap();
    assert_eq!(registry.get("n1").unwrap().models_available, ["qwen2.5-7b"]);
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    let mut heartbeat = beat(pb::PoolState::Ready);
    heartbeat.pools[0].endpoint = "http://n1:8001".into();
    registry
        .heartbeat(&slot, reg.session_id, heartbeat, Instant::now())
        .unwrap();
    assert_eq!(
        registry.get("n1").unwrap().pool_status[0].endpoint,
        "http://n1:8001"
    );
}

#[tokio::test(start_paused = true)]
async fn raising_every_signal_raises_each_nodes_once() {
    let (registry, _stop) = start();
    let slots: Vec<_> = ["n1", "n2"]
        .into_iter()
        .map(|id| {
            let reg = registry.register(registration(id), Now::read()).unwrap();
            let (slot, _) = registry
                .attach_stream(id, reg.session_id, &reg.session_secret)
                .unwrap();
            (slot.signal().seen(), slot)
        })
        .collect();
    registry.raise_every_signal();
    for (seen, slot) in slots {
        assert_eq!(slot.signal().seen(), seen + 1, "{}", slot.id());
    }
}

#[tokio::test(start_paused = true)]
async fn a_newer_stream_replaces_the_older_and_wakes_it() {
    let (registry, _stop) = start();
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    let (slot, older) = registry
        .attach_stream("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    let seen = slot.signal().seen();
    registry
        .heartbeat_on_stream(
            &slot,
            reg.session_id,
            older,
            beat(pb::PoolState::Ready),
            Instant::now(),
            &mut 0,
        )
        .unwrap();

    let (_, newer) = registry
        .attach_stream("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    assert_ne!(newer, older);
    assert!(
        slot.signal().raised_since(seen),
        "the older stream is woken"
    );
    let replaced = RegistryError::StreamReplaced {
        node_id: "n1".into(),
        session_id: reg.session_id,
    };
    assert_eq!(
        registry.pending_on_stream(&slot, reg.session_id, older, &mut 0),
        Err(replaced.clone())
    );
    assert_eq!(
        registry.heartbeat_on_stream(
            &slot,
            reg.session_id,
            older,
            beat(pb::PoolState::Ready),
            Instant::now(),
            &mut 0,
        ),
        Err(replaced)
    );
    assert_eq!(
        registry.pending_on_stream(&slot, reg.session_id, newer, &mut 0),
        Ok(None)
    );
    registry
        .heartbeat_on_stream(
            &slot,
            reg.session_id,
            newer,
            beat(pb::PoolState::Ready),
            Instant::now(),
            &mut 0,
        )
        .unwrap();

    // A new session wakes the stream too, which then finds its session gone.
    let seen = slot.signal().seen();
    registry.register(registration("n1"), Now::read()).unwrap();
    assert!(
        slot.signal().raised_since(seen),
        "the old session's stream is woken"
    );
    assert!(matches!(
        registry.pending_on_stream(&slot, reg.session_id, newer, &mut 0),
        Err(RegistryError::SessionSuperseded { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_goes_offline_exactly_at_its_deadline() {
    let (registry, _stop) = start();
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    advance(Duration::from_secs(10)).await;
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            beat(pb::PoolState::Ready),
            Instant::now(),
        )
        .unwrap();

    // The deadline is now last heartbeat + 30 s, not registration + 30 s.
    advance(TIMEOUT - MS).await;
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
    advance(2 * MS).await;
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);
    assert_eq!(
        registry.counts(),
        Counts {
            online: 0,
            offline: 1
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_that_never_streams_goes_offline_at_its_deadline() {
    let (registry, _stop) = start();
    registry
        .register(registration("quiet"), Now::read())
        .unwrap();
    advance(TIMEOUT - MS).await;
    assert_eq!(status(&registry, "quiet"), pb::NodeStatus::Online);
    advance(2 * MS).await;
    assert_eq!(status(&registry, "quiet"), pb::NodeStatus::Offline);
}

#[tokio::test(start_paused = true)]
async fn steady_heartbeats_keep_a_node_online() {
    let (registry, _stop) = start();
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    for _ in 0..20 {
        advance(Duration::from_secs(10)).await;
        registry
            .heartbeat(
                &slot,
                reg.session_id,
                beat(pb::PoolState::Ready),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
    }
}

#[tokio::test(start_paused = true)]
async fn an_offline_node_is_online_again_on_its_next_heartbeat() {
    let (registry, _stop) = start();
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    advance(TIMEOUT + MS).await;
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);

    registry
        .heartbeat(
            &slot,
            reg.session_id,
            beat(pb::PoolState::Draining),
            Instant::now(),
        )
        .unwrap();
    let node = registry.get("n1").unwrap();
    assert_eq!(node.status(), pb::NodeStatus::Online);
    assert_eq!(node.pool_status[0].state(), pb::PoolState::Draining);
    assert_eq!(
        registry.counts(),
        Counts {
            online: 1,
            offline: 0
        }
    );

    // And its new deadline is enforced again.
    advance(TIMEOUT + MS).await;
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);
}

#[tokio::test(start_paused = true)]
async fn re_registering_keeps_registered_at_and_refuses_the_old_session() {
    let (registry, _stop) = start();
    let first = registry.register(registration("n1"), Now::read()).unwrap();
    assert!(first.created);
    let old_slot = registry
        .attach("n1", first.session_id, &first.session_secret)
        .unwrap();
    advance(Duration::from_secs(5)).await;

    let mut changed = new_registration("n1");
    changed.address = "http://elsewhere:9200".into();
    let changed = Registration::from(changed);
    let second = registry.register(changed, Now::read()).unwrap();
    assert!(!second.created);
    assert_ne!(second.session_id, first.session_id);
    assert_eq!(second.registered_at, first.registered_at);
    assert_eq!(registry.get("n1").unwrap().address, "http://elsewhere:9200");

    let err = registry
        .heartbeat(
            &old_slot,
            first.session_id,
            beat(pb::PoolState::Ready),
            Instant::now(),
        )
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::SessionSuperseded { presented, .. } if presented == first.session_id)
    );
    assert!(matches!(
        registry.attach("n1", first.session_id, &first.session_secret),
        Err(RegistryError::SessionSuperseded { .. })
    ));
    // The new session's id with the old secret, or none: refused too.
    assert!(matches!(
        registry.attach("n1", second.session_id, &first.session_secret),
        Err(RegistryError::PermissionDenied(_))
    ));
    assert!(matches!(
        registry.attach("n1", second.session_id, ""),
        Err(RegistryError::PermissionDenied(m)) if m.contains("requires its session_secret")
    ));
    registry
        .attach("n1", second.session_id, &second.session_secret)
        .unwrap();
    assert_ne!(first.session_secret, second.session_secret);
    assert_eq!(second.session_secret.len(), 32);
    assert_eq!(
        registry.counts(),
        Counts {
            online: 1,
            offline: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn re_registering_an_offline_node_brings_it_online() {
    let (registry, _stop) = start();
    registry.register(registration("n1"), Now::read()).unwrap();
    advance(TIMEOUT + MS).await;
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);
    registry.register(registration("n1"), Now::read()).unwrap();
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
    advance(TIMEOUT - MS).await;
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
}

#[tokio::test(start_paused = true)]
async fn offline_nodes_are_removed_after_retention() {
    let (registry, _stop) = start();
    registry.register(registration("n1"), Now::read()).unwrap();
    advance(TIMEOUT + MS).await;
    advance(RETENTION - 2 * MS).await;
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);
    advance(2 * MS).await;
    assert!(matches!(
        registry.get("n1"),
        Err(RegistryError::NodeNotFound { .. })
    ));
    assert_eq!(registry.counts(), Counts::default());
    // The id is free for a fresh registration.
    assert!(
        registry
            .register(registration("n1"), Now::read())
            .unwrap()
            .created
    );
}

#[tokio::test(start_paused = true)]
async fn deregister_removes_at_once_and_ends_the_session() {
    let (registry, _stop) = start();
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    registry.register(registration("n2"), Now::read()).unwrap();

    assert!(matches!(
        registry.deregister("n1", reg.session_id + 1, None),
        Err(RegistryError::SessionSuperseded { .. })
    ));
    registry
        .deregister("n1", reg.session_id, Some(&reg.session_secret))
        .unwrap();
    assert!(registry.get("n1").is_err());
    assert!(matches!(
        registry.heartbeat(
            &slot,
            reg.session_id,
            beat(pb::PoolState::Ready),
            Instant::now()
        ),
        Err(RegistryError::NodeNotFound { .. })
    ));
    assert!(matches!(
        registry.deregister("n1", 0, None),
        Err(RegistryError::NodeNotFound { .. })
    ));
    assert_eq!(status(&registry, "n2"), pb::NodeStatus::Online);
    assert_eq!(
        registry.counts(),
        Counts {
            online: 1,
            offline: 0
        }
    );
    // No stale wake-up of the removed node disturbs anything later.
    advance(TIMEOUT + MS).await;
    assert_eq!(
        registry.counts(),
        Counts {
            online: 0,
            offline: 1
        }
    );
}

#[tokio::test(start_paused = true)]
async fn many_nodes_each_keep_their_own_deadline() {
    // All 50 falling silent is exactly what the mass-failure guard stops;
    // this test is about the deadlines alone.
    let (registry, _stop) = start_with(GuardConfig::off());
    for i in 0..50 {
        registry
            .register(registration(&format!("n{i:02}")), Now::read())
            .unwrap();
        advance(Duration::from_millis(100)).await;
    }
    // n00 registered at t=0 and n49 at t=4.9 s; at t=30.05 s the first
    // nodes (deadlines 30.0 s) are offline and n01 (30.1 s) is not.
    advance(TIMEOUT - Duration::from_millis(4950)).await;
    assert_eq!(status(&registry, "n00"), pb::NodeStatus::Offline);
    assert_eq!(status(&registry, "n01"), pb::NodeStatus::Online);
    advance(Duration::from_secs(5)).await;
    assert_eq!(
        registry.counts(),
        Counts {
            online: 0,
            offline: 50
        }
    );
}

#[tokio::test(start_paused = true)]
async fn list_filters_and_pages_in_node_id_order() {
    let (registry, _stop) = start();
    for id in ["c", "a", "b", "d"] {
        let mut reg = registration(id);
        if id == "b" {
            reg.labels = [("zone".to_string(), "b".to_string())].into();
            let mut pools = reg.pools.to_proto();
            pools[0].pool_id = "pool-b".into();
            reg.pools = pools.into();
        }
        registry.register(reg, Now::read()).unwrap();
    }
    advance(TIMEOUT + MS).await;
    let reg = registry.register(registration("d"), Now::read()).unwrap();
    registry.register(registration("e"), Now::read()).unwrap();
    let slot = registry
        .attach("d", reg.session_id, &reg.session_secret)
        .unwrap();
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            beat(pb::PoolState::Ready),
            Instant::now(),
        )
        .unwrap();

    let ids = |filter: &NodeFilter| -> Vec<String> {
        let (nodes, next) = registry.list(filter, 0, "");
        assert!(next.is_none());
        nodes.into_iter().map(|n| n.node_id).collect()
    };
    assert_eq!(ids(&NodeFilter::default()), ["a", "b", "c", "d", "e"]);
    let online = NodeFilter {
        status: Some(Liveness::Online),
        ..Default::default()
    };
    assert_eq!(ids(&online), ["d", "e"]);
    let offline = NodeFilter {
        status: Some(Liveness::Offline),
        ..Default::default()
    };
    assert_eq!(ids(&offline), ["a", "b", "c"]);
    let pool_b = NodeFilter {
        pool_id: Some("pool-b".into()),
        ..Default::default()
    };
    assert_eq!(ids(&pool_b), ["b"]);
    let zone_a_online = NodeFilter {
        status: Some(Liveness::Online),
        labels: vec![("zone".into(), "a".into())],
        ..Default::default()
    };
    assert_eq!(ids(&zone_a_online), ["d", "e"]);
    let no_such_label = NodeFilter {
        labels: vec![("rack".into(), "1".into())],
        ..Default::default()
    };
    assert!(ids(&no_such_label).is_empty());

    let (page1, token) = registry.list(&NodeFilter::default(), 2, "");
    assert_eq!(
        page1.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(token.as_deref(), Some("b"));
    let (page2, token) = registry.list(&NodeFilter::default(), 2, "b");
    assert_eq!(
        page2.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
        ["c", "d"]
    );
    let (page3, token) = registry.list(&NodeFilter::default(), 2, token.as_deref().unwrap());
    assert_eq!(
        page3.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
        ["e"]
    );
    assert!(token.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_live_node_is_not_taken_over_from_another_machine() {
    let (registry, _stop) = start();
    let first = registry.register(registration("n1"), Now::read()).unwrap();
    let mut intruder = new_registration("n1");
    intruder.machine_id = "other-machine".into();
    let intruder = Registration::from(intruder);
    assert!(matches!(
        registry.register(intruder.clone(), Now::read()),
        Err(RegistryError::NodeTaken { node_id }) if node_id == "n1"
    ));
    let node = registry.get("n1").unwrap();
    assert_eq!(node.session_id, first.session_id, "nothing changed");
    assert_eq!(node.machine_id, "machine-n1");

    // The same machine may re-register; another may once n1 is OFFLINE.
    registry.register(registration("n1"), Now::read()).unwrap();
    advance(TIMEOUT + MS).await;
    let moved = registry.register(intruder, Now::read()).unwrap();
    assert!(!moved.created);
    assert_eq!(registry.get("n1").unwrap().machine_id, "other-machine");
}

#[tokio::test(start_paused = true)]
async fn no_node_beyond_the_cap_is_added() {
    let registry = Registry::with_max_nodes(Timing::default(), 2);
    registry.register(registration("a"), Now::read()).unwrap();
    registry.register(registration("b"), Now::read()).unwrap();
    assert!(matches!(
        registry.register(registration("c"), Now::read()),
        Err(RegistryError::LimitReached(m)) if m.contains("2 nodes")
    ));
    // Known nodes still re-register at the cap.
    registry.register(registration("a"), Now::read()).unwrap();
    registry.deregister("b", 0, None).unwrap();
    registry.register(registration("c"), Now::read()).unwrap();
}

#[test]
fn session_ids_are_unique_and_never_zero() {
    let ids = SessionIds {
        base: u64::MAX - 2,
        next: AtomicU64::new(1),
    };
    let got: Vec<u64> = (0..5).map(|_| ids.next()).collect();
    assert!(!got.contains(&0));
    let unique: std::collections::HashSet<_> = got.iter().collect();
    assert_eq!(unique.len(), got.len());
}
