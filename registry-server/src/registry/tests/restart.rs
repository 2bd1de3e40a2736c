//! Restarts and the store: what the registry writes through (and what it
//! never writes), how nodes loaded at start look and behave during the
//! restart grace, and a failing store.

use std::sync::Arc;
use std::sync::Mutex as StdMutex;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::*;
use crate::store::{Commit, Loaded, NodeRecord, Store, StoreError, secret_sha256};

/// One write the registry asked of the store.
#[derive(Debug, Clone, PartialEq)]
enum Write {
    PutNode(String, u64),
    DeleteNode(String),
    /// A liveness transition: ONLINE (true) or OFFLINE.
    Liveness(String, bool),
}

/// A store that records every write, and fails them when told to.
#[derive(Default)]
struct Recorder {
    writes: StdMutex<Vec<Write>>,
    fail: std::sync::atomic::AtomicBool,
}

impl Recorder {
    fn writes(&self) -> Vec<Write> {
        self.writes.lock().unwrap().clone()
    }

    fn answer(&self, write: Write) -> Commit {
        self.writes.lock().unwrap().push(write);
        let failed = self.fail.load(std::sync::atomic::Ordering::Relaxed);
        std::future::ready(if failed {
            Err(StoreError::Write("injected: disk full".into()))
        } else {
            Ok(())
        })
        .boxed()
    }
}

impl Store for Recorder {
    fn load(&self) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        std::future::ready(Ok(Loaded::default())).boxed()
    }
    fn put_node(&self, record: NodeRecord) -> Commit {
        self.answer(Write::PutNode(
            record.registration.node_id().to_owned(),
            record.session_id,
        ))
    }
    fn delete_node(&self, node_id: &str) -> Commit {
        self.answer(Write::DeleteNode(node_id.to_string()))
    }
    fn put_liveness(&self, node_id: &str, liveness: crate::store::LivenessRecord) -> Commit {
        self.answer(Write::Liveness(node_id.to_string(), liveness.online))
    }
    fn put_admin(&self, _node_id: &str, _admin: Option<pb::AdminState>) -> Commit {
        std::future::ready(Ok(())).boxed()
    }
    fn close(&self) -> BoxFuture<'static, ()> {
        std::future::ready(()).boxed()
    }
    fn describe(&self) -> String {
        "recorder".into()
    }
}

fn timing() -> Timing {
    Timing {
        node_timeout: TIMEOUT,
        heartbeat_interval: Duration::from_secs(10),
        offline_retention: RETENTION,
    }
}

/// A registry writing to `store`, with its expiry task running.
fn start_with(store: Arc<dyn Store>) -> (Registry, CancellationToken) {
    let registry = Registry::with_options(
        timing(),
        Options {
            store,
            ..Options::default()
        },
    );
    let stop = CancellationToken::new();
    tokio::spawn(crate::expiry::run(registry.clone(), stop.clone()));
    (registry, stop)
}

/// What a previous run stored for node `id`, with session `session` and
/// secret "secret-{id}".
fn stored(id: &str, session: u64) -> NodeRecord {
    NodeRecord {
        registration: registration(id),
        session_id: session,
        secret_sha256: secret_sha256(&format!("secret-{id}")),
        registered_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
    }
}

/// A registry restarted now with `n1` (session 11) and `n2` (session 12)
/// in its store.
fn restarted() -> (Registry, CancellationToken) {
    let (registry, stop) = start();
    let leftover = registry.restore(
        Loaded {
            liveness: Vec::new(),
            nodes: vec![stored("n1", 11), stored("n2", 12)],
            admin: Vec::new(),
        },
        Now::read(),
    );
    assert!(leftover.is_empty());
    (registry, stop)
}

