//! What the workspace's tests share, so each exists once:
//!
//! - [`wait`]: polling a condition until a deadline ([`eventually`]), with
//!   the last reason it did not hold in the panic;
//! - [`registry`]: a registry-server served in-process on `127.0.0.1:0`,
//!   stopped and restarted on the same address ([`TestRegistry`]);
//! - [`follower`]: a follower replica stand-in that refuses writes with
//!   the leader's URL and answers reads marked stale ([`Follower`]);
//! - [`pki`]: a CA and leaf certificates made at run time ([`Pki`]);
//! - [`fixtures`]: valid Register and Heartbeat requests and the session a
//!   Register returns;
//! - [`logs`]: logs of a failing test on request ([`init_logs`]) and
//!   captured logs to assert on ([`LogCapture`]);
//! - [`etcd`]: a real etcd cluster on loopback ([`etcd::EtcdCluster`]);
//! - [`http`]: a plain GET and Prometheus samples of a metrics port;
//! - [`health`]: a registry's gRPC health per service, and whether it leads.
//!
//! Only tests and the bench use it: registry-server and node-agent list it
//! as a dev-dependency (registry-server's unit tests in `src/` cannot, as
//! this crate depends on registry-server), integration-tests and bench (the
//! etcd cluster of its replicas scenario) as a dependency.

pub mod etcd;
pub mod fixtures;
pub mod follower;
pub mod health;
pub mod http;
pub mod logs;
pub mod pki;
pub mod registry;
pub mod wait;

pub use fixtures::Session;
pub use follower::Follower;
pub use logs::{LogCapture, init_logs};
pub use pki::Pki;
pub use registry::TestRegistry;
pub use wait::{eventually, poll_until};
