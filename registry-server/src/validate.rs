//! Validation of everything a client sends, before any state is touched.
//!
//! The rules themselves live in [`registry_proto::rules`], shared with
//! node-agent so both sides agree on what is valid; this module applies
//! them and turns a broken rule into [`RegistryError::InvalidArgument`]
//! naming the field, so a bad request is refused whole and no node's data
//! changes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use registry_proto::convert::from_proto_timestamp;
use registry_proto::pb;
use registry_proto::rules::{self, Field};

use crate::error::RegistryError;
use crate::hardware::Hardware;
use crate::registry::{
    Beat, DrainRequest, Liveness, NewRegistration, NodeFilter, Registration, fitted,
};

pub use registry_proto::rules::{
    MAX_ADDRESS_LEN, MAX_GPUS, MAX_ID_LEN, MAX_LABELS, MAX_MACHINE_ID_LEN, MAX_POOLS, MAX_TEXT_LEN,
};

/// Checks a RegisterRequest and turns it into a [`Registration`].
pub fn registration(req: pb::RegisterRequest) -> Result<Registration, RegistryError> {
    rules::register_request(&req)?;
    let capabilities = Hardware::new(req.capabilities.unwrap_or_default());
    Ok(Registration::from(NewRegistration {
        node_id: req.node_id,
        machine_id: req.machine_id,
        address: req.address,
        pools: req.pools.into(),
        capabilities,
        agent_version: req.agent_version,
        labels: req.labels.into(),
        metrics_address: req.metrics_address,
        models_available: fitted(req.models_available),
    }))
}

/// Checks the payload of a heartbeat message (not its node or session,
/// which the stream checks) against the server's clock `now`.
pub fn beat(
    req: &mut pb::HeartbeatRequest,
    now: DateTime<Utc>,
    max_clock_skew: Duration,
) -> Result<Beat, RegistryError> {
    let sent_at = req
        .sent_at
        .as_ref()
        .ok_or_else(|| RegistryError::invalid("sent_at", "is required"))?;
    let sent_at = from_proto_timestamp(sent_at)
        .ok_or_else(|| RegistryError::invalid("sent_at", "is not a valid timestamp"))?;
    let skew = (sent_at - now).abs().to_std().unwrap_or(Duration::MAX);
    if skew > max_clock_skew {
        return Err(RegistryError::invalid(
            "sent_at",
            format!(
                "{sent_at} is {} away from the registry's clock {now}; at most {} is allowed (check the node's clock)",
                humantime::format_duration(Duration::from_secs(skew.as_secs())),
                humantime::format_duration(max_clock_skew),
            ),
        ));
    }
    rules::pool_statuses(&req.pools)?;
    rules::gpu_stats(&req.gpus)?;
    Ok(Beat {
        sent_at,
        received_at: now,
        pools: std::mem::take(&mut req.pools),
        gpus: std::mem::take(&mut req.gpus),
    })
}

/// Longest drain deadline accepted: far beyond any maintenance window,
/// and small enough that clock arithmetic on it cannot overflow.
pub const MAX_DRAIN_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks a DrainNodeRequest: node_id, each pool id (well formed, at most
/// [`MAX_POOLS`], no repeats), the reason as text and a deadline between
/// zero (none) and [`MAX_DRAIN_DEADLINE`]. Whether each pool belongs to the node is the
/// registry's check, under the node's lock.
pub fn drain(req: pb::DrainNodeRequest) -> Result<DrainRequest, RegistryError> {
    node_id("node_id", &req.node_id)?;
    rules::at_most("pool_ids".into(), req.pool_ids.len(), MAX_POOLS)?;
    {
        let mut seen = rules::Seen::default();
        for (index, id) in req.pool_ids.iter().enumerate() {
            let field = Field::Entry {
                list: "pool_ids",
                index,
            };
            rules::pool_id(field, id)?;
            rules::unique(&mut seen, field, id)?;
        }
    }
    rules::text("reason".into(), &req.reason)?;
    let deadline = match req.deadline {
        None => None,
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            return Err(RegistryError::invalid(
                "deadline",
                "must not be negative (absent or zero: no deadline)",
            ));
        }
        Some(d) if d.nanos >= 1_000_000_000 || d.seconds as u64 > MAX_DRAIN_DEADLINE.as_secs() => {
            return Err(RegistryError::invalid(
                "deadline",
                format!(
                    "must be a valid duration of at most {}",
                    humantime::format_duration(MAX_DRAIN_DEADLINE)
                ),
            ));
        }
        Some(d) => {
            let d = Duration::new(d.seconds as u64, d.nanos as u32);
            (!d.is_zero()).then_some(d)
        }
    };
    Ok(DrainRequest {
        pool_ids: req.pool_ids,
        reason: req.reason,
        deadline,
    })
}

