//! Crash safety of the embedded store: the registry process is SIGKILLed
//! in the middle of a registration storm and restarted on the same data
//! directory. Every Register it acknowledged is listed again, and the
//! store opens cleanly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::binaries::binaries;
use integration_tests::{RegistryProcess, Timing, list_nodes};
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use test_support::fixtures::register_request;

/// Concurrent registering clients.
const CLIENTS: usize = 32;
/// Acknowledged registrations after which the registry is killed.
const KILL_AFTER: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_register_survives_a_sigkill_mid_storm() {
    let bins = binaries().expect("the binaries build");
    let dir = bins.target_dir.join("e2e-logs").join("store-crash");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data_dir = dir.join("data");
    // A long timeout: nothing may go OFFLINE while the test looks.
    let timing = Timing {
        node_timeout: Duration::from_secs(60),
        heartbeat_interval: Duration::from_secs(20),
    };
    let mut registry = RegistryProcess::start_with_store(
        &bins.registry_server,
        &dir.join("registry.log"),
        timing,
        Some(&data_dir),
    )
    .await
    .expect("the registry starts");

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let url = registry.url();
    let mut storm = Vec::new();
    for client_no in 0..CLIENTS {
        let (acked, url) = (acked.clone(), url.clone());
        storm.push(tokio::spawn(async move {
            let mut client = NodeRegistryClient::connect(url).await.unwrap();
            let mut i = 0;
            loop {
                let node_id = format!("storm-{client_no}-{i}");
                match client.register(register_request(&node_id)).await {
                    Ok(_) => {
                        acked.lock().unwrap().push(node_id);
                        i += 1;
                    }
                    // Deferred by admission control (the registry's
                    // runtimes behind on a busy machine): again, as told.
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                        let advice = registry_proto::retry::advice(&status)
                            .unwrap_or(Duration::from_millis(100));
                        tokio::time::sleep(advice).await;
                    }
                    // The registry is gone: the storm is over.
                    Err(_) => return,
                }
            }
        }));
    }
    test_support::eventually("the storm well under way", Duration::from_secs(60), || {
        let n = acked.lock().unwrap().len();
        async move {
            if n >= KILL_AFTER {
                Ok(())
            } else {
                Err(format!("{n} acknowledged"))
            }
        }
    })
    .await;
    registry.kill().expect("SIGKILL the registry");
    for client in storm {
        client.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    registry.restart().await.expect("the store opens cleanly");
    let nodes = list_nodes(&registry.url()).await.expect("ListNodes");
    let missing: Vec<_> = acked.iter().filter(|id| !nodes.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged registrations lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    eprintln!(
        "{} acknowledged before the SIGKILL, {} listed after the restart",
        acked.len(),
        nodes.len()
    );
    assert!(nodes.len() >= acked.len());
}
