//! The RegisterRequest the agent sends: one function, used by the session
//! and by the tests that check the agent and the registry agree.

use registry_proto::pb;

use crate::config::AgentConfig;
use crate::pools::PoolConfig;

/// The registration of this node: its identity and address from `config`,
/// the pools it runs now and its hardware.
pub fn register_request(
    config: &AgentConfig,
    pools: &[PoolConfig],
    capabilities: pb::Capabilities,
) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node_id: config.node_id.clone(),
        machine_id: config.machine_id.clone(),
        address: config.address.clone(),
        pools: pools.iter().map(PoolConfig::spec).collect(),
        capabilities: Some(capabilities),
        agent_version: format!("node-agent {}", env!("CARGO_PKG_VERSION")),
        // Set by `run` once the metrics port is bound (see
        // AgentConfig::advertised_metrics_url); empty when none is served.
        metrics_address: config.metrics_address.clone().unwrap_or_default(),
        models_available: config.models_available.clone(),
        labels: config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}
