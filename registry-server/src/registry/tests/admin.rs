//! Cordon and drain in the registry core: events and revisions, drain
//! progress from pool status, the deadline on the paused clock, commands
//! owed to streams, admin state kept across re-registration and removal,
//! and the gauges.

use std::sync::atomic::Ordering;

use pb::heartbeat_response::Command;

use super::*;

/// Registers `id` and opens its stream's slot.
fn joined(registry: &Registry, id: &str) -> (Registered, Arc<NodeSlot>) {
    let reg = registry.register(registration(id), Now::read()).unwrap();
    let slot = registry
        .attach(id, reg.session_id, &reg.session_secret)
        .unwrap();
    (reg, slot)
}

/// One pool-0 status: `state`, with `busy` of 4 slots in use.
fn pool_beat(state: pb::PoolState, busy: u32) -> Beat {
    let mut b = beat(state);
    b.pools[0].slots_free = 4 - busy;
    b
}

fn drain_all(reason: &str, deadline: Option<Duration>) -> DrainRequest {
    DrainRequest {
        pool_ids: vec![],
        reason: reason.into(),
        deadline,
    }
}

fn drain_state(registry: &Registry, id: &str) -> Option<pb::DrainState> {
    registry.get(id).unwrap().admin.unwrap().drain
}

