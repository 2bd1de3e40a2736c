//! A registry with the embedded store, stopped and restarted on the same
//! address and data directory: nodes, sessions and the squatting rule
//! survive; placement offers a loaded node only once it heartbeats.

mod common;

use std::time::Duration;

use common::{Stream, get, register};
use registry_proto::pb;
use registry_server::Settings;
use test_support::registry::durable;
use test_support::{Session, TestRegistry, fixtures::beat, fixtures::register_request};
use tonic::Code;

fn settings(dir: &std::path::Path) -> Settings {
    durable(
        Settings {
            node_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            ..Settings::default()
        },
        dir,
    )
}

#[tokio::test]
async fn a_session_survives_a_restart_and_its_heartbeats_are_accepted_without_register() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestRegistry::start(settings(dir.path())).await;
    let mut client = server.client().await;
    let session: Session = register(&mut client, register_request("n1")).await;
    let mut labelled = register_request("n2");
    labelled.labels.insert("rack".into(), "r7".into());
    register(&mut client, labelled).await;
    let mut stream = Stream::open(&mut client).await.unwrap();
    let before = stream.send(beat("n1", &session, 1)).await.unwrap();
    let old_revision = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .revision;
    drop(stream);
    drop(client);
    let addr = server.addr;
    server.stop().await;

    let restarted = TestRegistry::restart_on(addr, settings(dir.path())).await;
    let mut client = restarted.client().await;
    let loaded = get(&mut client, "n1").await;
    assert_eq!(loaded.status(), pb::NodeStatus::Online);
    assert!(loaded.suspect, "not heard from since the restart");
    assert!(loaded.pool_status.is_empty());
    assert_eq!(loaded.session_id, session.id);
    assert_eq!(get(&mut client, "n2").await.labels["rack"], "r7");
    // A watcher resuming from the old run's revision relists.
    let resumed = client
        .watch_nodes(pb::WatchNodesRequest {
            start_revision: old_revision,
            ..Default::default()
        })
        .await;
    let code = match resumed {
        Err(status) => status.code(),
        Ok(stream) => stream.into_inner().message().await.unwrap_err().code(),
    };
    assert_eq!(code, Code::OutOfRange);
    // The loaded nodes are in the new run's listing, above the old revision.
    let listed = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.nodes.len(), 2);
    assert!(listed.revision > old_revision);
    // Placement offers none of its pools before it speaks.
    let refused = client
        .find_pools(pb::FindPoolsRequest {
            model: "llama-3.1-8b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");

    // The agent's stream reconnects with the same session and secret.
    let mut stream = Stream::open(&mut client).await.unwrap();
    let ack = stream.send(beat("n1", &session, 2)).await.unwrap();
    assert_ne!(
        ack.registry.unwrap().instance_id,
        before.registry.unwrap().instance_id,
        "readers can tell the registry restarted"
    );
    let back = get(&mut client, "n1").await;
    assert!(!back.suspect);
    assert_eq!(back.pool_status.len(), 1);
    let found = client
        .find_pools(pb::FindPoolsRequest {
            model: "llama-3.1-8b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.candidates.len(), 1);

    // A wrong secret is still refused.
    let mut forged = Session::forged(session.id);
    forged.secret = "0".repeat(32);
    let mut other = Stream::open(&mut client).await.unwrap();
    let err = other.send(beat("n1", &forged, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    drop((stream, other, client));
    restarted.stop().await;
}

#[tokio::test]
async fn another_machine_cannot_take_a_node_id_during_the_restart_grace() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestRegistry::start(settings(dir.path())).await;
    let mut client = server.client().await;
    register(&mut client, register_request("n1")).await;
    drop(client);
    let addr = server.addr;
    server.stop().await;

    let restarted = TestRegistry::restart_on(addr, settings(dir.path())).await;
    let mut client = restarted.client().await;
    let mut squatter = register_request("n1");
    squatter.machine_id = "another-machine".into();
    squatter.address = "http://squatter.example:9200".into();
    let err = client.register(squatter).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("has until"), "{}", err.message());
    assert_eq!(
        get(&mut client, "n1").await.address,
        "http://n1.example:9200",
        "readers still see the owner's address"
    );
    // The owner itself may register again at once.
    register(&mut client, register_request("n1")).await;
    drop(client);
    restarted.stop().await;
}

#[tokio::test]
async fn a_deregistered_node_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestRegistry::start(settings(dir.path())).await;
    let mut client = server.client().await;
    let session = register(&mut client, register_request("n1")).await;
    register(&mut client, register_request("n2")).await;
    client
        .deregister(pb::DeregisterRequest {
            node_id: "n1".into(),
            session_id: session.id,
            session_secret: session.secret,
        })
        .await
        .unwrap();
    drop(client);
    let addr = server.addr;
    server.stop().await;

    let restarted = TestRegistry::restart_on(addr, settings(dir.path())).await;
    let mut client = restarted.client().await;
    let listed = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed.nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["n2"]);
    drop(client);
    restarted.stop().await;
}

/// Cordons and drains are admin changes: written to the store, and back
/// after a restart, for a listed node and for one that deregistered while
/// cordoned (it comes back cordoned when it registers again). A drain is
/// owed again to the resumed stream until the agent reports it.
#[tokio::test]
async fn cordons_and_drains_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestRegistry::start(settings(dir.path())).await;
    let mut client = server.client().await;
    let session: Session = register(&mut client, register_request("n1")).await;
    register(&mut client, register_request("n2")).await;
    let gone: Session = register(&mut client, register_request("n3")).await;
    client
        .drain_node(pb::DrainNodeRequest {
            node_id: "n1".into(),
            reason: "kernel upgrade".into(),
            deadline: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    for node_id in ["n2", "n3"] {
        client
            .cordon_node(pb::CordonNodeRequest {
                node_id: node_id.into(),
                reason: "bad fan".into(),
            })
            .await
            .unwrap();
    }
    client
        .deregister(pb::DeregisterRequest {
            node_id: "n3".into(),
            session_id: gone.id,
            session_secret: gone.secret.clone(),
        })
        .await
        .unwrap();
    drop(client);
    let addr = server.addr;
    server.stop().await;

    let restarted = TestRegistry::restart_on(addr, settings(dir.path())).await;
    let mut client = restarted.client().await;
    let n1 = get(&mut client, "n1").await.admin.unwrap();
    assert!(!n1.schedulable);
    let drain = n1.drain.expect("the drain survived");
    assert_eq!(drain.reason, "kernel upgrade");
    assert!(drain.deadline.is_some() && !drain.drained);
    let n2 = get(&mut client, "n2").await.admin.unwrap();
    assert!(n2.cordoned && n2.cordon_reason == "bad fan" && !n2.schedulable);
    let status = client
        .get_node(pb::GetNodeRequest {
            node_id: "n3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "deregistered stays gone");
    register(&mut client, register_request("n3")).await;
    let n3 = get(&mut client, "n3").await.admin.unwrap();
    assert!(n3.cordoned, "cordoned again when it registers: {n3:?}");

    // The resumed stream of n1 is owed the drain on its first ack.
    let mut stream = Stream::open(&mut client).await.unwrap();
    let ack = stream.send(beat("n1", &session, 1)).await.unwrap();
    assert!(
        matches!(
            ack.command,
            Some(pb::heartbeat_response::Command::Drain(ref d)) if d.reason == "kernel upgrade"
        ),
        "{ack:?}"
    );
    drop(stream);
    drop(client);
    restarted.stop().await;
}
