//! The registry under test: a separate `registry-server` process (what the
//! benchmarks measure, read through /proc) or, for the quick test in
//! `cargo test`, a server task in this process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tracing::info;

use crate::BenchError;
use crate::procfs::{self, ProcSample};

/// How long a server may take to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The settings a scenario runs the registry with.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// A short name for log files ("scale-10000").
    pub name: String,
    /// --node-timeout.
    pub node_timeout: Duration,
    /// --heartbeat-interval (advertised to agents).
    pub heartbeat_interval: Duration,
    /// --max-streams-per-connection: above the streams a shared connection
    /// of the simulator carries.
    pub max_streams_per_connection: u32,
    /// --max-connections: above the simulator's connection count.
    pub max_connections: usize,
    /// --max-nodes and --max-heartbeat-streams: above the fleet (the
    /// registry's defaults, 200,000 and 250,000, refuse a larger one).
    pub max_nodes: usize,
    /// `--store embedded --data-dir DIR` when set; `--store memory` (the
    /// state is lost on restart) when not.
    pub data_dir: Option<PathBuf>,
    /// `--store etcd` on these members when set (a replica; wins over
    /// `data_dir`).
    pub etcd: Option<EtcdTarget>,
    /// `--max-concurrent-registrations` and `--max-queued-registrations`
    /// when set; the registry's defaults when not.
    pub admission: Option<(usize, usize)>,
}

/// Where a replica keeps its records and elects its leader.
#[derive(Debug, Clone)]
pub struct EtcdTarget {
    /// --etcd-endpoints (comma-separated client URLs).
    pub endpoints: String,
    /// --etcd-prefix, one per replica set.
    pub prefix: String,
    /// --etcd-lease-ttl.
    pub lease_ttl: Duration,
}

impl ServerSpec {
    /// The registry's defaults (30 s timeout, 10 s interval).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            node_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            max_streams_per_connection: 1024,
            max_connections: 16_384,
            max_nodes: 250_000,
            data_dir: None,
            etcd: None,
            admission: None,
        }
    }

    /// Register's admission control: `running` at once, `queued` waiting.
    pub fn admission(mut self, running: usize, queued: usize) -> Self {
        self.admission = Some((running, queued));
        self
    }

    /// A replica on etcd.
    pub fn etcd(mut self, target: EtcdTarget) -> Self {
        self.etcd = Some(target);
        self
    }

    /// With the embedded store in `dir` (kept across restarts).
    pub fn embedded(mut self, dir: PathBuf) -> Self {
        self.data_dir = Some(dir);
        self
    }

    /// With this timeout and interval.
    pub fn timing(mut self, node_timeout: Duration, heartbeat_interval: Duration) -> Self {
        self.node_timeout = node_timeout;
        self.heartbeat_interval = heartbeat_interval;
        self
    }

    fn args(&self, listen: SocketAddr) -> Vec<String> {
        vec![
            "--listen".into(),
            listen.to_string(),
            // Metrics stay on, as in production, on a port of their own.
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--node-timeout".into(),
            humantime::format_duration(self.node_timeout).to_string(),
            "--heartbeat-interval".into(),
            humantime::format_duration(self.heartbeat_interval).to_string(),
            "--max-streams-per-connection".into(),
            self.max_streams_per_connection.to_string(),
            "--max-connections".into(),
            self.max_connections.to_string(),
            // Every simulated node connects from 127.0.0.1.
            "--max-connections-per-address".into(),
            self.max_connections.to_string(),
            "--max-nodes".into(),
            self.max_nodes.to_string(),
            "--max-heartbeat-streams".into(),
            self.max_nodes.to_string(),
        ]
        .into_iter()
        .chain(self.admission.into_iter().flat_map(|(running, queued)| {
            [
                "--max-concurrent-registrations".into(),
                running.to_string(),
                "--max-queued-registrations".into(),
                queued.to_string(),
            ]
        }))
        .chain(match (&self.etcd, &self.data_dir) {
            (Some(etcd), _) => vec![
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                etcd.endpoints.clone(),
                "--etcd-prefix".into(),
                etcd.prefix.clone(),
                "--etcd-lease-ttl".into(),
                humantime::format_duration(etcd.lease_ttl).to_string(),
            ],
            (None, Some(dir)) => vec![
                "--store".into(),
                "embedded".into(),
                "--data-dir".into(),
                dir.display().to_string(),
            ],
            (None, None) => vec!["--store".into(), "memory".into()],
        })
        .collect()
    }

    fn settings(&self) -> registry_server::Settings {
        registry_server::Settings {
            node_timeout: self.node_timeout,
            heartbeat_interval: self.heartbeat_interval,
            max_streams_per_connection: self.max_streams_per_connection,
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections,
            max_nodes: self.max_nodes,
            max_heartbeat_streams: self.max_nodes,
            max_concurrent_registrations: self.admission.map_or(
                registry_server::Settings::default().max_concurrent_registrations,
                |a| a.0,
            ),
            max_queued_registrations: self.admission.map_or(
                registry_server::Settings::default().max_queued_registrations,
                |a| a.1,
            ),
            store: match (&self.etcd, &self.data_dir) {
                (Some(_), _) => registry_server::config::StoreKind::Etcd,
                (None, Some(_)) => registry_server::config::StoreKind::Embedded,
                (None, None) => registry_server::config::StoreKind::Memory,
            },
            data_dir: self.data_dir.clone().unwrap_or_default(),
            etcd_endpoints: self
                .etcd
                .as_ref()
                .map(|e| e.endpoints.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
            etcd_prefix: self.etcd.as_ref().map_or_else(
                || registry_server::Settings::default().etcd_prefix,
                |e| e.prefix.clone(),
            ),
            etcd_lease_ttl: self
                .etcd
                .as_ref()
                .map_or(registry_server::Settings::default().etcd_lease_ttl, |e| {
                    e.lease_ttl
                }),
            ..registry_server::Settings::default()
        }
    }
}

