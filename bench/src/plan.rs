//! The parameters of every scenario: the full run that produces the
//! published figures, and the quick run (seconds, small N) that CI and
//! `cargo test` use so the bench cannot rot.

use std::time::Duration;

use crate::server::StopMode;

/// Every scenario's parameters.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Scale steps, run in order, each against a fresh server.
    pub scale: Vec<ScaleStep>,
    /// Heartbeat interval of the scale steps (advertised by the server).
    pub scale_interval: Duration,
    /// Node timeout of the scale steps.
    pub scale_timeout: Duration,
    /// Measured steady-state window of each scale step.
    pub scale_window: Duration,
    /// Throughput search.
    pub throughput: ThroughputPlan,
    /// Failure detection.
    pub detection: DetectionPlan,
    /// ListNodes under heartbeat load.
    pub reads: ReadsPlan,
    /// Restart storm.
    pub restart: RestartPlan,
    /// The store's write rate and commit latency.
    pub store: StorePlan,
    /// The change feed under churn (issue 10).
    pub feed: FeedPlan,
    /// The drain round trip (issue 11).
    pub drain: DrainPlan,
    /// Three replicas on etcd against one registry (issue 12).
    pub replicas: ReplicasPlan,
    /// Agents arriving all at once beside a registered fleet (issue 13).
    pub arrival: ArrivalPlan,
}

/// A registration storm: a registered fleet heartbeats while a second
/// fleet arrives all at once (ramp 0), against a registry with the
/// embedded store, with the registry's admission control and without it.
#[derive(Debug, Clone)]
pub struct ArrivalPlan {
    /// Nodes registered before the storm (their heartbeats are watched).
    pub registered: usize,
    /// Connections they share.
    pub registered_connections: usize,
    /// Nodes arriving at once.
    pub arriving: usize,
    /// Connections they share.
    pub arriving_connections: usize,
    /// Heartbeat interval (advertised by the server; timeout 3x).
    pub interval: Duration,
    /// Steady heartbeating of the registered fleet before the storm.
    pub settle: Duration,
    /// Longest wait for the storm to be registered and attached.
    pub limit: Duration,
    /// `--max-concurrent-registrations` and `--max-queued-registrations`
    /// of the run with admission control; `None`: the registry's defaults.
    pub admission: Option<(usize, usize)>,
}

/// Three replicas on a 3-member etcd cluster, then one registry with the
/// embedded store, under the same fleet: a registration storm, a steady
/// window, and (replicas) a leader SIGKILL.
#[derive(Debug, Clone)]
pub struct ReplicasPlan {
    /// Virtual nodes.
    pub nodes: usize,
    /// Connections they share (0: one per node).
    pub connections: usize,
    /// Registrations started per second (the storm).
    pub ramp: f64,
    /// Heartbeat interval (advertised by the server).
    pub interval: Duration,
    /// Node timeout.
    pub node_timeout: Duration,
    /// --etcd-lease-ttl: bounds the failover.
    pub lease_ttl: Duration,
    /// Measured steady-state window.
    pub window: Duration,
    /// Longest wait for the fleet to come up or back.
    pub limit: Duration,
}

/// The drain round trip: nodes drained one by one under a heartbeating
/// fleet, each timed from DrainNode to the acknowledgement in the feed.
#[derive(Debug, Clone)]
pub struct DrainPlan {
    /// Virtual nodes.
    pub nodes: usize,
    /// Connections they share (0: one per node, as real agents).
    pub connections: usize,
    /// Heartbeat interval (advertised by the server; timeout 3x); long, so
    /// a pushed command shows as a round trip far below it.
    pub interval: Duration,
    /// Nodes drained (and resumed), one after another, spread over the
    /// fleet.
    pub drains: usize,
    /// Longest wait for one round trip.
    pub limit: Duration,
}

/// One scale step.
#[derive(Debug, Clone, Copy)]
pub struct ScaleStep {
    /// Virtual nodes.
    pub nodes: usize,
    /// HTTP/2 connections they share (0: one per node).
    pub connections: usize,
    /// Registrations started per second.
    pub ramp: f64,
}

/// The throughput search: one fleet, its interval shortened step by step.
#[derive(Debug, Clone)]
pub struct ThroughputPlan {
    /// Virtual nodes.
    pub nodes: usize,
    /// Connections they share.
    pub connections: usize,
    /// Offered heartbeat rates, ascending, per second. The search goes on
    /// past the p99 limit until acks fall behind the offered rate, so both
    /// the highest rate within the limit and the saturation rate show.
    pub rates: Vec<u64>,
    /// Time at each rate before measuring.
    pub warmup: Duration,
    /// Measured time at each rate.
    pub window: Duration,
    /// A rate is sustained while ack p99 stays under this.
    pub p99_limit: Duration,
}