/// A node id: a DNS label (1-63 characters of `[a-z0-9-]`, starting and
/// ending with a letter or digit), so it is safe in hostnames, URLs, metric
/// labels and logs.
pub fn node_id(field: &str, id: &str) -> Result<(), RegistryError> {
    Ok(rules::node_id(Field::Name(field), id)?)
}

/// The filters ListNodes and WatchNodes share (status, pool_id, labels),
/// checked and turned into a [`NodeFilter`] (its `model` unset: WatchNodes
/// adds it).
pub fn node_filter(
    status: i32,
    pool_id: &str,
    labels: &std::collections::HashMap<String, String>,
) -> Result<NodeFilter, RegistryError> {
    let status = match pb::NodeStatus::try_from(status) {
        Ok(pb::NodeStatus::Unspecified) => None,
        Ok(pb::NodeStatus::Online) => Some(Liveness::Online),
        Ok(pb::NodeStatus::Offline) => Some(Liveness::Offline),
        Err(_) => {
            return Err(RegistryError::invalid(
                "status",
                format!("{status} is not a known NodeStatus"),
            ));
        }
    };
    if pool_id.len() > MAX_ID_LEN {
        return Err(RegistryError::invalid(
            "pool_id",
            format!("is longer than {} bytes", MAX_ID_LEN),
        ));
    }
    if labels.len() > MAX_LABELS {
        return Err(RegistryError::invalid(
            "labels",
            format!("has more than {} entries", MAX_LABELS),
        ));
    }
    Ok(NodeFilter {
        status,
        pool_id: (!pool_id.is_empty()).then(|| pool_id.to_string()),
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        model: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_requests_are_checked_field_by_field() {
        let good = pb::DrainNodeRequest {
            node_id: "n1".into(),
            pool_ids: vec!["pool-0".into(), "pool-1".into()],
            reason: "kernel upgrade".into(),
            deadline: Some(prost_types::Duration {
                seconds: 90,
                nanos: 0,
            }),
        };
        let checked = drain(good.clone()).unwrap();
        assert_eq!(checked.pool_ids, ["pool-0", "pool-1"]);
        assert_eq!(checked.deadline, Some(Duration::from_secs(90)));
        let zero = pb::DrainNodeRequest {
            deadline: Some(prost_types::Duration::default()),
            ..good.clone()
        };
        assert_eq!(drain(zero).unwrap().deadline, None, "zero: no deadline");

        let field_of = |req: pb::DrainNodeRequest| match drain(req) {
            Err(RegistryError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut twice = good.clone();
        twice.pool_ids[1] = "pool-0".into();
        assert_eq!(field_of(twice), "pool_ids[1]");
        let mut bad_id = good.clone();
        bad_id.pool_ids[0] = "pool 0".into();
        assert_eq!(field_of(bad_id), "pool_ids[0]");
        let mut long = good.clone();
        long.reason = "r".repeat(MAX_TEXT_LEN + 1);
        assert_eq!(field_of(long), "reason");
        let mut negative = good.clone();
        negative.deadline = Some(prost_types::Duration {
            seconds: 0,
            nanos: -1,
        });
        assert_eq!(field_of(negative), "deadline");
        let mut endless = good.clone();
        endless.deadline = Some(prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        });
        assert_eq!(field_of(endless), "deadline");
        let mut unnamed = good;
        unnamed.node_id = "Node_1".into();
        assert_eq!(field_of(unnamed), "node_id");
    }

    fn good_register() -> pb::RegisterRequest {
        pb::RegisterRequest {
            node_id: "gpu-node-1".into(),
            machine_id: "4c4c4544004d3510".into(),
            address: "http://10.0.0.5:9200".into(),
            pools: vec![pb::PoolSpec {
                pool_id: "pool-0".into(),
                engine: "llamacpp".into(),
                model: "llama-3.1-8b-instruct".into(),
                slots_total: 4,
                gpu_indices: vec![0],
                engine_version: "b3000".into(),
                metrics_url: "http://10.0.0.5:8080/metrics".into(),
                endpoint: "http://10.0.0.5:8080".into(),
                mig_uuids: Vec::new(),
            }],
            capabilities: Some(pb::Capabilities {
                gpus: vec![pb::GpuInfo {
                    index: 0,
                    uuid: "GPU-1".into(),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_bytes: 80 << 30,
                    compute_capability: "9.0".into(),
                    pci_bus_id: String::new(),
                    mig_enabled: false,
                    ..Default::default()
                }],
                cpu_cores: 64,
                ram_total_bytes: 512 << 30,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
            }),
            agent_version: "node-agent 0.1.0".into(),
            labels: [("zone".to_string(), "eu-1".to_string())].into(),
            metrics_address: "http://10.0.0.5:9101/metrics".into(),
            models_available: vec!["qwen2.5-7b".into()],
        }
    }

    fn good_beat() -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            node_id: "gpu-node-1".into(),
            session_id: 1,
            sent_at: Some(registry_proto::convert::to_proto_timestamp(now())),
            pools: vec![pb::PoolStatus {
                pool_id: "pool-0".into(),
                state: pb::PoolState::Ready as i32,
                slots_total: 4,
                slots_free: 2,
                vram_free_bytes: 1 << 30,
                model: "m".into(),
                engine: "llamacpp".into(),
                endpoint: String::new(),
            }],
            gpus: vec![],
            sequence: 1,
            session_secret: "s".repeat(32),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn register_field(mutate: impl FnOnce(&mut pb::RegisterRequest)) -> String {
        let mut req = good_register();
        mutate(&mut req);
        match registration(req) {
            Err(RegistryError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    fn beat_field(mutate: impl FnOnce(&mut pb::HeartbeatRequest)) -> String {
        let mut req = good_beat();
        mutate(&mut req);
        match beat(&mut req, now(), Duration::from_secs(3600)) {
            Err(RegistryError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_complete_registration_passes() {
        let reg = registration(good_register()).unwrap();
        assert_eq!(reg.node_id(), "gpu-node-1");
        assert_eq!(reg.capabilities.gpu_count(), 1);
    }

    #[test]
    fn pool_endpoints_and_staged_models_are_checked_and_kept() {
        let reg = registration(good_register()).unwrap();
        assert_eq!(reg.pools[0].endpoint(), "http://10.0.0.5:8080");
        assert_eq!(*reg.models_available, ["qwen2.5-7b"]);
        assert_eq!(
            register_field(|r| r.pools[0].endpoint = "10.0.0.5:8080".into()),
            "pools[0].endpoint"
        );
        assert_eq!(
            register_field(|r| r.models_available.push(String::new())),
            "models_available[1]"
        );
        assert_eq!(
            beat_field(|b| b.pools[0].endpoint = "ftp://x".into()),
            "pools[0].endpoint"
        );
    }

    #[test]
    fn node_id_must_be_a_dns_label() {
        for bad in [
            "",
            "UPPER",
            "under_score",
            "-lead",
            "trail-",
            "dot.ted",
            "spa ce",
            "ünï",
        ] {
            assert_eq!(
                register_field(|r| r.node_id = bad.into()),
                "node_id",
                "{bad:?}"
            );
        }
        assert_eq!(register_field(|r| r.node_id = "a".repeat(64)), "node_id");
        for good in ["a", "0", "gpu-node-1", &"a".repeat(63)] {
            node_id("node_id", good).unwrap();
        }
    }

    #[test]
    fn machine_id_is_required_and_bounded() {
        assert_eq!(register_field(|r| r.machine_id.clear()), "machine_id");
        assert_eq!(
            register_field(|r| r.machine_id = "x".repeat(129)),
            "machine_id"
        );
        assert_eq!(
            register_field(|r| r.machine_id = "a b".into()),
            "machine_id"
        );
    }

    #[test]
    fn address_must_be_an_http_url_with_a_host() {
        for bad in [
            "",
            "not a url",
            "ftp://host/",
            "10.0.0.1:9200",
            "http://",
            "http:///path",
        ] {
            assert_eq!(
                register_field(|r| r.address = bad.into()),
                "address",
                "{bad:?}"
            );
        }
        let long = format!("http://h/{}", "p".repeat(MAX_ADDRESS_LEN));
        assert_eq!(register_field(|r| r.address = long), "address");
        rules::address("address".into(), "https://gpu-1.example:9200/v1").unwrap();
        rules::address("address".into(), "http://[::1]:9200").unwrap();
    }

    #[test]
    fn pools_are_bounded_valid_and_unique() {
        let pool = |id: &str| pb::PoolSpec {
            pool_id: id.into(),
            ..Default::default()
        };
        assert_eq!(
            register_field(|r| r.pools = (0..65).map(|i| pool(&format!("p{i}"))).collect()),
            "pools"
        );
        assert_eq!(
            register_field(|r| r.pools = vec![pool("a"), pool("a")]),
            "pools[1].pool_id"
        );
        assert_eq!(
            register_field(|r| r.pools = vec![pool("")]),
            "pools[0].pool_id"
        );
        assert_eq!(
            register_field(|r| r.pools = vec![pool("a b")]),
            "pools[0].pool_id"
        );
        assert_eq!(
            register_field(|r| r.pools[0].model = "m".repeat(MAX_TEXT_LEN + 1)),
            "pools[0].model"
        );
    }

    #[test]
    fn gpus_are_bounded_and_well_formed() {
        assert_eq!(
            register_field(|r| {
                let gpu = r.capabilities.as_ref().unwrap().gpus[0].clone();
                r.capabilities.as_mut().unwrap().gpus = (0..65)
                    .map(|i| pb::GpuInfo {
                        index: i,
                        ..gpu.clone()
                    })
                    .collect();
            }),
            "capabilities.gpus"
        );
        assert_eq!(
            register_field(|r| {
                let caps = r.capabilities.as_mut().unwrap();
                caps.gpus.push(caps.gpus[0].clone());
            }),
            "capabilities.gpus[1].index"
        );
        for bad in ["9", "9.", ".0", "x.y", "1.2.3"] {
            assert_eq!(
                register_field(|r| {
                    r.capabilities.as_mut().unwrap().gpus[0].compute_capability = bad.into()
                }),
                "capabilities.gpus[0].compute_capability",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            register_field(
                |r| r.labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect()
            ),
            "labels"
        );
        assert_eq!(
            register_field(|r| r.labels = [("zone".into(), "v".repeat(1 << 20))].into()),
            "labels[\"zone\"]"
        );
        assert_eq!(
            register_field(|r| r.labels = [(String::new(), "v".into())].into()),
            "labels[\"\"]"
        );
    }

    #[test]
    fn a_registration_keeps_no_spare_room() {
        use prost::Message;
        // Decoded as the server decodes them, so the lists have grown.
        let mut register = good_register();
        let mut second = register.pools[0].clone();
        second.pool_id = "pool-1".into();
        second.gpu_indices.clear();
        register.pools.push(second);
        let register = pb::RegisterRequest::decode(&register.encode_to_vec()[..]).unwrap();
        assert!(register.pools.capacity() > 2, "the decoder leaves room");
        let reg = registration(register).unwrap();
        assert_eq!(
            reg.pools.len(),
            2,
            "kept compact, in a list of their length"
        );
        // The GPUs are kept encoded, and read back whole.
        assert_eq!(
            reg.capabilities.to_proto(),
            good_register().capabilities.unwrap()
        );
    }

    #[test]
    fn a_good_beat_passes_and_moves_its_lists() {
        let mut req = good_beat();
        let beat = beat(&mut req, now(), Duration::from_secs(60)).unwrap();
        assert_eq!(beat.pools.len(), 1);
        assert!(req.pools.is_empty(), "pools are moved, not copied");
    }

    #[test]
    fn beat_rules() {
        assert_eq!(beat_field(|b| b.sent_at = None), "sent_at");
        assert_eq!(
            beat_field(|b| b.sent_at = Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -1
            })),
            "sent_at"
        );
        let far = |secs: i64| {
            Some(prost_types::Timestamp {
                seconds: now().timestamp() + secs,
                nanos: 0,
            })
        };
        assert_eq!(beat_field(|b| b.sent_at = far(3601)), "sent_at");
        assert_eq!(beat_field(|b| b.sent_at = far(-3601)), "sent_at");
        assert_eq!(beat_field(|b| b.pools[0].state = 0), "pools[0].state");
        assert_eq!(beat_field(|b| b.pools[0].state = 99), "pools[0].state");
        assert_eq!(
            beat_field(|b| b.pools[0].slots_free = 5),
            "pools[0].slots_free"
        );
        assert_eq!(
            beat_field(|b| b.pools.push(b.pools[0].clone())),
            "pools[1].pool_id"
        );
        assert_eq!(
            beat_field(|b| b.pools = vec![b.pools[0].clone(); 10_000]),
            "pools"
        );
        assert_eq!(
            beat_field(|b| b.gpus = vec![pb::GpuStats {
                utilization_percent: 101,
                ..Default::default()
            }]),
            "gpus[0].utilization_percent"
        );
    }

    #[test]
    fn long_values_are_not_echoed_whole() {
        let err = registration(pb::RegisterRequest {
            node_id: "X".repeat(1 << 20),
            ..good_register()
        })
        .unwrap_err();
        assert!(err.to_string().len() < 200, "{}", err.to_string().len());
        assert!(rules::quoted(&"y".repeat(1000)).len() < 100);
    }
}
