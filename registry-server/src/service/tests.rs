//! The service's own tests: placement answers through the adapter.

use std::sync::Arc;

use pb::node_registry_server::NodeRegistry as _;

use super::*;
use crate::events::EventKind;
use crate::placement::testing::{event, view};

/// A service whose placement index holds one ONLINE node, `gpu-1`,
/// built from a RegisterRequest and a heartbeat (the registry core
/// feeds the index once merged; these tests feed it directly).
fn service() -> NodeRegistryService {
    let settings = Settings::default();
    let index = PlacementIndex::new();
    let request = pb::RegisterRequest {
        node_id: "gpu-1".into(),
        machine_id: "machine-gpu-1".into(),
        address: "http://gpu-1.example:9200".into(),
        pools: vec![pb::PoolSpec {
            pool_id: "pool-0".into(),
            engine: "llamacpp".into(),
            model: "llama-3.1-8b".into(),
            slots_total: 4,
            endpoint: "http://gpu-1.example:8000".into(),
            ..Default::default()
        }],
        labels: [("zone".to_owned(), "eu-1".to_owned())].into(),
        models_available: vec!["qwen2.5-7b".into()],
        ..Default::default()
    };
    let beat = [pb::PoolStatus {
        pool_id: "pool-0".into(),
        state: pb::PoolState::Ready as i32,
        slots_total: 4,
        slots_free: 3,
        vram_free_bytes: 10 << 30,
        model: "llama-3.1-8b".into(),
        engine: "llamacpp".into(),
        endpoint: String::new(),
    }];
    let node = view(&request, Some(&beat), pb::NodeStatus::Online);
    index.apply(&event(3, EventKind::Added, Arc::clone(&node)));
    NodeRegistryService::new(
        Registry::new(settings.timing()),
        &settings,
        Authenticator::open(),
        CancellationToken::new(),
        index,
    )
}

#[tokio::test]
async fn find_pools_answers_from_the_index() {
    let service = service();
    let answer = service
        .find_pools(Request::new(pb::FindPoolsRequest {
            model: "llama-3.1-8b".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.revision, 3);
    assert_eq!(answer.candidates.len(), 1);
    let best = &answer.candidates[0];
    assert_eq!(
        (best.node_id.as_str(), best.pool_id.as_str()),
        ("gpu-1", "pool-0")
    );
    assert_eq!(best.endpoint, "http://gpu-1.example:8000");
    assert_eq!(best.node_address, "http://gpu-1.example:9200");
    assert_eq!(best.labels.get("zone").map(String::as_str), Some("eu-1"));
    assert_eq!((best.slots_free, best.slots_total), (3, 4));
}

#[tokio::test]
async fn find_pools_maps_refusals_to_their_codes() {
    let service = service();
    let find = |req: pb::FindPoolsRequest| {
        let service = service.clone();
        async move { service.find_pools(Request::new(req)).await.unwrap_err() }
    };
    let base = || pb::FindPoolsRequest {
        model: "llama-3.1-8b".into(),
        ..Default::default()
    };
    let status = find(pb::FindPoolsRequest {
        model: "absent".into(),
        ..base()
    })
    .await;
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.message(), "model absent is served by no pool");
    let status = find(pb::FindPoolsRequest {
        engine: "vllm".into(),
        ..base()
    })
    .await;
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(
        status.message().contains("none runs engine vllm"),
        "{}",
        status.message()
    );
    let status = find(pb::FindPoolsRequest {
        node_id: "ghost".into(),
        ..base()
    })
    .await;
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(status.message().contains("ghost is not registered"));
    let status = find(pb::FindPoolsRequest {
        node_id: "gpu-1".into(),
        min_slots_free: Some(4),
        ..base()
    })
    .await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().starts_with("node unavailable: node gpu-1"),
        "{}",
        status.message()
    );
    let status = find(pb::FindPoolsRequest {
        limit: 101,
        ..base()
    })
    .await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("limit"));
}

#[tokio::test]
async fn list_models_reports_served_and_staged_models() {
    let service = service();
    let answer = service
        .list_models(Request::new(pb::ListModelsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.revision, 3);
    let names: Vec<&str> = answer.models.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(names, ["llama-3.1-8b", "qwen2.5-7b"]);
    let llama = &answer.models[0];
    assert_eq!(
        (llama.nodes_serving, llama.pools_ready, llama.slots_free),
        (1, 1, 3)
    );
    assert_eq!(llama.pools[0].state, pb::PoolState::Ready as i32);
    assert_eq!(llama.pools[0].node_status, pb::NodeStatus::Online as i32);
    assert_eq!(answer.models[1].staged_on, ["gpu-1"]);
    let one = service
        .list_models(Request::new(pb::ListModelsRequest {
            model: "qwen2.5-7b".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.models.len(), 1);
}

#[tokio::test]
async fn a_follower_refuses_every_write_naming_the_leader_and_marks_its_reads() {
    let role = crate::replica::ReplicaRole::starting_follower();
    role.leader_is(Some("http://leader.example:50051".into()));
    let service = service().with_role(role.clone());
    let refused = |status: Status| {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(
            status
                .metadata()
                .get(crate::replica::LEADER_METADATA)
                .unwrap(),
            "http://leader.example:50051"
        );
    };
    let register = pb::RegisterRequest {
        node_id: "gpu-2".into(),
        machine_id: "machine-gpu-2".into(),
        address: "http://gpu-2.example:9200".into(),
        ..Default::default()
    };
    refused(
        service
            .register(Request::new(register.clone()))
            .await
            .unwrap_err(),
    );
    refused(
        service
            .cordon_node(Request::new(pb::CordonNodeRequest {
                node_id: "gpu-1".into(),
                reason: "maintenance".into(),
            }))
            .await
            .unwrap_err(),
    );
    refused(
        service
            .deregister(Request::new(pb::DeregisterRequest {
                node_id: "gpu-1".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err(),
    );

    let read = service
        .find_pools(Request::new(pb::FindPoolsRequest {
            model: "llama-3.1-8b".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        read.metadata().get(crate::replica::ROLE_METADATA).unwrap(),
        "follower"
    );
    assert!(
        read.metadata()
            .get(crate::replica::STALE_METADATA)
            .is_some()
    );

    // Elected: the same service takes writes, and its reads carry no marker.
    role.lead(crate::replica::Term::new(
        Arc::new(|| true),
        CancellationToken::new(),
    ));
    service.register(Request::new(register)).await.unwrap();
    let read = service
        .find_pools(Request::new(pb::FindPoolsRequest {
            model: "llama-3.1-8b".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(read.metadata().get(crate::replica::ROLE_METADATA).is_none());
}
