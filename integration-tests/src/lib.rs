//! End-to-end test harness: runs the real `registry-server` and `node-agent`
//! binaries as child processes on loopback and looks at the registry through
//! its gRPC API.
//!
//! Rules the harness enforces for every test:
//! - the binaries are built by the suite itself ([`binaries`]), never taken
//!   stale from an earlier build;
//! - no port is guessed: the registry binds port 0 and the harness reads the
//!   port from its log;
//! - conditions are awaited with deadlines ([`test_support::eventually`]),
//!   never with fixed sleeps;
//! - every child is killed and reaped when its guard drops, also while a
//!   failing test unwinds, and the failing test prints the logs' tails.
//!
//! Module map:
//! - [`binaries`]: building the binaries once per test process;
//! - [`process`]: the child process guard;
//! - [`registry`]: the registry process, its port and restarts;
//! - [`agent`]: node-agent processes with fake GPUs;
//! - [`cluster`]: one test's registry and agents, and ListNodes views.
//!
//! Polling with deadlines comes from the workspace's test-support crate,
//! shared with the in-process tests of registry-server and node-agent.

pub mod agent;
pub mod binaries;
pub mod cluster;
pub mod error;
pub mod process;
pub mod registry;

pub use agent::{AgentProcess, AgentSpec};
pub use cluster::{Cluster, Nodes, expect_status, list_nodes};
pub use error::HarnessError;
pub use registry::{RegistryProcess, Timing};
