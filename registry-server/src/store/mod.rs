//! What survives a registry restart: each node's durable record
//! (registration, session id, a hash of the session secret, first
//! registration time) and the admin state (cordon, drain) by node id.
//!
//! Why it looks like this:
//! - [`Store`] is a small object-safe trait with futures for answers, so a
//!   networked backend (etcd, for replicas) can be added without touching
//!   the registry core. Backends: [`memory::MemoryStore`] (nothing
//!   survives; the tests' default) and [`embedded::EmbeddedStore`] (one
//!   redb file under `--data-dir`).
//! - A write is *queued* when the method is called, not when its future is
//!   first polled: the registry calls it under the node's lock, so the
//!   store sees each node's writes in the order the registry applied them,
//!   and the caller awaits the commit after releasing every lock.
//! - Heartbeats are never written: liveness and pool status are memory
//!   only. A record changes only on register, deregister, removal after
//!   retention and admin changes.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use registry_proto::pb;

use crate::registry::Registration;

pub mod embedded;
pub mod etcd;
pub mod memory;
mod record;

pub use embedded::EmbeddedStore;
pub use memory::MemoryStore;

/// The answer to one write: `Ok` once it is durable.
pub type Commit = BoxFuture<'static, Result<(), StoreError>>;

/// A node's durable record: what a restarted registry needs to list the
/// node and accept its agent's existing session without a new Register.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// The latest accepted registration (node info, pools, labels).
    pub registration: Registration,
    /// The current session, which the agent's heartbeat stream names.
    pub session_id: u64,
    /// SHA-256 of the session secret: enough to check the agent's secret,
    /// useless to someone who reads the store file.
    pub secret_sha256: [u8; 32],
    /// When the node was first registered (kept across re-registrations).
    pub registered_at: DateTime<Utc>,
}

/// Everything a store holds, read once at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// Every node's durable record.
    pub nodes: Vec<NodeRecord>,
    /// Admin state by node id, including nodes that are not registered
    /// (a node deregistered while cordoned stays cordoned).
    pub admin: Vec<(String, pb::AdminState)>,
    /// The latest ONLINE↔OFFLINE transition by node id, for the nodes
    /// that had one since their registration.
    pub liveness: Vec<(String, LivenessRecord)>,
}

/// A node's latest ONLINE↔OFFLINE transition, as the leader recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessRecord {
    /// ONLINE (true) or OFFLINE.
    pub online: bool,
    /// When the transition happened.
    pub since: DateTime<Utc>,
}

/// Why the store cannot be opened, read or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store file cannot be opened (unreadable, corrupt, locked by
    /// another process); the server refuses to start.
    #[error(
        "the store file {path} cannot be opened: {reason} (fix or move it away, or start with --reset-store to discard it)"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A record in the store cannot be decoded; the server refuses to start
    /// rather than silently drop the node.
    #[error(
        "the store file {path} holds an unreadable record for {key}: {reason} (start with --reset-store to discard the store)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The record's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A write failed or the store is closed; the caller's change is not
    /// durable.
    #[error("the store could not write: {0}")]
    Write(String),
}

/// Where the registry keeps what survives a restart. Writes are grouped by
/// the backend (group commit); each future answers once its write is
/// durable or failed.
pub trait Store: Send + Sync + 'static {
    /// Everything stored, read once at start before the server serves.
    fn load(&self) -> BoxFuture<'static, Result<Loaded, StoreError>>;
    /// Writes a node's record (register, re-register), replacing the old.
    fn put_node(&self, record: NodeRecord) -> Commit;
    /// Deletes a node's record and its liveness record (deregister, removal
    /// after retention); its admin state stays.
    fn delete_node(&self, node_id: &str) -> Commit;
    /// Writes a node's latest ONLINE↔OFFLINE transition (never a
    /// heartbeat), so a follower's copy and the next leader know which
    /// nodes were OFFLINE. Backends that do not keep it (memory) answer
    /// at once.
    fn put_liveness(&self, node_id: &str, liveness: LivenessRecord) -> Commit {
        let _ = (node_id, liveness);
        Box::pin(std::future::ready(Ok(())))
    }
    /// Writes a node's admin state, or deletes it with `None` (uncordoned
    /// and not draining: nothing to remember).
    fn put_admin(&self, node_id: &str, admin: Option<pb::AdminState>) -> Commit;
    /// Finishes queued writes and releases the store (its file lock), so a
    /// registry restarted in the same process can open it again.
    fn close(&self) -> BoxFuture<'static, ()>;
    /// What to log: the backend and its file.
    fn describe(&self) -> String;
}

/// SHA-256 of a session secret, as the store keeps it.
pub fn secret_sha256(secret: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

/// Opens the store `settings` ask for: `memory`, or the embedded file in
/// the data directory (reset first with `--reset-store`).
pub fn open(settings: &crate::Settings) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match settings.store {
        crate::config::StoreKind::Memory => Ok(std::sync::Arc::new(MemoryStore)),
        // Replicas connect to etcd asynchronously (`etcd::replicas`).
        crate::config::StoreKind::Etcd => Err(StoreError::Open {
            path: PathBuf::from("etcd"),
            reason: "the etcd store is opened by the replica set-up (store::etcd::replicas)".into(),
        }),
        crate::config::StoreKind::Embedded => {
            let path = settings.data_dir.join(embedded::FILE_NAME);
            if settings.reset_store {
                embedded::reset(&path)?;
            }
            Ok(std::sync::Arc::new(EmbeddedStore::open(&path)?))
        }
    }
}
