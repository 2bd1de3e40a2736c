//! A follower's copy of the leader's records (`mirror`) and the takeover
//! that makes it the leader's registry, on the paused clock. No expiry task
//! runs on a follower: these registries start without one until they take
//! over.

use super::*;
use crate::store::{LivenessRecord, Loaded, NodeRecord, secret_sha256};

/// A follower's registry: no expiry task (only the leader decides
/// liveness).
fn follower() -> Registry {
    Registry::with_options(
        Timing {
            node_timeout: TIMEOUT,
            heartbeat_interval: Duration::from_secs(10),
            offline_retention: RETENTION,
        },
        Options::default(),
    )
}

/// The leader's record of node `id` with session `session` and secret
/// "secret-{id}".
fn record(id: &str, session: u64) -> NodeRecord {
    NodeRecord {
        registration: registration(id),
        session_id: session,
        secret_sha256: secret_sha256(&format!("secret-{id}")),
        registered_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
    }
}

fn cordoned(reason: &str) -> pb::AdminState {
    pb::AdminState {
        cordoned: true,
        cordon_reason: reason.into(),
        ..pb::AdminState::default()
    }
}

#[tokio::test(start_paused = true)]
async fn records_put_by_the_leader_are_listed_and_re_registrations_replace_the_session() {
    let registry = follower();
    registry.mirror_put_node(record("n1", 11), Now::read());
    let node = registry.get("n1").unwrap();
    assert_eq!(node.session_id, 11);
    assert_eq!(node.status(), pb::NodeStatus::Online);
    assert_eq!(registry.counts().online, 1);

    let before = registry.revision();
    registry.mirror_put_node(record("n1", 12), Now::read());
    assert_eq!(registry.get("n1").unwrap().session_id, 12);
    assert_eq!(registry.revision(), before + 1, "one MODIFIED event");
    assert_eq!(registry.counts().online, 1, "still one node");
}

#[tokio::test(start_paused = true)]
async fn liveness_transitions_follow_the_leader_and_nothing_expires_on_a_follower() {
    let registry = follower();
    registry.mirror_put_node(record("n1", 11), Now::read());
    registry.mirror_put_node(record("n2", 12), Now::read());
    let since = Utc::now() - chrono::Duration::seconds(20);
    registry.mirror_liveness("n1", false, since, Now::read());
    let n1 = registry.get("n1").unwrap();
    assert_eq!(n1.status(), pb::NodeStatus::Offline);
    assert_eq!(
        registry_proto::convert::from_proto_timestamp(n1.status_changed_at.as_ref().unwrap()),
        Some(since)
    );
    assert_eq!(
        (registry.counts().online, registry.counts().offline),
        (1, 1)
    );

    // No expiry on a follower: silence far past the timeout changes nothing.
    advance(TIMEOUT * 10).await;
    assert_eq!(status(&registry, "n2"), pb::NodeStatus::Online);

    registry.mirror_liveness("n1", true, Utc::now(), Now::read());
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
    assert_eq!(
        (registry.counts().online, registry.counts().offline),
        (2, 0)
    );
    // An unknown node's transition is ignored (a relist brings it).
    registry.mirror_liveness("ghost", false, Utc::now(), Now::read());
    assert!(registry.get("ghost").is_err());
}

