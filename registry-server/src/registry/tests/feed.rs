//! The change feed of the registry core: which operations bump the
//! revision (and which must not), shared views, and the history's
//! compaction boundary.

use std::sync::Mutex as StdMutex;

use super::*;
use crate::events::{ChangeSubscriber, Event, EventKind, Start, StartError};
use crate::figures::GpuFigures;

/// Records every event it is handed, as the placement index would.
#[derive(Default)]
struct Recorder {
    /// The events, in the order they were applied.
    events: StdMutex<Vec<Event>>,
}

impl ChangeSubscriber for Recorder {
    fn apply(&self, event: &Event) {
        self.events.lock().unwrap().push(event.clone());
    }
}

impl Recorder {
    fn kinds(&self) -> Vec<(u64, EventKind, String)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e.revision, e.kind, e.node.node_id().to_owned()))
            .collect()
    }

    fn last(&self) -> Event {
        self.events.lock().unwrap().last().cloned().unwrap()
    }
}

/// A registry with a recording subscriber and its expiry task running.
fn recorded(history: usize) -> (Registry, Arc<Recorder>, CancellationToken) {
    let recorder = Arc::new(Recorder::default());
    let registry = Registry::with_options(
        Timing {
            node_timeout: TIMEOUT,
            heartbeat_interval: Duration::from_secs(10),
            offline_retention: RETENTION,
        },
        Options {
            watch_history: history,
            subscribers: vec![recorder.clone() as Arc<dyn ChangeSubscriber>],
            ..Options::default()
        },
    );
    let stop = CancellationToken::new();
    tokio::spawn(crate::expiry::run(registry.clone(), stop.clone()));
    (registry, recorder, stop)
}

fn pool(state: pb::PoolState, free: u32, vram: u64) -> Vec<pb::PoolStatus> {
    vec![pb::PoolStatus {
        pool_id: "pool-0".into(),
        state: state as i32,
        slots_total: 4,
        slots_free: free,
        vram_free_bytes: vram,
        model: "m".into(),
        engine: "vllm".into(),
        ..Default::default()
    }]
}

fn beat_with(pools: Vec<pb::PoolStatus>) -> Beat {
    Beat {
        sent_at: Utc::now(),
        received_at: Utc::now(),
        pools,
        gpus: vec![],
    }
}

const GIB: u64 = 1 << 30;

#[tokio::test(start_paused = true)]
async fn the_revision_moves_exactly_on_visible_changes() {
    let (registry, recorder, _stop) = recorded(100);
    assert_eq!(registry.revision(), 0);
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    assert_eq!(registry.revision(), 1, "register is ADDED");
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    let send = |pools| {
        registry
            .heartbeat(&slot, reg.session_id, beat_with(pools), Instant::now())
            .unwrap();
        registry.revision()
    };
    assert_eq!(
        send(pool(pb::PoolState::Ready, 4, 10 * GIB)),
        2,
        "first pool status"
    );
    assert_eq!(
        send(pool(pb::PoolState::Ready, 4, 10 * GIB)),
        2,
        "liveness only"
    );
    assert_eq!(
        send(pool(pb::PoolState::Ready, 4, 10 * GIB + VRAM_STEP)),
        2,
        "vram moving by the step or less is not a change"
    );
    assert_eq!(
        send(pool(pb::PoolState::Ready, 4, 10 * GIB - VRAM_STEP - 1)),
        3,
        "vram moving by more than the step is"
    );
    assert_eq!(
        send(pool(pb::PoolState::Ready, 3, 9 * GIB)),
        4,
        "slots_free"
    );
    assert_eq!(send(pool(pb::PoolState::Draining, 3, 9 * GIB)), 5, "state");
    let mut other_model = pool(pb::PoolState::Draining, 3, 9 * GIB);
    other_model[0].model = "m2".into();
    assert_eq!(send(other_model.clone()), 6, "model");
    let mut two = other_model.clone();
    two.push(pb::PoolStatus {
        pool_id: "pool-1".into(),
        ..other_model[0].clone()
    });
    assert_eq!(send(two), 7, "the set of pools");

    // Re-registering, even identically, starts a visible new session.
    let again = registry.register(registration("n1"), Now::read()).unwrap();
    assert_eq!(registry.revision(), 8);
    assert_eq!(registry.get("n1").unwrap().session_id, again.session_id);

    // OFFLINE at the deadline, removal after retention.
    advance(TIMEOUT + MS).await;
    assert_eq!(registry.revision(), 9);
    assert_eq!(recorder.last().node.status(), pb::NodeStatus::Offline);
    advance(RETENTION).await;
    assert_eq!(registry.revision(), 10);
    let removed = recorder.last();
    assert_eq!(removed.kind, EventKind::Deleted);
    assert_eq!(
        removed.node.status(),
        pb::NodeStatus::Offline,
        "DELETED carries the final state"
    );

    let reg2 = registry.register(registration("n2"), Now::read()).unwrap();
    registry.deregister("n2", reg2.session_id, None).unwrap();
    assert_eq!(
        recorder.kinds(),
        (1..=12)
            .map(|r| {
                let (kind, node) = match r {
                    1 => (EventKind::Added, "n1"),
                    10 => (EventKind::Deleted, "n1"),
                    11 => (EventKind::Added, "n2"),
                    12 => (EventKind::Deleted, "n2"),
                    _ => (EventKind::Modified, "n1"),
                };
                (r, kind, node.to_string())
            })
            .collect::<Vec<_>>(),
        "subscribers see every event once, in revision order"
    );
}

