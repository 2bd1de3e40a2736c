//! The quick plan against an in-process registry: proves every scenario
//! still runs end to end and that the figures are sane (no errors, no false
//! OFFLINE, every silent node detected). Never asserts a speed: timings on
//! a shared CI machine mean nothing; the bench prints, a person reads.

use bench::Scenario;
use bench::plan::{Plan, RestartStore};
use bench::server::Launcher;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_plan_runs_every_scenario_correctly() {
    let plan = Plan::quick(false);
    let results = bench::run(&Launcher::InProcess, &plan, &Scenario::ALL, false)
        .await
        .expect("every scenario completes");

    let scale = results.scale.as_ref().expect("scale ran");
    assert_eq!(scale.len(), plan.scale.len());
    for row in scale {
        assert_eq!(row.listed, row.nodes, "every node is listed");
        assert_eq!(row.false_offline, 0, "no node was marked OFFLINE");
        assert!(row.errors.is_empty(), "errors: {:?}", row.errors);
        assert!(row.heartbeats_per_sec > 0.0);
        assert!(row.ack.count > 0 && row.ack.p50 <= row.ack.p99);
    }

    let throughput = results.throughput.as_ref().expect("throughput ran");
    assert!(!throughput.rows.is_empty());
    for row in &throughput.rows {
        assert!(row.errors.is_empty(), "errors: {:?}", row.errors);
        assert!(row.achieved > 0.0 && row.cpu_seconds_per_100k > 0.0);
    }

    let detection = results.detection.as_ref().expect("detection ran");
    assert_eq!(
        detection.silenced,
        (plan.detection.nodes as f64 * plan.detection.fraction) as usize
    );
    assert_eq!(
        detection.detected, detection.silenced,
        "every silent node went OFFLINE"
    );
    assert_eq!(detection.missed, 0);
    assert_eq!(detection.false_offline, 0, "no sending node went OFFLINE");
    assert_eq!(detection.lag.count, detection.detected as u64);

    let reads = results.reads.as_ref().expect("reads ran");
    assert_eq!(reads.rows.len(), 3);
    assert_eq!(
        reads.rows[1].nodes_per_read, plan.reads.nodes,
        "a walk reads every node"
    );
    assert_eq!(reads.rows[2].nodes_per_read, plan.reads.page_size as usize);
    assert_eq!(reads.rows[2].calls_per_read, 1);
    for row in &reads.rows[1..] {
        assert!(row.list.is_some_and(|l| l.count > 0));
        assert!(row.ack.count > 0, "heartbeats flowed during {}", row.phase);
    }

    let restart = results.restart.as_ref().expect("restart ran");
    assert_eq!(
        restart.len(),
        plan.restart.modes.len() * plan.restart.stores.len()
    );
    for row in restart {
        assert_eq!(row.online, row.nodes, "every node is back ONLINE");
        assert_eq!(row.false_offline, 0);
        assert!(row.all_back >= row.down);
        match row.store {
            // An empty registry: every node registers again.
            RestartStore::Memory => assert_eq!(row.reregistered, row.nodes, "{row:?}"),
            // The embedded store kept every session: nobody re-registers.
            RestartStore::Embedded => assert_eq!(row.reregistered, 0, "{row:?}"),
        }
    }

    let arrival = results.arrival.as_ref().expect("arrival ran");
    assert_eq!(arrival.rows.len(), 2);
    for row in &arrival.rows {
        assert_eq!(row.register_failures, 0, "{row:?}");
        assert!(row.registered_errors.is_empty(), "{row:?}");
        assert!(row.all_attached >= row.all_registered, "{row:?}");
        assert!(
            row.registered_ack.count > 0,
            "the registered fleet beat meanwhile"
        );
    }
    // 400 at once against 2 running and 8 queued: some are told to come
    // back later; without admission control none is.
    assert!(arrival.rows[0].deferred > 0, "{:?}", arrival.rows[0]);
    assert_eq!(arrival.rows[1].deferred, 0, "{:?}", arrival.rows[1]);

    let store = results.store.as_ref().expect("store ran");
    assert_eq!(store.failed, 0, "{store:?}");
    assert_eq!(store.acknowledged, plan.store.registrations);
    assert_eq!(
        store.listed, plan.store.registrations,
        "every acknowledged node listed"
    );
    assert!(store.latency.p50 <= store.latency.p99);

    let feed = results.feed.as_ref().expect("feed ran");
    assert_eq!(feed.rows.len(), 3);
    assert!(feed.rows[0].delivery.is_none());
    for row in &feed.rows[1..] {
        let delivery = row.delivery.expect("watchers measured");
        assert!(delivery.count > 0, "watchers received changes: {row:?}");
        assert_eq!(row.heartbeat_errors, 0, "{row:?}");
    }
    assert!(feed.find.calls > 0);
    assert_eq!(feed.find.errors + feed.find.not_found + feed.find.empty, 0);
    assert_eq!(
        feed.walk.nodes_per_walk, plan.feed.nodes,
        "a walk lists every node"
    );

    let drain = results.drain.as_ref().expect("drain ran");
    assert_eq!(drain.timed_out, 0, "every drain and resume round-tripped");
    assert_eq!(drain.drain.count, plan.drain.drains as u64);
    assert_eq!(drain.resume.count, plan.drain.drains as u64);
    assert!(drain.drain.p50 <= drain.drain.p99);

    // Without etcd (outside CI) the replicas scenario is skipped.
    if let Some(replicas) = results.replicas.as_ref() {
        assert_eq!(replicas.rows.len(), 2);
        for row in &replicas.rows {
            assert_eq!(row.register_failures, 0, "{row:?}");
            assert!(row.window.acked() > 0, "heartbeats flowed: {row:?}");
        }
        assert!(replicas.rows[0].etcd.is_some() && replicas.rows[1].etcd.is_none());
        let failover = &replicas.failover;
        assert_eq!(failover.reregistered, 0, "sessions survive: {failover:?}");
        assert_eq!(failover.listed, plan.replicas.nodes);
        assert_eq!(failover.offline, 0, "{failover:?}");
        assert!(failover.to_all_heartbeating >= failover.to_serving);
        assert!(bench::table::all(&results).contains("9. Replicas on etcd"));
    } else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI installs etcd"
        );
    }

    let tables = bench::table::all(&results);
    for heading in [
        "1. Scale",
        "2. Throughput",
        "3. Detection",
        "4. Reads",
        "5. Restart",
        "6. Change feed",
        "7. Drain round trip",
    ] {
        assert!(tables.contains(heading), "{heading} missing from\n{tables}");
    }
}
