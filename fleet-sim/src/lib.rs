//! fleet-sim: many virtual node-agents in one process, for load and failure
//! tests of a registry.
//!
//! Every virtual node registers with its own node_id, fake GPUs and pools,
//! holds its own Heartbeat stream and sends on it every interval with jitter,
//! like node-agent does. Nodes re-register (with backoff and jitter) when the
//! registry answers NOT_FOUND or FAILED_PRECONDITION, and reconnect with
//! their session when the connection drops, so a registry restart (with or
//! without its store) can be simulated too.
//!
//! Module map:
//! - [`config`]: the options (shared by the `fleet-sim` binary and `bench`);
//! - [`fleet`]: starts the nodes, controls them (interval, silence), stops;
//! - [`node`]: one virtual agent's life, and the state all of a fleet's
//!   nodes share;
//! - [`fake`]: the registration and heartbeat payloads a node sends;
//! - [`stats`]: counters and latency histograms, snapshots and the report;
//! - [`limits`]: the open-file limit and 4 KiB pages;
//! - [`error`]: why a fleet could not start.
//!
//! Retry delays come from [`registry_proto::backoff`], the backoff
//! node-agent uses too.

pub mod config;
pub mod error;
pub mod fake;
pub mod fleet;
pub mod limits;
pub mod node;
pub mod stats;

pub use config::FleetConfig;
pub use error::SimError;
pub use fleet::{Fleet, run};
pub use stats::{LatencySummary, Report, Snapshot, Stats, WindowLatency};
