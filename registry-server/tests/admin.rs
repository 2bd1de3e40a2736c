//! Cordon and drain through a real server on 127.0.0.1:0: commands pushed
//! on open Heartbeat streams and re-sent on new ones, placement leaving
//! cordoned and draining nodes out, validation, and admin state kept
//! across an agent's deregistration.

mod common;

use std::time::Duration;

use common::{Stream, get, register};
use registry_proto::pb;
use registry_proto::pb::heartbeat_response::Command;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_server::Settings;
use test_support::fixtures::{beat, beat_in, register_request};
use test_support::{Session, TestRegistry, eventually};
use tonic::Code;
use tonic::transport::Channel;

const MODEL: &str = "llama-3.1-8b";

fn drain_request(id: &str) -> pb::DrainNodeRequest {
    pb::DrainNodeRequest {
        node_id: id.into(),
        reason: "kernel upgrade".into(),
        ..Default::default()
    }
}

/// A registered node with an open stream whose first beat (READY) was
/// acked.
async fn joined(client: &mut NodeRegistryClient<Channel>, id: &str) -> (Session, Stream) {
    let session = register(client, register_request(id)).await;
    let mut stream = Stream::open(client).await.unwrap();
    let ack = stream.send(beat(id, &session, 1)).await.unwrap();
    assert_eq!(ack.sequence, 1);
    assert!(ack.command.is_none());
    (session, stream)
}

#[tokio::test]
async fn a_drain_is_pushed_at_once_and_again_on_new_streams_until_acknowledged() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = server.client().await;
    let (session, mut stream) = joined(&mut client, "n1").await;

    let node = client
        .drain_node(pb::DrainNodeRequest {
            deadline: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            ..drain_request("n1")
        })
        .await
        .unwrap()
        .into_inner();
    let drain = node.admin.unwrap().drain.unwrap();
    assert!(!drain.acknowledged && drain.deadline.is_some());

    // Pushed without waiting for a heartbeat: sequence 0 acks nothing.
    let push = stream.next().await.unwrap();
    assert_eq!(push.sequence, 0);
    match push.command {
        Some(Command::Drain(cmd)) => {
            assert_eq!(cmd.reason, "kernel upgrade");
            assert!(cmd.pool_ids.is_empty() && cmd.deadline.is_some());
        }
        other => panic!("expected a DrainCommand, got {other:?}"),
    }
    // The same stream is not sent it twice.
    let ack = stream.send(beat("n1", &Session::none(), 2)).await.unwrap();
    assert_eq!(ack.sequence, 2);
    assert!(ack.command.is_none());

    // The agent reconnects before reporting DRAINING: sent again.
    drop(stream);
    let mut stream = Stream::open(&mut client).await.unwrap();
    let ack = stream.send(beat("n1", &session, 3)).await.unwrap();
    assert_eq!(ack.sequence, 3);
    assert!(matches!(ack.command, Some(Command::Drain(_))));

    // Reported DRAINING: acknowledged, and no new stream gets it again.
    let ack = stream
        .send(beat_in("n1", &Session::none(), 4, pb::PoolState::Draining))
        .await
        .unwrap();
    assert!(ack.command.is_none());
    let drain = get(&mut client, "n1").await.admin.unwrap().drain.unwrap();
    assert!(
        drain.acknowledged && !drain.drained,
        "3 of 4 slots free: busy"
    );
    drop(stream);
    let mut stream = Stream::open(&mut client).await.unwrap();
    let ack = stream
        .send(beat_in("n1", &session, 5, pb::PoolState::Draining))
        .await
        .unwrap();
    assert!(ack.command.is_none());

    // Idle: drained.
    let mut idle = beat_in("n1", &Session::none(), 6, pb::PoolState::Draining);
    idle.pools[0].slots_free = 4;
    stream.send(idle).await.unwrap();
    let drain = get(&mut client, "n1").await.admin.unwrap().drain.unwrap();
    assert!(drain.drained && drain.drained_at.is_some());
    server.stop().await;
}

