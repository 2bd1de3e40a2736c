//! The change feed's unit: one [`Event`] per change a reader can see,
//! produced by the registry core in revision order and shared (never deep
//! copied) by everything downstream: the watch history and watchers, the
//! placement index, and later the durable store and agent commands.

use std::sync::Arc;

use registry_proto::pb;

/// What happened to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The node was registered for the first time (or after it was removed).
    Added,
    /// Something a reader can see changed: a re-registration with other
    /// fields, ONLINE↔OFFLINE, a material pool status change.
    Modified,
    /// The node was deregistered or removed after its retention; `node` is
    /// its final state.
    Deleted,
}

/// One change of one node, at one registry-wide revision.
#[derive(Debug, Clone)]
pub struct Event {
    /// The registry-wide revision this change created; strictly increasing.
    pub revision: u64,
    /// What happened.
    pub kind: EventKind,
    /// The node's read view after the change (its final state for
    /// `Deleted`), built once and shared by every consumer.
    pub node: Arc<pb::Node>,
}