#[tokio::test(start_paused = true)]
async fn a_returning_node_is_modified_and_its_view_moves_only_with_changes() {
    let (registry, recorder, _stop) = recorded(100);
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    advance(TIMEOUT + MS).await;
    assert_eq!(registry.revision(), 2);
    registry
        .heartbeat(&slot, reg.session_id, beat_with(vec![]), Instant::now())
        .unwrap();
    assert_eq!(registry.revision(), 3, "back ONLINE is MODIFIED");
    assert_eq!(recorder.last().node.status(), pb::NodeStatus::Online);

    // A liveness-only beat moves last_heartbeat_at, not the view.
    let before = registry.view("n1").unwrap();
    advance(Duration::from_secs(5)).await;
    let later = Beat {
        received_at: Utc::now() + chrono::Duration::seconds(5),
        ..beat_with(vec![])
    };
    registry
        .heartbeat(&slot, reg.session_id, later.clone(), Instant::now())
        .unwrap();
    let after = registry.view("n1").unwrap();
    assert!(Arc::ptr_eq(&before, &after), "no view was built");
    let read = registry.get("n1").unwrap();
    assert_eq!(
        read.last_heartbeat_at,
        Some(registry_proto::convert::to_proto_timestamp(
            later.received_at
        )),
        "readers see the latest beat"
    );
    assert_eq!(read.revision, 3);
}

#[tokio::test(start_paused = true)]
async fn readers_and_events_share_one_view() {
    let (registry, recorder, _stop) = recorded(100);
    registry.register(registration("n1"), Now::read()).unwrap();
    let event = recorder.last();
    let view = registry.view("n1").unwrap();
    assert!(
        Arc::ptr_eq(&view, &event.node),
        "the event carries the stored view"
    );
    assert_eq!(view.revision(), event.revision);
    let page = registry.list_page(&NodeFilter::default(), 0, "");
    assert_eq!(page.revision, 1);
    let mut listed = page.nodes[0].clone();
    let mut stored = view.to_proto();
    // Only the liveness fields are patched at read time.
    listed.last_heartbeat_at = None;
    listed.agent_time = None;
    stored.last_heartbeat_at = None;
    stored.agent_time = None;
    assert_eq!(listed, stored);
    assert_eq!(registry.get("n1").unwrap().revision, 1);
    let snapshot = registry.feed().subscribe(Start::Snapshot).unwrap();
    let first = snapshot.backlog.map(Result::unwrap).next().unwrap();
    assert!(
        Arc::ptr_eq(&first.node, &view),
        "snapshots share the view too"
    );
}

