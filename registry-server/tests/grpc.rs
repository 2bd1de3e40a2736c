//! The registry served for real on 127.0.0.1:0 and driven by a real tonic
//! client: every RPC, heartbeat streams, health and reflection.

mod common;

use std::time::Duration;

use common::{Stream, register, status_is, status_of};
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_server::Settings;
use test_support::{
    Session, TestRegistry, eventually,
    fixtures::{beat_in, register_request},
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

/// Settings with timeouts short enough for tests that wait on expiry.
fn fast() -> Settings {
    Settings {
        node_timeout: Duration::from_millis(400),
        heartbeat_interval: Duration::from_millis(100),
        ..Settings::default()
    }
}

async fn client(server: &TestRegistry) -> NodeRegistryClient<Channel> {
    NodeRegistryClient::new(server.channel().await)
}

fn ids(response: &pb::ListNodesResponse) -> Vec<&str> {
    response.nodes.iter().map(|n| n.node_id.as_str()).collect()
}

#[tokio::test]
async fn register_get_list_and_deregister() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = client(&server).await;

    let first = client
        .register(register_request("gpu-b"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    assert_ne!(first.session_id, 0);
    assert_eq!(first.heartbeat_interval.unwrap().seconds, 10);
    assert_eq!(first.node_timeout.unwrap().seconds, 30);
    client.register(register_request("gpu-a")).await.unwrap();

    // Idempotent: the same node again is an update with a new session.
    let again = client
        .register(register_request("gpu-b"))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_ne!(again.session_id, first.session_id);
    assert_eq!(again.registered_at, first.registered_at);

    let node = client
        .get_node(pb::GetNodeRequest {
            node_id: "gpu-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.status(), pb::NodeStatus::Online);
    assert_eq!(node.session_id, again.session_id);
    assert_eq!(node.address, "http://gpu-b.example:9200");
    assert_eq!(
        node.capabilities.as_ref().unwrap().gpus[0].compute_capability,
        "9.0"
    );
    assert_eq!(node.pools[0].pool_id, "pool-0");
    assert_eq!(node.labels["zone"], "eu-1");
    assert!(node.registered_at.is_some() && node.last_heartbeat_at.is_some());

    let all = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&all), ["gpu-a", "gpu-b"]);

    client
        .deregister(pb::DeregisterRequest {
            node_id: "gpu-b".into(),
            session_id: again.session_id,
            session_secret: again.session_secret.clone(),
        })
        .await
        .unwrap();
    let err = client
        .get_node(pb::GetNodeRequest {
            node_id: "gpu-b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("gpu-b"), "{}", err.message());
    let err = client
        .deregister(pb::DeregisterRequest {
            node_id: "gpu-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let all = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&all), ["gpu-a"]);
    server.stop().await;
}

#[tokio::test]
async fn list_filters_by_status_pool_and_labels_and_pages() {
    let server = TestRegistry::start(fast()).await;
    let mut client = client(&server).await;

    // n1 stays silent and goes OFFLINE; n2..n4 keep heartbeating.
    client.register(register_request("n1")).await.unwrap();
    let mut streams = Vec::new();
    for id in ["n2", "n3", "n4"] {
        let mut request = register_request(id);
        if id == "n3" {
            request.labels.insert("zone".into(), "us-1".into());
            request.pools[0].pool_id = "pool-x".into();
        }
        let session = register(&mut client, request).await;
        streams.push((id, session, Stream::open(&mut client).await.unwrap()));
    }
    let beating = tokio::spawn(async move {
        for sequence in 1.. {
            for (id, session, stream) in &mut streams {
                let mut request = beat_in(id, session, sequence, pb::PoolState::Ready);
                if *id == "n3" {
                    request.pools[0].pool_id = "pool-x".into();
                }
                stream.send(request).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    eventually("n1 offline", Duration::from_secs(5), || {
        let mut client = client.clone();
        async move { status_is(&mut client, "n1", pb::NodeStatus::Offline).await }
    })
    .await;

    let list = |request: pb::ListNodesRequest| {
        let mut client = client.clone();
        async move { client.list_nodes(request).await.unwrap().into_inner() }
    };
    let online = list(pb::ListNodesRequest {
        status: pb::NodeStatus::Online as i32,
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&online), ["n2", "n3", "n4"]);
    let offline = list(pb::ListNodesRequest {
        status: pb::NodeStatus::Offline as i32,
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&offline), ["n1"]);
    let by_pool = list(pb::ListNodesRequest {
        pool_id: "pool-x".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&by_pool), ["n3"]);
    let by_label = list(pb::ListNodesRequest {
        labels: [("zone".to_string(), "eu-1".to_string())].into(),
        status: pb::NodeStatus::Online as i32,
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&by_label), ["n2", "n4"]);

    let page1 = list(pb::ListNodesRequest {
        page_size: 3,
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&page1), ["n1", "n2", "n3"]);
    assert_eq!(page1.next_page_token, "n3");
    let page2 = list(pb::ListNodesRequest {
        page_size: 3,
        page_token: page1.next_page_token.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&page2), ["n4"]);
    assert!(page2.next_page_token.is_empty());

    let err = client
        .list_nodes(pb::ListNodesRequest {
            status: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("status"), "{}", err.message());

    beating.abort();
    server.stop().await;
}

#[tokio::test]
async fn heartbeats_are_acknowledged_and_update_the_node() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = client(&server).await;
    let session = register(&mut client, register_request("n1")).await;
    let mut stream = Stream::open(&mut client).await.unwrap();

    let ack = stream
        .send(beat_in("n1", &session, 7, pb::PoolState::Initializing))
        .await
        .unwrap();
    assert_eq!(ack.sequence, 7);
    assert!(ack.server_time.is_some());
    assert_eq!(ack.heartbeat_interval.unwrap().seconds, 10);
    assert!(ack.command.is_none());

    // Later messages may leave node_id and session_id out.
    let mut later = beat_in("", &Session::none(), 8, pb::PoolState::Ready);
    later.gpus.clear();
    assert_eq!(stream.send(later).await.unwrap().sequence, 8);

    let node = client
        .get_node(pb::GetNodeRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.pool_status.len(), 1);
    assert_eq!(node.pool_status[0].state(), pb::PoolState::Ready);
    assert_eq!(node.pool_status[0].slots_free, 3);
    // A beat without GPU figures keeps the last ones.
    assert_eq!(node.gpu_stats[0].utilization_percent, 87);
    assert!(node.agent_time.is_some());
    server.stop().await;
}

/// Register, every heartbeat ack, ListNodes and the watch's first message
/// name the same registry instance; a restarted registry names another.
#[tokio::test]
async fn answers_name_the_registry_instance_and_a_restart_changes_it() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = client(&server).await;
    let registered = client
        .register(register_request("n1"))
        .await
        .unwrap()
        .into_inner();
    let instance = registered
        .registry
        .clone()
        .expect("RegisterResponse.registry");
    assert_eq!(instance.instance_id.len(), 16);
    assert!(instance.started_at.is_some());
    let session = Session::from(registered);
    let mut stream = Stream::open(&mut client).await.unwrap();
    for sequence in 1..=2 {
        let ack = stream
            .send(beat_in("n1", &session, sequence, pb::PoolState::Ready))
            .await
            .unwrap();
        assert_eq!(ack.registry.as_ref(), Some(&instance));
    }
    let list = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.registry.as_ref(), Some(&instance));
    let mut watch = client
        .watch_nodes(pb::WatchNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Every message: the snapshot's node, its marker, a live event.
    client.register(register_request("n2")).await.unwrap();
    for _ in 0..3 {
        let event = watch.message().await.unwrap().unwrap();
        assert_eq!(event.registry.as_ref(), Some(&instance), "{event:?}");
    }
    drop(stream);
    drop(watch);

    let addr = server.addr;
    server.stop().await;
    let restarted = TestRegistry::restart_on(addr, Settings::default()).await;
    let mut client = restarted.client().await;
    let list = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let after = list.registry.expect("ListNodesResponse.registry");
    assert_ne!(after.instance_id, instance.instance_id);
    restarted.stop().await;
}

#[tokio::test]
async fn a_silent_node_goes_offline_and_returns_on_its_next_heartbeat() {
    let server = TestRegistry::start(fast()).await;
    let mut client = client(&server).await;
    let session = register(&mut client, register_request("n1")).await;
    let mut stream = Stream::open(&mut client).await.unwrap();
    stream
        .send(beat_in("n1", &session, 1, pb::PoolState::Ready))
        .await
        .unwrap();

    // The stream stays open but silent: only messages count as liveness.
    eventually("n1 offline", Duration::from_secs(5), || {
        let mut client = client.clone();
        async move { status_is(&mut client, "n1", pb::NodeStatus::Offline).await }
    })
    .await;
    // On the same stream, without re-registering.
    stream
        .send(beat_in("n1", &session, 2, pb::PoolState::Ready))
        .await
        .unwrap();
    assert_eq!(status_of(&mut client, "n1").await, pb::NodeStatus::Online);
    server.stop().await;
}

#[tokio::test]
async fn a_registered_node_that_never_streams_goes_offline() {
    // ONLINE is read right after the Register: a node timeout that a
    // starved test process cannot overrun between the two calls.
    let server = TestRegistry::start(Settings {
        node_timeout: Duration::from_secs(2),
        ..fast()
    })
    .await;
    let mut client = client(&server).await;
    client.register(register_request("mute")).await.unwrap();
    assert_eq!(status_of(&mut client, "mute").await, pb::NodeStatus::Online);
    eventually("mute offline", Duration::from_secs(5), || {
        let mut client = client.clone();
        async move { status_is(&mut client, "mute", pb::NodeStatus::Offline).await }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn heartbeat_for_an_unknown_node_is_not_found_and_says_to_register() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = client(&server).await;
    let mut stream = Stream::open(&mut client).await.unwrap();
    let err = stream
        .send(beat_in(
            "ghost",
            &Session::forged(99),
            1,
            pb::PoolState::Ready,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("ghost") && err.message().contains("Register"),
        "{}",
        err.message()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_stream_of_a_superseded_session_is_refused() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = client(&server).await;
    let old = register(&mut client, register_request("n1")).await;
    let mut old_stream = Stream::open(&mut client).await.unwrap();
    old_stream
        .send(beat_in("n1", &old, 1, pb::PoolState::Ready))
        .await
        .unwrap();

    let new = register(&mut client, register_request("n1")).await;
    let err = old_stream
        .send(beat_in("n1", &old, 2, pb::PoolState::Ready))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("superseded"), "{}", err.message());

    let mut fresh = Stream::open(&mut client).await.unwrap();
    let err = fresh
        .send(beat_in("n1", &old, 1, pb::PoolState::Ready))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let mut current = Stream::open(&mut client).await.unwrap();
    current
        .send(beat_in("n1", &new, 1, pb::PoolState::Ready))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn bad_stream_input_ends_only_that_stream() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = client(&server).await;
    let s1 = register(&mut client, register_request("n1")).await;
    let s2 = register(&mut client, register_request("n2")).await;

    let mut no_session = Stream::open(&mut client).await.unwrap();
    let err = no_session
        .send(beat_in("n1", &Session::forged(0), 1, pb::PoolState::Ready))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("session_id"), "{}", err.message());

    let mut switching = Stream::open(&mut client).await.unwrap();
    switching
        .send(beat_in("n1", &s1, 1, pb::PoolState::Ready))
        .await
        .unwrap();
    let err = switching
        .send(beat_in("n2", &s2, 2, pb::PoolState::Ready))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node_id"), "{}", err.message());

    let mut bad_pool = Stream::open(&mut client).await.unwrap();
    let mut request = beat_in("n2", &s2, 1, pb::PoolState::Ready);
    request.pools[0].slots_free = 99;
    let err = bad_pool.send(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("pools[0].slots_free"),
        "{}",
        err.message()
    );

    // n2 was untouched by the refused beat; the server still serves.
    let n2 = client
        .get_node(pb::GetNodeRequest {
            node_id: "n2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(n2.pool_status.is_empty());
    let mut good = Stream::open(&mut client).await.unwrap();
    good.send(beat_in("n2", &s2, 1, pb::PoolState::Ready))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn invalid_registrations_are_refused_naming_the_field() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = client(&server).await;
    client.register(register_request("keeper")).await.unwrap();
    let before = client
        .get_node(pb::GetNodeRequest {
            node_id: "keeper".into(),
        })
        .await
        .unwrap()
        .into_inner();

    type Mutation = Box<dyn Fn(&mut pb::RegisterRequest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("node_id", Box::new(|r| r.node_id = String::new())),
        ("node_id", Box::new(|r| r.node_id = "Bad_Name".into())),
        ("node_id", Box::new(|r| r.node_id = "x".repeat(64))),
        ("machine_id", Box::new(|r| r.machine_id = String::new())),
        ("address", Box::new(|r| r.address = "not a url".into())),
        (
            "pools",
            Box::new(|r| r.pools = vec![r.pools[0].clone(); 10_000]),
        ),
        (
            "pools[1].pool_id",
            Box::new(|r| r.pools.push(r.pools[0].clone())),
        ),
        (
            "labels",
            Box::new(|r| r.labels = (0..100).map(|i| (format!("k{i}"), "v".into())).collect()),
        ),
    ];
    for (field, mutate) in cases {
        let mut request = register_request("keeper");
        mutate(&mut request);
        let err = client.register(request).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let err = client
        .get_node(pb::GetNodeRequest {
            node_id: "UPPER".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A message over the size limit is refused (OUT_OF_RANGE) as soon as
    // its length prefix arrives, before any handler runs.
    let mut huge = register_request("keeper");
    huge.labels.insert("blob".into(), "x".repeat(2 << 20));
    let err = client.register(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
    assert!(
        err.message().contains("--max-message-size"),
        "{}",
        err.message()
    );

    let after = client
        .get_node(pb::GetNodeRequest {
            node_id: "keeper".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, after, "refused registrations changed nothing");
    server.stop().await;
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let server = TestRegistry::start(Settings::default()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "registry.v1.NodeRegistry"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_registry_in_v1_and_v1alpha() {
    let server = TestRegistry::start(Settings::default()).await;
    let channel = server.channel().await;

    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("not a service list: {reply:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"registry.v1.NodeRegistry"), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "registry.v1.NodeRegistry".into(),
            )),
        };
        let mut replies = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.next().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
            panic!("no descriptor: {reply:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = client(&server).await;
    let session = register(&mut client, register_request("n1")).await;
    let mut stream = Stream::open(&mut client).await.unwrap();
    stream
        .send(beat_in("n1", &session, 1, pb::PoolState::Ready))
        .await
        .unwrap();

    let mut rx = stream.rx;
    let _keep_sending_side_open = stream.tx;
    server.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), rx.next())
        .await
        .unwrap();
    match ended {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{}", status.message()),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

#[tokio::test]
async fn pages_never_exceed_the_server_maximum() {
    let server = TestRegistry::start(Settings {
        max_page_size: 2,
        ..Settings::default()
    })
    .await;
    let mut client = client(&server).await;
    for id in ["a", "b", "c", "d", "e"] {
        register(&mut client, register_request(id)).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        // page_size 0 ("all") and 50 are both capped at 2.
        let page = client
            .list_nodes(pb::ListNodesRequest {
                page_size: if seen.is_empty() { 0 } else { 50 },
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.nodes.len() <= 2, "{}", page.nodes.len());
        seen.extend(page.nodes.iter().map(|n| n.node_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
    server.stop().await;
}
