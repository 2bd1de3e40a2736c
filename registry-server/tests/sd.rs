//! The metrics port of a real server: `/metrics` and Prometheus HTTP
//! service discovery (`/sd/nodes`, `/sd/pools`) in Prometheus' format.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use registry_proto::pb;
use registry_server::Settings;
use registry_server::metrics_port::MetricsEndpoint;
use serde_json::{Value, json};
use test_support::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A plain HTTP/1.0 GET: the status line's code, the Content-Type and the
/// body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// GETs `path` and checks it is HTTP SD: 200, application/json, an array.
async fn sd(addr: SocketAddr, path: &str) -> Value {
    let (status, content_type, body) = get(addr, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    assert_eq!(content_type, "application/json", "{path}");
    let value: Value = serde_json::from_str(&body).unwrap();
    assert!(value.is_array(), "{path}: {body}");
    value
}

#[tokio::test]
async fn service_discovery_lists_online_nodes_with_metrics_addresses() {
    // A recorder of this test's own: nothing is installed globally.
    let handle = PrometheusBuilder::new().build_recorder().handle();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(registry_server::run_with_metrics(
        grpc,
        Settings {
            node_timeout: Duration::from_millis(600),
            heartbeat_interval: Duration::from_millis(200),
            ..Settings::default()
        },
        MetricsEndpoint {
            listener: metrics,
            handle,
        },
        async {
            let _ = stopped.await;
        },
    ));
    let mut client = eventually("the registry answers", Duration::from_secs(10), || async {
        pb::node_registry_client::NodeRegistryClient::connect(format!("http://{grpc_addr}"))
            .await
            .map_err(|e| e.to_string())
    })
    .await;

    // Empty: exactly `[]`.
    let (_, _, body) = get(metrics_addr, "/sd/nodes").await;
    assert_eq!(body, "[]");
    assert_eq!(sd(metrics_addr, "/sd/pools").await, json!([]));
    let (status, content_type, _) = get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"), "{content_type}");

    let mut with_metrics = test_support::fixtures::register_request("gpu-1");
    with_metrics.machine_id = "m-1".into();
    with_metrics.metrics_address = "http://10.0.0.5:9101/metrics".into();
    with_metrics.labels = [
        ("rack".to_owned(), "r7".to_owned()),
        ("topology.kubernetes.io/zone".to_owned(), "z1".to_owned()),
    ]
    .into();
    with_metrics.pools = vec![
        pb::PoolSpec {
            pool_id: "llama".into(),
            engine: "vllm".into(),
            model: "llama-3.1-8b".into(),
            slots_total: 4,
            metrics_url: "https://10.0.0.5:8443/engine/metrics".into(),
            ..Default::default()
        },
        pb::PoolSpec {
            pool_id: "quiet".into(),
            engine: "vllm".into(),
            model: "m".into(),
            slots_total: 1,
            ..Default::default()
        },
    ];
    client.register(with_metrics).await.unwrap();
    let mut without = test_support::fixtures::register_request("gpu-2");
    without.metrics_address = String::new();
    for pool in &mut without.pools {
        pool.metrics_url = String::new();
    }
    client.register(without).await.unwrap();

    assert_eq!(
        sd(metrics_addr, "/sd/nodes").await,
        json!([{
            "targets": ["10.0.0.5:9101"],
            "labels": {
                "__scheme__": "http",
                "__metrics_path__": "/metrics",
                "node_id": "gpu-1",
                "machine_id": "m-1",
                "label_rack": "r7",
                "label_topology_kubernetes_io_zone": "z1",
            },
        }])
    );
    assert_eq!(
        sd(metrics_addr, "/sd/pools").await,
        json!([{
            "targets": ["10.0.0.5:8443"],
            "labels": {
                "__scheme__": "https",
                "__metrics_path__": "/engine/metrics",
                "node_id": "gpu-1",
                "machine_id": "m-1",
                "pool_id": "llama",
                "model": "llama-3.1-8b",
                "engine": "vllm",
                "label_rack": "r7",
                "label_topology_kubernetes_io_zone": "z1",
            },
        }])
    );

    // No heartbeats: gpu-1 goes OFFLINE after the node timeout and leaves
    // both lists.
    eventually(
        "gpu-1 leaves /sd/nodes",
        Duration::from_secs(10),
        || async {
            let (_, _, body) = get(metrics_addr, "/sd/nodes").await;
            if body == "[]" { Ok(()) } else { Err(body) }
        },
    )
    .await;
    assert_eq!(
        client
            .get_node(pb::GetNodeRequest {
                node_id: "gpu-1".into()
            })
            .await
            .unwrap()
            .into_inner()
            .status,
        pb::NodeStatus::Offline as i32
    );
    assert_eq!(sd(metrics_addr, "/sd/pools").await, json!([]));

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
