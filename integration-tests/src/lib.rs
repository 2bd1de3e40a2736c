//! End-to-end test harness: runs the real `registry-server`, `node-agent`
//! and `registry-ctl` binaries as child processes on loopback and looks at
//! the registry through its gRPC API.
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
//! - [`cluster`]: one test's registry and agents, ListNodes and FindPools
//!   views;
//! - [`ctl`]: a running `registry-ctl watch` whose output the test reads,
//!   and one-shot `registry-ctl` runs ([`ctl::run_ctl`]);
//! - [`engine`]: a fake engine health endpoint a test switches between
//!   ready and not ready.
//!
//! Scenarios:
//! - `tests/e2e.rs`: registration with GPUs and pools, a frozen, a killed
//!   and a terminated agent, and a registry restart;
//! - `tests/feed_and_placement.rs` (issue 10): three agents serving one
//!   model and a running `registry-ctl -o json watch`; one pool's probe
//!   switches to 503 and back, and within one heartbeat interval plus a
//!   stated slack FindPools drops (then offers again) that pool and the
//!   watch prints the node as MODIFIED with the pool's new state;
//! - `tests/drain.rs` (issue 11): `registry-ctl drain --wait` and `undrain`
//!   against one agent whose pool's drain and resume commands append to a
//!   file; a cordon that outlives an agent restart; a drain re-sent to an
//!   agent killed and started again.
//!
//! Polling with deadlines comes from the workspace's test-support crate,
//! shared with the in-process tests of registry-server and node-agent.

pub mod agent;
pub mod binaries;
pub mod cluster;
pub mod ctl;
pub mod engine;
pub mod error;
pub mod process;
pub mod registry;
pub mod replicas;

pub use agent::{AgentProcess, AgentSpec};
pub use cluster::{Cluster, Nodes, expect_status, find_pools, list_nodes};
pub use ctl::{CtlOutput, WatchProcess};
pub use engine::FakeEngine;
pub use error::HarnessError;
pub use registry::{RegistryProcess, Timing};
