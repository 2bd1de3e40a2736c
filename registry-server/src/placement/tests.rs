use super::testing::{event, view};
use super::*;

const GIB: u64 = 1 << 30;

fn gpu(index: u32, name: &str, cc: &str) -> pb::GpuInfo {
    pb::GpuInfo {
        index,
        name: name.into(),
        compute_capability: cc.into(),
        ..Default::default()
    }
}

fn spec(pool_id: &str, model: &str, engine: &str, gpus: &[u32]) -> pb::PoolSpec {
    pb::PoolSpec {
        pool_id: pool_id.into(),
        model: model.into(),
        engine: engine.into(),
        slots_total: 4,
        gpu_indices: gpus.to_vec(),
        endpoint: format!("http://spec-{pool_id}:8000"),
        ..Default::default()
    }
}

fn status(
    pool_id: &str,
    model: &str,
    state: pb::PoolState,
    free: u32,
    vram: u64,
) -> pb::PoolStatus {
    pb::PoolStatus {
        pool_id: pool_id.into(),
        state: state as i32,
        slots_total: 4,
        slots_free: free,
        vram_free_bytes: vram,
        model: model.into(),
        ..Default::default()
    }
}

/// A MIG slice `uuid` of `profile`.
fn slice(uuid: &str, profile: &str) -> pb::MigInstance {
    pb::MigInstance {
        uuid: uuid.into(),
        profile: profile.into(),
        ..Default::default()
    }
}

/// A node in zone `zone` with an H100 (9.0) at index 0 and an A100 (8.0)
/// at index 1, running `pools`.
fn register(node_id: &str, zone: &str, pools: Vec<pb::PoolSpec>) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node_id: node_id.into(),
        machine_id: format!("m-{node_id}"),
        address: format!("http://{node_id}:9200"),
        pools,
        capabilities: Some(pb::Capabilities {
            gpus: vec![
                gpu(0, "NVIDIA H100 80GB HBM3", "9.0"),
                gpu(1, "NVIDIA A100-SXM4-40GB", "8.0"),
            ],
            ..Default::default()
        }),
        labels: [("zone".to_owned(), zone.to_owned())].into(),
        ..Default::default()
    }
}

/// An index fed one Added event per (request, heartbeat), ONLINE.
struct Fleet {
    index: PlacementIndex,
    revision: u64,
}

impl Fleet {
    fn new() -> Self {
        Fleet {
            index: PlacementIndex::new(),
            revision: 0,
        }
    }

    fn send(&mut self, kind: EventKind, node: Arc<pb::Node>) {
        self.revision += 1;
        self.index.apply(&event(self.revision, kind, node));
    }

    fn online(&mut self, req: &pb::RegisterRequest, beat: &[pb::PoolStatus]) {
        self.send(
            EventKind::Added,
            view(req, Some(beat), pb::NodeStatus::Online),
        );
    }

    fn ids(&self, query: &PlacementQuery) -> Vec<(String, String)> {
        self.index
            .find(query)
            .unwrap()
            .candidates
            .into_iter()
            .map(|c| (c.node_id, c.pool_id))
            .collect()
    }
}

fn ids(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, p)| (n.to_string(), p.to_string()))
        .collect()
}

fn query(model: &str) -> PlacementQuery {
    PlacementQuery::for_model(model)
}

fn with_limit(mut q: PlacementQuery, limit: usize) -> PlacementQuery {
    q.limit = limit;
    q
}

use pb::PoolState::{Failed, Initializing, Ready};

#[test]
fn ranks_by_free_vram_then_free_slots_then_node_and_pool_id() {
    let mut fleet = Fleet::new();
    let two = |n: &str| {
        register(
            n,
            "a",
            vec![spec("p0", "m", "vllm", &[0]), spec("p1", "m", "vllm", &[1])],
        )
    };
    fleet.online(
        &two("n-b"),
        &[
            status("p0", "m", Ready, 1, 8 * GIB),
            status("p1", "m", Ready, 3, 8 * GIB),
        ],
    );
    fleet.online(
        &two("n-a"),
        &[
            status("p0", "m", Ready, 3, 8 * GIB),
            status("p1", "m", Ready, 1, 20 * GIB),
        ],
    );
    fleet.online(
        &two("n-c"),
        &[
            status("p0", "m", Ready, 3, 8 * GIB),
            status("p1", "m", Ready, 3, 8 * GIB),
        ],
    );
    assert_eq!(
        fleet.ids(&with_limit(query("m"), 10)),
        ids(&[
            ("n-a", "p1"), // most VRAM
            ("n-a", "p0"), // 8 GiB, 3 slots: ties broken by node, then pool id
            ("n-b", "p1"),
            ("n-c", "p0"),
            ("n-c", "p1"),
            ("n-b", "p0"), // 8 GiB, 1 slot
        ])
    );
    assert_eq!(
        fleet.ids(&query("m")),
        ids(&[("n-a", "p1")]),
        "default limit is 1"
    );
    assert_eq!(
        fleet.ids(&with_limit(query("m"), 2)),
        ids(&[("n-a", "p1"), ("n-a", "p0")])
    );
}

#[test]
fn a_candidate_carries_what_a_caller_needs_to_send_requests() {
    let mut fleet = Fleet::new();
    let req = register(
        "n1",
        "a",
        vec![spec("p0", "m", "vllm", &[0]), spec("p1", "m", "vllm", &[1])],
    );
    let mut reported = status("p1", "m", Ready, 2, GIB);
    reported.endpoint = "http://moved:9000".into();
    fleet.online(&req, &[status("p0", "m", Ready, 3, 2 * GIB), reported]);
    let placement = fleet.index.find(&with_limit(query("m"), 2)).unwrap();
    assert_eq!(placement.revision, 1);
    let best = &placement.candidates[0];
    assert_eq!(
        best,
        &Candidate {
            node_id: "n1".into(),
            pool_id: "p0".into(),
            endpoint: "http://spec-p0:8000".into(),
            model: "m".into(),
            engine: "vllm".into(),
            slots_free: 3,
            slots_total: 4,
            vram_free_bytes: 2 * GIB,
            node_address: "http://n1:9200".into(),
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            mig_uuids: Vec::new(),
            mig_profile: String::new(),
        }
    );
    assert_eq!(
        placement.candidates[1].endpoint, "http://moved:9000",
        "the reported endpoint overrides the registered one"
    );
}

