//! A stand-in for a follower replica of the registry, served on
//! `127.0.0.1:0`: it refuses every write with UNAVAILABLE and the leader's
//! URL in `registry-leader` (the replica contract), answers reads by asking
//! the leader and marking the answer `registry-role: follower` with a
//! `registry-stale` text, and its health says NOT_SERVING for
//! `registry.v1.NodeRegistry` (SERVING for the whole server). Clients'
//! tests put it in front of a real [`TestRegistry`](crate::TestRegistry)
//! as the leader.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_proto::pb::node_registry_server::{NodeRegistry, NodeRegistryServer};
use registry_proto::replica::{self, ROLE_FOLLOWER, ROLE_METADATA, STALE_METADATA};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;

/// The `registry-stale` text the follower sends with every read.
pub const STALE_TEXT: &str = "mirror of the leader, up to 1s behind";

/// A follower stand-in until dropped (or [`Follower::stop`]).
pub struct Follower {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it answers with.
    state: Arc<State>,
    /// Sent to stop the server.
    stop: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    /// The URL writes are pointed to; `None`: "no leader elected".
    leader: Mutex<Option<String>>,
    /// Writes refused so far (Register, Heartbeat, admin...).
    refused: AtomicUsize,
    /// Reads answered so far.
    reads: AtomicUsize,
}

impl State {
    fn leader(&self) -> Option<String> {
        self.leader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn refuse(&self) -> Status {
        self.refused.fetch_add(1, Ordering::Relaxed);
        replica::not_leader(self.leader().as_deref())
    }

    /// A client of the leader, for a read; UNAVAILABLE without one.
    async fn leader_client(&self) -> Result<NodeRegistryClient<tonic::transport::Channel>, Status> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let leader = self
            .leader()
            .ok_or_else(|| Status::unavailable("the follower's mirror is empty: no leader"))?;
        NodeRegistryClient::connect(leader)
            .await
            .map_err(|e| Status::unavailable(format!("the follower's mirror is unreachable: {e}")))
    }
}

/// A read's answer as a follower sends it: role and staleness attached.
fn as_follower<T>(answer: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    let mut response = answer?;
    let metadata = response.metadata_mut();
    metadata.insert(ROLE_METADATA, MetadataValue::from_static(ROLE_FOLLOWER));
    metadata.insert(STALE_METADATA, MetadataValue::from_static(STALE_TEXT));
    Ok(response)
}

impl Follower {
    /// Serves a follower pointing writes at `leader` on `127.0.0.1:0`.
    pub async fn start(leader: Option<String>) -> Self {
        crate::init_logs();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("the listener's address");
        let state = Arc::new(State {
            leader: Mutex::new(leader),
            ..State::default()
        });
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(replica::LEADER_HEALTH_SERVICE, ServingStatus::NotServing)
            .await;
        let (stop, stopped) = oneshot::channel::<()>();
        let service = NodeRegistryServer::new(Service(Arc::clone(&state)));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        Follower {
            addr,
            state,
            stop: Some(stop),
        }
    }

    /// The URL clients dial.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Points writes (and reads) at another leader from now on; `None`
    /// answers "no leader elected".
    pub fn point_at(&self, leader: Option<String>) {
        *self.state.leader.lock().unwrap_or_else(|e| e.into_inner()) = leader;
    }

    /// Writes refused so far.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::Relaxed)
    }

    /// Reads answered (or tried) so far.
    pub fn reads(&self) -> usize {
        self.state.reads.load(Ordering::Relaxed)
    }

    /// Stops serving.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The tonic service.
struct Service(Arc<State>);

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl NodeRegistry for Service {
    async fn register(&self, _: Request<pb::RegisterRequest>) -> Answer<pb::RegisterResponse> {
        Err(self.0.refuse())
    }

    async fn deregister(
        &self,
        _: Request<pb::DeregisterRequest>,
    ) -> Answer<pb::DeregisterResponse> {
        Err(self.0.refuse())
    }

    type HeartbeatStream = tokio_stream::Empty<Result<pb::HeartbeatResponse, Status>>;

    async fn heartbeat(
        &self,
        _: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Answer<Self::HeartbeatStream> {
        Err(self.0.refuse())
    }

    async fn cordon_node(&self, _: Request<pb::CordonNodeRequest>) -> Answer<pb::Node> {
        Err(self.0.refuse())
    }

    async fn uncordon_node(&self, _: Request<pb::UncordonNodeRequest>) -> Answer<pb::Node> {
        Err(self.0.refuse())
    }

    async fn drain_node(&self, _: Request<pb::DrainNodeRequest>) -> Answer<pb::Node> {
        Err(self.0.refuse())
    }

    async fn cancel_drain(&self, _: Request<pb::CancelDrainRequest>) -> Answer<pb::Node> {
        Err(self.0.refuse())
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Answer<pb::ListNodesResponse> {
        let mut leader = self.0.leader_client().await?;
        as_follower(leader.list_nodes(request.into_inner()).await)
    }

    async fn get_node(&self, request: Request<pb::GetNodeRequest>) -> Answer<pb::Node> {
        let mut leader = self.0.leader_client().await?;
        as_follower(leader.get_node(request.into_inner()).await)
    }

    async fn find_pools(
        &self,
        request: Request<pb::FindPoolsRequest>,
    ) -> Answer<pb::FindPoolsResponse> {
        let mut leader = self.0.leader_client().await?;
        as_follower(leader.find_pools(request.into_inner()).await)
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Answer<pb::ListModelsResponse> {
        let mut leader = self.0.leader_client().await?;
        as_follower(leader.list_models(request.into_inner()).await)
    }

    type WatchNodesStream = tokio_stream::Empty<Result<pb::WatchNodesResponse, Status>>;

    async fn watch_nodes(
        &self,
        _: Request<pb::WatchNodesRequest>,
    ) -> Answer<Self::WatchNodesStream> {
        Err(Status::unimplemented(
            "the follower stand-in does not mirror the change feed",
        ))
    }
}
