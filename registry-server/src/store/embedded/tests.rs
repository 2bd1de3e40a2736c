use std::time::Duration;

use chrono::{TimeZone, Utc};
use registry_proto::pb;

use super::*;
use crate::registry::{NewRegistration, Registration};
use crate::store::secret_sha256;

fn record(node_id: &str, session_id: u64) -> NodeRecord {
    NodeRecord {
        registration: Registration::from(NewRegistration {
            node_id: node_id.to_string(),
            machine_id: format!("machine-{node_id}"),
            address: format!("http://{node_id}.example:9200"),
            pools: vec![pb::PoolSpec {
                pool_id: "pool-0".into(),
                engine: "vllm".into(),
                model: "llama-3.1-8b".into(),
                slots_total: 4,
                gpu_indices: vec![0],
                ..pb::PoolSpec::default()
            }]
            .into(),
            // A GPU with a MIG slice: the registration keeps its GPUs
            // encoded, and the record must read them back whole.
            capabilities: pb::Capabilities {
                cpu_cores: 8,
                gpus: vec![pb::GpuInfo {
                    index: 0,
                    uuid: "GPU-0a1b2c3d-0000-1111-2222-333344445555".into(),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_bytes: 80 << 30,
                    compute_capability: "9.0".into(),
                    pci_bus_id: "00000000:18:00.0".into(),
                    mig_enabled: true,
                    mig_instances: vec![pb::MigInstance {
                        uuid: "MIG-5a6b7c8d-0000-1111-2222-333344445555".into(),
                        profile: "1g.10gb".into(),
                        memory_total_bytes: 10 << 30,
                        index: 0,
                    }],
                }],
                ..pb::Capabilities::default()
            }
            .into(),
            agent_version: "node-agent test".into(),
            metrics_address: String::new(),
            models_available: vec!["qwen2.5-7b".into()],
            labels: [("zone".to_string(), "eu-1".to_string())].into(),
        }),
        session_id,
        secret_sha256: secret_sha256("s3cret"),
        registered_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
    }
}

/// `record` with GPUs as NVML names them and no MIG instance: the
/// registration keeps their ids packed and the rest shared, and the record
/// must read them back whole all the same.
fn packed_record(node_id: &str, session_id: u64) -> NodeRecord {
    let mut packed = record(node_id, session_id);
    packed.registration.capabilities = pb::Capabilities {
        cpu_cores: 8,
        gpus: crate::hardware::nvml_gpus(2, 2),
        ..pb::Capabilities::default()
    }
    .into();
    packed
}

fn cordoned() -> pb::AdminState {
    pb::AdminState {
        schedulable: false,
        cordoned: true,
        cordon_reason: "maintenance".into(),
        ..pb::AdminState::default()
    }
}

#[tokio::test]
async fn records_and_admin_states_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let store = EmbeddedStore::open(&path).unwrap();
    store.put_node(record("gpu-1", 7)).await.unwrap();
    store.put_node(packed_record("gpu-2", 8)).await.unwrap();
    store.put_admin("gpu-1", Some(cordoned())).await.unwrap();
    store.put_admin("gone-1", Some(cordoned())).await.unwrap();
    store.close().await;

    let store = EmbeddedStore::open(&path).unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(
        loaded.nodes,
        vec![record("gpu-1", 7), packed_record("gpu-2", 8)]
    );
    assert_eq!(
        loaded.admin,
        vec![
            ("gone-1".to_string(), cordoned()),
            ("gpu-1".to_string(), cordoned())
        ]
    );
    store.close().await;
}

#[tokio::test]
async fn deletes_remove_the_record_and_leave_the_admin_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let store = EmbeddedStore::open(&path).unwrap();
    store.put_node(record("gpu-1", 1)).await.unwrap();
    store.put_admin("gpu-1", Some(cordoned())).await.unwrap();
    store.delete_node("gpu-1").await.unwrap();
    let loaded = store.load().await.unwrap();
    assert!(loaded.nodes.is_empty());
    assert_eq!(loaded.admin.len(), 1);
    store.put_admin("gpu-1", None).await.unwrap();
    assert!(store.load().await.unwrap().admin.is_empty());
    // Deleting what is not there is no error.
    store.delete_node("never-there").await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn a_later_put_replaces_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join(FILE_NAME)).unwrap();
    store.put_node(record("gpu-1", 1)).await.unwrap();
    store.put_node(record("gpu-1", 2)).await.unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.nodes, vec![record("gpu-1", 2)]);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_puts_are_committed_in_few_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join(FILE_NAME)).unwrap());
    // Queue every write first, as a storm of concurrent Registers does,
    // then await them all.
    let commits: Vec<_> = (0..2000)
        .map(|i| store.put_node(record(&format!("gpu-{i}"), i)))
        .collect();
    for commit in futures_util::future::join_all(commits).await {
        commit.unwrap();
    }
    let stats = store.commit_stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.writes.load(Relaxed), 2000);
    // One commit per batch: far fewer than one per write.
    assert!(
        stats.commits.load(Relaxed) < 100,
        "{} commits for 2000 writes",
        stats.commits.load(Relaxed)
    );
    assert_eq!(store.load().await.unwrap().nodes.len(), 2000);
    store.close().await;
}

#[tokio::test]
async fn writes_after_close_fail_instead_of_vanishing() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join(FILE_NAME)).unwrap();
    store.close().await;
    let err = store.put_node(record("gpu-1", 1)).await.unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
}

#[tokio::test]
async fn a_corrupt_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
    let err = EmbeddedStore::open(&path).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Open { .. }), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("--reset-store"), "{text}");
}

#[tokio::test]
async fn an_undecodable_record_is_an_error_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let store = EmbeddedStore::open(&path).unwrap();
    store
        .queue(Op::Node {
            node_id: "gpu-1".into(),
            value: Some(vec![0xff, 0xff, 0xff]),
        })
        .await
        .unwrap();
    let err = store.load().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("node gpu-1"), "{text}");
    store.close().await;
}

#[tokio::test]
async fn reset_discards_the_file_and_a_fresh_store_opens_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    std::fs::write(&path, b"not a store").unwrap();
    assert!(EmbeddedStore::open(&path).is_err());
    reset(&path).unwrap();
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.load().await.unwrap(), Loaded::default());
    store.close().await;
    // Resetting when there is no file is fine too.
    std::fs::remove_file(&path).unwrap();
    reset(&path).unwrap();
}

#[tokio::test]
async fn a_second_open_of_a_file_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let store = EmbeddedStore::open(&path).unwrap();
    let err = EmbeddedStore::open(&path).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    store.close().await;
    // Once closed, the file opens again.
    tokio::time::sleep(Duration::from_millis(10)).await;
    EmbeddedStore::open(&path).unwrap().close().await;
}
