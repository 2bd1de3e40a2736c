//! The node-agent binary as a child process with fake GPUs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::HarnessError;
use crate::process::ChildProcess;
use crate::registry::{clear_environment, humantime};

/// What one agent announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    /// `--node-id`.
    pub node_id: String,
    /// `--pool`, one per pool.
    pub pools: Vec<String>,
    /// `--fake-gpus`: how many simulated GPUs it reports.
    pub fake_gpus: u32,
    /// `--label k=v`, one per label.
    pub labels: Vec<(String, String)>,
    /// `--config`: a TOML file for what flags cannot say (a pool's drain
    /// and resume actions); its pools come in addition to `pools`.
    pub config: Option<PathBuf>,
    /// `--backoff-max`: the reconnect backoff's ceiling (node-agent's
    /// default, 30 s, when `None`).
    pub backoff_max: Option<Duration>,
}

impl AgentSpec {
    /// An agent named `node_id` with `fake_gpus` GPUs, one pool and a
    /// `suite=e2e` label.
    pub fn new(node_id: &str, fake_gpus: u32, pool: &str) -> Self {
        Self {
            node_id: node_id.to_owned(),
            pools: vec![pool.to_owned()],
            fake_gpus,
            labels: vec![("suite".to_owned(), "e2e".to_owned())],
            config: None,
            backoff_max: None,
        }
    }

    /// The machine id the agent is started with.
    pub fn machine_id(&self) -> String {
        format!("machine-{}", self.node_id)
    }

    /// The endpoint address the agent is started with (nothing listens
    /// there; the registry only stores it).
    pub fn address(&self) -> String {
        format!("http://{}.e2e.invalid:9200", self.node_id)
    }
}

/// A running node-agent.
#[derive(Debug)]
pub struct AgentProcess {
    /// What it announces.
    pub spec: AgentSpec,
    /// The process.
    pub process: ChildProcess,
}

impl AgentProcess {
    /// Starts an agent that registers with `registry_url` and beats every
    /// `heartbeat_interval`.
    pub fn start(
        binary: &Path,
        log: &Path,
        registry_url: &str,
        heartbeat_interval: Duration,
        spec: AgentSpec,
    ) -> Result<Self, HarnessError> {
        let mut command = Command::new(binary);
        command
            .arg("--registry")
            .arg(registry_url)
            .arg("--node-id")
            .arg(&spec.node_id)
            .arg("--machine-id")
            .arg(spec.machine_id())
            .arg("--address")
            .arg(spec.address())
            .arg("--fake-gpus")
            .arg(spec.fake_gpus.to_string())
            .arg("--heartbeat-interval")
            .arg(humantime(heartbeat_interval))
            .args(["--log-format", "json"]);
        for pool in &spec.pools {
            command.arg("--pool").arg(pool);
        }
        if let Some(config) = &spec.config {
            command.arg("--config").arg(config);
        }
        if let Some(max) = spec.backoff_max {
            command.arg("--backoff-max").arg(humantime(max));
        }
        for (key, value) in &spec.labels {
            command.arg("--label").arg(format!("{key}={value}"));
        }
        command.env("RUST_LOG", "info,node_agent=debug");
        clear_environment(&mut command);
        let process = ChildProcess::spawn(format!("agent {}", spec.node_id), command, log)?;
        Ok(Self { spec, process })
    }
}