#[tokio::test(start_paused = true)]
async fn the_history_serves_exactly_the_revisions_it_holds() {
    let (registry, _recorder, _stop) = recorded(3);
    for i in 0..5 {
        registry
            .register(registration(&format!("n{i}")), Now::read())
            .unwrap();
    }
    // Revisions 3, 4 and 5 are kept: any start from 2 on is served.
    let feed = registry.feed();
    let from2 = feed.subscribe(Start::After(2)).unwrap();
    assert_eq!(
        from2
            .backlog
            .map(|e| e.unwrap().revision)
            .collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(from2.revision, 5);
    assert!(feed.subscribe(Start::After(5)).unwrap().backlog.is_empty());
    assert_eq!(
        feed.subscribe(Start::After(1)).err(),
        Some(StartError::Compacted {
            requested: 1,
            oldest: 2,
            current: 5
        })
    );
    assert_eq!(
        feed.subscribe(Start::After(6)).err(),
        Some(StartError::Future {
            requested: 6,
            current: 5
        })
    );
    let snapshot = feed.subscribe(Start::Snapshot).unwrap();
    assert_eq!(snapshot.backlog.len(), 5, "a snapshot needs no history");
}

#[tokio::test(start_paused = true)]
async fn a_live_subscription_joins_its_backlog_without_gap_or_duplicate() {
    let (registry, _recorder, _stop) = recorded(100);
    registry.register(registration("a"), Now::read()).unwrap();
    let mut sub = registry.feed().subscribe(Start::After(0)).unwrap();
    registry.register(registration("b"), Now::read()).unwrap();
    assert_eq!(sub.backlog.len(), 1);
    assert_eq!(sub.backlog.next().unwrap().unwrap().revision, 1);
    assert_eq!(sub.live.recv().await.unwrap().revision, 2);
}

#[tokio::test(start_paused = true)]
async fn a_resume_gets_each_view_with_the_registration_it_had() {
    let (registry, recorder, _stop) = recorded(100);
    let first = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", first.session_id, &first.session_secret)
        .unwrap();
    for free in [3, 2] {
        registry
            .heartbeat(
                &slot,
                first.session_id,
                beat_with(pool(pb::PoolState::Ready, free, GIB)),
                Instant::now(),
            )
            .unwrap();
    }
    // The same machine registers again with another address and labels:
    // the views after it carry the new registration, those before the old.
    let mut moved = new_registration("n1");
    moved.address = "http://n1-new:9200".into();
    moved.labels = [("zone".to_string(), "b".to_string())].into();
    let moved = Registration::from(moved);
    let second = registry.register(moved, Now::read()).unwrap();
    let slot = registry
        .attach("n1", second.session_id, &second.session_secret)
        .unwrap();
    registry
        .heartbeat(
            &slot,
            second.session_id,
            beat_with(pool(pb::PoolState::Ready, 1, GIB)),
            Instant::now(),
        )
        .unwrap();
    registry
        .deregister("n1", second.session_id, Some(&second.session_secret))
        .unwrap();

    let published: Vec<_> = recorder
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| (e.revision, e.kind, e.node.to_proto()))
        .collect();
    let addresses: Vec<_> = published
        .iter()
        .map(|(_, _, n)| n.address.as_str())
        .collect();
    assert_eq!(
        addresses,
        [
            "http://n1:9200",
            "http://n1:9200",
            "http://n1:9200",
            "http://n1-new:9200",
            "http://n1-new:9200",
            "http://n1-new:9200"
        ]
    );
    // The node is deleted, so every entry is held encoded now, and each
    // decodes to exactly the view that was published.
    let resumed = registry.feed().subscribe(Start::After(0)).unwrap().backlog;
    assert_eq!(resumed.decoded(), published);
}

#[tokio::test(start_paused = true)]
async fn views_share_the_registration_until_it_changes() {
    let (registry, recorder, _stop) = recorded(100);
    // With GPUs as NVML names them, kept packed (their ids per node, the
    // rest shared): an equal registration is still found equal.
    let new_registration = |id: &str| {
        let mut reg = new_registration(id);
        reg.capabilities = pb::Capabilities {
            gpus: crate::hardware::nvml_gpus(1, 8),
            ..Default::default()
        }
        .into();
        reg
    };
    let registration = |id: &str| Registration::from(new_registration(id));
    let first = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", first.session_id, &first.session_secret)
        .unwrap();
    registry
        .heartbeat(
            &slot,
            first.session_id,
            beat_with(pool(pb::PoolState::Ready, 3, GIB)),
            Instant::now(),
        )
        .unwrap();
    // The same agent registers again with the same fields (a reconnect),
    // then with another address.
    let again = registry.register(registration("n1"), Now::read()).unwrap();
    let mut moved = new_registration("n1");
    moved.address = "http://n1-new:9200".into();
    let moved = Registration::from(moved);
    registry.register(moved, Now::read()).unwrap();
    let events = recorder.events.lock().unwrap().clone();
    assert_eq!(events.len(), 4, "added, the beat, two re-registrations");
    let shared = |a: &Event, b: &Event| Arc::ptr_eq(a.node.registered(), b.node.registered());
    assert!(
        shared(&events[0], &events[1]),
        "a beat's view does not copy the registration"
    );
    assert!(
        shared(&events[1], &events[2]),
        "an equal registration keeps the shared one"
    );
    assert_eq!(events[2].node.live().session_id, again.session_id);
    assert!(
        !shared(&events[2], &events[3]),
        "a new one is taken as such"
    );
    assert_eq!(
        events[3].node.registration().address(),
        "http://n1-new:9200"
    );
    let view = registry.view("n1").unwrap();
    assert!(Arc::ptr_eq(view.registered(), events[3].node.registered()));
    let node = registry.get("n1").unwrap();
    assert_eq!(node.address, "http://n1-new:9200");
    assert_eq!(node.capabilities.unwrap().gpus.len(), 8);
}