/// Failure detection: silence a fraction of a fleet and read how late the
/// registry marked each silent node OFFLINE.
#[derive(Debug, Clone)]
pub struct DetectionPlan {
    /// Virtual nodes.
    pub nodes: usize,
    /// Connections they share.
    pub connections: usize,
    /// Fraction silenced.
    pub fraction: f64,
    /// The server's node timeout (short, so the scenario is short).
    pub node_timeout: Duration,
    /// The heartbeat interval.
    pub interval: Duration,
    /// Steady running before the silence.
    pub steady: Duration,
}

/// ListNodes latency under heartbeat load, and heartbeat latency under
/// ListNodes load.
#[derive(Debug, Clone)]
pub struct ReadsPlan {
    /// Virtual nodes.
    pub nodes: usize,
    /// Connections they share.
    pub connections: usize,
    /// Heartbeat interval (advertised by the server; timeout 3x).
    pub interval: Duration,
    /// Length of each phase (baseline, full listings, paged listings).
    pub phase: Duration,
    /// Page size of the paged phase.
    pub page_size: u32,
}

/// Restart storm: stop the registry under a fleet, start it again, time
/// until every node is back.
#[derive(Debug, Clone)]
pub struct RestartPlan {
    /// Virtual nodes.
    pub nodes: usize,
    /// Connections (0: one per node, as real agents).
    pub connections: usize,
    /// How the registry is stopped, one restart each.
    pub modes: Vec<StopMode>,
    /// Longest wait for the fleet to come back.
    pub limit: Duration,
    /// The stores to restart with, one fleet each: memory (every node
    /// must register again) and embedded (sessions survive).
    pub stores: Vec<RestartStore>,
}

/// The registry's store in a restart storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartStore {
    /// `--store memory`: the new registry starts empty.
    Memory,
    /// `--store embedded`: the new registry loads every node and session.
    Embedded,
}

/// The store's write path: Registers of new nodes at a paced rate by many
/// concurrent clients against a registry with the embedded store.
#[derive(Debug, Clone)]
pub struct StorePlan {
    /// Registrations in the storm (distinct nodes).
    pub registrations: usize,
    /// Target rate, registrations per second.
    pub rate: u32,
    /// Concurrent Register calls at most.
    pub concurrency: usize,
}

/// The change feed under churn: a fleet whose every heartbeat changes
/// slots_free of its 4 pools, with and without watchers, then with
/// FindPools and ListNodes walks besides.
#[derive(Debug, Clone)]
pub struct FeedPlan {
    /// Virtual nodes (4 pools each).
    pub nodes: usize,
    /// Connections they share.
    pub connections: usize,
    /// Heartbeat interval (advertised by the server; timeout 3x).
    pub interval: Duration,
    /// WatchNodes streams, one connection each.
    pub watchers: usize,
    /// Length of each of the three phases.
    pub phase: Duration,
    /// FindPools calls per second in the last phase.
    pub find_rate: u32,
    /// ListNodes page size of the walks in the last phase.
    pub page_size: u32,
}

