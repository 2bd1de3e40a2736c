//! MIG slices end to end: a real registry on 127.0.0.1:0 and the agent
//! in-process with the fake GPU source's MIG slices; a pool naming a
//! `1g.10gb` slice is found by that profile and by no other, and a pool
//! naming a slice the host does not have stops the agent at start.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Agent, agent_config, registry_settings};
use node_agent::pools::PoolConfig;
use node_agent::{AgentError, ConfigError, FakeGpuSource, GpuSource};
use registry_proto::pb;
use test_support::{TestRegistry, eventually};

/// Generous bound for anything to show up; the tests never assert speed.
const WAIT: Duration = Duration::from_secs(10);

/// One fake GPU carved into a `3g.40gb` and a `1g.10gb` slice.
fn sliced_gpu() -> FakeGpuSource {
    FakeGpuSource::new(1, "mig-e2e").with_mig(&["3g.40gb".into(), "1g.10gb".into()])
}

fn pool_on(uuids: Vec<String>) -> PoolConfig {
    let mut pool = PoolConfig::new("on-slice");
    pool.model = Some("m".into());
    pool.engine = Some("vllm".into());
    pool.mig_uuids = Some(uuids);
    pool
}

fn by_profile(profile: &str) -> pb::FindPoolsRequest {
    pb::FindPoolsRequest {
        model: "m".into(),
        mig_profile: profile.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_pool_on_a_mig_slice_is_found_by_its_profile_only() {
    test_support::init_logs();
    let registry = TestRegistry::start(registry_settings()).await;
    let source = sliced_gpu();
    let slice = source.inventory().unwrap().gpus[0].mig_instances[1].clone();
    assert_eq!(slice.profile, "1g.10gb");
    let mut config = agent_config(&registry.url(), "mig-node");
    config.pools = vec![pool_on(vec![slice.uuid.clone()])];
    let agent = Agent::start_with_gpus(config, Arc::new(source));
    let mut client = registry.client().await;

    let found = eventually("the slice's pool offered by profile", WAIT, || {
        let mut client = client.clone();
        async move {
            client
                .find_pools(by_profile("1g.10gb"))
                .await
                .map(|r| r.into_inner())
                .map_err(|status| format!("{status:?}"))
        }
    })
    .await;
    let candidate = &found.candidates[0];
    assert_eq!(candidate.pool_id, "on-slice");
    assert_eq!(candidate.mig_uuids, std::slice::from_ref(&slice.uuid));
    assert_eq!(candidate.mig_profile, "1g.10gb");

    let status = client.find_pools(by_profile("3g.40gb")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(
        status
            .message()
            .contains("none runs on MIG slices of profile \"3g.40gb\""),
        "{}",
        status.message()
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_pool_naming_a_slice_this_host_lacks_stops_the_agent_naming_the_setting() {
    let registry = TestRegistry::start(registry_settings()).await;
    let mut config = agent_config(&registry.url(), "mig-node");
    config.pools = vec![pool_on(vec!["MIG-not-here".into()])];
    let agent = Agent::start_with_gpus(config, Arc::new(sliced_gpu()));
    match agent.stop().await {
        Err(AgentError::Config(error @ ConfigError::Pool { .. })) => {
            let text = error.to_string();
            assert!(text.contains("mig_uuids[0]"), "{text}");
            assert!(text.contains("\"MIG-not-here\""), "{text}");
        }
        other => panic!("{other:?}"),
    }
}
