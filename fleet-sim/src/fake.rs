//! The payloads a virtual node sends: a registration that looks like a GPU
//! host's (GPUs, pools, labels) and heartbeats with pool and GPU figures.
//! Sizes match a real 8-GPU host, so the registry's memory and encoding costs
//! are realistic; the values are made up and deterministic per node.

use std::time::SystemTime;

use registry_proto::gpu_figures::GoodOrder;
use registry_proto::pb;

/// What a node looks like; fixed for the node's life.
#[derive(Debug, Clone)]
pub struct NodeShape {
    /// The node's index in the fleet (seeds ids and values).
    pub index: usize,
    /// The node's id.
    pub node_id: String,
    /// GPUs the node has.
    pub gpus: u32,
    /// Pools the node runs.
    pub pools: u32,
    /// Whether every heartbeat changes every pool's slots_free.
    pub churn: bool,
    /// Whether heartbeats carry every GPU figure node-agent reads, not
    /// only the basic ones.
    pub all_gpu_figures: bool,
    /// Whether GPU 0 reports UNHEALTHY (XID 79) in every heartbeat; the
    /// others report HEALTHY.
    pub unhealthy_gpu: bool,
}

const GIB: u64 = 1 << 30;
const GPU_MEMORY: u64 = 80 * GIB;
const SLOTS: u32 = 16;

impl NodeShape {
    /// The node's RegisterRequest.
    pub fn registration(&self) -> pb::RegisterRequest {
        let i = self.index;
        let gpus = (0..self.gpus)
            .map(|g| pb::GpuInfo {
                index: g,
                uuid: format!("GPU-{i:08x}-{g:04x}-4000-8000-{:012x}", i * 64 + g as usize),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: GPU_MEMORY,
                compute_capability: "9.0".into(),
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x17 + g),
                mig_enabled: false,
                ..Default::default()
            })
            .collect();
        let pools = (0..self.pools)
            .map(|p| pb::PoolSpec {
                pool_id: pool_id(p),
                engine: "vllm".into(),
                model: model(i, p).into(),
                slots_total: SLOTS,
                gpu_indices: self.pool_gpus(p),
                engine_version: "0.6.3".into(),
                metrics_url: format!("http://{}.sim.invalid:8000/metrics", self.node_id),
                endpoint: format!("http://{}.sim.invalid:{}", self.node_id, 8000 + p),
                // Simulated pools run on whole GPUs.
                mig_uuids: Vec::new(),
            })
            .collect();
        pb::RegisterRequest {
            node_id: self.node_id.clone(),
            machine_id: format!("{:032x}", (i as u128 + 1) * 0x9e37_79b9_7f4a_7c15),
            // .invalid never resolves: nothing ever connects to these nodes.
            address: format!("http://{}.sim.invalid:9200", self.node_id),
            metrics_address: format!("http://{}.sim.invalid:9101/metrics", self.node_id),
            models_available: Vec::new(),
            pools,
            capabilities: Some(pb::Capabilities {
                gpus,
                cpu_cores: 96,
                ram_total_bytes: 1024 * GIB,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
            }),
            agent_version: concat!("fleet-sim ", env!("CARGO_PKG_VERSION")).into(),
            labels: [
                ("zone".to_string(), format!("zone-{}", i % 4)),
                ("rack".to_string(), format!("rack-{:03}", i / 40)),
                ("gpu".to_string(), "h100".to_string()),
            ]
            .into(),
        }
    }

    /// Heartbeat number `sequence`: every pool READY with some slots busy,
    /// every GPU with varying utilisation. The first message of a stream
    /// names the node and session and presents the session's secret.
    pub fn heartbeat(
        &self,
        session_id: u64,
        session_secret: &str,
        sequence: u64,
        first: bool,
        rng: &mut fastrand::Rng,
    ) -> pb::HeartbeatRequest {
        let pools = (0..self.pools)
            .map(|p| pb::PoolStatus {
                pool_id: pool_id(p),
                state: pb::PoolState::Ready as i32,
                slots_total: SLOTS,
                slots_free: if self.churn {
                    churn_slots_free(self.index, p, sequence)
                } else {
                    rng.u32(0..=SLOTS)
                },
                vram_free_bytes: rng.u64(0..GPU_MEMORY / 4),
                model: model(self.index, p).into(),
                engine: "vllm".into(),
                endpoint: String::new(),
            })
            .collect();
        let gpus = (0..self.gpus)
            .map(|g| {
                let used = rng.u64(GPU_MEMORY / 2..GPU_MEMORY);
                let sick = self.unhealthy_gpu && g == 0;
                let basic = pb::GpuStats {
                    index: g,
                    memory_used_bytes: used,
                    memory_free_bytes: GPU_MEMORY - used,
                    utilization_percent: rng.u32(0..=100),
                    temperature_celsius: Some(rng.u32(35..85)),
                    health: if sick {
                        pb::GpuHealth::Unhealthy
                    } else {
                        pb::GpuHealth::Healthy
                    } as i32,
                    health_reasons: if sick {
                        vec!["xid 79 (GPU has fallen off the bus)".into()]
                    } else {
                        Vec::new()
                    },
                    xid_errors: if sick { vec![79] } else { Vec::new() },
                    ..Default::default()
                };
                if !self.all_gpu_figures {
                    return basic;
                }
                GoodOrder {
                    ecc_correctable: Some(rng.u64(0..4)),
                    power_draw_milliwatts: rng.u32(100_000..700_000),
                    power_limit_milliwatts: 700_000,
                }
                .figures(basic)
            })
            .collect();
        pb::HeartbeatRequest {
            node_id: if first {
                self.node_id.clone()
            } else {
                String::new()
            },
            session_id: if first { session_id } else { 0 },
            session_secret: if first {
                session_secret.to_string()
            } else {
                String::new()
            },
            sent_at: Some(prost_types::Timestamp::from(SystemTime::now())),
            pools,
            gpus,
            sequence,
        }
    }

    /// GPUs of pool `p`: the node's GPUs split evenly between its pools.
    fn pool_gpus(&self, p: u32) -> Vec<u32> {
        let per_pool = (self.gpus / self.pools.max(1)).max(1);
        (p * per_pool..((p + 1) * per_pool).min(self.gpus)).collect()
    }
}

