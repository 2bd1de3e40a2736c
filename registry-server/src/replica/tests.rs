//! The replica loop against an in-memory stand-in for etcd, on tokio's
//! paused clock: one leader at a time, followers' copies, step-down when
//! the term ends, takeover grace.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use registry_proto::pb;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Proto;
use tonic_health::pb::health_server::Health;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::registry::{Options, Registration, Registry, Timing};
use crate::store::{Loaded, NodeRecord, StoreError, secret_sha256};

const TIMEOUT: Duration = Duration::from_secs(30);

/// What the stand-in keeps: the records, who leads, who listens.
#[derive(Default)]
struct Shared {
    nodes: BTreeMap<String, NodeRecord>,
    revision: i64,
    leader: Option<String>,
    /// The current term's lease flag and end.
    term: Option<(Arc<AtomicBool>, CancellationToken)>,
    watchers: Vec<mpsc::Sender<MirrorEvent>>,
    leaders: Vec<watch::Sender<Option<String>>>,
    /// While set, reads and campaigns fail (etcd unreachable).
    down: bool,
}

/// An in-memory etcd: a leader key and node records.
#[derive(Default, Clone)]
struct FakeEtcd {
    shared: Arc<Mutex<Shared>>,
    changed: Arc<tokio::sync::Notify>,
}

impl FakeEtcd {
    fn put(&self, record: NodeRecord) {
        let mut s = self.shared.lock().unwrap();
        s.revision += 1;
        s.nodes
            .insert(record.registration.node_id.clone(), record.clone());
        s.watchers
            .retain(|w| w.try_send(MirrorEvent::PutNode(record.clone())).is_ok());
    }

    /// The leader's lease runs out: its term ends, the key is deleted.
    fn expire_leader(&self) {
        let mut s = self.shared.lock().unwrap();
        if let Some((holds, lost)) = s.term.take() {
            holds.store(false, Ordering::SeqCst);
            lost.cancel();
        }
        s.leader = None;
        s.leaders.retain(|l| l.send(None).is_ok());
        drop(s);
        self.changed.notify_waiters();
    }

    fn leader(&self) -> Option<String> {
        self.shared.lock().unwrap().leader.clone()
    }

    /// A coordinator for the replica at `url`.
    fn replica(&self, url: &str) -> Arc<dyn Coordinator> {
        Arc::new(FakeCoordinator {
            etcd: self.clone(),
            url: url.to_owned(),
        })
    }
}

struct FakeCoordinator {
    etcd: FakeEtcd,
    url: String,
}

impl Coordinator for FakeCoordinator {
    fn load(&self) -> BoxFuture<'static, Result<(Loaded, i64), StoreError>> {
        let s = self.etcd.shared.lock().unwrap();
        let answer = if s.down {
            Err(StoreError::Write("etcd unreachable".into()))
        } else {
            Ok((
                Loaded {
                    nodes: s.nodes.values().cloned().collect(),
                    ..Loaded::default()
                },
                s.revision,
            ))
        };
        std::future::ready(answer).boxed()
    }

    fn mirror(&self, _after: i64, _stop: CancellationToken) -> mpsc::Receiver<MirrorEvent> {
        let (tx, rx) = mpsc::channel(1024);
        self.etcd.shared.lock().unwrap().watchers.push(tx);
        rx
    }

    fn observe_leader(&self, _stop: CancellationToken) -> watch::Receiver<Option<String>> {
        let mut s = self.etcd.shared.lock().unwrap();
        let (tx, rx) = watch::channel(s.leader.clone());
        s.leaders.push(tx);
        rx
    }

    fn campaign(&self, stop: CancellationToken) -> BoxFuture<'static, Result<Lead, StoreError>> {
        let etcd = self.etcd.clone();
        let url = self.url.clone();
        async move {
            loop {
                let notified = etcd.changed.notified();
                {
                    let mut s = etcd.shared.lock().unwrap();
                    if s.leader.is_none() && !s.down {
                        let holds = Arc::new(AtomicBool::new(true));
                        let lost = CancellationToken::new();
                        s.leader = Some(url.clone());
                        s.term = Some((holds.clone(), lost.clone()));
                        s.leaders.retain(|l| l.send(Some(url.clone())).is_ok());
                        let resign = {
                            let etcd = etcd.clone();
                            async move { etcd.expire_leader() }.boxed()
                        };
                        let term = Term::new(Arc::new(move || holds.load(Ordering::SeqCst)), lost);
                        return Ok(Lead { term, resign });
                    }
                }
                tokio::select! {
                    () = notified => {}
                    () = stop.cancelled() => return Err(StoreError::Write("stopped".into())),
                }
            }
        }
        .boxed()
    }
}