#[tokio::test(start_paused = true)]
async fn cordon_is_a_visible_change_once_and_uncordon_undoes_it() {
    let (registry, _stop) = start();
    let (_reg, _slot) = joined(&registry, "n1");
    let before = registry.revision();
    let node = registry.cordon("n1", "bad fan", Now::read()).unwrap();
    let admin = node.admin.clone().unwrap();
    assert!(admin.cordoned && !admin.schedulable);
    assert_eq!(admin.cordon_reason, "bad fan");
    assert_eq!(node.revision, before + 1, "one MODIFIED event");
    assert_eq!(node.status(), pb::NodeStatus::Online, "stays ONLINE");

    // The same cordon again: no change, no event.
    let again = registry.cordon("n1", "bad fan", Now::read()).unwrap();
    assert_eq!(again.revision, node.revision);
    assert_eq!(registry.revision(), before + 1);
    // Another reason: a change that keeps cordoned_at.
    let reworded = registry.cordon("n1", "fan swap", Now::read()).unwrap();
    assert_eq!(reworded.revision, before + 2);
    assert_eq!(
        reworded.admin.as_ref().unwrap().cordoned_at,
        admin.cordoned_at
    );

    let open = registry.uncordon("n1").unwrap();
    let admin = open.admin.unwrap();
    assert!(admin.schedulable && !admin.cordoned && admin.cordon_reason.is_empty());
    assert_eq!(open.revision, before + 3);
    // Idempotent.
    assert_eq!(registry.uncordon("n1").unwrap().revision, before + 3);
    assert_eq!(registry.stats().cordoned_nodes.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn nodes_nobody_cordoned_share_one_admin_state_with_their_views() {
    let (registry, _stop) = start();
    let (_a, a) = joined(&registry, "a");
    let (_b, b) = joined(&registry, "b");
    let shared = |slot: &NodeSlot| {
        let st = slot.lock();
        let view = st
            .view
            .admin()
            .expect("a published view holds the admin state");
        assert!(std::ptr::eq(view, &*st.admin), "the view shares the node's");
        Arc::clone(&st.admin)
    };
    assert!(Arc::ptr_eq(&shared(&a), &shared(&b)));
    assert!(shared(&a).schedulable);

    registry.cordon("a", "bad fan", Now::read()).unwrap();
    assert!(!Arc::ptr_eq(&shared(&a), &shared(&b)));
    assert!(shared(&a).cordoned && shared(&b).schedulable);
    registry.uncordon("a").unwrap();
    assert!(Arc::ptr_eq(&shared(&a), &shared(&b)), "back to the default");
}

#[tokio::test(start_paused = true)]
async fn admin_calls_on_unknown_nodes_are_not_found() {
    let (registry, _stop) = start();
    for result in [
        registry.cordon("ghost", "", Now::read()),
        registry.uncordon("ghost"),
        registry.drain("ghost", drain_all("", None), Now::read()),
        registry.cancel_drain("ghost"),
    ] {
        assert!(
            matches!(result, Err(RegistryError::NodeNotFound { .. })),
            "{result:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn drain_of_a_pool_the_node_lacks_names_the_pool() {
    let (registry, _stop) = start();
    joined(&registry, "n1");
    let request = DrainRequest {
        pool_ids: vec!["pool-0".into(), "pool-9".into()],
        ..drain_all("", None)
    };
    let err = registry.drain("n1", request, Now::read()).unwrap_err();
    match err {
        RegistryError::InvalidArgument { field, reason } => {
            assert_eq!(field, "pool_ids[1]");
            assert!(reason.contains("pool-9"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(drain_state(&registry, "n1").is_none(), "nothing changed");
}

#[tokio::test(start_paused = true)]
async fn a_drain_is_acknowledged_then_drained_from_pool_status_each_an_event() {
    let (registry, _stop) = start();
    let (reg, slot) = joined(&registry, "n1");
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Ready, 2),
            Instant::now(),
        )
        .unwrap();
    let requested = registry
        .drain("n1", drain_all("kernel upgrade", None), Now::read())
        .unwrap();
    let admin = requested.admin.unwrap();
    assert!(!admin.schedulable);
    let drain = admin.drain.unwrap();
    assert!(!drain.acknowledged && !drain.drained && drain.requested_at.is_some());
    assert_eq!(registry.stats().draining_nodes.load(Ordering::Relaxed), 1);

    // Still READY: nothing moves.
    let mut sent = 0;
    registry
        .heartbeat_for(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Ready, 2),
            Instant::now(),
            &mut sent,
        )
        .unwrap();
    assert_eq!(registry.get("n1").unwrap().revision, requested.revision);

    // DRAINING with busy slots: acknowledged, not drained.
    registry
        .heartbeat_for(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Draining, 2),
            Instant::now(),
            &mut sent,
        )
        .unwrap();
    let acked = registry.get("n1").unwrap();
    let drain = acked.admin.unwrap().drain.unwrap();
    assert!(drain.acknowledged && !drain.drained);
    assert!(acked.revision > requested.revision);

    // Idle: drained, with its time.
    registry
        .heartbeat_for(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Draining, 0),
            Instant::now(),
            &mut sent,
        )
        .unwrap();
    let done = registry.get("n1").unwrap();
    let drain = done.admin.unwrap().drain.unwrap();
    assert!(drain.drained && drain.drained_at.is_some());
    assert!(done.revision > acked.revision);

    // Busy again later: drained stays (it is a fact about the past).
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Draining, 1),
            Instant::now(),
        )
        .unwrap();
    assert!(drain_state(&registry, "n1").unwrap().drained);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_pool_counts_as_drained() {
    let (registry, _stop) = start();
    let (reg, slot) = joined(&registry, "n1");
    registry
        .drain("n1", drain_all("", None), Now::read())
        .unwrap();
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Offline, 0),
            Instant::now(),
        )
        .unwrap();
    let drain = drain_state(&registry, "n1").unwrap();
    assert!(drain.acknowledged && drain.drained);
}

#[tokio::test(start_paused = true)]
async fn past_its_deadline_a_drain_of_a_silent_busy_node_counts_as_drained() {
    let (registry, _stop) = start();
    let (reg, slot) = joined(&registry, "n1");
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Draining, 3),
            Instant::now(),
        )
        .unwrap();
    registry
        .drain(
            "n1",
            drain_all("", Some(Duration::from_secs(10))),
            Now::read(),
        )
        .unwrap();
    let drain = drain_state(&registry, "n1").unwrap();
    assert!(drain.acknowledged && !drain.drained && drain.deadline.is_some());
    let before = registry.revision();

    advance(Duration::from_secs(9)).await;
    assert!(!drain_state(&registry, "n1").unwrap().drained);
    advance(Duration::from_secs(1) + MS).await;
    let node = registry.get("n1").unwrap();
    let drain = node.admin.clone().unwrap().drain.unwrap();
    assert!(drain.drained && drain.drained_at.is_some());
    assert_eq!(node.revision, before + 1, "the flip is one event");
    assert_eq!(node.status(), pb::NodeStatus::Online, "no heartbeat needed");

    // The node's liveness deadline still holds (the clock moves in steps:
    // one jump past a queued deadline would read as a registry stall).
    for _ in 0..TIMEOUT.as_secs() {
        advance(Duration::from_secs(1)).await;
    }
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);
}