#[tokio::test(start_paused = true)]
async fn a_published_beat_moves_its_figures_into_the_view() {
    let (registry, recorder, _stop) = recorded(100);
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    let send = |temp: u32, slots_free: u32| {
        let mut heartbeat = beat(pb::PoolState::Ready);
        heartbeat.pools[0].slots_free = slots_free;
        heartbeat.gpus = gpu(pb::GpuHealth::Healthy, &[], temp);
        // As decoded: the lists have room to spare.
        heartbeat.pools.reserve(8);
        heartbeat.gpus.reserve(8);
        registry
            .heartbeat(&slot, reg.session_id, heartbeat, Instant::now())
            .unwrap();
    };
    let temp = |gpus: &GpuFigures| gpus.to_proto()[0].temperature_celsius;

    // A first beat is published: its figures live in the view alone.
    send(40, 4);
    {
        let st = slot.lock();
        assert!(st.newer_pool_status.is_none() && st.newer_gpu_stats.is_none());
        assert!(st.pool_status().eq(st.view.pool_status()));
        assert_eq!(st.view.pool_report(0).map(|p| p.slots_free), Some(4));
        assert_eq!(temp(st.gpu_stats()), Some(40));
    }
    // Only raw figures move: not published, so the node holds them apart
    // from the view until the next change, and readers see them.
    let events = recorder.kinds().len();
    send(77, 4);
    assert_eq!(recorder.kinds().len(), events);
    {
        let st = slot.lock();
        assert_eq!(temp(st.gpu_stats()), Some(77));
        assert_eq!(temp(st.view.gpus()), Some(40));
    }
    assert_eq!(
        registry.get("n1").unwrap().gpu_stats[0].temperature_celsius,
        Some(77)
    );
    // A change made elsewhere (a cordon) publishes the latest figures.
    registry.cordon("n1", "fan", Now::read()).unwrap();
    assert_eq!(temp(recorder.last().node.gpus()), Some(77));
    {
        let st = slot.lock();
        assert!(st.newer_pool_status.is_none() && st.newer_gpu_stats.is_none());
        assert_eq!(st.pool_status().next().map(|p| p.slots_free), Some(4));
    }
    // A published beat moves the pool status and the figures together.
    send(50, 1);
    let last = recorder.last();
    assert_eq!(last.node.pool_report(0).map(|p| p.slots_free), Some(1));
    assert_eq!(temp(last.node.gpus()), Some(50));
    let st = slot.lock();
    assert!(Arc::ptr_eq(&st.view, &last.node));
    assert!(st.newer_pool_status.is_none() && st.newer_gpu_stats.is_none());
}

/// GPU figures for GPU 0 at `health` for `reasons`, `temp` degrees.
fn gpu(health: pb::GpuHealth, reasons: &[&str], temp: u32) -> Vec<pb::GpuStats> {
    vec![pb::GpuStats {
        index: 0,
        temperature_celsius: Some(temp),
        health: health as i32,
        health_reasons: reasons.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    }]
}

