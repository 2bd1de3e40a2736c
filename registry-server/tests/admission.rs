//! Register's admission control through the real server: a burst of
//! registrations larger than the registry runs and queues at once is
//! answered RESOURCE_EXHAUSTED with a retry time (google.rpc.RetryInfo)
//! for the excess, never with a timeout, and every caller that comes back
//! at its time is registered.

mod common;

use std::time::Duration;

use registry_proto::pb;
use registry_server::Settings;
use test_support::registry::durable;
use test_support::{TestRegistry, fixtures::register_request};
use tonic::Code;

#[tokio::test]
async fn a_burst_past_the_queue_is_deferred_with_a_retry_time_and_then_registered() {
    // This test binary holds only this test, so it owns the global recorder.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // One Register at a time and two waiting: each waits for its record's
    // commit to the embedded store, so 200 at once cannot all fit.
    let settings = durable(
        Settings {
            max_concurrent_registrations: 1,
            max_queued_registrations: 2,
            ..Settings::default()
        },
        dir.path(),
    );
    let server = TestRegistry::start(settings).await;
    let client = server.client().await;
    let calls = (0..200).map(|i| {
        let mut client = client.clone();
        async move {
            let id = format!("burst-{i}");
            let mut deferrals = 0;
            loop {
                match client.register(register_request(&id)).await {
                    Ok(_) => return deferrals,
                    Err(status) => {
                        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                        assert!(
                            status.message().contains("--max-queued-registrations")
                                || status.message().contains("--max-registration-wait"),
                            "the refusal names the limit: {}",
                            status.message()
                        );
                        let advice = registry_proto::retry::advice(&status)
                            .expect("a refusal carries a retry time");
                        assert!(
                            advice >= Duration::from_millis(100)
                                && advice <= Duration::from_secs(60),
                            "{advice:?}"
                        );
                        deferrals += 1;
                        tokio::time::sleep(advice).await;
                    }
                }
            }
        }
    });
    let deferrals: Vec<u32> = futures_util::future::join_all(calls).await;
    let deferred = deferrals.iter().filter(|&&d| d > 0).count();
    assert!(
        deferred > 0,
        "200 Registers at once with room for 3 deferred none"
    );
    let mut client = client;
    let listed = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(listed.len(), 200, "every deferred caller registered later");
    // The metrics say so too.
    let refused =
        test_support::http::sample(&handle.render(), "registry_registrations_refused_total")
            .expect("the refusal counter");
    assert_eq!(refused as u32, deferrals.iter().sum::<u32>());
    server.stop().await;
}
