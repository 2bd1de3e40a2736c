//! Shared by node-agent's integration tests: registry settings with short
//! timings, the agent run in-process, an admin client, a fake llama.cpp
//! engine. The registry itself, waits, PKI and log capture come from the
//! test-support crate.

#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use node_agent::auth::{BearerAuth, Credentials};
use node_agent::config::BackoffConfig;
use node_agent::{AgentConfig, Secret, TokenSource};
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use test_support::{TestRegistry, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Server heartbeat interval in the tests.
pub const SERVER_INTERVAL: Duration = Duration::from_millis(200);
/// Server node timeout in the tests.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// A `node` token the registry accepts in the security tests.
pub const NODE_TOKEN: &str = "node-token-aaaaaaaaaaaaaaaa";
/// An `admin` token, for the test's own reads.
pub const ADMIN_TOKEN: &str = "admin-token-cccccccccccccccc";

/// Registry settings of the tests: short timings, no security.
pub fn registry_settings() -> registry_server::Settings {
    registry_server::Settings {
        node_timeout: NODE_TIMEOUT,
        heartbeat_interval: SERVER_INTERVAL,
        offline_retention: Duration::from_secs(60),
        ..registry_server::Settings::default()
    }
}

/// A directory of files a test writes (tokens, certificates), removed
/// with it.
pub struct Files(tempfile::TempDir);

impl Files {
    pub fn new() -> Self {
        Files(tempfile::tempdir().unwrap())
    }

    /// Where `name` is (or would be) in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Writes `name` by writing a temporary file and renaming it into
    /// place, as a rotation should, so no reader sees half a file.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        let tmp = self.0.path().join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// Writes a secret the way operators should: mode 0600.
    pub fn write_secret(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.0.path().join(name);
        let tmp = self.0.path().join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// The registry's token file: the node and admin tokens.
    pub fn registry_tokens(&self) -> PathBuf {
        self.write_secret(
            "registry-tokens",
            &format!("node {NODE_TOKEN}\nadmin {ADMIN_TOKEN}\n"),
        )
    }
}

/// How the test reaches a registry that checks tokens, and maybe TLS.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// PEM CA that signs the registry's certificate; `None` for plain
    /// http.
    pub ca: Option<String>,
    /// Server name in the registry's certificate.
    pub domain: String,
    /// Client certificate and key (PEM), for mTLS.
    pub identity: Option<(String, String)>,
}

/// The test's own client with the admin token: it reads the fleet as an
/// operator would.
#[derive(Clone)]
pub struct Admin(NodeRegistryClient<InterceptedService<Channel, BearerAuth>>);

impl Admin {
    pub async fn connect(registry: &TestRegistry, tls: &ClientTls) -> Self {
        let mut endpoint = Channel::from_shared(registry.url()).unwrap();
        if let Some(ca) = &tls.ca {
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(tls.domain.clone());
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(config).unwrap();
        }
        Self::on(endpoint.connect().await.unwrap(), ADMIN_TOKEN)
    }

    /// A plain-http client that sends `token` instead of the admin token.
    pub async fn with_token(registry: &TestRegistry, token: &str) -> Self {
        let channel = Channel::from_shared(registry.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self::on(channel, token)
    }

    fn on(channel: Channel, token: &str) -> Self {
        let credentials =
            Arc::new(Credentials::load(Some(TokenSource::Value(Secret::new(token)))).unwrap());
        Admin(NodeRegistryClient::with_interceptor(
            channel,
            credentials.interceptor(),
        ))
    }

    /// The status code ListNodes answers with (`Ok` when it works).
    pub async fn list_code(&self) -> tonic::Code {
        match self
            .0
            .clone()
            .list_nodes(pb::ListNodesRequest::default())
            .await
        {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    }

    /// Every node the registry lists.
    pub async fn nodes(&self) -> Vec<pb::Node> {
        self.0
            .clone()
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .nodes
    }

    /// The node, while it is registered.
    pub async fn node(&self, node_id: &str) -> Option<pb::Node> {
        self.nodes()
            .await
            .into_iter()
            .find(|n| n.node_id == node_id)
    }

    /// Waits until the node is ONLINE and a heartbeat with pool status
    /// has arrived.
    pub async fn wait_heartbeating(&self, node_id: &str) -> pb::Node {
        eventually(
            &format!("{node_id} online and heartbeating"),
            Duration::from_secs(10),
            || async {
                self.node(node_id)
                    .await
                    .matching(|n| n.status() == pb::NodeStatus::Online && !n.pool_status.is_empty())
            },
        )
        .await
    }
}

/// The node as the registry has it, or `None` while it does not.
pub async fn get_node(client: &mut NodeRegistryClient<Channel>, node_id: &str) -> Option<pb::Node> {
    client
        .get_node(pb::GetNodeRequest {
            node_id: node_id.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// A condition on a node as the registry reports it, for
/// [`eventually`]: the node when it holds, else what was seen instead, so
/// a timeout says why.
pub trait NodeCondition {
    /// `Ok(node)` when the node is registered and `holds` accepts it.
    fn matching(self, holds: impl FnOnce(&pb::Node) -> bool) -> Result<pb::Node, String>;
}

impl NodeCondition for Option<pb::Node> {
    fn matching(self, holds: impl FnOnce(&pb::Node) -> bool) -> Result<pb::Node, String> {
        match self {
            None => Err("the node is not registered".to_owned()),
            Some(node) if holds(&node) => Ok(node),
            Some(node) => Err(describe(&node)),
        }
    }
}

/// A node's status, pools and figures, in one line.
fn describe(node: &pb::Node) -> String {
    let pools: Vec<String> = node
        .pool_status
        .iter()
        .map(|p| format!("{} {:?}", p.pool_id, p.state()))
        .collect();
    let specs: Vec<&str> = node.pools.iter().map(|p| p.pool_id.as_str()).collect();
    format!(
        "{} is {:?}, pools registered {specs:?}, pool status [{}], {} GPU stats, last heartbeat {:?}",
        node.node_id,
        node.status(),
        pools.join(", "),
        node.gpu_stats.len(),
        node.last_heartbeat_at,
    )
}

/// Agent settings for tests: fake GPUs, short intervals and backoff.
pub fn agent_config(registry: &str, node_id: &str) -> AgentConfig {
    let mut config = AgentConfig::new(registry, node_id);
    config.gpus.fake = Some(2);
    config.heartbeat_interval = Some(Duration::from_millis(300));
    config.registry_timeout = Duration::from_secs(1);
    config.deregister_timeout = Duration::from_secs(1);
    config.probe_timeout = Duration::from_millis(500);
    config.keepalive_interval = Duration::from_secs(1);
    config.keepalive_timeout = Duration::from_secs(1);
    config.backoff = BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    config
}

/// The agent running in-process until [`Agent::stop`].
pub struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), node_agent::AgentError>>,
}

impl Agent {
    pub fn start(config: AgentConfig) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(node_agent::run(config, async {
            let _ = stopped.await;
        }));
        Agent {
            stop: Some(stop),
            task,
        }
    }

    /// [`Agent::start`] with `gpus` instead of the source `config.gpus`
    /// names, e.g. a fake source whose faults the test injects.
    pub fn start_with_gpus(config: AgentConfig, gpus: Arc<dyn node_agent::GpuSource>) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(node_agent::run_with_gpu_source(config, gpus, async {
            let _ = stopped.await;
        }));
        Agent {
            stop: Some(stop),
            task,
        }
    }

    /// Signals shutdown and returns the agent's result once it has exited.
    pub async fn stop(mut self) -> Result<(), node_agent::AgentError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("agent stops within 10 s")
            .unwrap()
    }
}

/// A stand-in for a llama.cpp server: `/health` answers with a settable
/// status code, `/slots` with a settable body (404 when none).
pub struct FakeEngine {
    pub addr: SocketAddr,
    health: Arc<AtomicU16>,
    slots: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl FakeEngine {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(AtomicU16::new(200));
        let slots = Arc::new(Mutex::new(None));
        let task = tokio::spawn(serve_engine(listener, health.clone(), slots.clone()));
        FakeEngine {
            addr,
            health,
            slots,
            task,
        }
    }

    pub fn health_url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }

    pub fn set_slots(&self, body: &str) {
        *self.slots.lock().unwrap() = Some(body.to_owned());
    }

    /// Stops listening and drops every connection: probes are refused.
    pub fn kill(self) {
        self.task.abort();
    }
}

async fn serve_engine(
    listener: TcpListener,
    health: Arc<AtomicU16>,
    slots: Arc<Mutex<Option<String>>>,
) {
    // Connection tasks live in the set, so aborting this task (and so
    // dropping the set) closes them all.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let health = health.clone();
        let slots = slots.clone();
        connections.spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                // One GET per request head; keep-alive, so loop.
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, body) = match path.as_str() {
                    "/health" => {
                        let status = health.load(Ordering::SeqCst);
                        let body = if status == 200 {
                            r#"{"status":"ok"}"#
                        } else {
                            r#"{"error":{"message":"Loading model"}}"#
                        };
                        (status, body.to_owned())
                    }
                    "/slots" => match slots.lock().unwrap().clone() {
                        Some(body) => (200, body),
                        None => (404, r#"{"error":"not found"}"#.to_owned()),
                    },
                    _ => (404, r#"{"error":"not found"}"#.to_owned()),
                };
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}
