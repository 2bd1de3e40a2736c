//! What FindPools and ListModels answer.

use std::collections::HashMap;

use registry_proto::pb;

/// One pool that can take the model's requests now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The node running the pool.
    pub node_id: String,
    /// The pool.
    pub pool_id: String,
    /// Where its engine takes requests (reported, else registered).
    pub endpoint: String,
    /// The model it serves.
    pub model: String,
    /// Its engine.
    pub engine: String,
    /// Free slots in the latest heartbeat (a score input).
    pub slots_free: u32,
    /// Total slots, to judge how loaded the pool is.
    pub slots_total: u32,
    /// Free VRAM in the latest heartbeat (the first score input).
    pub vram_free_bytes: u64,
    /// The node's address.
    pub node_address: String,
    /// The node's labels, so the caller can see why it matched.
    pub labels: HashMap<String, String>,
    /// The MIG slices the pool runs on, so the caller knows which slice
    /// it got; empty for a pool on whole GPUs.
    pub mig_uuids: Vec<String>,
    /// The profile those slices share ("1g.10gb"); empty otherwise.
    pub mig_profile: String,
}

/// FindPools' answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Best first, at most the query's limit.
    pub candidates: Vec<Candidate>,
    /// The revision of the latest event the index had applied.
    pub revision: u64,
}

/// One pool serving a model, for ListModels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPool {
    /// The node running the pool.
    pub node_id: String,
    /// The pool.
    pub pool_id: String,
    /// Its engine.
    pub engine: String,
    /// Its reported state; `None` before the node's first heartbeat.
    pub state: Option<pb::PoolState>,
    /// The node's liveness.
    pub node_status: pb::NodeStatus,
    /// Total slots.
    pub slots_total: u32,
    /// Free slots in the latest heartbeat.
    pub slots_free: u32,
    /// Whether FindPools could offer it, slot and VRAM minimums aside.
    pub ready: bool,
}

/// Where one model is served or staged (ListModels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAvailability {
    /// The model.
    pub model: String,
    /// Every pool serving it, by (node_id, pool_id).
    pub pools: Vec<ModelPool>,
    /// Distinct nodes with a pool serving it.
    pub nodes_serving: u32,
    /// Pools that are `ready`.
    pub pools_ready: u32,
    /// Slots of every pool serving it.
    pub slots_total: u32,
    /// Free slots of the ready pools: what can be used now.
    pub slots_free: u32,
    /// Nodes with it staged on disk but no pool serving it, by id.
    pub staged_on: Vec<String>,
}

/// ListModels' answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelList {
    /// By model name.
    pub models: Vec<ModelAvailability>,
    /// The revision of the latest event the index had applied.
    pub revision: u64,
}