#[tokio::test]
async fn cancel_pushes_a_resume_command() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = server.client().await;
    let (_session, mut stream) = joined(&mut client, "n1").await;
    client
        .drain_node(pb::DrainNodeRequest {
            pool_ids: vec!["pool-0".into()],
            ..drain_request("n1")
        })
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await.unwrap().command,
        Some(Command::Drain(_))
    ));
    stream
        .send(beat_in("n1", &Session::none(), 2, pb::PoolState::Draining))
        .await
        .unwrap();

    let node = client
        .cancel_drain(pb::CancelDrainRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let admin = node.admin.unwrap();
    assert!(admin.schedulable && admin.drain.is_none());
    let push = stream.next().await.unwrap();
    assert_eq!(push.sequence, 0);
    match push.command {
        Some(Command::Resume(cmd)) => assert_eq!(cmd.pool_ids, ["pool-0"]),
        other => panic!("expected a ResumeCommand, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn placement_never_offers_a_cordoned_or_draining_node() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = server.client().await;
    let (_s1, _stream1) = joined(&mut client, "n1").await;
    let (_s2, _stream2) = joined(&mut client, "n2").await;
    let offered = |client: NodeRegistryClient<Channel>| async move {
        let mut client = client;
        let mut nodes: Vec<String> = client
            .find_pools(pb::FindPoolsRequest {
                model: MODEL.into(),
                limit: 10,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().candidates)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.node_id)
            .collect();
        nodes.sort();
        nodes
    };
    eventually("both nodes offered", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let nodes = offered(client).await;
            (nodes == ["n1", "n2"])
                .then_some(())
                .ok_or(format!("{nodes:?}"))
        }
    })
    .await;

    client
        .cordon_node(pb::CordonNodeRequest {
            node_id: "n1".into(),
            reason: "bad fan".into(),
        })
        .await
        .unwrap();
    client.drain_node(drain_request("n2")).await.unwrap();
    let pinned = |id: &str| pb::FindPoolsRequest {
        model: MODEL.into(),
        node_id: id.into(),
        ..Default::default()
    };
    // The index follows the feed: wait until it has both changes.
    let err = eventually("n1 refused as cordoned", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            match client.find_pools(pinned("n1")).await {
                Err(e) if e.code() == Code::FailedPrecondition => Ok(e),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(err.message().contains("cordoned"), "{}", err.message());
    assert!(err.message().contains("bad fan"), "{}", err.message());
    let err = eventually("n2 refused as draining", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            match client.find_pools(pinned("n2")).await {
                Err(e) if e.code() == Code::FailedPrecondition => Ok(e),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(err.message().contains("draining"), "{}", err.message());

    let err = client
        .find_pools(pb::FindPoolsRequest {
            model: MODEL.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("takes new work"),
        "{}",
        err.message()
    );
    let models = client
        .list_models(pb::ListModelsRequest {
            model: MODEL.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models[0].pools_ready, 0);
    assert!(models.models[0].pools.iter().all(|p| !p.ready));
    // Both stay ONLINE.
    for id in ["n1", "n2"] {
        assert_eq!(get(&mut client, id).await.status(), pb::NodeStatus::Online);
    }

    client
        .uncordon_node(pb::UncordonNodeRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap();
    eventually("n1 offered again", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let nodes = offered(client).await;
            (nodes == ["n1"]).then_some(()).ok_or(format!("{nodes:?}"))
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn bad_admin_requests_name_the_field() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = server.client().await;
    let (_session, _stream) = joined(&mut client, "n1").await;

    let err = client
        .drain_node(pb::DrainNodeRequest {
            pool_ids: vec!["pool-0".into(), "pool-7".into()],
            ..drain_request("n1")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("pool_ids[1]") && err.message().contains("pool-7"),
        "{}",
        err.message()
    );
    let err = client
        .drain_node(pb::DrainNodeRequest {
            deadline: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..drain_request("n1")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("deadline"), "{}", err.message());
    let err = client
        .cordon_node(pb::CordonNodeRequest {
            node_id: "n1".into(),
            reason: "x".repeat(257),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("reason"), "{}", err.message());
    let err = client
        .uncordon_node(pb::UncordonNodeRequest {
            node_id: "Not_A_Label".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node_id"), "{}", err.message());
    let err = client
        .cancel_drain(pb::CancelDrainRequest {
            node_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client.drain_node(drain_request("ghost")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Nothing changed on n1.
    assert!(get(&mut client, "n1").await.admin.unwrap().schedulable);
    server.stop().await;
}

#[tokio::test]
async fn a_cordon_outlives_the_agent_deregistering_and_registering_again() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = server.client().await;
    let (session, stream) = joined(&mut client, "n1").await;
    client
        .cordon_node(pb::CordonNodeRequest {
            node_id: "n1".into(),
            reason: "rma".into(),
        })
        .await
        .unwrap();
    drop(stream);
    client
        .deregister(pb::DeregisterRequest {
            node_id: "n1".into(),
            session_id: session.id,
            session_secret: session.secret.clone(),
        })
        .await
        .unwrap();
    let err = client
        .get_node(pb::GetNodeRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "not listed while away");

    register(&mut client, register_request("n1")).await;
    let admin = get(&mut client, "n1").await.admin.unwrap();
    assert!(admin.cordoned && !admin.schedulable);
    assert_eq!(admin.cordon_reason, "rma");
    server.stop().await;
}