/// How to stop the registry in a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: streams end with UNAVAILABLE, connections close cleanly.
    Graceful,
    /// SIGKILL: the process dies; the kernel resets its connections.
    Crash,
}

/// Where servers come from.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// `registry-server` processes of this binary; logs go to `log_dir`.
    Process {
        /// The registry-server binary.
        bin: PathBuf,
        /// Where each server's stdout and stderr go.
        log_dir: PathBuf,
    },
    /// Server tasks in this process (tests: no /proc figures of the server
    /// alone, no crash mode).
    InProcess,
}

/// A running registry.
pub enum Server {
    /// A child process.
    Process(ProcessServer),
    /// A task of this process.
    InProcess(TaskServer),
}

/// A registry-server child process.
pub struct ProcessServer {
    /// The binary, for restarts.
    bin: PathBuf,
    /// Its settings, for restarts.
    spec: ServerSpec,
    /// Its log file.
    log: PathBuf,
    /// The process.
    child: Child,
    /// The address it listens on.
    addr: SocketAddr,
}

/// A registry task in this process.
pub struct TaskServer {
    /// Its settings, for restarts.
    spec: ServerSpec,
    /// The address it listens on.
    addr: SocketAddr,
    /// Completes the task's shutdown future.
    stop: Option<oneshot::Sender<()>>,
    /// The task.
    task: Option<JoinHandle<Result<(), registry_server::ServerError>>>,
}

impl Launcher {
    /// An empty directory for a scenario's store: beside the logs of a
    /// process server, under the temporary directory for an in-process one.
    pub fn data_dir(&self, name: &str) -> Result<PathBuf, BenchError> {
        let dir = match self {
            Launcher::Process { log_dir, .. } => log_dir.join(format!("{name}-data")),
            Launcher::InProcess => {
                std::env::temp_dir().join(format!("bench-{}-{name}-data", std::process::id()))
            }
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BenchError::Io(format!("{}: {e}", dir.display()))),
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| BenchError::Io(format!("{}: {e}", dir.display())))?;
        Ok(dir)
    }

    /// Starts a registry with `spec` on a free loopback port.
    pub async fn start(&self, spec: &ServerSpec) -> Result<Server, BenchError> {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        match self {
            Launcher::Process { bin, log_dir } => {
                std::fs::create_dir_all(log_dir)
                    .map_err(|e| BenchError::Io(format!("{}: {e}", log_dir.display())))?;
                let log = log_dir.join(format!("{}.log", spec.name));
                let server = ProcessServer::spawn(bin, spec.clone(), &log, any).await?;
                Ok(Server::Process(server))
            }
            Launcher::InProcess => Ok(Server::InProcess(
                TaskServer::spawn(spec.clone(), any).await?,
            )),
        }
    }
}

impl Server {
    /// The registry's address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Server::Process(s) => s.addr,
            Server::InProcess(s) => s.addr,
        }
    }

    /// The registry's URL for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The process whose CPU and memory are the server's (this process for
    /// an in-process server, where the figures include the simulator).
    pub fn pid(&self) -> u32 {
        match self {
            Server::Process(s) => s.child.id(),
            Server::InProcess(_) => std::process::id(),
        }
    }

    /// The server's CPU time and memory now.
    pub fn sample(&self) -> Result<ProcSample, BenchError> {
        procfs::sample(self.pid())
    }

    /// Stops the registry as `mode` says and starts it again on the same
    /// address. Returns when the new one listens.
    pub async fn restart(&mut self, mode: StopMode) -> Result<(), BenchError> {
        match self {
            Server::Process(s) => s.restart(mode).await,
            Server::InProcess(s) => s.restart().await,
        }
    }

    /// Stops the registry as `mode` says and waits for it (a task in this
    /// process can only stop gracefully).
    pub async fn stop_with(mut self, mode: StopMode) -> Result<(), BenchError> {
        match &mut self {
            Server::Process(s) => s.stop(mode).await,
            Server::InProcess(s) => s.stop().await,
        }
    }

    /// Stops the registry gracefully and waits for it.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        match &mut self {
            Server::Process(s) => s.stop(StopMode::Graceful).await,
            Server::InProcess(s) => s.stop().await,
        }
    }
}

