//! Shared helpers of the registry-server integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::time::Duration;

use registry_proto::convert::to_proto_timestamp;
use registry_proto::pb;
use registry_server::Settings;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// A registry serving on a loopback port for the length of a test.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), registry_server::ServerError>>,
}

impl TestServer {
    pub async fn start(settings: Settings) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, settings)
    }

    pub fn start_on(listener: TcpListener, settings: Settings) -> Self {
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(registry_server::run(listener, settings, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

pub fn register_request(node_id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node_id: node_id.into(),
        machine_id: format!("machine-{node_id}"),
        address: format!("http://{node_id}.example:9200"),
        pools: vec![pb::PoolSpec {
            pool_id: "pool-0".into(),
            engine: "llamacpp".into(),
            model: "llama-3.1-8b".into(),
            slots_total: 4,
            gpu_indices: vec![0],
            engine_version: String::new(),
            metrics_url: String::new(),
        }],
        capabilities: Some(pb::Capabilities {
            gpus: vec![pb::GpuInfo {
                index: 0,
                uuid: format!("GPU-{node_id}"),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                compute_capability: "9.0".into(),
                pci_bus_id: String::new(),
                mig_enabled: false,
            }],
            cpu_cores: 32,
            ram_total_bytes: 256 << 30,
            driver_version: "550.54.15".into(),
            cuda_version: "12.4".into(),
        }),
        agent_version: "test 0.0.0".into(),
        labels: [("zone".to_string(), "eu-1".to_string())].into(),
        metrics_address: String::new(),
    }
}

/// What a Register returned that heartbeats must present.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: u64,
    pub secret: String,
}

impl Session {
    /// No session: what a message after the first may send.
    pub fn none() -> Self {
        Self {
            id: 0,
            secret: String::new(),
        }
    }

    /// A made-up session id with no secret.
    pub fn forged(id: u64) -> Self {
        Self {
            id,
            secret: String::new(),
        }
    }
}

impl From<pb::RegisterResponse> for Session {
    fn from(response: pb::RegisterResponse) -> Self {
        Self {
            id: response.session_id,
            secret: response.session_secret,
        }
    }
}

/// A heartbeat reporting pool-0 READY, with GPU figures.
pub fn beat(node_id: &str, session: &Session, sequence: u64) -> pb::HeartbeatRequest {
    beat_in(node_id, session, sequence, pb::PoolState::Ready)
}

/// A heartbeat reporting pool-0 in `state`, with GPU figures.
pub fn beat_in(
    node_id: &str,
    session: &Session,
    sequence: u64,
    state: pb::PoolState,
) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        node_id: node_id.into(),
        session_id: session.id,
        session_secret: session.secret.clone(),
        sent_at: Some(to_proto_timestamp(chrono::Utc::now())),
        pools: vec![pb::PoolStatus {
            pool_id: "pool-0".into(),
            state: state as i32,
            slots_total: 4,
            slots_free: 3,
            vram_free_bytes: 10 << 30,
            model: "llama-3.1-8b".into(),
            engine: "llamacpp".into(),
        }],
        gpus: vec![pb::GpuStats {
            index: 0,
            memory_used_bytes: 70 << 30,
            memory_free_bytes: 10 << 30,
            utilization_percent: 87,
            temperature_celsius: Some(61),
        }],
        sequence,
    }
}

/// Registers `request` and returns its session.
pub async fn register(
    client: &mut pb::node_registry_client::NodeRegistryClient<Channel>,
    request: pb::RegisterRequest,
) -> Session {
    client.register(request).await.unwrap().into_inner().into()
}

/// The node's status, as GetNode reports it.
pub async fn status_of(
    client: &mut pb::node_registry_client::NodeRegistryClient<Channel>,
    node_id: &str,
) -> pb::NodeStatus {
    client
        .get_node(pb::GetNodeRequest {
            node_id: node_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// An open Heartbeat stream: a sender for requests and the server's replies.
pub struct Stream {
    pub tx: mpsc::Sender<pb::HeartbeatRequest>,
    pub rx: Streaming<pb::HeartbeatResponse>,
}

impl Stream {
    pub async fn open<T>(
        client: &mut pb::node_registry_client::NodeRegistryClient<T>,
    ) -> Result<Self, tonic::Status>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<tonic::codegen::StdError>,
        T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    {
        let (tx, requests) = mpsc::channel(16);
        let rx = client
            .heartbeat(ReceiverStream::new(requests))
            .await?
            .into_inner();
        Ok(Self { tx, rx })
    }

    /// Sends one request and returns the server's answer to it.
    pub async fn send(
        &mut self,
        request: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, tonic::Status> {
        // The server may already have ended the stream; the reply says why.
        let _ = self.tx.send(request).await;
        self.next().await
    }

    /// The server's next message on the stream.
    pub async fn next(&mut self) -> Result<pb::HeartbeatResponse, tonic::Status> {
        let reply = tokio::time::timeout(Duration::from_secs(10), self.rx.next())
            .await
            .expect("a reply within 10 s");
        match reply {
            Some(result) => result,
            None => panic!("stream ended without a status"),
        }
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the server answers the health service with SERVING.
pub async fn serving(channel: Channel) -> bool {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "registry-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
