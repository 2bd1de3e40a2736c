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
use crate::error::RegistryError;
use crate::registry::{NewRegistration, Options, Registration, Registry, Timing};
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
            .insert(record.registration.node_id().to_owned(), record.clone());
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

    /// The leader's term ends while its key still stands (a leader that
    /// stopped trusting its lease before etcd expired it).
    fn end_term_keeping_key(&self) {
        let mut s = self.shared.lock().unwrap();
        if let Some((holds, lost)) = s.term.take() {
            holds.store(false, Ordering::SeqCst);
            lost.cancel();
        }
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
        registration: Registration::from(NewRegistration {
            node_id: id.into(),
            machine_id: format!("machine-{id}"),
            address: format!("http://{id}:9200"),
            pools: Default::default(),
            capabilities: Default::default(),
            agent_version: "test".into(),
            labels: BTreeMap::new().into_iter().collect(),
            metrics_address: String::new(),
            models_available: Vec::new(),
        }),
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

/// Replica A (which leads, being first), then replica B.
async fn a_then_b(etcd: &FakeEtcd) -> (Process, Process) {
    let a = Process::start(etcd, "http://a:50051");
    settle(Duration::from_millis(10)).await;
    let b = Process::start(etcd, "http://b:50051");
    settle(Duration::from_millis(10)).await;
    (a, b)
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
    let (a, b) = a_then_b(&etcd).await;

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
    let (a, b) = a_then_b(&etcd).await;
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
async fn a_replica_that_just_stepped_down_never_names_itself_as_the_leader() {
    let etcd = FakeEtcd::default();
    let (a, b) = a_then_b(&etcd).await;
    etcd.end_term_keeping_key();
    settle(Duration::from_millis(10)).await;

    // The key still names A; A's refusal must not send clients back to A.
    let Err(RegistryError::NotLeader { leader, .. }) = a.role.writable() else {
        panic!("A stepped down and takes no writes");
    };
    assert_eq!(leader, None);

    // Once the key moves, the follower names the new leader (either may
    // win the election that follows).
    etcd.expire_leader();
    settle(Duration::from_millis(10)).await;
    let (leading, following) = if b.role.leads() { (&b, &a) } else { (&a, &b) };
    assert!(leading.role.leads());
    let Err(RegistryError::NotLeader { leader, .. }) = following.role.writable() else {
        panic!("one replica follows");
    };
    assert_eq!(leader, etcd.leader());
    assert!(leader.is_some());
    a.stop.cancel();
    b.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn shutdown_resigns_so_the_next_replica_leads_at_once() {
    let etcd = FakeEtcd::default();
    let (a, b) = a_then_b(&etcd).await;
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

// The whole server as a replica, over gRPC on loopback: the stand-in etcd
// also takes the leader's store writes, so the follower's copy follows
// them as it would follow etcd's watch.

impl crate::store::Store for FakeEtcd {
    fn load(&self) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        let nodes = self
            .shared
            .lock()
            .unwrap()
            .nodes
            .values()
            .cloned()
            .collect();
        std::future::ready(Ok(Loaded {
            nodes,
            ..Loaded::default()
        }))
        .boxed()
    }
    fn put_node(&self, record: NodeRecord) -> crate::store::Commit {
        self.put(record);
        std::future::ready(Ok(())).boxed()
    }
    fn delete_node(&self, node_id: &str) -> crate::store::Commit {
        let mut s = self.shared.lock().unwrap();
        s.nodes.remove(node_id);
        let id = node_id.to_owned();
        s.watchers
            .retain(|w| w.try_send(MirrorEvent::DeleteNode(id.clone())).is_ok());
        std::future::ready(Ok(())).boxed()
    }
    fn put_admin(&self, node_id: &str, admin: Option<pb::AdminState>) -> crate::store::Commit {
        let mut s = self.shared.lock().unwrap();
        let id = node_id.to_owned();
        s.watchers.retain(|w| {
            w.try_send(MirrorEvent::Admin(id.clone(), admin.clone()))
                .is_ok()
        });
        std::future::ready(Ok(())).boxed()
    }
    fn put_liveness(
        &self,
        node_id: &str,
        liveness: crate::store::LivenessRecord,
    ) -> crate::store::Commit {
        let mut s = self.shared.lock().unwrap();
        let id = node_id.to_owned();
        s.watchers.retain(|w| {
            w.try_send(MirrorEvent::Liveness(id.clone(), liveness))
                .is_ok()
        });
        std::future::ready(Ok(())).boxed()
    }
    fn close(&self) -> BoxFuture<'static, ()> {
        std::future::ready(()).boxed()
    }
    fn describe(&self) -> String {
        "an in-memory stand-in for etcd".into()
    }
}

mod over_grpc {
    use std::net::SocketAddr;

    use registry_proto::pb::node_registry_client::NodeRegistryClient;
    use tokio::net::TcpListener;
    use tonic::transport::Channel;

    use super::*;
    use crate::config::Settings;

    /// A replica server on 127.0.0.1:0, stopped when `stop` is cancelled.
    async fn serve(etcd: &FakeEtcd, stop: CancellationToken) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = Settings {
            node_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            ..Settings::default()
        };
        let replicas = crate::server::Replicas {
            store: Arc::new(etcd.clone()),
            coordinator: etcd.replica(&format!("http://{addr}")),
        };
        tokio::spawn(crate::server::run_replica(
            listener,
            settings,
            replicas,
            None,
            async move { stop.cancelled().await },
        ));
        addr
    }

    async fn client(addr: SocketAddr) -> NodeRegistryClient<Channel> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        NodeRegistryClient::new(channel)
    }

    fn register_request() -> pb::RegisterRequest {
        pb::RegisterRequest {
            node_id: "gpu-1".into(),
            machine_id: "machine-gpu-1".into(),
            address: "http://gpu-1.example:9200".into(),
            agent_version: "test".into(),
            ..Default::default()
        }
    }

    fn beat(session_id: u64, secret: &str, sequence: u64) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            node_id: "gpu-1".into(),
            session_id,
            session_secret: secret.into(),
            sequence,
            sent_at: Some(registry_proto::convert::to_proto_timestamp(
                chrono::Utc::now(),
            )),
            ..Default::default()
        }
    }

    /// Waits (real time) until `check` holds, at most 10 s.
    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn the_follower_points_writers_at_the_leader_whose_streams_move_on_failover() {
        let etcd = FakeEtcd::default();
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let a = serve(&etcd, stop_a.clone()).await;
        until("A leads", || etcd.leader().is_some()).await;
        let b = serve(&etcd, stop_b.clone()).await;
        assert_eq!(etcd.leader(), Some(format!("http://{a}")));

        // B refuses Register and names A; A takes it.
        let refused = client(b)
            .await
            .register(register_request())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert_eq!(
            refused.metadata().get(LEADER_METADATA).unwrap(),
            format!("http://{a}").as_str()
        );
        let registered = client(a)
            .await
            .register(register_request())
            .await
            .unwrap()
            .into_inner();
        let (session, secret) = (registered.session_id, registered.session_secret);

        // B's copy lists the node, marked as a follower's answer.
        let mut on_b = client(b).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let read = loop {
            match on_b
                .get_node(pb::GetNodeRequest {
                    node_id: "gpu-1".into(),
                })
                .await
            {
                Ok(read) => break read,
                Err(status) if status.code() == tonic::Code::NotFound => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "B's copy never listed gpu-1"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        };
        assert_eq!(read.metadata().get(ROLE_METADATA).unwrap(), "follower");
        assert_eq!(read.into_inner().session_id, session);

        // A heartbeat stream on A is acknowledged...
        let (tx, rx) = mpsc::channel(4);
        tx.send(beat(session, &secret, 1)).await.unwrap();
        let mut acks = client(a)
            .await
            .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acks.message().await.unwrap().unwrap().sequence, 1);

        // ...and ends with UNAVAILABLE when A's term ends.
        etcd.expire_leader();
        let ended = tokio::time::timeout(Duration::from_secs(10), acks.message())
            .await
            .expect("the stream outlived the term")
            .unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
        until("B leads", || etcd.leader() == Some(format!("http://{b}"))).await;

        // The agent resumes on B with its session: no re-registration.
        let (tx, rx) = mpsc::channel(4);
        tx.send(beat(session, &secret, 2)).await.unwrap();
        let mut acks = on_b
            .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acks.message().await.unwrap().unwrap().sequence, 2);
        let node = on_b
            .get_node(pb::GetNodeRequest {
                node_id: "gpu-1".into(),
            })
            .await
            .unwrap();
        assert!(node.metadata().get(ROLE_METADATA).is_none(), "B leads now");
        assert_eq!(node.into_inner().status(), pb::NodeStatus::Online);
        // A, a follower now, refuses writes.
        let refused = client(a)
            .await
            .register(register_request())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        stop_a.cancel();
        stop_b.cancel();
    }
}
