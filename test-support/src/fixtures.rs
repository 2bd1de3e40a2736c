//! Requests that pass the registry's validation, and the session a Register
//! returns. Tests start from these and change what they test.

use registry_proto::convert::to_proto_timestamp;
use registry_proto::pb;

/// A valid registration of `node_id`: one GPU, one pool (`pool-0` on GPU 0,
/// 4 slots) and the label `zone=eu-1`.
pub fn register_request(node_id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node_id: node_id.into(),
        machine_id: format!("machine-{node_id}"),
        address: format!("http://{node_id}.example:9200"),
        pools: vec![pb::PoolSpec {
            pool_id: "pool-0".into(),
            engine: "llamacpp".into(),
            model: "llama-3.1-8b".into(),
            slots_total: 4,
            gpu_indices: vec![0],
            // Fields added to the contract later keep their defaults.
            ..Default::default()
        }],
        capabilities: Some(pb::Capabilities {
            gpus: vec![pb::GpuInfo {
                index: 0,
                uuid: format!("GPU-{node_id}"),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                compute_capability: "9.0".into(),
                pci_bus_id: String::new(),
                mig_enabled: false,
                ..Default::default()
            }],
            cpu_cores: 32,
            ram_total_bytes: 256 << 30,
            driver_version: "550.54.15".into(),
            cuda_version: "12.4".into(),
        }),
        agent_version: "test 0.0.0".into(),
        labels: [("zone".to_string(), "eu-1".to_string())].into(),
        ..Default::default()
    }
}

/// What a Register returned that heartbeats must present.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// RegisterResponse.session_id.
    pub id: u64,
    /// RegisterResponse.session_secret.
    pub secret: String,
}

impl Session {
    /// No session: what a message after the first may send.
    pub fn none() -> Self {
        Self {
            id: 0,
            secret: String::new(),
        }
    }

    /// A made-up session id with no secret.
    pub fn forged(id: u64) -> Self {
        Self {
            id,
            secret: String::new(),
        }
    }
}

impl From<pb::RegisterResponse> for Session {
    fn from(response: pb::RegisterResponse) -> Self {
        Self {
            id: response.session_id,
            secret: response.session_secret,
        }
    }
}

/// A heartbeat of [`register_request`]'s node reporting pool-0 READY, with
/// GPU figures, sent now.
pub fn beat(node_id: &str, session: &Session, sequence: u64) -> pb::HeartbeatRequest {
    beat_in(node_id, session, sequence, pb::PoolState::Ready)
}

/// A heartbeat of [`register_request`]'s node reporting pool-0 in `state`
/// (3 of 4 slots free), with GPU figures, sent now.
pub fn beat_in(
    node_id: &str,
    session: &Session,
    sequence: u64,
    state: pb::PoolState,
) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        node_id: node_id.into(),
        session_id: session.id,
        session_secret: session.secret.clone(),
        sent_at: Some(to_proto_timestamp(chrono::Utc::now())),
        pools: vec![pb::PoolStatus {
            pool_id: "pool-0".into(),
            state: state as i32,
            slots_total: 4,
            slots_free: 3,
            vram_free_bytes: 10 << 30,
            model: "llama-3.1-8b".into(),
            engine: "llamacpp".into(),
            endpoint: String::new(),
        }],
        gpus: vec![pb::GpuStats {
            index: 0,
            memory_used_bytes: 70 << 30,
            memory_free_bytes: 10 << 30,
            utilization_percent: 87,
            temperature_celsius: Some(61),
            ..Default::default()
        }],
        sequence,
    }
}
