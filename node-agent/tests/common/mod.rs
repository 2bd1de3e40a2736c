//! Shared by the integration tests: a real registry on a loopback port, the
//! agent run in-process, a fake llama.cpp engine, and deadline-bound waits.

#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use node_agent::AgentConfig;
use node_agent::config::BackoffConfig;
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Server heartbeat interval in the tests.
pub const SERVER_INTERVAL: Duration = Duration::from_millis(200);
/// Server node timeout in the tests.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// Logs to the test's output when `RUST_LOG` is set, to debug a failure.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A registry-server served from a listener the test bound.
pub struct Registry {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), registry_server::ServerError>>,
}

impl Registry {
    /// Serves on a fresh 127.0.0.1:0 listener.
    pub async fn start() -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Serves on `addr` again after an earlier registry there stopped
    /// (SO_REUSEADDR, so connections in TIME_WAIT do not block the bind).
    pub async fn restart_on(addr: SocketAddr) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        Self::serve(socket.listen(1024).unwrap())
    }

    /// Serves on a listener the test already holds.
    pub fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let settings = registry_server::Settings {
            node_timeout: NODE_TIMEOUT,
            heartbeat_interval: SERVER_INTERVAL,
            offline_retention: Duration::from_secs(60),
            ..registry_server::Settings::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(registry_server::run(listener, settings, async {
            let _ = stopped.await;
        }));
        Registry {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client on its own connection.
    pub async fn client(&self) -> NodeRegistryClient<Channel> {
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        NodeRegistryClient::new(channel)
    }

    /// Stops gracefully and waits until the listener is closed.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("registry stops within 10 s")
            .unwrap()
            .unwrap();
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

    /// Signals shutdown and returns the agent's result once it has exited.
    pub async fn stop(mut self) -> Result<(), node_agent::AgentError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("agent stops within 10 s")
            .unwrap()
    }
}

/// Polls `check` until it gives a value or `within` has passed (then
/// panics naming `what`).
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
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