/// A fleet where each filter has something to remove: n1 (zone a) runs
/// p0 on the H100 with vllm and p1 on the A100 with llamacpp; n2 (zone b)
/// runs p0 on both GPUs with vllm.
fn mixed_fleet() -> Fleet {
    let mut fleet = Fleet::new();
    fleet.online(
        &register(
            "n1",
            "a",
            vec![
                spec("p0", "m", "vllm", &[0]),
                spec("p1", "m", "llamacpp", &[1]),
            ],
        ),
        &[
            status("p0", "m", Ready, 1, 10 * GIB),
            status("p1", "m", Ready, 4, 30 * GIB),
        ],
    );
    fleet.online(
        &register("n2", "b", vec![spec("p0", "m", "vllm", &[])]),
        &[status("p0", "m", Ready, 0, 50 * GIB)],
    );
    fleet
}

#[test]
fn every_filter_narrows_the_candidates() {
    let fleet = mixed_fleet();
    let all = |q: PlacementQuery| fleet.ids(&with_limit(q, 100));
    assert_eq!(
        all(query("m")),
        ids(&[("n1", "p1"), ("n1", "p0")]),
        "n2 has no free slot"
    );

    let mut q = query("m");
    q.min_slots_free = 0;
    assert_eq!(
        all(q),
        ids(&[("n2", "p0"), ("n1", "p1"), ("n1", "p0")]),
        "0 offers full pools"
    );

    let mut q = query("m");
    q.engine = Some("vllm".into());
    assert_eq!(all(q), ids(&[("n1", "p0")]));

    let mut q = query("m");
    q.min_slots_free = 2;
    assert_eq!(all(q), ids(&[("n1", "p1")]));

    let mut q = query("m");
    q.min_vram_free_bytes = 20 * GIB;
    assert_eq!(all(q), ids(&[("n1", "p1")]));

    let mut q = query("m");
    q.min_slots_free = 0;
    q.labels = [("zone".to_owned(), "b".to_owned())].into();
    assert_eq!(all(q), ids(&[("n2", "p0")]));

    // GPU name: a case-insensitive substring every GPU of the pool has.
    // n2's pool names no GPU, so it runs on both: H100 and A100.
    let mut q = query("m");
    q.min_slots_free = 0;
    q.gpu_name = Some("h100".into());
    assert_eq!(all(q), ids(&[("n1", "p0")]));
    let mut q = query("m");
    q.min_slots_free = 0;
    q.gpu_name = Some("nvidia".into());
    assert_eq!(all(q).len(), 3);

    let mut q = query("m");
    q.min_slots_free = 0;
    q.min_compute_capability = Some((8, 9));
    assert_eq!(all(q), ids(&[("n1", "p0")]));
    let mut q = query("m");
    q.min_slots_free = 0;
    q.min_compute_capability = Some((8, 0));
    assert_eq!(all(q).len(), 3);

    let mut q = query("m");
    q.node_id = Some("n1".into());
    q.min_slots_free = 0;
    assert_eq!(all(q), ids(&[("n1", "p1"), ("n1", "p0")]));

    let mut q = query("m");
    q.exclude = ["n1".to_owned()].into();
    q.min_slots_free = 0;
    assert_eq!(all(q), ids(&[("n2", "p0")]));
}

#[test]
fn compute_capability_compares_numerically() {
    let mut fleet = Fleet::new();
    let mut req = register("n1", "a", vec![spec("p0", "m", "vllm", &[0])]);
    req.capabilities.as_mut().unwrap().gpus[0].compute_capability = "8.10".into();
    fleet.online(&req, &[status("p0", "m", Ready, 1, GIB)]);
    let mut q = query("m");
    q.min_compute_capability = Some((8, 9));
    assert_eq!(fleet.ids(&q), ids(&[("n1", "p0")]), "8.10 is above 8.9");
    q.min_compute_capability = Some((9, 0));
    assert!(fleet.index.find(&q).is_err());
}

#[test]
fn the_no_candidate_answer_names_the_first_filter_that_emptied_the_set() {
    let mut fleet = mixed_fleet();
    // n3 is OFFLINE, n4 never reported, n5 is INITIALIZING: each serves "x".
    let x = |n: &str| register(n, "c", vec![spec("p0", "x", "vllm", &[0])]);
    fleet.send(
        EventKind::Added,
        view(
            &x("n3"),
            Some(&[status("p0", "x", Ready, 4, GIB)]),
            pb::NodeStatus::Offline,
        ),
    );
    fleet.send(
        EventKind::Added,
        view(&x("n4"), None, pb::NodeStatus::Online),
    );
    fleet.online(&x("n5"), &[status("p0", "x", Initializing, 0, GIB)]);

    let cases: Vec<(PlacementQuery, Filter, &str)> = vec![
        (
            query("nope"),
            Filter::Model,
            "model nope is served by no pool",
        ),
        (
            PlacementQuery {
                exclude: ["n1".into(), "n2".into()].into(),
                ..query("m")
            },
            Filter::Excluded,
            "3 pools serve m but all are on excluded nodes",
        ),
        (
            PlacementQuery {
                engine: Some("sglang".into()),
                ..query("m")
            },
            Filter::Engine,
            "3 pools serve m but none runs engine sglang",
        ),
        (
            PlacementQuery {
                labels: [("zone".into(), "z".into())].into(),
                ..query("m")
            },
            Filter::Labels,
            "3 pools serve m but none is on a node with labels zone=z",
        ),
        (
            PlacementQuery {
                gpu_name: Some("b200".into()),
                ..query("m")
            },
            Filter::GpuName,
            "3 pools serve m but none runs only on GPUs whose name contains \"b200\"",
        ),
        (
            PlacementQuery {
                min_compute_capability: Some((10, 0)),
                ..query("m")
            },
            Filter::ComputeCapability,
            "none runs only on GPUs of compute capability 10.0 or higher",
        ),
        (
            PlacementQuery {
                exclude: ["n4".into(), "n5".into()].into(),
                ..query("x")
            },
            Filter::Online,
            "3 pools serve x; 1 matches the earlier filters but none is on an ONLINE node",
        ),
        (
            PlacementQuery {
                exclude: ["n5".into()].into(),
                ..query("x")
            },
            Filter::Reported,
            "3 pools serve x; 1 matches the earlier filters but none has reported its status yet",
        ),
        (
            query("x"),
            Filter::Ready,
            "3 pools serve x; 1 matches the earlier filters but none is READY",
        ),
        (
            PlacementQuery {
                min_slots_free: 5,
                ..query("m")
            },
            Filter::SlotsFree,
            "3 pools serve m but none is READY with 5 free slots",
        ),
        (
            PlacementQuery {
                labels: [("zone".into(), "b".into())].into(),
                ..query("m")
            },
            Filter::SlotsFree,
            "3 pools serve m; 1 matches the earlier filters but none is READY with a free slot",
        ),
        (
            PlacementQuery {
                min_vram_free_bytes: 100 * GIB,
                ..query("m")
            },
            Filter::VramFree,
            "none is READY with 107374182400 bytes of VRAM free",
        ),
    ];
    for (q, filter, text) in cases {
        match fleet.index.find(&q) {
            Err(PlacementError::NoCandidate {
                filter: got,
                reason,
            }) => {
                assert_eq!(got, filter, "{q:?}: {reason}");
                assert!(reason.contains(text), "{reason:?} lacks {text:?}");
            }
            other => panic!("{q:?}: {other:?}"),
        }
    }
}

