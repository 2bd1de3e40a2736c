//! What ListNodes costs per node listed, in-process: the registry's
//! listing (clone of each node's shared view, with the liveness fields
//! patched) plus encoding the pages as the server does. Ignored by default
//! (it is a measurement; only meaningful in release):
//!
//! `cargo test --release -p registry-server --test list_cost -- --ignored --nocapture`

use std::time::{Duration, Instant};

use chrono::Utc;
use prost::Message;
use registry_proto::pb;
use registry_server::registry::{
    Beat, NewRegistration, NodeFilter, Now, Registration, Registry, Timing,
};

const NODES: usize = 10_000;
const PAGE: usize = 1000;

/// A node like the benchmark's: 8 GPUs, 2 pools, 4 labels.
fn registration(i: usize) -> Registration {
    Registration::from(NewRegistration {
        node_id: format!("gpu-node-{i:05}"),
        machine_id: format!("machine-{i:05}"),
        address: format!("http://10.0.{}.{}:9200", i / 256, i % 256),
        pools: (0..2)
            .map(|p| pb::PoolSpec {
                pool_id: format!("pool-{p}"),
                engine: "vllm".into(),
                model: "llama-3.1-8b-instruct".into(),
                slots_total: 8,
                gpu_indices: (p * 4..p * 4 + 4).collect(),
                engine_version: "0.6.1".into(),
                metrics_url: format!("http://10.0.0.1:{}/metrics", 8000 + p),
                endpoint: format!("http://10.0.0.1:{}", 8000 + p),
                mig_uuids: Vec::new(),
            })
            .collect(),
        capabilities: pb::Capabilities {
            gpus: (0..8)
                .map(|g| pb::GpuInfo {
                    index: g,
                    // As NVML names them, so they are kept packed as a
                    // real fleet's are, and read back written out.
                    uuid: format!("GPU-{i:08x}-{g:04x}-4000-8000-000000000000"),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_bytes: 80 << 30,
                    compute_capability: "9.0".into(),
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x17 + g),
                    mig_enabled: false,
                    ..Default::default()
                })
                .collect(),
            cpu_cores: 96,
            ram_total_bytes: 1 << 40,
            driver_version: "550.54.15".into(),
            cuda_version: "12.4".into(),
        }
        .into(),
        agent_version: "node-agent 0.1.0".into(),
        metrics_address: "http://10.0.0.1:9101/metrics".into(),
        models_available: vec!["qwen2.5-7b".into()],
        labels: [
            ("zone", "eu-1"),
            ("rack", "r12"),
            ("tier", "prod"),
            ("sku", "h100"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    })
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "a measurement; run in release with --ignored --nocapture"]
async fn listing_costs_a_few_microseconds_per_node() {
    let registry = Registry::new(Timing::default());
    for i in 0..NODES {
        let registered = registry.register(registration(i), Now::read()).unwrap();
        let slot = registry
            .attach(
                &format!("gpu-node-{i:05}"),
                registered.session_id,
                &registered.session_secret,
            )
            .unwrap();
        let beat = Beat {
            sent_at: Utc::now(),
            received_at: Utc::now(),
            pools: (0..2)
                .map(|p| pb::PoolStatus {
                    pool_id: format!("pool-{p}"),
                    state: pb::PoolState::Ready as i32,
                    slots_total: 8,
                    slots_free: 5,
                    vram_free_bytes: 20 << 30,
                    model: "llama-3.1-8b-instruct".into(),
                    engine: "vllm".into(),
                    endpoint: String::new(),
                })
                .collect(),
            gpus: (0..8)
                .map(|g| pb::GpuStats {
                    index: g,
                    memory_used_bytes: 60 << 30,
                    memory_free_bytes: 20 << 30,
                    utilization_percent: 80,
                    temperature_celsius: Some(60),
                    ..Default::default()
                })
                .collect(),
        };
        registry
            .heartbeat(
                &slot,
                registered.session_id,
                beat,
                tokio::time::Instant::now(),
            )
            .unwrap();
    }
    let filter = NodeFilter::default();
    let mut best = Duration::MAX;
    let mut bytes = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let mut token = String::new();
        let mut listed = 0;
        bytes = 0;
        loop {
            let page = registry.list_page(&filter, PAGE, &token);
            listed += page.nodes.len();
            let response = pb::ListNodesResponse {
                nodes: page.nodes,
                next_page_token: page.next_page_token.clone().unwrap_or_default(),
                revision: page.revision,
                registry: Some(registry.instance().clone()),
            };
            bytes += response.encode_to_vec().len();
            match page.next_page_token {
                Some(next) => token = next,
                None => break,
            }
        }
        assert_eq!(listed, NODES);
        best = best.min(started.elapsed());
    }
    // The listing alone, without encoding.
    let mut list_best = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let mut token = String::new();
        loop {
            let page = registry.list_page(&filter, PAGE, &token);
            std::hint::black_box(&page.nodes);
            match page.next_page_token {
                Some(next) => token = next,
                None => break,
            }
        }
        list_best = list_best.min(started.elapsed());
    }
    println!(
        "of which listing (an Arc per node under its lock, the deep copy after): {:.2} µs per node",
        list_best.as_secs_f64() * 1e6 / NODES as f64
    );
    let per_node = best.as_secs_f64() * 1e6 / NODES as f64;
    println!(
        "ListNodes in-process: {NODES} nodes in pages of {PAGE}: best of 5 {best:?}, {per_node:.2} µs per node (list + encode), {} bytes per node",
        bytes / NODES
    );
    assert!(per_node < 50.0, "{per_node:.2} µs per node");
}
