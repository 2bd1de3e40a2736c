//! The etcd backend against a real etcd cluster on loopback: election,
//! fencing of a deposed leader's writes, the follower's watch, and a term
//! ending when etcd loses quorum. Skipped (with a line saying so) where
//! etcd is not installed, except under CI=true.

use std::time::{Duration, Instant};

use registry_server::config::Settings;
use registry_server::replica::MirrorEvent;
use registry_server::store::etcd::{Etcd, EtcdSettings, EtcdStore};
use registry_server::store::{LivenessRecord, NodeRecord, Store, secret_sha256};
use test_support::etcd::EtcdCluster;
use test_support::fixtures::register_request;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);

async fn connect(cluster: &EtcdCluster, prefix: &str) -> Etcd {
    let settings = Settings {
        etcd_endpoints: cluster.client_urls(),
        etcd_prefix: prefix.into(),
        etcd_lease_ttl: TTL,
        ..Settings::default()
    };
    Etcd::connect(&EtcdSettings::from_settings(&settings).unwrap())
        .await
        .unwrap()
}

fn record(id: &str, session: u64) -> NodeRecord {
    NodeRecord {
        registration: registry_server::validate::registration(register_request(id)).unwrap(),
        session_id: session,
        secret_sha256: secret_sha256("secret"),
        registered_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_candidate_leads_and_a_deposed_leaders_writes_are_fenced() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let (a, b) = (
        connect(&cluster, "/fence").await,
        connect(&cluster, "/fence").await,
    );
    let stop = CancellationToken::new();
    let term_a = a.campaign("http://a:50051", &stop).await.unwrap();
    assert!(term_a.holds());
    let store_a = EtcdStore::new(a.clone());
    store_a.set_term(Some(term_a.clone()));
    store_a.put_node(record("n1", 1)).await.unwrap();

    // B waits while A leads...
    let waiting = tokio::spawn({
        let (b, stop) = (b.clone(), stop.clone());
        async move { b.campaign("http://b:50051", &stop).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "two leaders at once");

    // ...until A's leader key is gone (as when its lease expires).
    let mut raw = etcd_client::Client::connect(cluster.client_urls(), None)
        .await
        .unwrap();
    raw.delete("/fence/leader", None).await.unwrap();
    let term_b = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("B was not elected")
        .unwrap()
        .unwrap();
    let store_b = EtcdStore::new(b.clone());
    store_b.set_term(Some(term_b.clone()));

    // A still believes in its term; etcd refuses its write all the same.
    let late = store_a.put_node(record("n1", 99)).await.unwrap_err();
    assert!(late.to_string().contains("fenced"), "{late}");
    assert!(term_a.lost().is_cancelled(), "a fenced write ends the term");
    store_b.put_node(record("n1", 2)).await.unwrap();
    let (loaded, _) = b.load().await.unwrap();
    assert_eq!(loaded.nodes.len(), 1);
    assert_eq!(
        loaded.nodes[0].session_id, 2,
        "the deposed leader's write is not in etcd"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_sees_every_write_of_the_leader_in_order() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let leader = connect(&cluster, "/mirror").await;
    let follower = connect(&cluster, "/mirror").await;
    let stop = CancellationToken::new();
    let term = leader.campaign("http://a:50051", &stop).await.unwrap();
    let store = EtcdStore::new(leader.clone());
    store.set_term(Some(term));
    store.put_node(record("n1", 1)).await.unwrap();

    let (loaded, revision) = follower.load().await.unwrap();
    assert_eq!(loaded.nodes.len(), 1);
    let mut events = follower.mirror(revision, stop.clone());
    store.put_node(record("n2", 2)).await.unwrap();
    store
        .put_admin(
            "n2",
            Some(registry_proto::pb::AdminState {
                cordoned: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let since = chrono::DateTime::from_timestamp(1_700_000_100, 0).unwrap();
    store
        .put_liveness(
            "n2",
            LivenessRecord {
                online: false,
                since,
            },
        )
        .await
        .unwrap();
    store.delete_node("n1").await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the watch delivered too little")
            .unwrap();
        seen.push(match event {
            MirrorEvent::PutNode(r) => format!("put {} {}", r.registration.node_id(), r.session_id),
            MirrorEvent::Admin(id, a) => format!("admin {id} {}", a.is_some_and(|a| a.cordoned)),
            MirrorEvent::Liveness(id, l) => {
                format!("liveness {id} {} {}", l.online, l.since == since)
            }
            MirrorEvent::DeleteNode(id) => format!("delete {id}"),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(
        seen,
        [
            "put n2 2",
            "admin n2 true",
            "liveness n2 false true",
            "delete n1"
        ]
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_ends_within_the_lease_when_etcd_loses_quorum() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let etcd = connect(&cluster, "/quorum").await;
    let stop = CancellationToken::new();
    let term = etcd.campaign("http://a:50051", &stop).await.unwrap();
    let store = EtcdStore::new(etcd.clone());
    store.set_term(Some(term.clone()));
    store.put_node(record("n1", 1)).await.unwrap();

    let cut_at = Instant::now();
    cluster.stop_member(1);
    cluster.stop_member(2);
    tokio::time::timeout(TTL + Duration::from_secs(1), term.lost().cancelled())
        .await
        .expect("the term outlived its lease without quorum");
    assert!(!term.holds());
    assert!(cut_at.elapsed() <= TTL + Duration::from_secs(1));
    let refused = store.put_node(record("n1", 2)).await.unwrap_err();
    assert!(refused.to_string().contains("not the leader"), "{refused}");

    // Quorum back: a campaign succeeds again.
    cluster.start_member(1);
    cluster.start_member(2);
    let again = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match etcd.campaign("http://a:50051", &stop).await {
                Ok(term) => return term,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("no leader after quorum came back");
    assert!(again.holds());
    stop.cancel();
}