#[tokio::test(start_paused = true)]
async fn admin_states_apply_to_listed_nodes_and_wait_for_unlisted_ones() {
    let registry = follower();
    registry.mirror_put_node(record("n1", 11), Now::read());
    registry.mirror_admin("n1", Some(cordoned("maintenance")), Now::read());
    let admin = registry.get("n1").unwrap().admin.unwrap();
    assert!(admin.cordoned && !admin.schedulable);
    assert_eq!(
        registry
            .stats()
            .cordoned_nodes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    registry.mirror_admin("n1", None, Now::read());
    assert!(registry.get("n1").unwrap().admin.unwrap().schedulable);
    assert_eq!(
        registry
            .stats()
            .cordoned_nodes
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // A node deregistered while cordoned comes back cordoned.
    registry.mirror_admin("n2", Some(cordoned("rma")), Now::read());
    assert_eq!(registry.parked_admin_states(), 1);
    registry.mirror_put_node(record("n2", 21), Now::read());
    assert!(registry.get("n2").unwrap().admin.unwrap().cordoned);
    assert_eq!(registry.parked_admin_states(), 0);
}

#[tokio::test(start_paused = true)]
async fn deletes_remove_the_node_and_keep_its_admin_state_parked() {
    let registry = follower();
    registry.mirror_put_node(record("n1", 11), Now::read());
    registry.mirror_admin("n1", Some(cordoned("rma")), Now::read());
    registry.mirror_delete_node("n1");
    assert!(registry.get("n1").is_err());
    assert_eq!(registry.counts().online, 0);
    assert_eq!(registry.parked_admin_states(), 1);
    // Deleting what is not listed is a no-op.
    registry.mirror_delete_node("n1");
}

#[tokio::test(start_paused = true)]
async fn a_reset_converges_on_the_full_read_and_leaves_unchanged_nodes_alone() {
    let registry = follower();
    registry.mirror_put_node(record("keep", 1), Now::read());
    registry.mirror_put_node(record("gone", 2), Now::read());
    registry.mirror_admin("parked", Some(cordoned("old")), Now::read());
    let keep_revision = registry.get("keep").unwrap().revision;
    let offline_since = Utc::now() - chrono::Duration::seconds(5);
    registry.mirror_reset(
        Loaded {
            nodes: vec![record("keep", 1), record("new", 3)],
            admin: vec![("new".into(), cordoned("fresh"))],
            liveness: vec![(
                "new".into(),
                LivenessRecord {
                    online: false,
                    since: offline_since,
                },
            )],
        },
        Now::read(),
    );
    assert!(registry.get("gone").is_err());
    assert_eq!(
        registry.get("keep").unwrap().revision,
        keep_revision,
        "an unchanged node is not published again"
    );
    let new = registry.get("new").unwrap();
    assert_eq!(new.status(), pb::NodeStatus::Offline);
    assert!(new.admin.unwrap().cordoned);
    assert_eq!(
        registry.parked_admin_states(),
        0,
        "the old parked state is gone"
    );
    assert_eq!(
        (registry.counts().online, registry.counts().offline),
        (1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_takeover_gives_every_online_node_one_timeout_and_keeps_offline_retention() {
    let registry = follower();
    registry.mirror_put_node(record("speaks", 1), Now::read());
    registry.mirror_put_node(record("silent", 2), Now::read());
    registry.mirror_put_node(record("offline", 3), Now::read());
    // OFFLINE for all but 10 s of its retention when the leader changes.
    let went_offline =
        Utc::now() - chrono::Duration::from_std(RETENTION - Duration::from_secs(10)).unwrap();
    registry.mirror_liveness("offline", false, went_offline, Now::read());
    // Long after the records were written: a follower's copy does not age.
    advance(TIMEOUT * 3).await;

    let taken_at = Instant::now();
    assert_eq!(registry.take_over(Now::read()), 2);
    let stop = CancellationToken::new();
    tokio::spawn(crate::expiry::run(registry.clone(), stop.clone()));
    let speaks = registry.get("speaks").unwrap();
    assert_eq!(speaks.suspect_reason, TAKEOVER_SUSPECT);

    // Removal at the end of the retention, 10 s after the takeover.
    advance(Duration::from_secs(10) + MS).await;
    assert!(
        registry.get("offline").is_err(),
        "removed after its retention"
    );

    // The agent resumes its stream with the session it had.
    let slot = registry.attach("speaks", 1, "secret-speaks").unwrap();
    registry
        .heartbeat(&slot, 1, beat(pb::PoolState::Ready), Instant::now())
        .unwrap();
    assert!(
        !registry.get("speaks").unwrap().suspect,
        "heard from: trusted again"
    );

    // The silent node: OFFLINE one timeout after the takeover, not before.
    let deadline = taken_at + TIMEOUT;
    advance(deadline - Instant::now() - MS).await;
    assert_eq!(status(&registry, "silent"), pb::NodeStatus::Online);
    advance(2 * MS).await;
    assert_eq!(status(&registry, "silent"), pb::NodeStatus::Offline);
    assert_eq!(status(&registry, "speaks"), pb::NodeStatus::Online);
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn during_the_takeover_grace_another_machine_cannot_take_the_id() {
    let registry = follower();
    registry.mirror_put_node(record("n1", 1), Now::read());
    registry.take_over(Now::read());
    let mut other = new_registration("n1");
    other.machine_id = "someone-else".into();
    let other = Registration::from(other);
    let err = registry.register(other, Now::read()).unwrap_err();
    assert!(matches!(err, RegistryError::NodeReserved { .. }), "{err:?}");
}