impl ProcessServer {
    async fn spawn(
        bin: &Path,
        spec: ServerSpec,
        log: &Path,
        listen: SocketAddr,
    ) -> Result<Self, BenchError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| BenchError::Io(format!("{}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| BenchError::Io(format!("{}: {e}", log.display())))?;
        let start_offset = out.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(bin)
            .args(spec.args(listen))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| BenchError::Io(format!("starting {}: {e}", bin.display())))?;
        let mut server = Self {
            bin: bin.to_path_buf(),
            spec,
            log: log.to_path_buf(),
            child,
            addr: listen,
        };
        server.addr = server.wait_listening(start_offset).await?;
        info!(addr = %server.addr, pid = server.child.id(), log = %server.log.display(), "registry started");
        Ok(server)
    }

    /// Waits for the "registry listening addr=..." line the server logs
    /// once it accepts connections, and returns that address.
    async fn wait_listening(&mut self, offset: u64) -> Result<SocketAddr, BenchError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = std::fs::read(&self.log).unwrap_or_default();
            let text =
                String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]).into_owned();
            if let Some(addr) = listening_addr(&text) {
                return Ok(addr);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BenchError::Server(format!(
                    "registry-server exited with {status} before listening; see {}",
                    self.log.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Server(format!(
                    "registry-server did not log its address within {START_TIMEOUT:?}; see {}",
                    self.log.display()
                )));
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(&mut self, mode: StopMode) -> Result<(), BenchError> {
        let pid = Pid::from_raw(self.child.id() as i32);
        let signal = match mode {
            StopMode::Graceful => Signal::SIGTERM,
            StopMode::Crash => Signal::SIGKILL,
        };
        // ESRCH: it already exited, which waiting below reports.
        let _ = kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(BenchError::Server(
                        "registry-server did not stop within 30 s of SIGTERM; killed".into(),
                    ));
                }
                Ok(None) => sleep(Duration::from_millis(5)).await,
                Err(e) => return Err(BenchError::Io(format!("waiting for registry-server: {e}"))),
            }
        }
    }

    async fn restart(&mut self, mode: StopMode) -> Result<(), BenchError> {
        self.stop(mode).await?;
        let again = Self::spawn(&self.bin, self.spec.clone(), &self.log, self.addr).await?;
        *self = again;
        Ok(())
    }
}

impl Drop for ProcessServer {
    fn drop(&mut self) {
        // A scenario that failed half-way must not leave a server behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address in a "registry listening addr=IP:PORT" log line.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|l| l.contains("registry listening"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|field| field.strip_prefix("addr="))
                .and_then(|a| a.trim_matches('"').parse().ok())
        })
}

impl TaskServer {
    async fn spawn(spec: ServerSpec, listen: SocketAddr) -> Result<Self, BenchError> {
        // The previous server on this address may still be letting go of it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(listen).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() > deadline => {
                    return Err(BenchError::Io(format!("binding {listen}: {e}")));
                }
                Err(_) => sleep(Duration::from_millis(20)).await,
            }
        };
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::Io(format!("listener address: {e}")))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let settings = spec.settings();
        let task = if spec.etcd.is_some() {
            let advertise = format!("http://{addr}");
            tokio::spawn(async move {
                let replicas = registry_server::store::etcd::replicas(&settings, advertise)
                    .await
                    .map_err(registry_server::ServerError::Store)?;
                registry_server::run_replica(listener, settings, replicas, None, shutdown).await
            })
        } else {
            tokio::spawn(registry_server::run(listener, settings, shutdown))
        };
        Ok(Self {
            spec,
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    async fn stop(&mut self) -> Result<(), BenchError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(BenchError::Server(format!("registry task: {e}"))),
                Err(e) => return Err(BenchError::Server(format!("registry task: {e}"))),
            }
        }
        Ok(())
    }

    async fn restart(&mut self) -> Result<(), BenchError> {
        self.stop().await?;
        *self = Self::spawn(self.spec.clone(), self.addr).await?;
        Ok(())
    }
}

impl Drop for TaskServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_address_is_read_from_the_log_line() {
        let text = "2026-01-01T00:00:00Z  INFO registry_server::server: registry listening addr=127.0.0.1:40123 node_timeout=30s\n";
        assert_eq!(
            listening_addr(text),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        let other = "INFO metrics at http://127.0.0.1:9464/metrics addr=127.0.0.1:9464\n";
        assert_eq!(listening_addr(other), None);
    }

    #[test]
    fn process_arguments_carry_the_spec() {
        let spec = ServerSpec::new("t").timing(Duration::from_secs(5), Duration::from_secs(1));
        let args = spec.args("127.0.0.1:7".parse().unwrap()).join(" ");
        assert!(args.contains("--listen 127.0.0.1:7"), "{args}");
        assert!(args.contains("--node-timeout 5s"), "{args}");
        assert!(args.contains("--heartbeat-interval 1s"), "{args}");
        assert!(args.contains("--store memory"), "{args}");
        let durable = spec.embedded("/tmp/x".into());
        let args = durable.args("127.0.0.1:7".parse().unwrap()).join(" ");
        assert!(
            args.contains("--store embedded --data-dir /tmp/x"),
            "{args}"
        );
    }
}
