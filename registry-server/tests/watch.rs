//! WatchNodes against a real server: snapshot and marker, resume, the
//! history's compaction answer, slow watchers, filters, progress, the cap,
//! and the list-then-watch recipe of the README.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Stream, register};
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_server::{RevisionBase, Settings};
use test_support::{
    Session, TestRegistry,
    fixtures::{beat_in, register_request},
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

type Watch = Streaming<pb::WatchNodesResponse>;

/// Default settings with revisions from 0, so tests can name them.
fn zero() -> Settings {
    Settings {
        revision_base: RevisionBase::Zero,
        ..Settings::default()
    }
}

async fn watch(client: &mut NodeRegistryClient<Channel>, request: pb::WatchNodesRequest) -> Watch {
    client.watch_nodes(request).await.unwrap().into_inner()
}

fn from(start_revision: u64) -> pb::WatchNodesRequest {
    pb::WatchNodesRequest {
        start_revision,
        ..Default::default()
    }
}

/// The next message of a watch, or the status that ended it.
async fn next(watch: &mut Watch) -> Result<pb::WatchNodesResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a watch message within 10 s")
        .expect("the watch ended without a status")
}

/// (type, revision, node_id) of a message, for compact assertions.
fn brief(event: &pb::WatchNodesResponse) -> (pb::WatchEventType, u64, String) {
    (
        event.r#type(),
        event.revision,
        event
            .node
            .as_ref()
            .map(|n| n.node_id.clone())
            .unwrap_or_default(),
    )
}