#[tokio::test(start_paused = true)]
async fn the_drain_command_is_owed_to_every_new_stream_until_acknowledged() {
    let (registry, _stop) = start();
    let (reg, slot) = joined(&registry, "n1");
    let seen = slot.signal().seen();
    registry
        .drain(
            "n1",
            drain_all("upgrade", Some(Duration::from_secs(60))),
            Now::read(),
        )
        .unwrap();
    assert!(slot.signal().raised_since(seen), "open streams are woken");

    // An open stream pushes it once.
    let mut open_stream = 0;
    match registry.pending_command(&slot, reg.session_id, &mut open_stream) {
        Some(Command::Drain(cmd)) => {
            assert_eq!(cmd.reason, "upgrade");
            assert!(cmd.pool_ids.is_empty() && cmd.deadline.is_some());
        }
        other => panic!("{other:?}"),
    }
    assert!(
        registry
            .pending_command(&slot, reg.session_id, &mut open_stream)
            .is_none()
    );
    let ready = || pool_beat(pb::PoolState::Ready, 0);
    let none = registry
        .heartbeat_for(
            &slot,
            reg.session_id,
            ready(),
            Instant::now(),
            &mut open_stream,
        )
        .unwrap();
    assert!(none.is_none(), "sent once per stream");

    // A new stream (the agent reconnected) gets it on its first ack.
    let mut new_stream = 0;
    let again = registry
        .heartbeat_for(
            &slot,
            reg.session_id,
            ready(),
            Instant::now(),
            &mut new_stream,
        )
        .unwrap();
    assert!(matches!(again, Some(Command::Drain(_))));

    // Once acknowledged, no stream is owed it.
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Draining, 0),
            Instant::now(),
        )
        .unwrap();
    let mut newer_stream = 0;
    let owed = registry
        .heartbeat_for(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Draining, 0),
            Instant::now(),
            &mut newer_stream,
        )
        .unwrap();
    assert!(owed.is_none());

    // A stream of an older session is owed nothing.
    let mut stale = 0;
    assert!(
        registry
            .pending_command(&slot, reg.session_id + 99, &mut stale)
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_owes_a_resume_until_the_pools_are_no_longer_draining() {
    let (registry, _stop) = start();
    let (reg, slot) = joined(&registry, "n1");
    registry
        .drain("n1", drain_all("", None), Now::read())
        .unwrap();
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Draining, 1),
            Instant::now(),
        )
        .unwrap();
    let before = registry.revision();
    let node = registry.cancel_drain("n1").unwrap();
    let admin = node.admin.unwrap();
    assert!(admin.schedulable && admin.drain.is_none());
    assert_eq!(node.revision, before + 1);
    assert_eq!(registry.stats().draining_nodes.load(Ordering::Relaxed), 0);

    let mut stream = 0;
    assert!(matches!(
        registry.pending_command(&slot, reg.session_id, &mut stream),
        Some(Command::Resume(_))
    ));
    // Still DRAINING: a new stream is owed it again.
    let mut new_stream = 0;
    let owed = registry
        .heartbeat_for(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Draining, 1),
            Instant::now(),
            &mut new_stream,
        )
        .unwrap();
    assert!(matches!(owed, Some(Command::Resume(_))));
    // READY again: done, no stream is owed anything.
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Ready, 1),
            Instant::now(),
        )
        .unwrap();
    let mut newest = 0;
    assert!(
        registry
            .pending_command(&slot, reg.session_id, &mut newest)
            .is_none()
    );
    // No drain: cancelling again changes nothing.
    let revision = registry.revision();
    assert_eq!(registry.cancel_drain("n1").unwrap().revision, revision);
}

