//! registry-server: the control plane's authoritative view of GPU nodes,
//! their GPUs and the pools they run, served over gRPC (`registry.v1`).
//!
//! Module map:
//! - [`registry`]: node state, sessions, liveness and the deadline rules,
//!   with the mass-failure guard and stall grace (`registry/guard.rs`);
//! - [`schedule`]: the deadline queue (one entry per listed node);
//! - [`expiry`]: the task that enforces deadlines and retention;
//! - [`validate`]: input rules applied before any state changes;
//! - [`service`]: the tonic adapter, heartbeat streams included;
//! - [`placement`]: the model → pools index behind FindPools and
//!   ListModels, fed by [`events::Event`]s;
//! - [`view`]: a node's read view, its GPU figures ([`figures`]) and pool
//!   status ([`pool_reports`]) kept compact;
//! - [`events`]: the change feed (revision, history, subscribers);
//!   [`watch`]: WatchNodes streams;
//! - [`server`]: wiring with health and reflection, graceful shutdown;
//! - [`metrics`]: Prometheus metrics; [`grpc_metrics`]: per-RPC metrics;
//!   [`process`]: process metrics; [`metrics_port`]: the metrics port (`/metrics`,
//!   `/health`, service discovery from [`sd`]);
//! - [`auth`]: bearer tokens and roles; [`identity`]: mTLS client names;
//! - [`limits`]: the connection cap;
//! - [`config`]: command line and environment settings.

pub mod admission;
pub mod auth;
pub mod budget;
pub mod config;
pub mod connection_threads;
pub mod error;
pub mod events;
pub mod expiry;
pub mod figures;
pub mod grpc_metrics;
pub mod hardware;
pub mod huge_pages;
pub mod identity;
pub mod lag;
pub mod limits;
pub mod metrics;
pub mod metrics_port;
pub mod packed_strings;
pub mod placement;
pub mod pool_reports;
pub mod pool_specs;
pub mod process;
pub mod registry;
pub mod replica;
pub mod schedule;
pub mod sd;
pub mod server;
pub mod service;
pub mod signal;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod validate;
pub mod view;
pub mod watch;

pub use config::{RevisionBase, Settings};
pub use error::RegistryError;
pub use server::{Replicas, ServerError, run, run_replica, run_with_metrics};