#[tokio::test(start_paused = true)]
async fn register_deregister_and_removal_write_through_and_heartbeats_never_do() {
    let recorder = Arc::new(Recorder::default());
    let (registry, _stop) = start_with(recorder.clone());
    let reg = registry
        .register_durably(registration("n1"), Now::read())
        .await
        .unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    for _ in 0..5 {
        registry
            .heartbeat(
                &slot,
                reg.session_id,
                beat(pb::PoolState::Ready),
                Instant::now(),
            )
            .unwrap();
    }
    let again = registry
        .register_durably(registration("n1"), Now::read())
        .await
        .unwrap();
    registry
        .deregister_durably("n1", again.session_id, Some(&again.session_secret))
        .await
        .unwrap();
    // A node removed after its retention is deleted from the store too.
    registry.register(registration("n2"), Now::read()).unwrap();
    let n2 = registry.get("n2").unwrap().session_id;
    advance(TIMEOUT + RETENTION + MS).await;
    assert!(registry.get("n2").is_err());
    assert_eq!(
        recorder.writes(),
        vec![
            Write::PutNode("n1".into(), reg.session_id),
            Write::PutNode("n1".into(), again.session_id),
            Write::DeleteNode("n1".into()),
            Write::PutNode("n2".into(), n2),
            Write::Liveness("n2".into(), false),
            Write::DeleteNode("n2".into()),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn liveness_transitions_are_written_and_heartbeats_between_them_are_not() {
    let recorder = Arc::new(Recorder::default());
    let (registry, _stop) = start_with(recorder.clone());
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    // Silent past the timeout, in steps (one jump would read as a stall).
    for _ in 0..31 {
        advance(Duration::from_secs(1)).await;
    }
    assert_eq!(
        registry.get("n1").unwrap().status(),
        pb::NodeStatus::Offline
    );
    for _ in 0..3 {
        registry
            .heartbeat(
                &slot,
                reg.session_id,
                beat(pb::PoolState::Ready),
                Instant::now(),
            )
            .unwrap();
    }
    assert_eq!(
        recorder.writes(),
        vec![
            Write::PutNode("n1".into(), reg.session_id),
            Write::Liveness("n1".into(), false),
            Write::Liveness("n1".into(), true),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_register_the_store_cannot_keep_is_refused_and_undone() {
    let recorder = Arc::new(Recorder::default());
    recorder
        .fail
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (registry, _stop) = start_with(recorder.clone());
    let err = registry
        .register_durably(registration("n1"), Now::read())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::StoreUnavailable(m) if m.contains("disk full")),
        "{err}"
    );
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    assert!(registry.get("n1").is_err(), "no half-registered node");
    assert_eq!(registry.counts(), Counts::default());
}

#[tokio::test(start_paused = true)]
async fn loaded_nodes_are_online_suspect_and_offer_no_pool_status() {
    let (registry, _stop) = restarted();
    let node = registry.get("n1").unwrap();
    assert_eq!(node.status(), pb::NodeStatus::Online);
    assert!(node.suspect);
    assert_eq!(node.suspect_reason, RESTART_SUSPECT);
    assert!(
        node.pool_status.is_empty(),
        "placement offers no pool of it"
    );
    assert_eq!(node.session_id, 11);
    assert_eq!(node.pools, registration("n1").pools.to_proto());
    assert_eq!(
        node.registered_at.unwrap().seconds,
        1_700_000_000,
        "first registration time kept"
    );
    assert_eq!(
        registry.counts(),
        Counts {
            online: 2,
            offline: 0
        }
    );
    // Loaded nodes are listed, each with its own revision (ADDED at start).
    let page = registry.list_page(&NodeFilter::default(), 10, "");
    assert_eq!(page.nodes.len(), 2);
    assert_eq!(registry.revision(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_silent_loaded_node_goes_offline_only_after_the_restart_grace() {
    let (registry, _stop) = restarted();
    advance(TIMEOUT - MS).await;
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
    advance(2 * MS).await;
    let node = registry.get("n1").unwrap();
    assert_eq!(node.status(), pb::NodeStatus::Offline);
    assert!(
        !node.suspect,
        "OFFLINE is the verdict, no longer a suspicion"
    );
}

#[tokio::test(start_paused = true)]
async fn the_stored_session_resumes_without_register_and_clears_suspect() {
    let (registry, _stop) = restarted();
    assert!(matches!(
        registry.attach("n1", 11, "a-guess"),
        Err(RegistryError::PermissionDenied(_))
    ));
    assert!(matches!(
        registry.attach("n1", 99, "secret-n1"),
        Err(RegistryError::SessionSuperseded { .. })
    ));
    let slot = registry.attach("n1", 11, "secret-n1").unwrap();
    let before = registry.revision();
    advance(Duration::from_secs(5)).await;
    registry
        .heartbeat(&slot, 11, beat(pb::PoolState::Ready), Instant::now())
        .unwrap();
    let node = registry.get("n1").unwrap();
    assert!(!node.suspect);
    assert!(node.suspect_reason.is_empty());
    assert_eq!(node.pool_status.len(), 1);
    assert!(node.revision > before, "readers are told");
    // Its deadline now follows its heartbeats, past the grace.
    advance(TIMEOUT - MS).await;
    assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
    assert_eq!(status(&registry, "n2"), pb::NodeStatus::Offline);
}

#[tokio::test(start_paused = true)]
async fn another_machine_cannot_take_a_loaded_id_during_the_grace() {
    let (registry, _stop) = restarted();
    let mut squatter = new_registration("n1");
    squatter.machine_id = "squatter".into();
    let squatter = Registration::from(squatter);
    let err = registry
        .register(squatter.clone(), Now::read())
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::NodeReserved { node_id, .. } if node_id == "n1"),
        "{err}"
    );
    assert!(err.to_string().contains("has until"), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::AlreadyExists);
    assert_eq!(registry.get("n1").unwrap().session_id, 11, "untouched");

    // Once the owner stayed silent through the grace, the id is free.
    advance(TIMEOUT + MS).await;
    registry.register(squatter, Now::read()).unwrap();
    assert_eq!(registry.get("n1").unwrap().machine_id, "squatter");
}

#[tokio::test(start_paused = true)]
async fn the_owner_may_register_again_during_the_grace() {
    let (registry, _stop) = restarted();
    let reg = registry.register(registration("n2"), Now::read()).unwrap();
    assert!(!reg.created);
    let node = registry.get("n2").unwrap();
    assert_eq!(node.session_id, reg.session_id);
    assert!(!node.suspect);
    // The old session is superseded.
    assert!(registry.attach("n2", 12, "secret-n2").is_err());
}

#[tokio::test(start_paused = true)]
async fn stored_admin_states_come_back_and_the_rest_are_handed_on() {
    let (registry, _stop) = start();
    let cordoned = pb::AdminState {
        schedulable: false,
        cordoned: true,
        cordon_reason: "disk swap".into(),
        ..pb::AdminState::default()
    };
    let leftover = registry.restore(
        Loaded {
            liveness: Vec::new(),
            nodes: vec![stored("n1", 11)],
            admin: vec![
                ("n1".into(), cordoned.clone()),
                ("gone".into(), cordoned.clone()),
            ],
        },
        Now::read(),
    );
    assert_eq!(registry.get("n1").unwrap().admin, Some(cordoned.clone()));
    assert_eq!(leftover, vec![("gone".to_string(), cordoned)]);
}

#[tokio::test(start_paused = true)]
async fn a_node_stored_offline_is_loaded_offline_and_removed_at_its_retention() {
    let (registry, _stop) = start();
    let went_offline = Utc::now() - chrono::Duration::seconds(60);
    registry.restore(
        Loaded {
            nodes: vec![stored("n1", 11), stored("n2", 12)],
            admin: Vec::new(),
            liveness: vec![(
                "n2".into(),
                crate::store::LivenessRecord {
                    online: false,
                    since: went_offline,
                },
            )],
        },
        Now::read(),
    );
    let n2 = registry.get("n2").unwrap();
    assert_eq!(n2.status(), pb::NodeStatus::Offline);
    assert!(!n2.suspect, "nothing to doubt about a node known OFFLINE");
    assert_eq!(registry.get("n1").unwrap().status(), pb::NodeStatus::Online);
    assert_eq!(
        (registry.counts().online, registry.counts().offline),
        (1, 1)
    );
    // Its retention counts from when it went OFFLINE, not from the restart.
    for _ in 0..(RETENTION.as_secs() - 60 + 1) {
        advance(Duration::from_secs(1)).await;
    }
    assert!(
        registry.get("n2").is_err(),
        "removed at the end of its retention"
    );
}