impl Plan {
    /// The published run: roughly 12 minutes on two cores.
    pub fn full() -> Self {
        Self {
            scale: vec![
                ScaleStep {
                    nodes: 1_000,
                    connections: 0,
                    ramp: 2_000.0,
                },
                ScaleStep {
                    nodes: 10_000,
                    connections: 0,
                    ramp: 2_000.0,
                },
                // Past ~19k connections a process runs out of descriptors:
                // 100 nodes share each connection.
                ScaleStep {
                    nodes: 50_000,
                    connections: 500,
                    ramp: 2_000.0,
                },
                ScaleStep {
                    nodes: 100_000,
                    connections: 1_000,
                    ramp: 2_000.0,
                },
            ],
            scale_interval: Duration::from_secs(10),
            scale_timeout: Duration::from_secs(30),
            scale_window: Duration::from_secs(60),
            throughput: ThroughputPlan {
                nodes: 10_000,
                connections: 100,
                rates: vec![
                    2_000, 5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 60_000,
                    80_000, 100_000, 120_000,
                ],
                warmup: Duration::from_secs(3),
                window: Duration::from_secs(10),
                p99_limit: Duration::from_millis(10),
            },
            detection: DetectionPlan {
                nodes: 10_000,
                connections: 100,
                fraction: 0.1,
                node_timeout: Duration::from_secs(5),
                interval: Duration::from_secs(1),
                steady: Duration::from_secs(5),
            },
            reads: ReadsPlan {
                nodes: 10_000,
                connections: 100,
                interval: Duration::from_secs(10),
                phase: Duration::from_secs(15),
                page_size: 100,
            },
            restart: RestartPlan {
                nodes: 10_000,
                connections: 0,
                modes: vec![StopMode::Graceful, StopMode::Crash],
                limit: Duration::from_secs(120),
                stores: vec![RestartStore::Memory, RestartStore::Embedded],
            },
            store: StorePlan {
                registrations: 10_000,
                rate: 2_000,
                concurrency: 512,
            },
            replicas: ReplicasPlan {
                nodes: 10_000,
                connections: 100,
                ramp: 1_000.0,
                interval: Duration::from_secs(10),
                node_timeout: Duration::from_secs(30),
                lease_ttl: Duration::from_secs(10),
                window: Duration::from_secs(30),
                limit: Duration::from_secs(120),
            },
            feed: FeedPlan {
                nodes: 10_000,
                connections: 100,
                interval: Duration::from_secs(10),
                watchers: 100,
                phase: Duration::from_secs(30),
                find_rate: 200,
                page_size: 1_000,
            },
            drain: DrainPlan {
                nodes: 1_000,
                connections: 0,
                interval: Duration::from_secs(10),
                drains: 1_000,
                limit: Duration::from_secs(30),
            },
            arrival: ArrivalPlan {
                registered: 10_000,
                registered_connections: 100,
                arriving: 50_000,
                arriving_connections: 500,
                interval: Duration::from_secs(10),
                settle: Duration::from_secs(10),
                limit: Duration::from_secs(120),
                admission: None,
            },
        }
    }

    /// The CI run: 200 nodes, seconds per scenario. `crash` is false for an
    /// in-process server, which cannot be killed alone.
    pub fn quick(crash: bool) -> Self {
        let mut modes = vec![StopMode::Graceful];
        if crash {
            modes.push(StopMode::Crash);
        }
        Self {
            scale: vec![ScaleStep {
                nodes: 200,
                connections: 0,
                ramp: 1_000.0,
            }],
            scale_interval: Duration::from_millis(500),
            scale_timeout: Duration::from_secs(3),
            scale_window: Duration::from_secs(2),
            throughput: ThroughputPlan {
                nodes: 200,
                connections: 4,
                rates: vec![1_000, 2_000],
                warmup: Duration::from_millis(500),
                window: Duration::from_secs(1),
                p99_limit: Duration::from_millis(10),
            },
            detection: DetectionPlan {
                nodes: 200,
                connections: 4,
                fraction: 0.1,
                node_timeout: Duration::from_secs(2),
                interval: Duration::from_millis(250),
                steady: Duration::from_millis(500),
            },
            reads: ReadsPlan {
                nodes: 200,
                connections: 4,
                interval: Duration::from_millis(250),
                phase: Duration::from_secs(1),
                page_size: 50,
            },
            restart: RestartPlan {
                nodes: 200,
                connections: 0,
                modes,
                limit: Duration::from_secs(30),
                stores: vec![RestartStore::Memory, RestartStore::Embedded],
            },
            store: StorePlan {
                registrations: 200,
                rate: 1_000,
                concurrency: 16,
            },
            replicas: ReplicasPlan {
                nodes: 200,
                connections: 20,
                ramp: 1_000.0,
                interval: Duration::from_secs(1),
                node_timeout: Duration::from_secs(3),
                lease_ttl: Duration::from_secs(2),
                window: Duration::from_secs(2),
                limit: Duration::from_secs(60),
            },
            feed: FeedPlan {
                nodes: 200,
                connections: 4,
                interval: Duration::from_millis(250),
                watchers: 4,
                phase: Duration::from_secs(1),
                find_rate: 50,
                page_size: 50,
            },
            drain: DrainPlan {
                nodes: 50,
                connections: 2,
                interval: Duration::from_secs(2),
                drains: 5,
                limit: Duration::from_secs(10),
            },
            // Tight admission, so the quick run defers some of the 400.
            arrival: ArrivalPlan {
                registered: 100,
                registered_connections: 4,
                arriving: 400,
                arriving_connections: 8,
                interval: Duration::from_secs(1),
                settle: Duration::from_secs(1),
                limit: Duration::from_secs(60),
                admission: Some((2, 8)),
            },
        }
    }
}