#[tokio::test(start_paused = true)]
async fn admin_state_survives_re_registration_and_deregistration() {
    let (registry, _stop) = start();
    let (reg, slot) = joined(&registry, "n1");
    registry.cordon("n1", "rack move", Now::read()).unwrap();
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            pool_beat(pb::PoolState::Draining, 0),
            Instant::now(),
        )
        .unwrap();
    registry
        .drain("n1", drain_all("rack move", None), Now::read())
        .unwrap();
    assert!(drain_state(&registry, "n1").unwrap().acknowledged);

    // Re-registration (agent restart without deregistering).
    let (again, slot) = joined(&registry, "n1");
    let admin = registry.get("n1").unwrap().admin.unwrap();
    assert!(admin.cordoned && admin.drain.is_some() && !admin.schedulable);

    // Deregistration, then a fresh registration: parked and put back.
    registry
        .deregister("n1", again.session_id, Some(&again.session_secret))
        .unwrap();
    drop(slot);
    assert!(matches!(
        registry.get("n1"),
        Err(RegistryError::NodeNotFound { .. })
    ));
    assert_eq!(registry.parked_admin_states(), 1);
    assert_eq!(registry.stats().cordoned_nodes.load(Ordering::Relaxed), 0);
    assert_eq!(registry.stats().draining_nodes.load(Ordering::Relaxed), 0);

    let (fresh, slot) = joined(&registry, "n1");
    let admin = registry.get("n1").unwrap().admin.unwrap();
    assert!(admin.cordoned && admin.drain.is_some() && !admin.schedulable);
    assert_eq!(admin.cordon_reason, "rack move");
    assert_eq!(registry.parked_admin_states(), 0);
    assert_eq!(registry.stats().cordoned_nodes.load(Ordering::Relaxed), 1);
    assert_eq!(registry.stats().draining_nodes.load(Ordering::Relaxed), 1);
    // The new agent has not reported DRAINING yet: it is owed the drain.
    let mut stream = 0;
    let owed = registry
        .heartbeat_for(
            &slot,
            fresh.session_id,
            pool_beat(pb::PoolState::Ready, 0),
            Instant::now(),
            &mut stream,
        )
        .unwrap();
    assert!(matches!(owed, Some(Command::Drain(_))));
    assert!(!drain_state(&registry, "n1").unwrap().acknowledged);
}

#[tokio::test(start_paused = true)]
async fn admin_state_survives_removal_after_retention_and_can_be_cleared_while_parked() {
    let (registry, _stop) = start();
    joined(&registry, "n1");
    registry.cordon("n1", "", Now::read()).unwrap();
    advance(TIMEOUT + RETENTION + Duration::from_secs(1)).await;
    assert!(registry.get("n1").is_err());
    assert_eq!(registry.parked_admin_states(), 1);

    // Uncordon while parked clears what is kept.
    let cleared = registry.uncordon("n1").unwrap();
    assert!(cleared.admin.clone().unwrap().schedulable);
    assert_eq!(cleared.status(), pb::NodeStatus::Unspecified);
    assert_eq!(registry.parked_admin_states(), 0);
    assert!(registry.uncordon("n1").is_err(), "nothing kept now");

    joined(&registry, "n1");
    assert!(registry.get("n1").unwrap().admin.unwrap().schedulable);
}

#[tokio::test(start_paused = true)]
async fn parked_admin_states_are_bounded_oldest_first() {
    let mut map = crate::registry::admin::ParkedMap::default();
    let parked = crate::registry::admin::Parked::for_tests();
    for i in 0..=MAX_PARKED {
        map.insert_for_tests(&format!("n{i}"), parked.clone());
    }
    assert_eq!(map.len(), MAX_PARKED);
    assert!(!map.contains("n0") && map.contains("n1") && map.contains(&format!("n{MAX_PARKED}")));
}
