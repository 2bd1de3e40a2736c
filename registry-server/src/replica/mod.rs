//! Several registry replicas on etcd: which one leads, and what that
//! changes for the calls a replica answers.
//!
//! Why it looks like this:
//! - [`ReplicaRole`] is the one thing the service asks before a write: a
//!   single registry (embedded or memory store) always leads; a replica
//!   leads only while its etcd lease surely holds ([`Term::holds`], read
//!   on every write and every heartbeat message, so a process resumed
//!   after a freeze does not act as leader for even one message).
//! - A term's `lost` token ends every heartbeat stream opened under it
//!   with UNAVAILABLE the moment the replica steps down; agents then find
//!   the new leader.
//! - A follower refuses writes with UNAVAILABLE and the leader's URL in
//!   the `registry-leader` metadata; it answers reads from its copy of the
//!   durable records (see `registry::mirror`) with `registry-role:
//!   follower` and `registry-stale` saying what that copy lacks.

mod role;
mod supervisor;
#[cfg(test)]
mod tests;

pub use role::{
    FOLLOWER_STALENESS, Holds, LEADER_METADATA, ROLE_METADATA, ReplicaRole, STALE_METADATA, Term,
};
pub use supervisor::{
    Coordinator, ExpiryStopped, LEADER_HEALTH_SERVICE, Lead, MirrorEvent, Replica,
};
