//! What the registry accepts as input: a registration and a heartbeat that
//! passed [`crate::validate`]. Plain domain types, so the registry core never
//! sees a raw protobuf request.

use chrono::{DateTime, Utc};
use registry_proto::pb;

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
    /// Hardware of the node.
    pub capabilities: pb::Capabilities,
    /// Version of the registering agent, for fleet audits.
    pub agent_version: String,
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
