//! [`Registry::check_consistency`] holds through ordinary operations and
//! names the invariant when the bookkeeping is broken on purpose (so the
//! property tests and fuzz targets that rely on it are not checking
//! nothing).

use chrono::Utc;
use registry_proto::pb;
use tokio::time::Instant;

use super::{MS, TIMEOUT, beat, registration};
use crate::registry::{DrainRequest, Liveness, Now, Registry, Timing};

fn now(at: Instant) -> Now {
    Now {
        at,
        wall: Utc::now(),
    }
}

fn registry() -> Registry {
    Registry::new(Timing {
        node_timeout: TIMEOUT,
        ..Timing::default()
    })
}

#[test]
fn holds_through_register_beat_admin_offline_and_removal() {
    let registry = registry();
    let t = Instant::now();
    let reg = registry.register(registration("n1"), now(t)).unwrap();
    registry.register(registration("n2"), now(t)).unwrap();
    registry.check_consistency().unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            beat(pb::PoolState::Ready),
            t + TIMEOUT / 2,
        )
        .unwrap();
    registry.cordon("n1", "maintenance", now(t)).unwrap();
    let drain = DrainRequest {
        pool_ids: Vec::new(),
        reason: "upgrade".into(),
        deadline: Some(TIMEOUT / 4),
    };
    registry.drain("n2", drain, now(t)).unwrap();
    registry.check_consistency().unwrap();
    // n2 OFFLINE at its deadline, n1 half a timeout later.
    let mut next = registry.process_due(now(t + TIMEOUT));
    registry.check_consistency().unwrap();
    while let Some(at) = next.filter(|&at| at <= t + 2 * TIMEOUT) {
        next = registry.process_due(now(at));
        registry.check_consistency().unwrap();
    }
    assert_eq!(registry.counts().offline, 2);
    registry.deregister("n1", 0, None).unwrap();
    registry.check_consistency().unwrap();
    registry.process_due(now(t + TIMEOUT + Timing::default().offline_retention + MS));
    assert_eq!(registry.counts().offline, 0);
    registry.check_consistency().unwrap();
}

#[test]
fn names_a_count_that_disagrees_with_the_nodes() {
    let registry = registry();
    registry
        .register(registration("n1"), now(Instant::now()))
        .unwrap();
    // A node counted that is not listed.
    registry.shared.population.add(Liveness::Online);
    let broken = registry.check_consistency().unwrap_err();
    assert!(broken.starts_with("counts"), "{broken}");
}

#[test]
fn names_an_offline_node_without_its_offline_time() {
    let registry = registry();
    registry
        .register(registration("n1"), now(Instant::now()))
        .unwrap();
    registry.read_nodes()["n1"].lock().liveness = Liveness::Offline;
    let broken = registry.check_consistency().unwrap_err();
    assert!(broken.starts_with("node n1: OFFLINE without"), "{broken}");
}

#[test]
fn names_a_wakeup_later_than_the_deadline() {
    let registry = registry();
    let t = Instant::now();
    registry.register(registration("n1"), now(t)).unwrap();
    // A heartbeat that moved last_seen back would leave the queued
    // wake-up after the deadline: the registry would oversleep it.
    registry.read_nodes()["n1"].lock().last_seen = t - TIMEOUT;
    let broken = registry.check_consistency().unwrap_err();
    assert!(broken.contains("after its deadline"), "{broken}");
}

#[test]
fn names_a_published_view_that_disagrees() {
    let registry = registry();
    registry
        .register(registration("n1"), now(Instant::now()))
        .unwrap();
    registry.read_nodes()["n1"].lock().session_id += 1;
    let broken = registry.check_consistency().unwrap_err();
    assert!(broken.contains("published view"), "{broken}");
}