#[tokio::test(start_paused = true)]
async fn a_change_of_gpu_health_is_an_event_and_raw_figures_are_not() {
    use std::sync::atomic::Ordering;
    let (registry, recorder, _stop) = recorded(100);
    let reg = registry.register(registration("n1"), Now::read()).unwrap();
    let slot = registry
        .attach("n1", reg.session_id, &reg.session_secret)
        .unwrap();
    let send = |gpus: Vec<pb::GpuStats>| {
        let mut heartbeat = beat(pb::PoolState::Ready);
        heartbeat.gpus = gpus;
        registry
            .heartbeat(&slot, reg.session_id, heartbeat, Instant::now())
            .unwrap();
    };
    let gauge = |health: pb::GpuHealth| {
        registry.stats().gpus_by_health[health as usize].load(Ordering::Relaxed)
    };
    send(gpu(pb::GpuHealth::Healthy, &[], 40));
    let after_first = recorder.kinds().len();
    assert_eq!(gauge(pb::GpuHealth::Healthy), 1);

    // Only raw figures move: no event, but readers see the new figures.
    send(gpu(pb::GpuHealth::Healthy, &[], 77));
    assert_eq!(recorder.kinds().len(), after_first);
    assert_eq!(
        registry.get("n1").unwrap().gpu_stats[0].temperature_celsius,
        Some(77)
    );

    // Turning UNHEALTHY is an event whose view carries health and reasons.
    let xid = "xid 79 (GPU has fallen off the bus)";
    send(gpu(pb::GpuHealth::Unhealthy, &[xid], 77));
    assert_eq!(recorder.kinds().len(), after_first + 1);
    let event = recorder.last();
    assert_eq!(event.kind, EventKind::Modified);
    let gpus = event.node.to_proto().gpu_stats;
    assert_eq!(gpus[0].health, pb::GpuHealth::Unhealthy as i32);
    assert_eq!(gpus[0].health_reasons, [xid]);
    assert_eq!(
        (
            gauge(pb::GpuHealth::Healthy),
            gauge(pb::GpuHealth::Unhealthy)
        ),
        (0, 1)
    );
    // A beat without figures keeps the last ones and changes nothing.
    send(Vec::new());
    assert_eq!(recorder.kinds().len(), after_first + 1);
    // New reasons at the same health are a change too.
    send(gpu(
        pb::GpuHealth::Unhealthy,
        &[xid, "thermal throttling"],
        90,
    ));
    assert_eq!(recorder.kinds().len(), after_first + 2);
    // Healing is an event.
    send(gpu(pb::GpuHealth::Healthy, &[], 50));
    assert_eq!(recorder.kinds().len(), after_first + 3);
    assert_eq!(
        (
            gauge(pb::GpuHealth::Healthy),
            gauge(pb::GpuHealth::Unhealthy)
        ),
        (1, 0)
    );
    // A removed node takes its GPUs out of the gauges.
    registry.deregister("n1", reg.session_id, None).unwrap();
    assert!(
        registry
            .stats()
            .gpus_by_health
            .iter()
            .all(|g| g.load(Ordering::Relaxed) == 0)
    );
}

/// Reports are cleared whenever the registration changes; a view built
/// after a change that left them in place still reads each pool's names
/// from a spec of the registration it shows, never another's.
#[test]
fn a_view_after_a_registration_change_reads_its_own_specs() {
    let spec = |pool_id: &str, model: &str| pb::PoolSpec {
        pool_id: pool_id.into(),
        model: model.into(),
        engine: "vllm".into(),
        ..Default::default()
    };
    let mut first = registration("n1");
    first.pools = vec![spec("pool-0", "llama"), spec("pool-1", "qwen")].into();
    let mut st = node::NodeState::new(first.clone(), 1, [0; 32], Instant::now(), Utc::now());
    let reported: Vec<pb::PoolStatus> = first
        .pools
        .iter()
        .map(|p| pb::PoolStatus {
            pool_id: p.pool_id().to_owned(),
            state: pb::PoolState::Ready as i32,
            slots_total: 4,
            slots_free: 2,
            model: p.model().to_owned(),
            engine: p.engine().to_owned(),
            ..Default::default()
        })
        .collect();
    st.report(reported.clone(), None);
    st.view = Arc::new(st.new_view());
    // Registered again with the pools in the other order, one renamed.
    let mut again = first.clone();
    again.pools = vec![spec("pool-1", "qwen"), spec("pool-0", "mistral")].into();
    st.set_registration(again);
    let view = st.new_view();
    assert_eq!(view.to_proto().pool_status, reported);
    let models: Vec<_> = view.pool_status().map(|p| (p.pool_id, p.model)).collect();
    assert_eq!(models, [("pool-0", "llama"), ("pool-1", "qwen")]);
}