fn record(id: &str, session: u64) -> NodeRecord {
    NodeRecord {
        registration: Registration {
            node_id: id.into(),
            machine_id: format!("machine-{id}"),
            address: format!("http://{id}:9200"),
            pools: Vec::new(),
            capabilities: pb::Capabilities::default(),
            agent_version: "test".into(),
            labels: BTreeMap::new().into_iter().collect(),
            metrics_address: String::new(),
            models_available: Vec::new(),
        },
        session_id: session,
        secret_sha256: secret_sha256(&format!("secret-{id}")),
        registered_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
    }
}

/// One replica process: its registry, role, health and loop.
struct Process {
    registry: Registry,
    role: ReplicaRole,
    health: tonic_health::server::HealthService,
    stop: CancellationToken,
}

impl Process {
    fn start(etcd: &FakeEtcd, url: &str) -> Self {
        let registry = Registry::with_options(
            Timing {
                node_timeout: TIMEOUT,
                heartbeat_interval: Duration::from_secs(10),
                offline_retention: Duration::from_secs(3600),
            },
            Options::default(),
        );
        let role = ReplicaRole::starting_follower();
        let reporter = tonic_health::server::HealthReporter::new();
        let health = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let stop = CancellationToken::new();
        let replica = Replica {
            registry: registry.clone(),
            role: role.clone(),
            coordinator: etcd.replica(url),
            health: reporter,
        };
        tokio::spawn(replica.run(stop.clone(), crate::expiry::run));
        Self {
            registry,
            role,
            health,
            stop,
        }
    }

    async fn leader_health(&self) -> Proto {
        let answer = self
            .health
            .check(tonic::Request::new(HealthCheckRequest {
                service: LEADER_HEALTH_SERVICE.into(),
            }))
            .await
            .unwrap()
            .into_inner();
        Proto::try_from(answer.status).unwrap()
    }
}

