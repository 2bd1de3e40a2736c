//! Scenario 7, the store's write path: a storm of Registers of new nodes,
//! paced at a target rate by many concurrent calls, against a registry
//! with the embedded store. Each Register is answered only once its record
//! is committed, so its latency is the store's commit latency plus the
//! call, and the acknowledged rate is the store's write rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fleet_sim::LatencySummary;
use hdrhistogram::Histogram;
use tokio::time::{Instant, sleep_until};
use tracing::info;

use crate::BenchError;
use crate::plan::Plan;
use crate::server::{Launcher, ServerSpec};
use crate::{inspect, procfs};

/// What the storm came to.
#[derive(Debug, Clone)]
pub struct StoreResult {
    /// Registrations attempted.
    pub registrations: usize,
    /// Target rate, per second.
    pub rate: u32,
    /// Concurrent calls at most.
    pub concurrency: usize,
    /// Registers answered OK.
    pub acknowledged: usize,
    /// Registers answered with an error.
    pub failed: usize,
    /// From the first call to the last answer.
    pub wall: Duration,
    /// Acknowledged registrations per second over `wall`.
    pub per_sec: f64,
    /// Register latency (call to answer).
    pub latency: LatencySummary,
    /// Nodes the registry listed afterwards.
    pub listed: usize,
}

/// Runs the storm of `plan.store`.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<StoreResult, BenchError> {
    let p = &plan.store;
    let spec = ServerSpec::new("store").embedded(launcher.data_dir("store")?);
    let server = launcher.start(&spec).await?;
    let _ = procfs::listen_overflows();
    // Calls share a few connections, as a fleet behind one proxy would.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(inspect::client(&server.url()).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / f64::from(p.rate.max(1)));
    let mut workers = Vec::new();
    for worker in 0..p.concurrency {
        let mut client = clients[worker % clients.len()].clone();
        let next = next.clone();
        let total = p.registrations;
        workers.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds");
            let mut failed = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return (latency, failed);
                }
                sleep_until(start + gap * u32::try_from(i).unwrap_or(u32::MAX)).await;
                let request = fleet_sim_request(i);
                let sent = Instant::now();
                loop {
                    match client.register(request.clone()).await {
                        Ok(_) => {
                            let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                            let _ = latency.record(us.max(1));
                        }
                        // Deferred by admission control: again at the time
                        // advised, as node-agent does; the wait counts in
                        // the call's latency.
                        Err(status) => match registry_proto::retry::advice(&status) {
                            Some(after) => {
                                tokio::time::sleep(after).await;
                                continue;
                            }
                            None => failed += 1,
                        },
                    }
                    break;
                }
            }
        }));
    }
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
    let mut failed = 0;
    for worker in workers {
        let (h, f) = worker
            .await
            .map_err(|e| BenchError::Server(format!("a Register worker failed: {e}")))?;
        latency
            .add(&h)
            .map_err(|e| BenchError::Server(format!("merging latencies: {e}")))?;
        failed += f;
    }
    let wall = start.elapsed();
    let acknowledged = p.registrations - failed;
    let mut client = inspect::client(&server.url()).await?;
    let listed = inspect::list_pages(&mut client, 1_000, true).await?.0;
    server.stop().await?;
    let result = StoreResult {
        registrations: p.registrations,
        rate: p.rate,
        concurrency: p.concurrency,
        acknowledged,
        failed,
        wall,
        per_sec: acknowledged as f64 / wall.as_secs_f64(),
        latency: LatencySummary::of(&latency),
        listed,
    };
    info!(
        acknowledged,
        failed,
        per_sec = result.per_sec as u64,
        "store storm done"
    );
    Ok(result)
}

/// A valid registration of a new node `store-<i>` (one GPU, one pool).
fn fleet_sim_request(i: usize) -> registry_proto::pb::RegisterRequest {
    use registry_proto::pb;
    pb::RegisterRequest {
        node_id: format!("store-{i}"),
        machine_id: format!("machine-store-{i}"),
        address: format!("http://10.1.{}.{}:9200", i / 250 % 250, i % 250 + 1),
        pools: vec![pb::PoolSpec {
            pool_id: "pool-0".into(),
            engine: "vllm".into(),
            model: "llama-3.1-8b".into(),
            slots_total: 4,
            gpu_indices: vec![0],
            ..Default::default()
        }],
        capabilities: Some(pb::Capabilities {
            gpus: vec![pb::GpuInfo {
                index: 0,
                uuid: format!("GPU-store-{i}"),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                ..Default::default()
            }],
            cpu_cores: 32,
            ram_total_bytes: 256 << 30,
            ..Default::default()
        }),
        agent_version: "bench".into(),
        labels: [("zone".to_string(), "bench".to_string())].into(),
        ..Default::default()
    }
}
