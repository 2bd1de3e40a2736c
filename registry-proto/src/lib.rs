//! The `registry.v1` protobuf contract shared by registry-server, node-agent
//! and the tests: message types, the `NodeRegistry` client and server stubs,
//! and the encoded descriptor set that server reflection serves; and the
//! reconnect [`backoff`] both clients of the contract (node-agent and
//! fleet-sim) use.

pub mod backoff;
pub mod codec;
pub mod endpoints;
pub mod gpu_figures;
pub mod replica;
pub mod retry;
pub mod rules;
pub mod status;

/// Generated types and stubs of the `registry.v1` package.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("registry.v1");
}

/// The name under which the registry's gRPC health service reports whether
/// it trusts its own liveness judgement: SERVING normally, NOT_SERVING while
/// it doubts itself (the mass-failure guard holds nodes, or nodes are
/// suspect after a stall or restart). The whole server ("") stays SERVING
/// meanwhile; `registry-ctl health` asks this name too and prints a
/// `degraded` line. Not a service of the contract, only a health entry.
pub const LIVENESS_HEALTH_SERVICE: &str = "registry.v1.NodeRegistry/liveness";

/// Encoded `FileDescriptorSet` of `registry.v1`, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("registry_v1_descriptor");

/// Conversions between protobuf well-known types and std / chrono types.
pub mod convert {
    use std::time::Duration;

    /// A `std::time::Duration` as a protobuf `Duration` (saturating).
    pub fn to_proto_duration(d: Duration) -> prost_types::Duration {
        prost_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }
    }

    /// A protobuf `Duration` as a `std::time::Duration`; `None` when it is
    /// negative or malformed.
    pub fn from_proto_duration(d: &prost_types::Duration) -> Option<Duration> {
        if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
            return None;
        }
        Some(Duration::new(d.seconds as u64, d.nanos as u32))
    }

    /// A `chrono` UTC time as a protobuf `Timestamp`.
    pub fn to_proto_timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
        }
    }

    /// A protobuf `Timestamp` as a `chrono` UTC time; `None` when it is out of
    /// range or malformed.
    pub fn from_proto_timestamp(
        t: &prost_types::Timestamp,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        if t.nanos < 0 || t.nanos >= 1_000_000_000 {
            return None;
        }
        chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn durations_round_trip() {
            let d = Duration::from_millis(1500);
            assert_eq!(from_proto_duration(&to_proto_duration(d)), Some(d));
            assert_eq!(
                from_proto_duration(&prost_types::Duration {
                    seconds: -1,
                    nanos: 0
                }),
                None
            );
        }

        #[test]
        fn timestamps_round_trip_and_reject_garbage() {
            let t = chrono::DateTime::from_timestamp(1_700_000_000, 42).unwrap();
            assert_eq!(from_proto_timestamp(&to_proto_timestamp(t)), Some(t));
            let bad = prost_types::Timestamp {
                seconds: 0,
                nanos: -5,
            };
            assert_eq!(from_proto_timestamp(&bad), None);
            let huge = prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            };
            assert_eq!(from_proto_timestamp(&huge), None);
        }
    }
}