#[test]
fn a_pinned_node_is_not_found_when_unknown_and_unavailable_when_it_cannot_serve() {
    let mut fleet = mixed_fleet();
    fleet.send(
        EventKind::Added,
        view(
            &register("n9", "a", vec![spec("p0", "m", "vllm", &[0])]),
            Some(&[status("p0", "m", Ready, 2, GIB)]),
            pb::NodeStatus::Offline,
        ),
    );
    let pinned = |n: &str| PlacementQuery {
        node_id: Some(n.into()),
        ..query("m")
    };
    assert_eq!(
        fleet.index.find(&pinned("ghost")),
        Err(PlacementError::UnknownNode {
            node_id: "ghost".into()
        })
    );
    match fleet.index.find(&pinned("n9")) {
        Err(PlacementError::NodeUnavailable {
            node_id,
            filter,
            reason,
        }) => {
            assert_eq!(node_id, "n9");
            assert_eq!(filter, Filter::Online);
            assert_eq!(
                reason,
                "node n9 has 1 pool of model m but none is on an ONLINE node"
            );
        }
        other => panic!("{other:?}"),
    }
    match fleet.index.find(&PlacementQuery {
        node_id: Some("n2".into()),
        ..query("other")
    }) {
        Err(e @ PlacementError::NodeUnavailable { .. }) => {
            assert_eq!(
                e.to_string(),
                "node unavailable: node n2 runs no pool of model other"
            );
        }
        other => panic!("{other:?}"),
    }
    match fleet.index.find(&pinned("n2")) {
        Err(PlacementError::NodeUnavailable { filter, .. }) => {
            assert_eq!(filter, Filter::SlotsFree)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fleet.ids(&pinned("n1")), ids(&[("n1", "p1")]));
}

#[test]
fn the_index_follows_added_modified_and_deleted_events() {
    let mut fleet = Fleet::new();
    let two = register(
        "n1",
        "a",
        vec![spec("p0", "m", "vllm", &[0]), spec("p1", "m", "vllm", &[1])],
    );
    fleet.online(
        &two,
        &[
            status("p0", "m", Ready, 1, GIB),
            status("p1", "m", Ready, 1, 2 * GIB),
        ],
    );
    assert_eq!(
        fleet.ids(&with_limit(query("m"), 5)),
        ids(&[("n1", "p1"), ("n1", "p0")])
    );

    // p1 goes FAILED: only p0 is left.
    let beat = [
        status("p0", "m", Ready, 1, GIB),
        status("p1", "m", Failed, 0, 2 * GIB),
    ];
    fleet.send(
        EventKind::Modified,
        view(&two, Some(&beat), pb::NodeStatus::Online),
    );
    assert_eq!(fleet.ids(&with_limit(query("m"), 5)), ids(&[("n1", "p0")]));

    // p0 is reloaded with another model: m keeps no pool of it.
    let beat = [
        status("p0", "m2", Ready, 1, GIB),
        status("p1", "m", Failed, 0, 2 * GIB),
    ];
    fleet.send(
        EventKind::Modified,
        view(&two, Some(&beat), pb::NodeStatus::Online),
    );
    assert_eq!(fleet.ids(&query("m2")), ids(&[("n1", "p0")]));
    assert!(matches!(
        fleet.index.find(&query("m")),
        Err(PlacementError::NoCandidate {
            filter: Filter::Ready,
            ..
        })
    ));

    // p1 is removed by a re-registration: m is served by no pool at all.
    let one = register("n1", "a", vec![spec("p0", "m2", "vllm", &[0])]);
    fleet.send(
        EventKind::Modified,
        view(&one, Some(&beat[..1]), pb::NodeStatus::Online),
    );
    assert!(matches!(
        fleet.index.find(&query("m")),
        Err(PlacementError::NoCandidate {
            filter: Filter::Model,
            ..
        })
    ));

    // The node goes OFFLINE, then comes back.
    fleet.send(
        EventKind::Modified,
        view(&one, Some(&beat[..1]), pb::NodeStatus::Offline),
    );
    assert!(matches!(
        fleet.index.find(&query("m2")),
        Err(PlacementError::NoCandidate {
            filter: Filter::Online,
            ..
        })
    ));
    fleet.send(
        EventKind::Modified,
        view(&one, Some(&beat[..1]), pb::NodeStatus::Online),
    );
    assert_eq!(fleet.ids(&query("m2")), ids(&[("n1", "p0")]));

    // Deleted: the node is unknown, its pools gone.
    fleet.send(
        EventKind::Deleted,
        view(&one, Some(&beat[..1]), pb::NodeStatus::Online),
    );
    assert!(matches!(
        fleet.index.find(&query("m2")),
        Err(PlacementError::NoCandidate {
            filter: Filter::Model,
            ..
        })
    ));
    assert_eq!(
        fleet.index.find(&PlacementQuery {
            node_id: Some("n1".into()),
            ..query("m2")
        }),
        Err(PlacementError::UnknownNode {
            node_id: "n1".into()
        })
    );
    assert!(fleet.index.models().is_empty());
    assert_eq!(fleet.index.revision(), 7);
}

#[test]
fn an_event_older_than_the_nodes_latest_is_ignored() {
    let index = PlacementIndex::new();
    let req = register("n1", "a", vec![spec("p0", "m", "vllm", &[0])]);
    let ready = [status("p0", "m", Ready, 1, GIB)];
    let failed = [status("p0", "m", Failed, 0, GIB)];
    index.apply(&event(
        5,
        EventKind::Modified,
        view(&req, Some(&ready), pb::NodeStatus::Online),
    ));
    index.apply(&event(
        4,
        EventKind::Modified,
        view(&req, Some(&failed), pb::NodeStatus::Online),
    ));
    assert_eq!(index.find(&query("m")).unwrap().candidates[0].node_id, "n1");
    assert_eq!(index.revision(), 5);
}

#[test]
fn a_registered_node_is_offered_only_after_its_first_heartbeat() {
    let mut fleet = Fleet::new();
    let req = register("n1", "a", vec![spec("p0", "m", "vllm", &[0])]);
    fleet.send(EventKind::Added, view(&req, None, pb::NodeStatus::Online));
    assert!(matches!(
        fleet.index.find(&query("m")),
        Err(PlacementError::NoCandidate {
            filter: Filter::Reported,
            ..
        })
    ));
    fleet.send(
        EventKind::Modified,
        view(
            &req,
            Some(&[status("p0", "m", Ready, 1, GIB)]),
            pb::NodeStatus::Online,
        ),
    );
    assert_eq!(fleet.ids(&query("m")), ids(&[("n1", "p0")]));
}

#[test]
fn list_models_counts_pools_slots_and_staged_nodes() {
    let mut fleet = mixed_fleet();
    let mut staged = register("n3", "a", vec![spec("p0", "x", "vllm", &[0])]);
    staged.models_available = vec!["m".into(), "only-staged".into(), "x".into()];
    fleet.send(
        EventKind::Added,
        view(
            &staged,
            Some(&[status("p0", "x", Failed, 0, 0)]),
            pb::NodeStatus::Online,
        ),
    );
    let mut on_n1 = mixed_fleet_n1();
    on_n1.models_available = vec!["m".into()];
    fleet.online(
        &on_n1,
        &[
            status("p0", "m", Ready, 1, 10 * GIB),
            status("p1", "m", Ready, 4, 30 * GIB),
        ],
    );

    let models = fleet.index.models();
    let names: Vec<&str> = models.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(names, ["m", "only-staged", "x"]);
    let m = &models[0];
    assert_eq!(m.pools.len(), 3);
    assert_eq!(m.nodes_serving, 2);
    assert_eq!(m.pools_ready, 3, "n2's full pool is READY all the same");
    assert_eq!(m.slots_total, 12);
    assert_eq!(m.slots_free, 5);
    assert_eq!(
        m.staged_on,
        ["n3"],
        "n1 serves m, so it is not listed as only staged"
    );
    assert_eq!(
        (
            m.pools[0].node_id.as_str(),
            m.pools[0].pool_id.as_str(),
            m.pools[0].state,
            m.pools[0].ready
        ),
        ("n1", "p0", Some(Ready), true)
    );
    let only = &models[1];
    assert!(only.pools.is_empty());
    assert_eq!(
        (only.nodes_serving, only.pools_ready, only.slots_total),
        (0, 0, 0)
    );
    assert_eq!(only.staged_on, ["n3"]);
    let x = &models[2];
    assert_eq!((x.nodes_serving, x.pools_ready, x.slots_free), (1, 0, 0));
    assert!(!x.pools[0].ready);
    assert!(x.staged_on.is_empty(), "n3 serves x (FAILED, but serving)");

    let one = fleet.index.list_models(Some("x"));
    assert_eq!(one.models.len(), 1);
    assert_eq!(one.revision, fleet.revision);
    assert!(fleet.index.list_models(Some("absent")).models.is_empty());
}

#[test]
fn a_beat_updates_pools_in_place_and_a_changed_set_rebuilds_them() {
    let mut fleet = Fleet::new();
    let mut req = register(
        "n1",
        "a",
        vec![spec("p0", "m", "vllm", &[0]), spec("p1", "m", "vllm", &[1])],
    );
    req.models_available = vec!["s".into()];
    fleet.online(
        &req,
        &[
            status("p0", "m", Ready, 1, GIB),
            status("p1", "m", Ready, 1, 2 * GIB),
        ],
    );
    // Same pools, models and staged models: slots and VRAM move in place.
    let beat = [
        status("p0", "m", Ready, 3, 4 * GIB),
        status("p1", "m", Ready, 0, 2 * GIB),
    ];
    fleet.send(
        EventKind::Modified,
        view(&req, Some(&beat), pb::NodeStatus::Online),
    );
    let m = fleet.index.list_models(Some("m")).models.remove(0);
    assert_eq!((m.pools.len(), m.slots_free), (2, 3));
    // p1 is full now, so only p0 is offered.
    assert_eq!(fleet.ids(&with_limit(query("m"), 5)), ids(&[("n1", "p0")]));
    let ranked = fleet.index.find(&with_limit(query("m"), 5)).unwrap();
    assert_eq!(ranked.candidates[0].vram_free_bytes, 4 * GIB);

    // Only the staged models change: the index follows (s out, t in).
    req.models_available = vec!["t".into()];
    fleet.send(
        EventKind::Modified,
        view(&req, Some(&beat), pb::NodeStatus::Online),
    );
    let names: Vec<String> = fleet.index.models().into_iter().map(|m| m.model).collect();
    assert_eq!(names, ["m", "t"]);

    // Pools in another order: same entries, nothing left behind.
    let swapped = [beat[1].clone(), beat[0].clone()];
    fleet.send(
        EventKind::Modified,
        view(&req, Some(&swapped), pb::NodeStatus::Online),
    );
    let m = fleet.index.list_models(Some("m")).models.remove(0);
    assert_eq!((m.pools.len(), m.slots_free), (2, 3));
}

fn mixed_fleet_n1() -> pb::RegisterRequest {
    register(
        "n1",
        "a",
        vec![
            spec("p0", "m", "vllm", &[0]),
            spec("p1", "m", "llamacpp", &[1]),
        ],
    )
}

#[test]
fn requests_are_checked_and_defaulted() {
    let q = PlacementQuery::from_request(pb::FindPoolsRequest {
        model: "m".into(),
        gpu_name: "H100".into(),
        min_compute_capability: "8.9".into(),
        exclude_node_ids: vec!["n1".into()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(q.limit, 1);
    assert_eq!(q.min_slots_free, 1);
    assert_eq!(q.gpu_name.as_deref(), Some("h100"));
    assert_eq!(q.min_compute_capability, Some((8, 9)));
    assert_eq!(q.engine, None);
    let q = PlacementQuery::from_request(pb::FindPoolsRequest {
        model: "m".into(),
        min_slots_free: Some(0),
        limit: 100,
        ..Default::default()
    })
    .unwrap();
    assert_eq!((q.min_slots_free, q.limit), (0, 100));

    let field_of = |req: pb::FindPoolsRequest| match PlacementQuery::from_request(req) {
        Err(PlacementError::InvalidArgument { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    let base = || pb::FindPoolsRequest {
        model: "m".into(),
        ..Default::default()
    };
    assert_eq!(field_of(pb::FindPoolsRequest::default()), "model");
    assert_eq!(
        field_of(pb::FindPoolsRequest {
            limit: 101,
            ..base()
        }),
        "limit"
    );
    assert_eq!(
        field_of(pb::FindPoolsRequest {
            min_compute_capability: "9".into(),
            ..base()
        }),
        "min_compute_capability"
    );
    assert_eq!(
        field_of(pb::FindPoolsRequest {
            node_id: "Bad_Id".into(),
            ..base()
        }),
        "node_id"
    );
    assert_eq!(
        field_of(pb::FindPoolsRequest {
            exclude_node_ids: vec!["ok".into(), "".into()],
            ..base()
        }),
        "exclude_node_ids[1]"
    );
    assert_eq!(
        field_of(pb::FindPoolsRequest {
            labels: [("a b".into(), "v".into())].into(),
            ..base()
        }),
        "labels[\"a b\"]"
    );
}

/// The sizing of the issue: 10,000 nodes × 4 pools over 100 models. Every
/// event replaces one node's entries, and a query walks only its model's
/// 400 pools; the answer is the pool with the most free VRAM.
#[test]
fn ten_thousand_nodes_of_four_pools_stay_consistent_under_events() {
    let index = PlacementIndex::new();
    let node = |n: usize, bump: u64| {
        let pools = (0..4)
            .map(|p| {
                spec(
                    &format!("p{p}"),
                    &format!("model-{}", (n * 4 + p) % 100),
                    "vllm",
                    &[],
                )
            })
            .collect();
        let beat: Vec<pb::PoolStatus> = (0..4)
            .map(|p| {
                let vram = ((n * 4 + p) as u64 * 7919) % 100_000 + bump;
                status(
                    &format!("p{p}"),
                    &format!("model-{}", (n * 4 + p) % 100),
                    Ready,
                    1,
                    vram,
                )
            })
            .collect();
        view(
            &register(&format!("n{n:05}"), "a", pools),
            Some(&beat),
            pb::NodeStatus::Online,
        )
    };
    let started = std::time::Instant::now();
    for n in 0..10_000 {
        index.apply(&event(n as u64 + 1, EventKind::Added, node(n, 0)));
    }
    let loaded = started.elapsed();
    // 1,000 Modified events: node n00042 gets far more free VRAM everywhere.
    let started = std::time::Instant::now();
    for i in 0..1_000u64 {
        let n = if i == 999 {
            42
        } else {
            (i as usize * 13) % 10_000
        };
        let bump = if i == 999 { 1 << 40 } else { 0 };
        index.apply(&event(10_001 + i, EventKind::Modified, node(n, bump)));
    }
    let modified = started.elapsed();
    let started = std::time::Instant::now();
    let mut worst = std::time::Duration::ZERO;
    for m in 0..100 {
        let one = std::time::Instant::now();
        let found = index
            .find(&with_limit(query(&format!("model-{m}")), 10))
            .unwrap();
        worst = worst.max(one.elapsed());
        assert_eq!(found.candidates.len(), 10);
        let vram: Vec<u64> = found.candidates.iter().map(|c| c.vram_free_bytes).collect();
        assert!(vram.windows(2).all(|w| w[0] >= w[1]), "{vram:?}");
    }
    let queried = started.elapsed();
    // n00042's pools serve models 68..=71; each is now their best.
    for m in 68..=71 {
        let best = &index
            .find(&query(&format!("model-{m}")))
            .unwrap()
            .candidates[0];
        assert_eq!(best.node_id, "n00042", "model-{m}");
    }
    let models = index.models();
    assert_eq!(models.len(), 100);
    assert!(
        models
            .iter()
            .all(|m| m.pools.len() == 400 && m.pools_ready == 400)
    );
    assert_eq!(index.revision(), 11_000);
    eprintln!(
        "40,000 pools: load {loaded:?}, 1,000 events {modified:?}, \
         100 finds over 400 pools each {queried:?} (slowest {worst:?})"
    );
}

#[test]
fn a_suspect_node_is_never_offered_and_its_pools_are_not_ready() {
    let mut fleet = Fleet::new();
    let beat = [status("p0", "m", Ready, 2, GIB)];
    let trusted = register("n1", "a", vec![spec("p0", "m", "vllm", &[0])]);
    let doubted = register("n2", "a", vec![spec("p0", "m", "vllm", &[0])]);
    fleet.online(&trusted, &beat);
    let mut suspect = pb::Node::clone(&view(&doubted, Some(&beat), pb::NodeStatus::Online));
    suspect.suspect = true;
    suspect.suspect_reason = "registry stalled for 1m 5s".into();
    fleet.send(EventKind::Added, Arc::new(suspect.clone()));

    let all = with_limit(query("m"), 10);
    assert_eq!(
        fleet.ids(&all),
        ids(&[("n1", "p0")]),
        "only the trusted node"
    );
    let pinned = PlacementQuery {
        node_id: Some("n2".into()),
        ..query("m")
    };
    match fleet.index.find(&pinned) {
        Err(e @ PlacementError::NodeUnavailable { .. }) => assert_eq!(
            e.to_string(),
            "node unavailable: suspect (registry stalled for 1m 5s)"
        ),
        other => panic!("{other:?}"),
    }
    let models = fleet.index.models();
    let ready: Vec<(&str, bool)> = models[0]
        .pools
        .iter()
        .map(|p| (p.node_id.as_str(), p.ready))
        .collect();
    assert_eq!(ready, [("n1", true), ("n2", false)]);
    assert_eq!(models[0].pools_ready, 1);

    // With only suspect nodes left, the reason names the filter.
    fleet.send(
        EventKind::Deleted,
        view(&trusted, None, pb::NodeStatus::Online),
    );
    match fleet.index.find(&query("m")) {
        Err(PlacementError::NoCandidate { filter, reason }) => {
            assert_eq!(filter, Filter::Suspect);
            assert_eq!(
                reason,
                "1 pool serves m but none is on a node the registry trusts (the rest are suspect)"
            );
        }
        other => panic!("{other:?}"),
    }

    // Its next heartbeat clears the flag: offered again.
    suspect.suspect = false;
    suspect.suspect_reason.clear();
    fleet.send(EventKind::Modified, Arc::new(suspect));
    assert_eq!(fleet.ids(&all), ids(&[("n2", "p0")]));
}

/// The view of `req` ONLINE with `beat`, its GPU 1 at `health` for
/// `reasons` and GPU 0 HEALTHY.
fn with_gpu1(
    req: &pb::RegisterRequest,
    beat: &[pb::PoolStatus],
    health: pb::GpuHealth,
    reasons: &[&str],
) -> Arc<pb::Node> {
    let mut node = pb::Node::clone(&view(req, Some(beat), pb::NodeStatus::Online));
    node.capabilities.as_mut().unwrap().gpus[1].uuid = "GPU-sick".into();
    node.gpu_stats = vec![
        pb::GpuStats {
            index: 0,
            health: pb::GpuHealth::Healthy as i32,
            ..Default::default()
        },
        pb::GpuStats {
            index: 1,
            health: health as i32,
            health_reasons: reasons.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        },
    ];
    Arc::new(node)
}

#[test]
fn a_pool_on_an_unhealthy_gpu_is_not_offered_and_not_ready_until_it_heals() {
    let mut fleet = Fleet::new();
    let beat = [
        status("on-h100", "m", Ready, 2, 10 * GIB),
        status("on-a100", "m", Ready, 2, 20 * GIB),
        status("on-all", "m", Ready, 2, 30 * GIB),
    ];
    let req = register(
        "n1",
        "a",
        vec![
            spec("on-h100", "m", "vllm", &[0]),
            spec("on-a100", "m", "vllm", &[1]),
            // No gpu_indices: every GPU of the node, the sick one too.
            spec("on-all", "m", "vllm", &[]),
        ],
    );
    let xid = "xid 79 (GPU has fallen off the bus)";
    fleet.send(
        EventKind::Added,
        with_gpu1(&req, &beat, pb::GpuHealth::Unhealthy, &[xid]),
    );
    let all = with_limit(query("m"), 10);
    assert_eq!(fleet.ids(&all), ids(&[("n1", "on-h100")]));
    let models = fleet.index.models();
    let ready: Vec<(&str, bool)> = models[0]
        .pools
        .iter()
        .map(|p| (p.pool_id.as_str(), p.ready))
        .collect();
    assert_eq!(
        ready,
        [("on-a100", false), ("on-all", false), ("on-h100", true)]
    );

    // Pinned to the node, asking for more than the healthy pool has: the
    // answer names the GPU (FAILED_PRECONDITION).
    let pinned = PlacementQuery {
        node_id: Some("n1".into()),
        min_vram_free_bytes: 15 * GIB,
        ..query("m")
    };
    match fleet.index.find(&pinned) {
        Err(PlacementError::NodeUnavailable { filter, .. }) => {
            assert_eq!(filter, Filter::VramFree, "the healthy pool got further");
        }
        other => panic!("{other:?}"),
    }
    let pinned_a100 = PlacementQuery {
        node_id: Some("n1".into()),
        gpu_name: Some("a100".into()),
        ..query("m")
    };
    match fleet.index.find(&pinned_a100) {
        Err(PlacementError::NodeUnavailable { filter, reason, .. }) => {
            assert_eq!(filter, Filter::GpuHealth);
            assert_eq!(
                reason,
                format!(
                    "node n1 has 3 pools of model m; 1 matches the earlier filters but none runs \
                     only on healthy GPUs (GPU 1 (GPU-sick) of node n1 is UNHEALTHY: {xid})"
                )
            );
        }
        other => panic!("{other:?}"),
    }
    // Unpinned, when it empties the set, the reason says so too.
    let a100 = PlacementQuery {
        gpu_name: Some("a100".into()),
        ..query("m")
    };
    match fleet.index.find(&a100) {
        Err(PlacementError::NoCandidate { filter, reason }) => {
            assert_eq!(filter, Filter::GpuHealth);
            assert!(
                reason.contains("none runs only on healthy GPUs (GPU 1 (GPU-sick)"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }

    // DEGRADED is still offered.
    fleet.send(
        EventKind::Modified,
        with_gpu1(
            &req,
            &beat,
            pb::GpuHealth::Degraded,
            &["thermal throttling"],
        ),
    );
    assert_eq!(
        fleet.ids(&all),
        ids(&[("n1", "on-all"), ("n1", "on-a100"), ("n1", "on-h100")])
    );
    // Healed: all back.
    fleet.send(
        EventKind::Modified,
        with_gpu1(&req, &beat, pb::GpuHealth::Healthy, &[]),
    );
    assert_eq!(fleet.index.models()[0].pools_ready, 3);
}

#[test]
fn mig_profile_matches_pools_whose_every_slice_has_it_and_a_slice_is_as_healthy_as_its_gpu() {
    let on = |pool_id: &str, slices: &[&str]| pb::PoolSpec {
        mig_uuids: slices.iter().map(|s| s.to_string()).collect(),
        ..spec(pool_id, "m", "vllm", &[])
    };
    let mut req = register(
        "n1",
        "a",
        vec![
            on("small", &["MIG-a"]),
            on("mixed", &["MIG-b", "MIG-c"]),
            on("big", &["MIG-c"]),
            on("small-gpu1", &["MIG-d"]),
            spec("whole", "m", "vllm", &[0]),
        ],
    );
    let gpus = &mut req.capabilities.as_mut().unwrap().gpus;
    gpus[0].mig_enabled = true;
    gpus[0].mig_instances = vec![
        slice("MIG-a", "1g.10gb"),
        slice("MIG-b", "1g.10gb"),
        slice("MIG-c", "3g.40gb"),
    ];
    gpus[1].mig_enabled = true;
    gpus[1].mig_instances = vec![slice("MIG-d", "1g.10gb")];
    let beat: Vec<pb::PoolStatus> = ["small", "mixed", "big", "small-gpu1", "whole"]
        .iter()
        .zip(1..)
        .map(|(p, vram)| status(p, "m", Ready, 1, vram * GIB))
        .collect();
    let mut fleet = Fleet::new();
    fleet.online(&req, &beat);

    let profile = |p: &str| PlacementQuery {
        mig_profile: Some(p.into()),
        ..with_limit(query("m"), 10)
    };
    assert_eq!(
        fleet.ids(&profile("1g.10gb")),
        ids(&[("n1", "small-gpu1"), ("n1", "small")])
    );
    assert_eq!(fleet.ids(&profile("3g.40gb")), ids(&[("n1", "big")]));
    // The candidate says which slice it got.
    let found = fleet.index.find(&profile("3g.40gb")).unwrap();
    assert_eq!(found.candidates[0].mig_uuids, ["MIG-c"]);
    assert_eq!(found.candidates[0].mig_profile, "3g.40gb");
    // Without the filter, pools on slices and whole GPUs alike are offered.
    assert_eq!(fleet.ids(&with_limit(query("m"), 10)).len(), 5);
    let whole = fleet.index.find(&query("m")).unwrap();
    assert_eq!(whole.candidates[0].pool_id, "whole");
    assert!(whole.candidates[0].mig_uuids.is_empty());
    assert_eq!(whole.candidates[0].mig_profile, "");

    match fleet.index.find(&PlacementQuery {
        engine: Some("vllm".into()),
        ..profile("7g.80gb")
    }) {
        Err(PlacementError::NoCandidate { filter, reason }) => {
            assert_eq!(filter, Filter::MigProfile);
            assert!(
                reason.contains("none runs on MIG slices of profile \"7g.80gb\""),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }

    // GPU 1 goes UNHEALTHY: its slice's pool goes with it, GPU 0's stay.
    fleet.send(
        EventKind::Modified,
        with_gpu1(&req, &beat, pb::GpuHealth::Unhealthy, &["xid 79"]),
    );
    assert_eq!(fleet.ids(&profile("1g.10gb")), ids(&[("n1", "small")]));
    let pinned = PlacementQuery {
        node_id: Some("n1".into()),
        min_slots_free: 2,
        ..profile("1g.10gb")
    };
    match fleet.index.find(&pinned) {
        Err(PlacementError::NodeUnavailable { filter, .. }) => {
            assert_eq!(filter, Filter::SlotsFree, "the GPU 0 slice got further");
        }
        other => panic!("{other:?}"),
    }
    let models = fleet.index.models();
    let sick = models[0]
        .pools
        .iter()
        .find(|p| p.pool_id == "small-gpu1")
        .unwrap();
    assert!(!sick.ready);
}

#[test]
fn mig_profile_is_checked_as_text() {
    let req = pb::FindPoolsRequest {
        model: "m".into(),
        mig_profile: "p".repeat(registry_proto::rules::MAX_TEXT_LEN + 1),
        ..Default::default()
    };
    match PlacementQuery::from_request(req) {
        Err(PlacementError::InvalidArgument { field, .. }) => assert_eq!(field, "mig_profile"),
        other => panic!("{other:?}"),
    }
    let ok = PlacementQuery::from_request(pb::FindPoolsRequest {
        model: "m".into(),
        mig_profile: "1g.10gb".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ok.mig_profile.as_deref(), Some("1g.10gb"));
}

#[test]
fn a_pool_key_freed_by_one_node_and_taken_by_another_moves_only_its_own_pool() {
    let mut fleet = Fleet::new();
    let one = |n: &str| register(n, "a", vec![spec("p0", "m", "vllm", &[0])]);
    fleet.online(&one("n-c"), &[status("p0", "m", Ready, 1, GIB)]);
    fleet.online(&one("n-b"), &[status("p0", "m", Ready, 2, GIB)]);
    // n-c leaves; n-a arrives in the slot its pool left free.
    fleet.send(
        EventKind::Deleted,
        view(&one("n-c"), None, pb::NodeStatus::Online),
    );
    fleet.online(&one("n-a"), &[status("p0", "m", Ready, 3, GIB)]);
    // n-b's beat replaces its own entry in place, not the newcomer's.
    fleet.send(
        EventKind::Modified,
        view(
            &one("n-b"),
            Some(&[status("p0", "m", Ready, 4, GIB)]),
            pb::NodeStatus::Online,
        ),
    );
    let free: Vec<(String, u32)> = fleet
        .index
        .find(&with_limit(query("m"), 10))
        .unwrap()
        .candidates
        .into_iter()
        .map(|c| (c.node_id, c.slots_free))
        .collect();
    assert_eq!(free, [("n-b".to_string(), 4), ("n-a".to_string(), 3)]);
    // ListModels lists the pools by node and pool id, whatever the order
    // they came in.
    let listed: Vec<String> = fleet.index.models()[0]
        .pools
        .iter()
        .map(|p| p.node_id.clone())
        .collect();
    assert_eq!(listed, ["n-a", "n-b"]);
}

#[test]
fn the_sick_gpu_named_is_the_first_by_node_and_pool_whatever_the_arrival_order() {
    let beat = [status("p0", "m", Ready, 2, GIB)];
    let sick = |n: &str| {
        let req = register(n, "a", vec![spec("p0", "m", "vllm", &[1])]);
        with_gpu1(&req, &beat, pb::GpuHealth::Unhealthy, &["xid 79"])
    };
    for order in [
        ["n-a", "n-b", "n-c"],
        ["n-c", "n-b", "n-a"],
        ["n-b", "n-c", "n-a"],
    ] {
        let mut fleet = Fleet::new();
        for n in order {
            fleet.send(EventKind::Added, sick(n));
        }
        match fleet.index.find(&query("m")) {
            Err(PlacementError::NoCandidate { filter, reason }) => {
                assert_eq!(filter, Filter::GpuHealth);
                assert!(
                    reason.contains("of node n-a is UNHEALTHY"),
                    "{order:?}: {reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_pool_refreshed_in_place_equals_one_built_afresh() {
    let mut req = register(
        "n1",
        "a",
        vec![
            pb::PoolSpec {
                mig_uuids: vec!["MIG-a".into()],
                ..spec("p0", "m", "vllm", &[])
            },
            spec("p1", "m", "vllm", &[1]),
        ],
    );
    req.capabilities.as_mut().unwrap().gpus[0].mig_instances =
        vec![slice("MIG-a", "1g.10gb"), slice("MIG-b", "3g.40gb")];
    let mut moved = req.clone();
    moved.pools[0].mig_uuids = vec!["MIG-b".into()];
    moved.pools[1].endpoint = "http://moved:8000".into();
    moved.pools[1].engine = "sglang".into();

    let reported = |engine: &str, endpoint: &str, free: u32| {
        let mut beat = vec![
            status("p0", "m", Ready, free, GIB),
            status("p1", "m", Initializing, 0, 0),
        ];
        for s in &mut beat {
            s.engine = engine.into();
            s.endpoint = endpoint.into();
        }
        // A pool reported but not registered rides along.
        beat.push(status("extra", "m", Ready, 2, GIB));
        beat
    };
    let first = reported("", "", 1);
    let beats = [
        reported("", "", 2),
        reported("trt", "http://other:9000", 0),
        reported("", "", 3),
    ];
    let base = event(
        1,
        EventKind::Added,
        view(&req, Some(&first), pb::NodeStatus::Online),
    )
    .node;
    // Views of the node in turn: beats sharing its registration (the
    // common case, GPUs not read again), a first beat, the same status with
    // none reported, and a new registration moving slices and strings.
    let mut views: Vec<Arc<NodeView>> = beats
        .iter()
        .map(|beat| {
            let full = event(
                2,
                EventKind::Modified,
                view(&req, Some(beat), pb::NodeStatus::Online),
            )
            .node;
            Arc::new(NodeView::new(
                Arc::clone(base.registered()),
                full.live().clone(),
                // Built against an equal registration: the same specs.
                full.pool_reports().clone(),
                full.gpus().clone(),
                full.admin().cloned().map(Arc::new),
            ))
        })
        .collect();
    views.push(
        event(
            3,
            EventKind::Modified,
            view(&req, None, pb::NodeStatus::Online),
        )
        .node,
    );
    views.push(
        event(
            4,
            EventKind::Modified,
            view(&req, Some(&first), pb::NodeStatus::Online),
        )
        .node,
    );
    views.push(
        event(
            5,
            EventKind::Modified,
            view(&moved, Some(&beats[1]), pb::NodeStatus::Online),
        )
        .node,
    );

    let built = |node: &Arc<NodeView>| -> Vec<String> {
        pools_of(node)
            .map(|s| format!("{:?}", PoolEntry::new(node, s)))
            .collect()
    };
    let mut held: Vec<PoolEntry> = pools_of(&base).map(|s| PoolEntry::new(&base, s)).collect();
    for node in &views {
        let sources: Vec<PoolSource<'_>> = pools_of(node).collect();
        let same_set = sources.len() == held.len()
            && held
                .iter()
                .zip(&sources)
                .all(|(p, s)| (p.pool_id(), p.model()) == (s.pool_id(), s.model()));
        if same_set {
            for (entry, source) in held.iter_mut().zip(&sources) {
                entry.refresh(node, *source);
            }
        } else {
            // Another set of pools (the unregistered one came or went):
            // the index rebuilds, as here.
            held = sources.iter().map(|s| PoolEntry::new(node, *s)).collect();
        }
        let refreshed: Vec<String> = held.iter().map(|p| format!("{p:?}")).collect();
        assert_eq!(refreshed, built(node));
    }
    // The slices moved with the new registration (MIG-b's profile now).
    assert_eq!(held[0].mig_profile(), Some("3g.40gb"));
    assert_eq!(held[1].endpoint(), "http://other:9000");
}

#[test]
fn the_node_table_finds_each_entry_by_its_own_views_id() {
    let entry = |id: &str, revision| NodeEntry {
        revision,
        view: Arc::new(NodeView::from_proto(pb::Node {
            node_id: id.into(),
            ..Default::default()
        })),
        keys: Vec::new(),
    };
    let mut nodes = Nodes::default();
    for (i, id) in ["n1", "n2", "n3"].into_iter().enumerate() {
        nodes.insert(entry(id, i as u64));
    }
    assert!(nodes.contains("n2") && !nodes.contains("n4"));
    nodes.get_mut("n2").unwrap().revision = 9;
    let removed = nodes.remove("n2").unwrap();
    assert_eq!((removed.view.node_id(), removed.revision), ("n2", 9));
    assert!(nodes.remove("n2").is_none() && !nodes.contains("n2"));
    assert_eq!(nodes.get_mut("n3").map(|e| e.revision), Some(2));
}
