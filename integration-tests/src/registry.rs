//! The registry-server binary as a child process on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::HarnessError;
use crate::process::ChildProcess;

/// How long the registry may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The registry's timing, short so that the suite runs in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `--node-timeout`: silence after which a node is OFFLINE.
    pub node_timeout: Duration,
    /// `--heartbeat-interval`: how often agents are asked to beat.
    pub heartbeat_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            node_timeout: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(500),
        }
    }
}

/// A running registry-server.
#[derive(Debug)]
pub struct RegistryProcess {
    /// The executable, kept for restarts.
    binary: PathBuf,
    /// The log file every incarnation appends to.
    log: PathBuf,
    /// The timing it runs with.
    timing: Timing,
    /// Further command-line arguments, kept for restarts.
    args: Vec<String>,
    /// The metrics port's address, when `args` turned it on.
    metrics_addr: Option<SocketAddr>,
    /// The address it listens on (the port the OS chose at the first start).
    addr: SocketAddr,
    /// The embedded store's directory, kept across restarts; `None`: the
    /// memory store (every incarnation starts empty).
    data_dir: Option<PathBuf>,
    /// The current incarnation; `None` after [`RegistryProcess::kill`].
    process: Option<ChildProcess>,
}

impl RegistryProcess {
    /// Starts the registry on `127.0.0.1:0` and reads the port it got from
    /// its "registry listening" log line, so no port is ever guessed.
    pub async fn start(binary: &Path, log: &Path, timing: Timing) -> Result<Self, HarnessError> {
        Self::start_with(binary, log, timing, Vec::new(), None).await
    }

    /// [`RegistryProcess::start`] with further arguments. The metrics port
    /// is off unless `args` has `--metrics-listen` (give it `127.0.0.1:0`:
    /// its port is read from the log too, see
    /// [`RegistryProcess::metrics_addr`]).
    pub async fn start_with_args(
        binary: &Path,
        log: &Path,
        timing: Timing,
        args: Vec<String>,
    ) -> Result<Self, HarnessError> {
        Self::start_with(binary, log, timing, args, None).await
    }

    /// [`RegistryProcess::start`] with the embedded store in `data_dir`
    /// (`Some`), which every restart loads, or the memory store (`None`).
    pub async fn start_with_store(
        binary: &Path,
        log: &Path,
        timing: Timing,
        data_dir: Option<&Path>,
    ) -> Result<Self, HarnessError> {
        Self::start_with(binary, log, timing, Vec::new(), data_dir).await
    }

    /// Starts with further arguments and a store (see the other starts).
    pub async fn start_with(
        binary: &Path,
        log: &Path,
        timing: Timing,
        args: Vec<String>,
        data_dir: Option<&Path>,
    ) -> Result<Self, HarnessError> {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("a valid socket address");
        let (process, addr, metrics_addr) =
            spawn_and_wait(binary, log, timing, &args, listen, data_dir).await?;
        Ok(Self {
            binary: binary.to_path_buf(),
            log: log.to_path_buf(),
            timing,
            args,
            metrics_addr,
            addr,
            data_dir: data_dir.map(Path::to_path_buf),
            process: Some(process),
        })
    }

    /// The metrics port's address (`/metrics`, `/health`), when it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The log every incarnation appends to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL agents and clients use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The timing it runs with.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Kills the registry with SIGKILL: no graceful shutdown, every
    /// connection drops at once.
    pub fn kill(&mut self) -> Result<(), HarnessError> {
        if let Some(mut process) = self.process.take() {
            process.kill()?;
        }
        Ok(())
    }

