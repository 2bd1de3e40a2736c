//! GPU health end to end: a real registry on 127.0.0.1:0 and the agent
//! in-process with the fake GPU source; a fault injected into one fake GPU
//! takes the pool on it out of placement with the heartbeat that reports
//! it, and healing brings it back.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Agent, NodeCondition, agent_config, get_node, registry_settings};
use node_agent::FakeGpuSource;
use node_agent::gpu::faults::Fault;
use node_agent::pools::PoolConfig;
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use test_support::{TestRegistry, eventually};
use tonic::transport::Channel;

/// Generous bound for anything to show up; the tests never assert speed.
const WAIT: Duration = Duration::from_secs(10);

/// The pool ids FindPools offers for model "m" (up to 10).
async fn offered(client: &mut NodeRegistryClient<Channel>) -> Vec<String> {
    let request = pb::FindPoolsRequest {
        model: "m".into(),
        limit: 10,
        ..Default::default()
    };
    match client.find_pools(request).await {
        Ok(answer) => {
            let mut ids: Vec<String> = answer
                .into_inner()
                .candidates
                .into_iter()
                .map(|c| c.pool_id)
                .collect();
            ids.sort();
            ids
        }
        Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
        Err(status) => panic!("{status:?}"),
    }
}

/// GPU `index`'s health as GetNode shows it.
fn health(node: &pb::Node, index: u32) -> Option<pb::GpuHealth> {
    node.gpu_stats
        .iter()
        .find(|g| g.index == index)
        .map(|g| g.health())
}

#[tokio::test]
async fn a_pool_on_a_gpu_turning_unhealthy_leaves_placement_and_comes_back_when_it_heals() {
    test_support::init_logs();
    let registry = TestRegistry::start(registry_settings()).await;
    let mut config = agent_config(&registry.url(), "gpu-node");
    let pool = |id: &str, gpu: u32| {
        let mut pool = PoolConfig::new(id);
        pool.model = Some("m".into());
        pool.engine = Some("vllm".into());
        pool.slots = Some(4);
        pool.gpus = Some(vec![gpu]);
        pool
    };
    config.pools = vec![pool("on-gpu0", 0), pool("on-gpu1", 1)];
    let source = FakeGpuSource::new(2, "gpu-health-e2e");
    let faults = source.faults();
    let agent = Agent::start_with_gpus(config, Arc::new(source));
    let mut client = registry.client().await;

    eventually("both pools offered", WAIT, || {
        let mut client = client.clone();
        async move {
            let ids = offered(&mut client).await;
            if ids.len() == 2 {
                Ok(())
            } else {
                Err(format!("offered {ids:?}"))
            }
        }
    })
    .await;
    let node = get_node(&mut client, "gpu-node").await.unwrap();
    assert_eq!(health(&node, 1), Some(pb::GpuHealth::Healthy));
    let revision = node.revision;

    faults.inject(1, Fault::Xid(79));
    // The heartbeat that reports the fault is the one that takes the pool
    // out: once GetNode shows it, placement already agrees (the index is
    // fed in the same publish), with no further interval to wait.
    let node = eventually("gpu 1 reported unhealthy", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "gpu-node")
                .await
                .matching(|n| health(n, 1) == Some(pb::GpuHealth::Unhealthy))
        }
    })
    .await;
    assert_eq!(offered(&mut client).await, ["on-gpu0"]);
    let gpu1 = node.gpu_stats.iter().find(|g| g.index == 1).unwrap();
    assert_eq!(gpu1.health_reasons, ["xid 79 (GPU has fallen off the bus)"]);
    assert_eq!(gpu1.xid_errors, [79]);
    assert!(
        node.revision > revision,
        "a change of health is a new revision"
    );
    assert_eq!(health(&node, 0), Some(pb::GpuHealth::Healthy));

    // Pinned to the pool's GPU model, the answer names the sick GPU.
    let gpu0_uuid = node.capabilities.as_ref().unwrap().gpus[0].uuid.clone();
    let pinned = pb::FindPoolsRequest {
        model: "m".into(),
        node_id: "gpu-node".into(),
        ..Default::default()
    };
    // on-gpu0 still serves a pinned request...
    let answer = client
        .find_pools(pinned.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.candidates[0].pool_id, "on-gpu0");
    // ...until GPU 0 is sick too: then FAILED_PRECONDITION names a GPU.
    faults.inject(0, Fault::EccUncorrectable);
    let status = eventually("pinned placement refused", WAIT, || {
        let mut client = client.clone();
        let pinned = pinned.clone();
        async move {
            match client.find_pools(pinned).await {
                Err(status) => Ok(status),
                Ok(answer) => Err(format!(
                    "still offered: {:?}",
                    answer.into_inner().candidates
                )),
            }
        }
    })
    .await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    // The first pool met (on-gpu0) names its GPU, by index and UUID.
    assert!(
        status.message().contains("none runs only on healthy GPUs")
            && status.message().contains(&format!(
                "GPU 0 ({gpu0_uuid}) of node gpu-node is UNHEALTHY: uncorrectable ECC errors"
            )),
        "{}",
        status.message()
    );
    let models = client
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models[0].pools_ready, 0);
    assert!(models.models[0].pools.iter().all(|p| !p.ready));
    faults.heal(0);

    // Healed: the next report brings the pool back.
    faults.heal(1);
    eventually("gpu 1 reported healthy again", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "gpu-node").await.matching(|n| {
                health(n, 1) == Some(pb::GpuHealth::Healthy)
                    && health(n, 0) == Some(pb::GpuHealth::Healthy)
            })
        }
    })
    .await;
    assert_eq!(offered(&mut client).await, ["on-gpu0", "on-gpu1"]);
    agent.stop().await.unwrap();
}
