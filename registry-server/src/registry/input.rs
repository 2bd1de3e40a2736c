//! What the registry accepts as input: a registration and a heartbeat that
//! passed [`crate::validate`], and the time they happen at. Plain domain
//! types, so the registry core never sees a raw protobuf request or reads a
//! clock.

use chrono::{DateTime, Utc};
use registry_proto::pb;
use tokio::time::Instant;

/// A registration that passed validation: the contract's fields, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// DNS-label node name; the registry's key.
    pub node_id: String,
    /// Host identity, to tell two hosts claiming one node_id apart.
    pub machine_id: String,
    /// Endpoint URL that orchestrators use to reach the node.
    pub address: String,
    /// Pools the node runs, unique by pool_id.
    pub pools: Vec<pb::PoolSpec>,
    /// Hardware of the node, its GPUs kept encoded.
    pub capabilities: crate::hardware::Hardware,
    /// Version of the registering agent, for fleet audits.
    pub agent_version: String,
    /// URL of the agent's Prometheus metrics (empty: none), for service
    /// discovery.
    pub metrics_address: String,
    /// Models staged on disk but not loaded (CLOUD-5010), for ListModels
    /// and the placement index.
    pub models_available: Vec<String>,
    /// Labels that ListNodes filters on.
    pub labels: std::collections::HashMap<String, String>,
}

/// One heartbeat message that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Beat {
    /// The agent's clock when it sent the message.
    pub sent_at: DateTime<Utc>,
    /// The server's clock when the message was validated: read once per
    /// message and reused as last_heartbeat_at and in the ack.
    pub received_at: DateTime<Utc>,
    /// Status of every pool, unique by pool_id.
    pub pools: Vec<pb::PoolStatus>,
    /// Live GPU figures; empty when the agent sent none.
    pub gpus: Vec<pb::GpuStats>,
}

/// Both clocks, read once by the caller (the gRPC service or the expiry
/// loop) and passed in, so the registry itself never reads a clock: its
/// rules are plain functions of their inputs, and tests drive them with
/// tokio's paused clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for deadlines and retention.
    pub at: Instant,
    /// Wall-clock time, for the timestamps operators read.
    pub wall: DateTime<Utc>,
}

impl Now {
    /// Reads both clocks.
    pub fn read() -> Self {
        Self {
            at: Instant::now(),
            wall: Utc::now(),
        }
    }
}

/// `items` in an allocation of their own length, for lists kept as long as
/// a node or a view lives: prost's decoder grows a repeated field by
/// doubling from four, so two pools held room for four (~400 bytes per
/// registration, ~240 per view's pool status). A copy only where there is
/// spare room. Not `Vec::shrink_to_fit`: mimalloc's realloc keeps a block
/// in place when the new size is at least half the old, and collecting
/// `into_iter()` reuses the allocation; `extend` into a fresh vector does
/// neither.
pub(crate) fn fitted<T>(items: Vec<T>) -> Vec<T> {
    if items.capacity() == items.len() {
        return items;
    }
    let mut fitted = Vec::with_capacity(items.len());
    fitted.extend(items);
    fitted
}
