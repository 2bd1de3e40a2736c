//! The queue stays bounded by the listed nodes, gauges move only by real
//! changes, and re-registration needs no map write lock. These drive the
//! registry with explicit times (no expiry task), which is possible because
//! it reads no clock itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use registry_proto::pb;
use tokio::time::Instant;

use super::{MS, RETENTION, TIMEOUT, beat, registration, status};
use crate::registry::{Now, Registry, Timing};

/// A registry with the tests' timing and no expiry task: the tests call
/// `process_due` themselves.
fn registry() -> Registry {
    Registry::new(Timing {
        node_timeout: TIMEOUT,
        heartbeat_interval: Duration::from_secs(10),
        offline_retention: RETENTION,
    })
}

fn at(t: Instant) -> Now {
    Now {
        at: t,
        wall: Utc::now(),
    }
}

fn pools(registry: &Registry, state: pb::PoolState) -> i64 {
    registry.stats().pools_by_state[state as usize].load(Ordering::Relaxed)
}

#[test]
fn flapping_leaves_one_queue_entry_per_node() {
    let registry = registry();
    let mut t = Instant::now();
    let steady = registry.register(registration("steady"), at(t)).unwrap();
    let steady_slot = registry
        .attach("steady", steady.session_id, &steady.session_secret)
        .unwrap();
    let reg = registry.register(registration("flapper"), at(t)).unwrap();
    let slot = registry
        .attach("flapper", reg.session_id, &reg.session_secret)
        .unwrap();
    for i in 0..100_000 {
        // "steady" beats halfway, so it stays ONLINE throughout.
        t += TIMEOUT / 2;
        registry
            .heartbeat(
                &steady_slot,
                steady.session_id,
                beat(pb::PoolState::Ready),
                t,
            )
            .unwrap();
        // "flapper" is silent past its deadline: OFFLINE, with a retention
        // wake-up an hour away...
        t += TIMEOUT / 2 + MS;
        registry.process_due(at(t));
        // ...then back: that wake-up must go, not linger for the hour.
        registry
            .heartbeat(&slot, reg.session_id, beat(pb::PoolState::Ready), t)
            .unwrap();
        assert!(
            registry.scheduled_wakeups() <= 2,
            "{} wake-ups queued for 2 nodes after {i} flaps",
            registry.scheduled_wakeups()
        );
    }
    // Every round was a real flap of "flapper" and of nothing else.
    let stats = registry.stats();
    assert_eq!(stats.offline_transitions.load(Ordering::Relaxed), 100_000);
    assert_eq!(stats.online_transitions.load(Ordering::Relaxed), 100_000);
    assert_eq!(status(&registry, "flapper"), pb::NodeStatus::Online);
    assert_eq!(status(&registry, "steady"), pb::NodeStatus::Online);
}

#[test]
fn register_deregister_cycles_leave_nothing_queued() {
    let registry = registry();
    let t = Instant::now();
    registry.register(registration("keeper"), at(t)).unwrap();
    for i in 0..100_000 {
        let id = if i % 2 == 0 { "cycler" } else { "other" };
        let reg = registry.register(registration(id), at(t)).unwrap();
        let slot = registry
            .attach(id, reg.session_id, &reg.session_secret)
            .unwrap();
        registry
            .deregister(id, reg.session_id, Some(&reg.session_secret))
            .unwrap();
        // Neither the map nor the schedule holds the removed node.
        assert_eq!(Arc::strong_count(&slot), 1, "removed slot still referenced");
        assert!(
            registry.scheduled_wakeups() <= 1,
            "{} wake-ups queued for 1 node after {i} cycles",
            registry.scheduled_wakeups()
        );
    }
    assert_eq!(registry.counts().online, 1);
}

#[test]
fn heartbeats_of_an_online_node_never_touch_the_schedule() {
    let registry = registry();
    let mut t = Instant::now();
    let reg = registry.register(registration("n1"), at(t)).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    let queued = slot.lock().wakeup;
    for _ in 0..10 {
        t += Duration::from_secs(10);
        registry
            .heartbeat(&slot, reg.session_id, beat(pb::PoolState::Ready), t)
            .unwrap();
        assert_eq!(slot.lock().wakeup, queued, "a heartbeat re-queued the node");
    }
    // Re-registering while ONLINE keeps the earlier entry too.
    registry.register(registration("n1"), at(t)).unwrap();
    assert_eq!(slot.lock().wakeup, queued);
    // The first wake-up re-checks and re-queues at the real deadline.
    let first = registry
        .shared
        .schedule
        .due_at(&queued.expect("the node is queued"));
    let next = registry.process_due(at(first));
    assert_eq!(next, Some(t + TIMEOUT));
    assert_eq!(registry.scheduled_wakeups(), 1);
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
}

#[test]
fn pool_gauges_follow_only_real_changes() {
    use pb::PoolState::{Draining, Ready};
    let registry = registry();
    let t = Instant::now();
    let reg = registry.register(registration("n1"), at(t)).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    let send = |state, when| {
        registry
            .heartbeat(&slot, reg.session_id, beat(state), when)
            .unwrap()
    };
    send(Ready, t);
    send(Ready, t);
    assert_eq!(
        (pools(&registry, Ready), pools(&registry, Draining)),
        (1, 0)
    );
    send(Draining, t);
    assert_eq!(
        (pools(&registry, Ready), pools(&registry, Draining)),
        (0, 1)
    );

    // OFFLINE nodes' pools are not counted; back ONLINE they are again.
    let late = t + TIMEOUT + MS;
    registry.process_due(at(late));
    assert_eq!(
        registry.get("n1").unwrap().status(),
        pb::NodeStatus::Offline
    );
    assert_eq!(pools(&registry, Draining), 0);
    send(Ready, late);
    assert_eq!(
        (pools(&registry, Ready), pools(&registry, Draining)),
        (1, 0)
    );

    // A new session reports its own pools; removal takes them away.
    let again = registry.register(registration("n1"), at(late)).unwrap();
    assert_eq!(pools(&registry, Ready), 0);
    let slot = registry
        .attach("n1", again.session_id, &again.session_secret)
        .unwrap();
    registry
        .heartbeat(&slot, again.session_id, beat(Ready), late)
        .unwrap();
    assert_eq!(pools(&registry, Ready), 1);
    registry.deregister("n1", 0, None).unwrap();
    assert_eq!(pools(&registry, Ready), 0);
    assert!(
        registry
            .stats()
            .pools_by_state
            .iter()
            .all(|g| g.load(Ordering::Relaxed) == 0)
    );
}

#[test]
fn re_registering_a_known_node_needs_no_map_write_lock() {
    let registry = registry();
    let t = Instant::now();
    registry.register(registration("n1"), at(t)).unwrap();
    // A reader (a ListNodes page) holds the map; a write lock would wait
    // for it, so the re-registration below would not finish.
    let reader = registry.read_nodes();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let handle = registry.clone();
    std::thread::spawn(move || {
        let renewed = handle.register(registration("n1"), at(t));
        let _ = done_tx.send(renewed.map(|r| r.created));
    });
    let renewed = done_rx.recv_timeout(Duration::from_secs(10));
    drop(reader);
    assert_eq!(renewed, Ok(Ok(false)), "re-registration waited on the map");
    assert_eq!(registry.counts().online, 1);
    assert!(registry.get("n1").is_ok());
    assert_eq!(
        registry.list(&Default::default(), 0, "").0[0].status(),
        pb::NodeStatus::Online
    );
}