/// slots_free of pool `p` in heartbeat `sequence` under churn: it walks
/// 0..=SLOTS one step per beat (offset per node and pool), so consecutive
/// beats always differ.
fn churn_slots_free(index: usize, p: u32, sequence: u64) -> u32 {
    ((index as u64 + u64::from(p) * 5 + sequence) % u64::from(SLOTS + 1)) as u32
}

fn pool_id(p: u32) -> String {
    format!("pool-{p}")
}

/// The models the fake pools serve: pool `p` of node `i` serves
/// `MODELS[(i + p) % 3]`, so every model is on about a third of the pools.
pub const MODELS: [&str; 3] = [
    "llama-3.1-8b-instruct",
    "llama-3.1-70b-instruct",
    "qwen2.5-32b-instruct",
];

fn model(index: usize, p: u32) -> &'static str {
    MODELS[(index + p as usize) % MODELS.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(gpus: u32, pools: u32) -> NodeShape {
        NodeShape {
            index: 12,
            node_id: "sim-000012".into(),
            gpus,
            pools,
            churn: false,
            all_gpu_figures: false,
            unhealthy_gpu: false,
        }
    }

    #[test]
    fn all_gpu_figures_are_every_figure_the_agent_reads_and_valid() {
        use prost::Message;
        let mut rng = fastrand::Rng::with_seed(9);
        let mut node = shape(8, 2);
        let basic = node.heartbeat(1, "s", 2, false, &mut rng);
        node.all_gpu_figures = true;
        let all = node.heartbeat(1, "s", 2, false, &mut rng);
        registry_proto::rules::gpu_stats(&all.gpus).unwrap();
        for gpu in &all.gpus {
            assert!(gpu.ecc_enabled.is_some() && gpu.power_limit_milliwatts.is_some());
            assert!(gpu.throttle_thermal.is_some() && gpu.row_remap_failed.is_some());
        }
        assert!(basic.gpus.iter().all(|g| g.ecc_enabled.is_none()));
        // What each costs on the wire (see the option's help).
        let (basic, all) = (basic.encoded_len(), all.encoded_len());
        assert!((250..400).contains(&basic), "{basic}");
        assert!((480..640).contains(&all), "{all}");
    }

    #[test]
    fn a_node_with_a_sick_gpu_reports_gpu_0_unhealthy_in_every_beat() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut node = shape(4, 2);
        node.unhealthy_gpu = true;
        for seq in 1..=3 {
            let beat = node.heartbeat(1, "s", seq, seq == 1, &mut rng);
            assert_eq!(beat.gpus[0].health(), pb::GpuHealth::Unhealthy);
            assert_eq!(beat.gpus[0].xid_errors, [79]);
            assert!(
                beat.gpus[1..]
                    .iter()
                    .all(|g| g.health() == pb::GpuHealth::Healthy)
            );
            registry_proto::rules::gpu_stats(&beat.gpus).unwrap();
        }
        let mut config = crate::FleetConfig::new("http://127.0.0.1:1", 10);
        config.unhealthy_gpu_fraction = 0.2;
        config.check().unwrap();
        assert_eq!((0..10).filter(|&i| config.has_unhealthy_gpu(i)).count(), 2);
        config.unhealthy_gpu_fraction = 2.0;
        assert!(config.check().is_err());
    }

    #[test]
    fn under_churn_every_beat_changes_every_pool_slots_free() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut node = shape(8, 4);
        node.churn = true;
        let beats: Vec<_> = (1..=40)
            .map(|seq| node.heartbeat(1, "s", seq, seq == 1, &mut rng))
            .collect();
        for pair in beats.windows(2) {
            for (a, b) in pair[0].pools.iter().zip(&pair[1].pools) {
                assert_ne!(a.slots_free, b.slots_free);
                assert!(b.slots_free <= b.slots_total);
            }
        }
        let models: std::collections::HashSet<_> = node
            .registration()
            .pools
            .into_iter()
            .map(|p| p.model)
            .collect();
        assert_eq!(models.len(), 3, "4 pools spread over the 3 models");
    }

    #[test]
    fn a_registration_has_the_requested_gpus_and_pools() {
        let reg = shape(8, 2).registration();
        assert_eq!(reg.node_id, "sim-000012");
        let caps = reg.capabilities.unwrap();
        assert_eq!(caps.gpus.len(), 8);
        assert_eq!(reg.pools.len(), 2);
        assert_eq!(reg.pools[0].gpu_indices, [0, 1, 2, 3]);
        assert_eq!(reg.pools[1].gpu_indices, [4, 5, 6, 7]);
        let uuids: std::collections::HashSet<_> = caps.gpus.iter().map(|g| &g.uuid).collect();
        assert_eq!(uuids.len(), 8);
        assert!(reg.address.starts_with("http://sim-000012."));
    }

    #[test]
    fn only_the_first_heartbeat_names_node_and_session() {
        let mut rng = fastrand::Rng::with_seed(1);
        let node = shape(4, 3);
        let first = node.heartbeat(77, "s3cr3t", 1, true, &mut rng);
        assert_eq!(
            (first.node_id.as_str(), first.session_id),
            ("sim-000012", 77)
        );
        assert_eq!(first.session_secret, "s3cr3t");
        let later = node.heartbeat(77, "s3cr3t", 2, false, &mut rng);
        assert_eq!((later.node_id.as_str(), later.session_id), ("", 0));
        assert!(later.session_secret.is_empty());
        assert_eq!(later.sequence, 2);
        assert_eq!(later.pools.len(), 3);
        assert_eq!(later.gpus.len(), 4);
        for pool in &later.pools {
            assert!(pool.slots_free <= pool.slots_total);
        }
        for gpu in &later.gpus {
            assert_eq!(gpu.memory_used_bytes + gpu.memory_free_bytes, GPU_MEMORY);
        }
    }
}
