//! A real etcd cluster on loopback for the replica tests: `etcd`
//! processes (Debian's `etcd-server` package) with temporary data
//! directories, killed when dropped.
//!
//! Ports: etcd must be told its URLs before it listens, so each member's
//! two ports are found by binding `127.0.0.1:0` and releasing the socket
//! just before etcd starts; a start that loses that race (address in use)
//! is retried on fresh ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member: its name, ports, data directory and process.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    process: Option<Child>,
}

/// A running etcd cluster, killed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    /// Temporary directory holding the members' data and logs.
    dir: PathBuf,
    /// The `etcd` binary.
    binary: PathBuf,
}

/// The `etcd` binary on PATH (or /usr/bin), if installed.
pub fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

impl EtcdCluster {
    /// Starts `members` etcd members and waits until the cluster answers.
    /// `None` (with a line on stderr) when etcd is not installed, unless
    /// CI=true: then it panics, since CI installs it.
    pub fn start(members: usize) -> Option<Self> {
        let Some(binary) = etcd_binary() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "etcd is not installed, and CI=true: .ci/run installs etcd-server"
            );
            eprintln!("etcd not installed (apt-get install etcd-server); skipping this test");
            return None;
        };
        for attempt in 0..5 {
            match Self::try_start(&binary, members) {
                Ok(cluster) => return Some(cluster),
                Err(why) if attempt < 4 => {
                    eprintln!("etcd cluster did not start ({why}); retrying on fresh ports")
                }
                Err(why) => panic!("etcd cluster did not start: {why}"),
            }
        }
        unreachable!()
    }

    fn try_start(binary: &Path, count: usize) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "registry-etcd-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let members: Vec<Member> = (0..count)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.join(format!("m{i}.data")),
                process: None,
            })
            .collect();
        let mut cluster = Self {
            members,
            dir,
            binary: binary.to_path_buf(),
        };
        for i in 0..count {
            cluster.spawn(i, "new")?;
        }
        cluster.wait_healthy(Duration::from_secs(20))?;
        Ok(cluster)
    }

    /// The `--initial-cluster` value.
    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), String> {
        let initial = self.initial_cluster();
        let log = self.dir.join(format!("m{i}.log"));
        let m = &mut self.members[i];
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| e.to_string())?;
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(&self.binary)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                state,
            ])
            .args(["--initial-cluster-token", "registry-tests"])
            // Fast elections: a member notices a dead leader in ~0.5 s.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // A restarted member does not depose a healthy leader first.
            .arg("--pre-vote=true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        m.process = Some(child);
        Ok(())
    }

    /// Waits until every running member answers `/health`.
    fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut down = Vec::new();
            for m in &mut self.members {
                let Some(process) = m.process.as_mut() else {
                    continue;
                };
                if let Ok(Some(status)) = process.try_wait() {
                    return Err(format!("member {} exited: {status}", m.name));
                }
                if !healthy(m.client_port) {
                    down.push(m.name.clone());
                }
            }
            if down.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("members not healthy: {down:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client URLs, comma-separated (`--etcd-endpoints`).
    pub fn endpoints_arg(&self) -> String {
        self.client_urls().join(",")
    }

    /// Every member's client URL.
    pub fn client_urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Stops member `i` (SIGKILL; its data stays for [`EtcdCluster::start_member`]).
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut process) = self.members[i].process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts member `i` again on its data and ports.
    pub fn start_member(&mut self, i: usize) {
        self.spawn(i, "existing").expect("the etcd member restarts");
    }

    /// The running members' process ids (CPU and memory from /proc).
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.process.as_ref().map(Child::id))
            .collect()
    }

    /// Member `i`'s Prometheus text (`GET /metrics`), `None` when it does
    /// not answer.
    pub fn metrics(&self, i: usize) -> Option<String> {
        crate::http::get(
            ([127, 0, 0, 1], self.members[i].client_port).into(),
            "/metrics",
        )
    }

    /// Where the members log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether the member on `port` answers `GET /health` with health true.
fn healthy(port: u16) -> bool {
    crate::http::get(([127, 0, 0, 1], port).into(), "/health").is_some_and(|answer| {
        answer.contains("\"health\":\"true\"") || answer.contains("\"health\": \"true\"")
    })
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