/// Lets every task run, moving the paused clock by `by` in steps of at
/// most 100 ms (one jump far past a queued deadline would read to the
/// expiry task as a stall of the registry itself).
async fn settle(by: Duration) {
    let step = Duration::from_millis(100);
    let mut left = by;
    loop {
        let now = left.min(step);
        tokio::time::advance(now).await;
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        left -= now;
        if left.is_zero() {
            break;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn one_replica_leads_the_other_follows_with_a_current_copy() {
    let etcd = FakeEtcd::default();
    etcd.put(record("n1", 11));
    let a = Process::start(&etcd, "http://a:50051");
    settle(Duration::from_millis(10)).await;
    let b = Process::start(&etcd, "http://b:50051");
    settle(Duration::from_millis(10)).await;

    assert_eq!(etcd.leader().as_deref(), Some("http://a:50051"));
    assert!(a.role.leads() && !b.role.leads());
    assert_eq!(a.leader_health().await, Proto::Serving);
    assert_eq!(b.leader_health().await, Proto::NotServing);
    // The follower knows whom to send writers to.
    let refused = tonic::Status::from(b.role.writable().unwrap_err());
    assert_eq!(
        refused.metadata().get(LEADER_METADATA).unwrap(),
        "http://a:50051"
    );
    // Both list the stored node; the leader gave it the takeover grace.
    assert!(a.registry.get("n1").unwrap().suspect);
    assert_eq!(b.registry.get("n1").unwrap().session_id, 11);
    // A record the leader writes reaches the follower's copy.
    etcd.put(record("n2", 12));
    settle(Duration::from_millis(1)).await;
    assert_eq!(b.registry.get("n2").unwrap().session_id, 12);
    a.stop.cancel();
    b.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_lost_term_steps_down_and_the_follower_takes_over_without_false_offline() {
    let etcd = FakeEtcd::default();
    etcd.put(record("n1", 11));
    let a = Process::start(&etcd, "http://a:50051");
    settle(Duration::from_millis(10)).await;
    let b = Process::start(&etcd, "http://b:50051");
    settle(Duration::from_millis(10)).await;
    let old_term = a.role.writable().unwrap();

    // Long silence while A leads is A's business; then A's lease ends.
    settle(TIMEOUT / 2).await;
    etcd.expire_leader();
    settle(Duration::from_millis(10)).await;

    assert!(old_term.lost().is_cancelled(), "A's streams end");
    assert!(!a.role.leads(), "A takes no more writes");
    assert_eq!(a.leader_health().await, Proto::NotServing);
    assert_eq!(etcd.leader().as_deref(), Some("http://b:50051"));
    assert!(b.role.leads());
    assert_eq!(b.leader_health().await, Proto::Serving);
    let taken_at = tokio::time::Instant::now();

    // n1's agent was silent for half a timeout under A: B still gives it
    // one full timeout from the takeover, and it resumes its session.
    settle(TIMEOUT - Duration::from_secs(1)).await;
    assert_eq!(
        b.registry.get("n1").unwrap().status(),
        pb::NodeStatus::Online
    );
    let slot = b.registry.attach("n1", 11, "secret-n1").unwrap();
    b.registry
        .heartbeat(
            &slot,
            11,
            crate::registry::Beat {
                sent_at: chrono::Utc::now(),
                received_at: chrono::Utc::now(),
                pools: Vec::new(),
                gpus: Vec::new(),
            },
            tokio::time::Instant::now(),
        )
        .unwrap();
    settle(TIMEOUT).await;
    assert!(tokio::time::Instant::now() > taken_at + TIMEOUT);
    assert_eq!(
        b.registry.get("n1").unwrap().status(),
        pb::NodeStatus::Offline,
        "silent after its heartbeat: OFFLINE on the leader's own deadline"
    );
    // A, a follower now, never decided liveness itself.
    assert_eq!(
        a.registry.get("n1").unwrap().status(),
        pb::NodeStatus::Online
    );
    a.stop.cancel();
    b.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn shutdown_resigns_so_the_next_replica_leads_at_once() {
    let etcd = FakeEtcd::default();
    let a = Process::start(&etcd, "http://a:50051");
    settle(Duration::from_millis(10)).await;
    let b = Process::start(&etcd, "http://b:50051");
    settle(Duration::from_millis(10)).await;
    a.stop.cancel();
    settle(Duration::from_millis(10)).await;
    assert_eq!(etcd.leader().as_deref(), Some("http://b:50051"));
    assert!(b.role.leads());
    b.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_follower_cut_off_from_etcd_marks_its_reads_and_catches_up() {
    let etcd = FakeEtcd::default();
    etcd.shared.lock().unwrap().down = true;
    let a = Process::start(&etcd, "http://a:50051");
    settle(Duration::from_millis(50)).await;
    let stale = a.role.staleness().unwrap();
    assert!(stale.contains("etcd unreachable"), "{stale}");
    assert!(!a.role.leads());

    etcd.put(record("n1", 11));
    etcd.shared.lock().unwrap().down = false;
    etcd.changed.notify_waiters();
    settle(Duration::from_secs(6)).await;
    assert!(a.role.leads());
    assert_eq!(a.registry.get("n1").unwrap().session_id, 11);
    a.stop.cancel();
}
