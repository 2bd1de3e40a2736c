//! Metrics published from a real server's activity, read through the
//! Prometheus recorder's own rendering (the text `/metrics` serves).

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use registry_proto::convert::to_proto_timestamp;
use registry_proto::pb;
use registry_server::Settings;
use test_support::{TestRegistry, eventually};
use tokio_stream::StreamExt;

/// The value of one sample line (`name{labels} value`) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn activity_shows_in_the_published_metrics() {
    // This test binary holds only this test, so it owns the global recorder.
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                registry_server::metrics::HEARTBEAT_SECONDS.into(),
            ),
            &[1e-3, 1.0],
        )
        .unwrap()
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    // The embedded store, so its commits show too.
    let data_dir = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start(test_support::registry::durable(
        Settings {
            // Long enough for the five durable writes below to land before
            // "beating" sends its first heartbeat on a slow disk.
            node_timeout: Duration::from_secs(1),
            heartbeat_interval: Duration::from_millis(100),
            ..Settings::default()
        },
        data_dir.path(),
    ))
    .await;
    let mut client = registry.client().await;

    let register = |id: &str| pb::RegisterRequest {
        node_id: id.into(),
        machine_id: "m".into(),
        address: "http://h:1".into(),
        ..Default::default()
    };
    let session = client
        .register(register("beating"))
        .await
        .unwrap()
        .into_inner();
    client.register(register("silent")).await.unwrap();
    let missing = client
        .get_node(pb::GetNodeRequest {
            node_id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    client.register(register("leaving")).await.unwrap();
    client
        .deregister(pb::DeregisterRequest {
            node_id: "leaving".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    client
        .cordon_node(pb::CordonNodeRequest {
            node_id: "beating".into(),
            reason: String::new(),
        })
        .await
        .unwrap();
    client
        .drain_node(pb::DrainNodeRequest {
            node_id: "silent".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // "beating" heartbeats every 50 ms while the test waits for "silent"
    // to go OFFLINE.
    let beating = tokio::spawn(async move {
        for sequence in 1.. {
            let beat = pb::HeartbeatRequest {
                node_id: "beating".into(),
                session_id: session.session_id,
                session_secret: session.session_secret.clone(),
                sent_at: Some(to_proto_timestamp(chrono::Utc::now())),
                pools: vec![pb::PoolStatus {
                    pool_id: "p".into(),
                    state: pb::PoolState::Ready as i32,
                    ..Default::default()
                }],
                gpus: vec![],
                sequence,
            };
            if tx.send(beat).await.is_err() {
                return;
            }
            replies.next().await.unwrap().unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let text = eventually(
        "one node offline and one pool ready in the metrics",
        Duration::from_secs(10),
        || {
            let text = handle.render();
            async move {
                let settled = sample(&text, "registry_nodes{status=\"offline\"}") == Some(1.0)
                    && sample(&text, "registry_pools{state=\"ready\"}") == Some(1.0)
                    && sample(&text, "registry_heartbeats_total") >= Some(3.0);
                if settled { Ok(text) } else { Err(text) }
            }
        },
    )
    .await;

    assert_eq!(
        sample(&text, "registry_nodes{status=\"online\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "registry_registrations_total"), Some(3.0));
    assert_eq!(sample(&text, "registry_deregistrations_total"), Some(1.0));
    assert_eq!(
        sample(&text, "registry_offline_transitions_total"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "registry_heartbeat_streams_open"), Some(1.0));
    assert_eq!(sample(&text, "registry_nodes_cordoned"), Some(1.0));
    assert_eq!(sample(&text, "registry_nodes_draining"), Some(1.0));
    assert!(sample(&text, "registry_heartbeats_total").unwrap() >= 1.0);
    assert!(
        sample(&text, "registry_heartbeat_handling_seconds_count").unwrap() >= 1.0,
        "{text}"
    );
    // Three registrations, one deregistration, the cordon and the drain
    // (its state, then its progress computed from the status at hand) were
    // written; the heartbeats and the OFFLINE transition never are. The
    // drain's two writes may share a commit.
    assert_eq!(sample(&text, "registry_store_writes_total"), Some(7.0));
    let commits = sample(&text, "registry_store_commits_total").unwrap();
    assert!((6.0..=7.0).contains(&commits), "{text}");
    assert_eq!(
        sample(&text, "registry_store_commit_seconds_count"),
        Some(commits),
        "{text}"
    );
    assert_eq!(sample(&text, "registry_store_commit_failures_total"), None);

    // Per-RPC metrics, go-grpc-prometheus style.
    let rpc = |kind: &str, method: &str| {
        format!(
            "grpc_type=\"{kind}\",grpc_service=\"registry.v1.NodeRegistry\",grpc_method=\"{method}\""
        )
    };
    let started = |kind: &str, method: &str| {
        sample(
            &text,
            &format!("grpc_server_started_total{{{}}}", rpc(kind, method)),
        )
    };
    let handled = |kind: &str, method: &str, code: &str| {
        let series = format!(
            "grpc_server_handled_total{{{},grpc_code=\"{code}\"}}",
            rpc(kind, method)
        );
        sample(&text, &series)
    };
    assert_eq!(started("unary", "Register"), Some(3.0), "{text}");
    assert_eq!(handled("unary", "Register", "OK"), Some(3.0), "{text}");
    assert_eq!(handled("unary", "Register", "InvalidArgument"), Some(0.0));
    assert_eq!(handled("unary", "Deregister", "OK"), Some(1.0));
    assert_eq!(handled("unary", "GetNode", "NotFound"), Some(1.0));
    assert_eq!(handled("unary", "GetNode", "OK"), Some(0.0));
    // Pre-registered: a method never called exports zero.
    assert_eq!(started("unary", "ListNodes"), Some(0.0));
    assert_eq!(
        sample(
            &text,
            &format!(
                "grpc_server_handling_seconds_count{{{}}}",
                rpc("unary", "Register")
            )
        ),
        Some(3.0)
    );
    // The heartbeat stream counts once, however many messages it carried,
    // and is not handled while it is open.
    assert_eq!(started("bidi_stream", "Heartbeat"), Some(1.0));
    assert_eq!(handled("bidi_stream", "Heartbeat", "OK"), Some(0.0));
    assert_eq!(handled("bidi_stream", "Heartbeat", "Canceled"), Some(0.0));
    assert!(
        !text.contains("grpc_server_handling_seconds_count{grpc_type=\"bidi_stream\""),
        "only unary calls have a latency histogram"
    );

    // Build and process metrics.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(
            &text,
            &format!("registry_build_info{{version=\"{version}\"}}")
        ),
        Some(1.0)
    );
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(sample(&text, "process_open_fds").unwrap() > 0.0);
    assert!(sample(&text, "process_start_time_seconds").unwrap() > 1.6e9);
    assert!(sample(&text, "process_cpu_seconds_total").is_some());

    // The agent going away ends the stream: counted once, as Canceled.
    beating.abort();
    drop(client);
    eventually(
        "the heartbeat stream counted as handled",
        Duration::from_secs(10),
        || {
            let text = handle.render();
            let series = format!(
                "grpc_server_handled_total{{{},grpc_code=\"Canceled\"}}",
                rpc("bidi_stream", "Heartbeat")
            );
            async move {
                match sample(&text, &series) {
                    Some(1.0) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    registry.stop().await;
}
