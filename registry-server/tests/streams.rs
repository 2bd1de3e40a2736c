//! One live Heartbeat stream per session, against a real server on
//! 127.0.0.1:0: a newer stream of the session, or a newer session, ends the
//! older stream at once, without waiting for its next message.

mod common;

use common::{Stream, register, status_is};
use registry_proto::pb;
use registry_proto::rules;
use registry_server::Settings;
use test_support::{TestRegistry, eventually, fixtures::beat};
use tonic::Code;

#[tokio::test]
async fn a_newer_stream_of_the_session_ends_the_older_one_at_once() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = server.client().await;
    let session = register(&mut client, test_support::fixtures::register_request("n1")).await;
    let mut older = Stream::open(&mut client).await.unwrap();
    older.send(beat("n1", &session, 1)).await.unwrap();

    // The same session on another connection, as an agent that reconnected
    // while its old connection was still half-open.
    let mut other = server.client().await;
    let mut newer = Stream::open(&mut other).await.unwrap();
    newer.send(beat("n1", &session, 2)).await.unwrap();

    // The older stream ends now, though it sent nothing more.
    let err = older.next().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("newer heartbeat stream") && err.message().contains("n1"),
        "{}",
        err.message()
    );
    assert!(
        rules::stream_replaced(&err),
        "the agent can tell it must not register again: {:?}",
        err.metadata()
    );

    // The newer stream is the node's, and keeps it ONLINE.
    let ack = newer.send(beat("n1", &session, 3)).await.unwrap();
    assert_eq!(ack.sequence, 3);
    status_is(&mut client, "n1", pb::NodeStatus::Online)
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_newer_session_ends_the_old_sessions_stream_at_once() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = server.client().await;
    let old = register(&mut client, test_support::fixtures::register_request("n1")).await;
    let mut stream = Stream::open(&mut client).await.unwrap();
    stream.send(beat("n1", &old, 1)).await.unwrap();

    let new = register(&mut client, test_support::fixtures::register_request("n1")).await;
    assert_ne!(new.id, old.id);

    let err = stream.next().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("superseded by a newer registration"),
        "{}",
        err.message()
    );
    assert!(!rules::stream_replaced(&err));
    assert!(rules::must_register_again(err.code()));

    // The new session's stream is served.
    let mut current = Stream::open(&mut client).await.unwrap();
    current.send(beat("n1", &new, 2)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn streams_of_other_nodes_are_not_disturbed() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = server.client().await;
    let a = register(&mut client, test_support::fixtures::register_request("a")).await;
    let b = register(&mut client, test_support::fixtures::register_request("b")).await;
    let mut stream_a = Stream::open(&mut client).await.unwrap();
    stream_a.send(beat("a", &a, 1)).await.unwrap();
    let mut stream_b = Stream::open(&mut client).await.unwrap();
    stream_b.send(beat("b", &b, 1)).await.unwrap();

    // Node b gets a newer stream; node a's stream carries on.
    let mut again_b = Stream::open(&mut client).await.unwrap();
    again_b.send(beat("b", &b, 2)).await.unwrap();
    assert_eq!(
        stream_b.next().await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    for sequence in 2..5 {
        let ack = stream_a.send(beat("a", &a, sequence)).await.unwrap();
        assert_eq!(ack.sequence, sequence);
    }
    eventually(
        "both nodes ONLINE",
        std::time::Duration::from_secs(5),
        || {
            let mut client = client.clone();
            async move {
                status_is(&mut client, "a", pb::NodeStatus::Online).await?;
                status_is(&mut client, "b", pb::NodeStatus::Online).await
            }
        },
    )
    .await;
    server.stop().await;
}
