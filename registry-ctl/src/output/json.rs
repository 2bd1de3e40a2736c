//! Proto3 canonical JSON of prost messages, by transcoding them through
//! the descriptor sets of registry.v1 and grpc.health.v1 with
//! prost-reflect: no hand-written mapping to keep in step with the proto.

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use registry_proto::pb;
use tonic_health::pb::HealthCheckResponse;

use crate::error::CtlError;

/// A prost message that can be printed as JSON: one `impl` per message
/// type, naming it as the descriptor set does.
pub trait ProtoMessage: prost::Message {
    /// The message's full protobuf name ("registry.v1.Node").
    const FULL_NAME: &'static str;
}

impl ProtoMessage for pb::Node {
    const FULL_NAME: &'static str = "registry.v1.Node";
}

impl ProtoMessage for pb::FindPoolsResponse {
    const FULL_NAME: &'static str = "registry.v1.FindPoolsResponse";
}

impl ProtoMessage for pb::ListModelsResponse {
    const FULL_NAME: &'static str = "registry.v1.ListModelsResponse";
}

impl ProtoMessage for pb::WatchNodesResponse {
    const FULL_NAME: &'static str = "registry.v1.WatchNodesResponse";
}

impl ProtoMessage for HealthCheckResponse {
    const FULL_NAME: &'static str = "grpc.health.v1.HealthCheckResponse";
}

/// Turns prost messages into proto3 JSON lines.
#[derive(Debug)]
pub struct JsonTranscoder {
    /// registry.v1, its imports (google.protobuf well-known types) and
    /// grpc.health.v1.
    pool: DescriptorPool,
}

impl JsonTranscoder {
    /// Decodes the descriptor sets compiled into registry-proto and
    /// tonic-health.
    pub fn new() -> Result<Self, CtlError> {
        let broken = |why: prost_reflect::DescriptorError| CtlError::Json {
            message: "the descriptor set",
            why: why.to_string(),
        };
        let mut pool =
            DescriptorPool::decode(registry_proto::FILE_DESCRIPTOR_SET).map_err(broken)?;
        pool.decode_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .map_err(broken)?;
        Ok(JsonTranscoder { pool })
    }

    /// `message` as one line of proto3 canonical JSON: lowerCamelCase
    /// names, enums by name, Timestamps in RFC 3339, 64-bit integers as
    /// strings, fields at their default value left out.
    pub fn to_line<M: ProtoMessage>(&self, message: &M) -> Result<String, CtlError> {
        let failed = |why: String| CtlError::Json {
            message: M::FULL_NAME,
            why,
        };
        let descriptor = self
            .pool
            .get_message_by_name(M::FULL_NAME)
            .ok_or_else(|| failed("not in the descriptor set".to_owned()))?;
        let mut dynamic = DynamicMessage::new(descriptor);
        dynamic
            .transcode_from(message)
            .map_err(|err| failed(err.to_string()))?;
        let mut line = Vec::new();
        let mut serializer = serde_json::Serializer::new(&mut line);
        dynamic
            .serialize_with_options(&mut serializer, &SerializeOptions::new())
            .map_err(|err| failed(err.to_string()))?;
        String::from_utf8(line).map_err(|err| failed(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::node::tests::sample_node;

    #[test]
    fn the_well_known_types_are_in_the_pool() {
        let json = JsonTranscoder::new().unwrap();
        for name in [
            "google.protobuf.Timestamp",
            "google.protobuf.Duration",
            pb::Node::FULL_NAME,
            pb::FindPoolsResponse::FULL_NAME,
            pb::ListModelsResponse::FULL_NAME,
            HealthCheckResponse::FULL_NAME,
        ] {
            assert!(json.pool.get_message_by_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn a_node_is_canonical_proto3_json() {
        let line = JsonTranscoder::new()
            .unwrap()
            .to_line(&sample_node())
            .unwrap();
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["nodeId"], "gpu-node-1");
        assert_eq!(value["machineId"], "machine-1");
        assert_eq!(value["status"], "NODE_STATUS_ONLINE");
        assert_eq!(value["sessionId"], "18446744073709551615");
        assert_eq!(value["registeredAt"], "2026-11-23T10:00:00Z");
        assert_eq!(value["lastHeartbeatAt"], "2026-11-23T11:59:58.500Z");
        assert_eq!(value["labels"]["zone"], "eu-1");
        assert_eq!(value["pools"][0]["poolId"], "pool-0");
        assert_eq!(value["poolStatus"][0]["state"], "POOL_STATE_READY");
        let gpu = &value["capabilities"]["gpus"][0];
        assert_eq!(gpu["memoryTotalBytes"], "85899345920");
        assert_eq!(gpu["name"], "NVIDIA H100 80GB HBM3");
        // Index 0 is the default value: proto3 JSON leaves it out.
        assert!(gpu.get("index").is_none(), "{gpu}");
        assert_eq!(value["gpuStats"][0]["temperatureCelsius"], 41);
    }

    #[test]
    fn health_answers_are_json_too() {
        let answer = HealthCheckResponse {
            status: tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        };
        let line = JsonTranscoder::new().unwrap().to_line(&answer).unwrap();
        assert_eq!(line, r#"{"status":"SERVING"}"#);
    }
}
