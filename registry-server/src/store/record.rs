//! How records are encoded: protobuf (prost), so fields can be added later
//! and old files still read. The registration reuses the contract's
//! RegisterRequest, and is checked with the same rules as a Register when
//! it is read back.

use registry_proto::convert::{from_proto_timestamp, to_proto_timestamp};
use registry_proto::pb;

use super::NodeRecord;

/// Format of the records written by this version; a reader refuses a newer
/// one rather than misread it.
pub(super) const FORMAT: u32 = 1;

/// A node's durable record as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredNode {
    /// Record format ([`FORMAT`]).
    #[prost(uint32, tag = "1")]
    pub format: u32,
    /// The registration, as the contract's RegisterRequest.
    #[prost(message, optional, tag = "2")]
    pub registration: Option<pb::RegisterRequest>,
    /// The current session id.
    #[prost(uint64, tag = "3")]
    pub session_id: u64,
    /// SHA-256 of the session secret (32 bytes).
    #[prost(bytes = "vec", tag = "4")]
    pub secret_sha256: Vec<u8>,
    /// When the node was first registered.
    #[prost(message, optional, tag = "5")]
    pub registered_at: Option<prost_types::Timestamp>,
}

/// Encodes a node record.
pub(super) fn encode_node(record: &NodeRecord) -> Vec<u8> {
    use prost::Message;
    let reg = &record.registration;
    StoredNode {
        format: FORMAT,
        registration: Some(pb::RegisterRequest {
            node_id: reg.node_id().to_owned(),
            machine_id: reg.machine_id().to_owned(),
            address: reg.address().to_owned(),
            pools: reg.pools.to_proto(),
            capabilities: Some(reg.capabilities.to_proto()),
            agent_version: reg.agent_version().to_owned(),
            labels: reg.labels.to_map(),
            metrics_address: reg.metrics_address().to_owned(),
            models_available: reg.models_available.to_vec(),
        }),
        session_id: record.session_id,
        secret_sha256: record.secret_sha256.to_vec(),
        registered_at: Some(to_proto_timestamp(record.registered_at)),
    }
    .encode_to_vec()
}

/// Decodes a node record stored under `key`, or says what is wrong.
pub(super) fn decode_node(key: &str, bytes: &[u8]) -> Result<NodeRecord, String> {
    use prost::Message;
    let stored = StoredNode::decode(bytes).map_err(|e| format!("not a node record: {e}"))?;
    if stored.format > FORMAT {
        return Err(format!(
            "record format {} is newer than this registry understands ({FORMAT})",
            stored.format
        ));
    }
    let request = stored.registration.ok_or("no registration")?;
    if request.node_id != key {
        return Err(format!("the record names node {:?}", request.node_id));
    }
    let registration = crate::validate::registration(request).map_err(|e| e.to_string())?;
    let secret_sha256 = <[u8; 32]>::try_from(stored.secret_sha256.as_slice())
        .map_err(|_| "the secret hash is not 32 bytes".to_string())?;
    let registered_at = stored
        .registered_at
        .as_ref()
        .and_then(from_proto_timestamp)
        .ok_or("no valid registered_at")?;
    Ok(NodeRecord {
        registration,
        session_id: stored.session_id,
        secret_sha256,
        registered_at,
    })
}

/// Encodes an admin state.
pub(super) fn encode_admin(admin: &pb::AdminState) -> Vec<u8> {
    prost::Message::encode_to_vec(admin)
}

/// Decodes an admin state.
pub(super) fn decode_admin(bytes: &[u8]) -> Result<pb::AdminState, String> {
    <pb::AdminState as prost::Message>::decode(bytes)
        .map_err(|e| format!("not an admin state: {e}"))
}

/// A node's latest liveness transition as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredLiveness {
    /// ONLINE (true) or OFFLINE.
    #[prost(bool, tag = "1")]
    pub online: bool,
    /// When the transition happened.
    #[prost(message, optional, tag = "2")]
    pub since: Option<prost_types::Timestamp>,
}

/// Encodes a liveness record.
pub(super) fn encode_liveness(liveness: &super::LivenessRecord) -> Vec<u8> {
    use prost::Message;
    StoredLiveness {
        online: liveness.online,
        since: Some(to_proto_timestamp(liveness.since)),
    }
    .encode_to_vec()
}

/// Decodes a liveness record.
pub(super) fn decode_liveness(bytes: &[u8]) -> Result<super::LivenessRecord, String> {
    use prost::Message;
    let stored = StoredLiveness::decode(bytes).map_err(|e| e.to_string())?;
    let since = stored
        .since
        .as_ref()
        .and_then(from_proto_timestamp)
        .ok_or("the transition has no valid time")?;
    Ok(super::LivenessRecord {
        online: stored.online,
        since,
    })
}