async fn revision(client: &mut NodeRegistryClient<Channel>) -> u64 {
    client
        .list_nodes(pb::ListNodesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// One heartbeat of `node_id` on its own stream, acknowledged.
async fn beat_once(
    client: &mut NodeRegistryClient<Channel>,
    node_id: &str,
    session: &Session,
    state: pb::PoolState,
) {
    let mut stream = Stream::open(client).await.unwrap();
    let ack = stream
        .send(beat_in(node_id, session, 7, state))
        .await
        .unwrap();
    assert_eq!(ack.sequence, 7);
}

use pb::WatchEventType::{Added, Deleted, Modified, Progress, SnapshotComplete};

#[tokio::test]
async fn a_snapshot_then_its_marker_then_live_events() {
    let server = TestRegistry::start(zero()).await;
    let mut client = server.client().await;
    register(&mut client, register_request("b")).await;
    register(&mut client, register_request("a")).await;
    let mut watch = watch(&mut client, from(0)).await;
    assert_eq!(
        brief(&next(&mut watch).await.unwrap()),
        (Added, 2, "a".into())
    );
    assert_eq!(
        brief(&next(&mut watch).await.unwrap()),
        (Added, 1, "b".into())
    );
    assert_eq!(
        brief(&next(&mut watch).await.unwrap()),
        (SnapshotComplete, 2, String::new())
    );
    let session = register(&mut client, register_request("c")).await;
    beat_once(&mut client, "c", &session, pb::PoolState::Ready).await;
    client
        .deregister(pb::DeregisterRequest {
            node_id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        brief(&next(&mut watch).await.unwrap()),
        (Added, 3, "c".into())
    );
    let modified = next(&mut watch).await.unwrap();
    assert_eq!(brief(&modified), (Modified, 4, "c".into()));
    assert_eq!(modified.node.unwrap().revision, 4);
    assert_eq!(
        brief(&next(&mut watch).await.unwrap()),
        (Deleted, 5, "a".into())
    );
}

#[tokio::test]
async fn a_resumed_watch_sees_every_later_change_exactly_once() {
    let server = TestRegistry::start(zero()).await;
    let mut client = server.client().await;
    let mut sessions = Vec::new();
    for i in 0..5 {
        sessions.push(register(&mut client, register_request(&format!("n{i}"))).await);
    }
    // Revision 5 now; watch from 2, then change more while watching.
    let mut watch = watch(&mut client, from(2)).await;
    beat_once(&mut client, "n1", &sessions[1], pb::PoolState::Draining).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(brief(&next(&mut watch).await.unwrap()));
    }
    assert_eq!(
        seen,
        vec![
            (Added, 3, "n2".into()),
            (Added, 4, "n3".into()),
            (Added, 5, "n4".into()),
            (Modified, 6, "n1".into()),
        ]
    );
    // A resume from the last revision seen starts exactly after it.
    drop(watch);
    beat_once(&mut client, "n2", &sessions[2], pb::PoolState::Failed).await;
    let mut again = self::watch(&mut client, from(6)).await;
    assert_eq!(
        brief(&next(&mut again).await.unwrap()),
        (Modified, 7, "n2".into())
    );
    let current = revision(&mut client).await;
    assert_eq!(current, 7);
    let future = client.watch_nodes(from(current + 1)).await;
    let status = match future {
        Ok(response) => next(&mut response.into_inner()).await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn a_start_older_than_the_history_is_out_of_range_with_the_relist_revision() {
    let settings = Settings {
        watch_history: 3,
        ..zero()
    };
    let server = TestRegistry::start(settings).await;
    let mut client = server.client().await;
    for i in 0..6 {
        register(&mut client, register_request(&format!("n{i}"))).await;
    }
    // History holds revisions 4..=6: a start from 3 is served, from 2 not.
    let mut served = watch(&mut client, from(3)).await;
    assert_eq!(
        brief(&next(&mut served).await.unwrap()),
        (Added, 4, "n3".into())
    );
    let status = match client.watch_nodes(from(2)).await {
        Ok(response) => next(&mut response.into_inner()).await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status
            .message()
            .contains("compacted; relist from revision 6"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_watcher_that_never_reads_is_ended_while_every_heartbeat_is_acknowledged() {
    const NODES: usize = 1000;
    let settings = Settings {
        watch_queue: 64,
        ..zero()
    };
    let server = TestRegistry::start(settings).await;
    let mut client = server.client().await;
    // The watcher's own connection, with small HTTP/2 windows (a client's
    // default stream window is megabytes), so its unread stream holds
    // nothing of the heartbeats' connections and fills up soon.
    let small = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .unwrap();
    let mut stuck = watch(&mut NodeRegistryClient::new(small), from(0)).await;
    let mut sessions = Vec::with_capacity(NODES);
    for i in 0..NODES {
        sessions.push(register(&mut client, register_request(&format!("n{i:04}"))).await);
    }
    // Every node streams beats whose pool state changes each time: each
    // beat is an event, far more than the watcher's queue.
    let mut acked = 0;
    for round in 0..3u64 {
        let mut streams = Vec::with_capacity(NODES);
        for _ in 0..NODES {
            streams.push(Stream::open(&mut client).await.unwrap());
        }
        let state = if round % 2 == 0 {
            pb::PoolState::Draining
        } else {
            pb::PoolState::Ready
        };
        for (i, stream) in streams.iter_mut().enumerate() {
            let id = format!("n{i:04}");
            let ack = stream
                .send(beat_in(&id, &sessions[i], round, state))
                .await
                .unwrap_or_else(|s| panic!("beat of {id} refused: {s:?}"));
            assert_eq!(ack.sequence, round);
            acked += 1;
        }
    }
    assert_eq!(acked, 3 * NODES, "every heartbeat was acknowledged");
    // Reading now: whatever was buffered, then RESOURCE_EXHAUSTED naming the
    // revision to resume from.
    let mut last = 0;
    let status = loop {
        match next(&mut stuck).await {
            Ok(event) => last = event.revision.max(last),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let resume: u64 = status
        .message()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {:?}", status.message()));
    assert!(resume >= last, "resume from {resume}, last sent {last}");
    register(&mut client, register_request("late")).await;
    let mut resumed = watch(&mut client, from(resume)).await;
    assert_eq!(next(&mut resumed).await.unwrap().revision, resume + 1);
}

#[tokio::test]
async fn a_status_filter_turns_offline_into_deleted_and_back_into_added() {
    let settings = Settings {
        node_timeout: Duration::from_millis(400),
        heartbeat_interval: Duration::from_millis(100),
        ..zero()
    };
    let server = TestRegistry::start(settings).await;
    let mut client = server.client().await;
    let mut online = watch(
        &mut client,
        pb::WatchNodesRequest {
            status: pb::NodeStatus::Online as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next(&mut online).await.unwrap().r#type(), SnapshotComplete);
    let session = register(&mut client, register_request("n1")).await;
    assert_eq!(
        brief(&next(&mut online).await.unwrap()),
        (Added, 1, "n1".into())
    );
    let gone = next(&mut online).await.unwrap();
    assert_eq!(brief(&gone), (Deleted, 2, "n1".into()));
    assert_eq!(gone.node.unwrap().status(), pb::NodeStatus::Offline);
    beat_once(&mut client, "n1", &session, pb::PoolState::Ready).await;
    let back = next(&mut online).await.unwrap();
    assert_eq!(brief(&back), (Added, 3, "n1".into()));
}

#[tokio::test]
async fn a_model_filter_matches_registered_and_reported_models() {
    let server = TestRegistry::start(zero()).await;
    let mut client = server.client().await;
    let mut other = register_request("other");
    other.pools[0].model = "mistral-7b".into();
    register(&mut client, other).await;
    register(&mut client, register_request("llama")).await;
    let mut watch = watch(
        &mut client,
        pb::WatchNodesRequest {
            model: "llama-3.1-8b".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        brief(&next(&mut watch).await.unwrap()),
        (Added, 2, "llama".into())
    );
    assert_eq!(next(&mut watch).await.unwrap().r#type(), SnapshotComplete);
}

#[tokio::test]
async fn a_quiet_watch_gets_progress_and_the_cap_refuses_more_watchers() {
    let settings = Settings {
        watch_progress_interval: Duration::from_millis(200),
        max_watchers: 1,
        ..zero()
    };
    let server = TestRegistry::start(settings).await;
    let mut client = server.client().await;
    register(&mut client, register_request("n1")).await;
    let mut quiet = watch(&mut client, from(1)).await;
    assert_eq!(
        brief(&next(&mut quiet).await.unwrap()),
        (Progress, 1, String::new())
    );
    let refused = match client.watch_nodes(from(0)).await {
        Ok(response) => next(&mut response.into_inner()).await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop(quiet);
    test_support::eventually("the cap frees up", Duration::from_secs(5), || {
        let mut client = client.clone();
        async move {
            match client.watch_nodes(from(0)).await {
                Ok(_) => Ok(()),
                Err(status) => Err(format!("{status:?}")),
            }
        }
    })
    .await;
}

/// A node as the change feed describes it: without the fields that move
/// on every beat without an event.
fn published(mut node: pb::Node) -> pb::Node {
    node.last_heartbeat_at = None;
    node.agent_time = None;
    node.gpu_stats.clear();
    node
}

#[tokio::test]
async fn list_then_watch_from_the_first_page_misses_nothing() {
    let settings = Settings {
        watch_progress_interval: Duration::from_millis(100),
        ..zero()
    };
    let server = TestRegistry::start(settings).await;
    let mut client = server.client().await;
    let mut sessions = BTreeMap::new();
    for i in 0..20 {
        let id = format!("n{i:02}");
        sessions.insert(
            id.clone(),
            register(&mut client, register_request(&id)).await,
        );
    }
    // List page by page while the fleet changes between pages.
    let mut state: BTreeMap<String, pb::Node> = BTreeMap::new();
    let mut first_revision = None;
    let mut token = String::new();
    let mut round = 0;
    loop {
        let page = client
            .list_nodes(pb::ListNodesRequest {
                page_size: 4,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        first_revision.get_or_insert(page.revision);
        for node in page.nodes {
            state.insert(node.node_id.clone(), node);
        }
        // Changes behind and ahead of the listing cursor.
        round += 1;
        let behind = format!("n{:02}", round - 1);
        let ahead = format!("n{:02}", 19 - round);
        beat_once(
            &mut client,
            &behind,
            &sessions[&behind],
            pb::PoolState::Draining,
        )
        .await;
        client
            .deregister(pb::DeregisterRequest {
                node_id: ahead.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        let new = format!("m{round:02}");
        sessions.insert(
            new.clone(),
            register(&mut client, register_request(&new)).await,
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut watch = watch(&mut client, from(first_revision.unwrap())).await;
    let last = revision(&mut client).await;
    loop {
        let event = next(&mut watch).await.unwrap();
        match event.r#type() {
            Added | Modified => {
                let node = event.node.unwrap();
                state.insert(node.node_id.clone(), node);
            }
            Deleted => {
                state.remove(&event.node.unwrap().node_id);
            }
            Progress | SnapshotComplete => {}
            pb::WatchEventType::Unspecified => panic!("an unspecified event"),
        }
        if event.revision >= last {
            break;
        }
    }
    let fleet: BTreeMap<String, pb::Node> = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| (n.node_id.clone(), published(n)))
        .collect();
    let rebuilt: BTreeMap<String, pb::Node> =
        state.into_iter().map(|(k, n)| (k, published(n))).collect();
    assert_eq!(rebuilt, fleet);
}

#[tokio::test]
async fn a_revision_from_before_a_restart_is_compacted_not_resumed() {
    // Revisions start at the start time in microseconds (the default).
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = server.client().await;
    register(&mut client, register_request("n1")).await;
    let before = revision(&mut client).await;
    assert!(
        before > 1_600_000_000_000_000,
        "a clock-based revision: {before}"
    );
    let addr = server.addr;
    server.stop().await;

    let again = TestRegistry::restart_on(addr, Settings::default()).await;
    let mut client = again.client().await;
    // The fleet re-registers: the new history moves on, from a higher base.
    register(&mut client, register_request("n1")).await;
    let after = revision(&mut client).await;
    assert!(after > before, "{after} after {before}");
    let status = match client.watch_nodes(from(before)).await {
        Ok(response) => next(&mut response.into_inner()).await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("relist"), "{}", status.message());
    again.stop().await;
}