    /// Starts a fresh incarnation on the same address (empty with the memory
    /// store; with the embedded store it loads what the last one stored),
    /// retrying
    /// while the port is still held by the old one's sockets.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let data_dir = self.data_dir.as_deref();
            match spawn_and_wait(
                &self.binary,
                &self.log,
                self.timing,
                &self.args,
                self.addr,
                data_dir,
            )
            .await
            {
                Ok((process, addr, metrics_addr)) => {
                    self.metrics_addr = metrics_addr;
                    assert_eq!(addr, self.addr, "the restarted registry moved");
                    self.process = Some(process);
                    return Ok(());
                }
                Err(HarnessError::EarlyExit { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Stops the registry as an operator does (SIGTERM: a replica resigns
    /// its leadership, so the next one takes over at once), waits up to
    /// `timeout` for it to exit, then starts a fresh incarnation on the same
    /// address.
    pub async fn restart_gracefully(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        if let Some(process) = self.process.as_mut() {
            process.signal(nix::sys::signal::Signal::SIGTERM)?;
            process
                .wait_exit(timeout)
                .await
                .map_err(|detail| HarnessError::NotStopped {
                    name: process.name().to_owned(),
                    detail,
                    log: process.log().to_path_buf(),
                })?;
        }
        self.restart().await
    }

    /// The current incarnation, if any.
    pub fn process(&mut self) -> Option<&mut ChildProcess> {
        self.process.as_mut()
    }
}

/// Starts one incarnation and waits for its "registry listening" line;
/// returns it with its gRPC address and, when on, its metrics address.
async fn spawn_and_wait(
    binary: &Path,
    log: &Path,
    timing: Timing,
    args: &[String],
    listen: SocketAddr,
    data_dir: Option<&Path>,
) -> Result<(ChildProcess, SocketAddr, Option<SocketAddr>), HarnessError> {
    // Only lines written by this incarnation count.
    let offset = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let mut command = Command::new(binary);
    command
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--node-timeout")
        .arg(humantime(timing.node_timeout))
        .arg("--heartbeat-interval")
        .arg(humantime(timing.heartbeat_interval))
        .args(["--log-format", "json"])
        .args(args)
        // Each test's registry keeps its own state (or none): never the
        // binary's default directory, shared by every run.
        // (unless `args` names a store itself: the replicas' etcd).
        .args(match data_dir {
            _ if args.iter().any(|a| a == "--store") => Vec::new(),
            Some(dir) => vec![
                "--store".into(),
                "embedded".into(),
                "--data-dir".into(),
                dir.display().to_string(),
            ],
            None => vec!["--store".to_string(), "memory".to_string()],
        })
        .env("RUST_LOG", "info,registry_server=debug");
    let metrics_on = args.iter().any(|a| a == "--metrics-listen");
    if !metrics_on {
        // Parallel tests would fight over the fixed default metrics port.
        command.args(["--metrics-listen", "off"]);
    }
    clear_environment(&mut command);
    let mut process = ChildProcess::spawn("registry", command, log)?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let text = std::fs::read(log)
            .map_err(|err| HarnessError::io(format!("reading {}", log.display()), err))?;
        let start = usize::try_from(offset).unwrap_or(0).min(text.len());
        let written = String::from_utf8_lossy(&text[start..]);
        if let Some(addr) = listening_addr(&written) {
            let metrics = metrics_on.then(|| metrics_addr(&written)).flatten();
            return Ok((process, addr, metrics));
        }
        if let Some(status) = process.try_exit_status()? {
            return Err(HarnessError::EarlyExit {
                name: process.name().to_owned(),
                status,
                log: log.to_path_buf(),
            });
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::NotReady {
                name: process.name().to_owned(),
                timeout: START_TIMEOUT,
                log: log.to_path_buf(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes the variables of both binaries from a child's environment, so a
/// developer's shell settings cannot change what a test runs.
pub(crate) fn clear_environment(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("REGISTRY_") || key.starts_with("NODE_AGENT_") {
            command.env_remove(key);
        }
    }
    command.env("NO_COLOR", "1");
}

/// A duration in the humantime form the binaries take ("500ms", "2s").
pub(crate) fn humantime(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// The address in the registry's JSON "registry listening" log line, if
/// `log` has one.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|line| line.contains(r#""message":"registry listening""#))
        .find_map(|line| json_string_field(line, "addr")?.parse().ok())
}

/// The metrics port's address in the registry's JSON "metrics at ..." log
/// line, if `log` has one (it is written before "registry listening").
fn metrics_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|line| line.contains(r#""message":"metrics at "#))
        .find_map(|line| json_string_field(line, "addr")?.parse().ok())
}

/// The value of a string field in a flat JSON object line (the registry's
/// log lines carry no escapes in the fields read here).
fn json_string_field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let key = format!(r#""{field}":""#);
    let start = line.find(&key)? + key.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_port() {
        let log = concat!(
            r#"{"timestamp":"2026-01-01T00:00:00Z","level":"INFO","message":"starting"}"#,
            "\n",
            r#"{"timestamp":"2026-01-01T00:00:00Z","level":"INFO","message":"registry listening","addr":"127.0.0.1:41927","node_timeout":"2s"}"#,
            "\n"
        );
        assert_eq!(
            listening_addr(log),
            Some("127.0.0.1:41927".parse().unwrap())
        );
        assert_eq!(listening_addr(r#"{"message":"cannot listen"}"#), None);
    }

    #[test]
    fn durations_are_written_in_milliseconds() {
        assert_eq!(humantime(Duration::from_secs(2)), "2000ms");
        assert_eq!(humantime(Duration::from_millis(500)), "500ms");
    }
}
