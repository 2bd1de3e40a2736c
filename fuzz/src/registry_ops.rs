//! `registry_ops`: the registry's state machine driven by an arbitrary
//! script (nodes loaded from a store at start, then register / heartbeat /
//! deregister / advance-clock / cordon / uncordon / drain / cancel-drain
//! operations), without a runtime: the fuzz target plays the expiry task,
//! calling [`Registry::process_due`] at every wake-up the registry asks for
//! and after every operation (as the task does when the schedule changes).
//!
//! After every step the registry is compared with a reference model whose
//! state is a plain function of the operations and the clock:
//! - the listed nodes, their status, session, last heartbeat, suspect flag,
//!   cordon and drain are the model's;
//! - an ONLINE node's deadline is exactly its last sign of life plus the
//!   node timeout: it is ONLINE one step before and OFFLINE at that very
//!   instant (its `status_changed_at` is the deadline), and it is removed
//!   exactly one retention later;
//! - the next wake-up the registry asks for is after now and no later than
//!   the earliest deadline, removal or drain deadline the model knows;
//! - counts match the listed nodes, admin states kept for unlisted nodes
//!   match the model's, and [`Registry::check_consistency`] holds (the
//!   invariants the property tests check too).
//!
//! The mass-failure guard is off: it holds nodes ONLINE on purpose, which
//! the exact deadlines above would report as a bug.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use chrono::{DateTime, Utc};
use registry_proto::convert::{from_proto_timestamp, to_proto_timestamp};
use registry_proto::pb;
use registry_server::RegistryError;
use registry_server::registry::{
    DrainRequest, GuardConfig, NodeFilter, Now, Options, Registration, Registry, Timing,
};
use registry_server::store::{Loaded, MemoryStore, NodeRecord, secret_sha256};
use registry_server::validate;
use tokio::time::Instant;

/// Silence after which a node is OFFLINE.
const TIMEOUT_MS: u64 = 1000;
/// How long an OFFLINE node stays listed.
const RETENTION_MS: u64 = 3000;
/// Node ids `n0`..`n3`: few enough that operations collide.
const NODES: u8 = 4;
/// Machines `machine-0`, `machine-1`: a node id claimed by two hosts.
const MACHINES: u8 = 2;
/// Most pools a node registers (`p0`..`p2`).
const POOLS: u8 = 3;
/// Longest script run, so one input stays fast.
const MAX_OPS: usize = 256;

/// One node of the store read at start.
#[derive(Arbitrary, Debug)]
struct LoadedNode {
    node: u8,
    machine: u8,
    /// Whether the store holds the node's record (else only its admin
    /// state, if cordoned: a node deregistered while cordoned).
    record: bool,
    /// Whether the store holds a cordon for the node.
    cordoned: bool,
}

/// Which session an operation presents.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Session {
    /// The node's current session and secret.
    Current,
    /// The session before the current one (superseded).
    Previous,
    /// The current session with a wrong secret.
    WrongSecret,
    /// No session and no secret (Deregister with an admin token).
    Admin,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Register {
        node: u8,
        machine: u8,
        pools: u8,
    },
    Heartbeat {
        node: u8,
        session: Session,
        state: u8,
        free: u8,
    },
    Deregister {
        node: u8,
        session: Session,
    },
    Advance {
        ms: u16,
    },
    Cordon {
        node: u8,
        other_reason: bool,
    },
    Uncordon {
        node: u8,
    },
    Drain {
        node: u8,
        pool: Option<u8>,
        deadline_ms: Option<u16>,
    },
    CancelDrain {
        node: u8,
    },
}

/// One fuzz input.
#[derive(Arbitrary, Debug)]
struct Script {
    load: Vec<LoadedNode>,
    ops: Vec<Op>,
}

/// A drain as the model knows it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Drain {
    /// Model time (ms) at which it counts as drained; `None`: never.
    deadline: Option<u64>,
    /// Pool drained (`None`: every pool), to tell a repeated request.
    pool: Option<u8>,
}

/// What operators asked of a node (listed or not).
#[derive(Debug, Clone, Default, PartialEq)]
struct Admin {
    cordoned: bool,
    drain: Option<Drain>,
}

impl Admin {
    fn is_empty(&self) -> bool {
        !self.cordoned && self.drain.is_none()
    }
}

/// What the model believes about one listed node.
#[derive(Debug, Clone)]
struct Node {
    machine: u8,
    pools: u8,
    /// Model time (ms) of the latest sign of life.
    last_seen: u64,
    session: (u64, String),
    previous: Option<(u64, String)>,
    admin: Admin,
    /// Loaded from the store and not heard from since: suspect, and its
    /// id reserved for its machine.
    restored: bool,
}

impl Node {
    fn deadline(&self) -> u64 {
        self.last_seen + TIMEOUT_MS
    }
    fn online(&self, now: u64) -> bool {
        now < self.deadline()
    }
    fn removal(&self) -> u64 {
        self.deadline() + RETENTION_MS
    }
}

/// The reference model and the registry under test.
struct Harness {
    registry: Registry,
    nodes: BTreeMap<u8, Node>,
    /// Admin states kept for unlisted nodes.
    parked: BTreeMap<u8, Admin>,
    /// Model time in ms since the start.
    now: u64,
    /// When the registry asked to be woken next.
    next: Option<Instant>,
    /// The latest revision seen: it never goes back.
    revision: u64,
}

/// The monotonic clock's origin, read once per process.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// The wall clock at model time 0.
fn wall_origin() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
}

fn at(ms: u64) -> Instant {
    origin() + Duration::from_millis(ms)
}

fn wall(ms: u64) -> DateTime<Utc> {
    wall_origin() + chrono::Duration::milliseconds(ms as i64)
}

fn clocks(ms: u64) -> Now {
    Now {
        at: at(ms),
        wall: wall(ms),
    }
}

fn node_id(n: u8) -> String {
    format!("n{n}")
}

fn registration(n: u8, machine: u8, pools: u8) -> Registration {
    validate::registration(pb::RegisterRequest {
        node_id: node_id(n),
        machine_id: format!("machine-{machine}"),
        address: format!("http://n{n}.example:9200"),
        pools: (0..pools)
            .map(|p| pb::PoolSpec {
                pool_id: format!("p{p}"),
                model: "m".into(),
                slots_total: 4,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .expect("the fuzz target's registrations are valid")
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(script) = Script::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let mut harness = Harness::start(&script.load);
    for op in script.ops.into_iter().take(MAX_OPS) {
        harness.apply(op);
    }
}

impl Harness {
    /// A registry that loads `load` from its store at time 0, as a
    /// restarted server does.
    fn start(load: &[LoadedNode]) -> Self {
        let registry = Registry::with_options(
            Timing {
                node_timeout: Duration::from_millis(TIMEOUT_MS),
                heartbeat_interval: Duration::from_millis(TIMEOUT_MS / 4),
                offline_retention: Duration::from_millis(RETENTION_MS),
            },
            Options {
                // Small: the defaults are sized for a fleet.
                watch_history: 64,
                watch_queue: 64,
                guard: GuardConfig::off(),
                store: Arc::new(MemoryStore),
                ..Options::default()
            },
        );
        let mut harness = Harness {
            registry,
            nodes: BTreeMap::new(),
            parked: BTreeMap::new(),
            now: 0,
            next: None,
            revision: 0,
        };
        harness.load(load);
        harness.settle();
        harness
    }

    fn load(&mut self, load: &[LoadedNode]) {
        let mut loaded = Loaded::default();
        let mut cordoned = BTreeSet::new();
        for entry in load.iter().take(2 * NODES as usize) {
            let n = entry.node % NODES;
            if entry.cordoned {
                cordoned.insert(n);
                loaded.admin.push((
                    node_id(n),
                    pb::AdminState {
                        cordoned: true,
                        cordon_reason: "loaded".into(),
                        cordoned_at: Some(to_proto_timestamp(wall_origin())),
                        ..Default::default()
                    },
                ));
            }
            // The store holds one record per node; the first one counts.
            if !entry.record || self.nodes.contains_key(&n) {
                continue;
            }
            let secret = format!("restored-secret-{n}");
            let session_id = 1000 + u64::from(n);
            loaded.nodes.push(NodeRecord {
                registration: registration(n, entry.machine % MACHINES, 1),
                session_id,
                secret_sha256: secret_sha256(&secret),
                registered_at: wall_origin() - chrono::Duration::hours(1),
            });
            self.nodes.insert(
                n,
                Node {
                    machine: entry.machine % MACHINES,
                    pools: 1,
                    last_seen: 0,
                    session: (session_id, secret),
                    previous: None,
                    admin: Admin::default(),
                    restored: true,
                },
            );
        }
        for n in cordoned {
            let admin = Admin {
                cordoned: true,
                drain: None,
            };
            match self.nodes.get_mut(&n) {
                Some(node) => node.admin = admin,
                None => {
                    self.parked.insert(n, admin);
                }
            }
        }
        let left = self.registry.restore(loaded, clocks(0));
        self.registry.park_loaded(left, clocks(0));
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Register {
                node,
                machine,
                pools,
            } => self.register(node % NODES, machine % MACHINES, pools % (POOLS + 1)),
            Op::Heartbeat {
                node,
                session,
                state,
                free,
            } => self.heartbeat(node % NODES, session, state, free),
            Op::Deregister { node, session } => self.deregister(node % NODES, session),
            Op::Advance { ms } => {
                self.advance(u64::from(ms));
                return;
            }
            Op::Cordon { node, other_reason } => self.cordon(node % NODES, other_reason),
            Op::Uncordon { node } => self.uncordon(node % NODES),
            Op::Drain {
                node,
                pool,
                deadline_ms,
            } => self.drain(node % NODES, pool.map(|p| p % (POOLS + 1)), deadline_ms),
            Op::CancelDrain { node } => self.cancel_drain(node % NODES),
        }
        // An operation may queue an earlier wake-up; the expiry task would
        // look at once.
        self.settle();
    }

    fn register(&mut self, n: u8, machine: u8, pools: u8) {
        let now = self.now;
        let result = self
            .registry
            .register(registration(n, machine, pools), clocks(now));
        let listed = self.nodes.get(&n);
        let taken = listed.is_some_and(|node| node.online(now) && node.machine != machine);
        let reserved = taken && listed.is_some_and(|node| node.restored);
        match result {
            Ok(registered) => {
                assert!(!taken, "n{n} taken over from another machine while ONLINE");
                assert_eq!(registered.created, listed.is_none());
                let previous = listed.map(|node| node.session.clone());
                let admin = match listed {
                    Some(node) => node.admin.clone(),
                    None => self.parked.remove(&n).unwrap_or_default(),
                };
                self.nodes.insert(
                    n,
                    Node {
                        machine,
                        pools,
                        last_seen: now,
                        session: (registered.session_id, registered.session_secret),
                        previous,
                        admin,
                        restored: false,
                    },
                );
            }
            Err(RegistryError::NodeReserved { .. }) => assert!(reserved, "n{n} reserved"),
            Err(RegistryError::NodeTaken { .. }) => {
                assert!(taken && !reserved, "n{n} refused as taken")
            }
            Err(other) => panic!("register n{n} failed: {other:?}"),
        }
    }

    fn heartbeat(&mut self, n: u8, session: Session, state: u8, free: u8) {
        let id = node_id(n);
        let Some(node) = self.nodes.get_mut(&n) else {
            let result = self.registry.attach(&id, 1, "x");
            assert!(
                matches!(result, Err(RegistryError::NodeNotFound { .. })),
                "{id} should be unknown: {:?}",
                result.map(|_| ())
            );
            return;
        };
        let (session_id, secret) = match session {
            Session::Current | Session::Admin => node.session.clone(),
            Session::Previous => {
                if let Some((old, secret)) = &node.previous
                    && *old != node.session.0
                {
                    let result = self.registry.attach(&id, *old, secret);
                    assert!(
                        matches!(result, Err(RegistryError::SessionSuperseded { .. })),
                        "stale session of {id}: {:?}",
                        result.map(|_| ())
                    );
                }
                return;
            }
            Session::WrongSecret => {
                let result = self.registry.attach(&id, node.session.0, "wrong");
                assert!(
                    matches!(result, Err(RegistryError::PermissionDenied(_))),
                    "wrong secret for {id}: {:?}",
                    result.map(|_| ())
                );
                return;
            }
        };
        let slot = self
            .registry
            .attach(&id, session_id, &secret)
            .unwrap_or_else(|e| panic!("attach {id}: {e:?}"));
        let states = [
            pb::PoolState::Ready,
            pb::PoolState::Initializing,
            pb::PoolState::Draining,
            pb::PoolState::Failed,
            pb::PoolState::Offline,
        ];
        let mut request = pb::HeartbeatRequest {
            node_id: id.clone(),
            session_id,
            session_secret: secret,
            sent_at: Some(to_proto_timestamp(wall(self.now))),
            pools: (0..node.pools)
                .map(|p| pb::PoolStatus {
                    pool_id: format!("p{p}"),
                    state: states[usize::from(state.wrapping_add(p)) % states.len()] as i32,
                    slots_total: 4,
                    slots_free: u32::from(free % 5),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let beat = validate::beat(&mut request, wall(self.now), Duration::from_secs(60))
            .expect("the fuzz target's heartbeats are valid");
        self.registry
            .heartbeat(&slot, session_id, beat, at(self.now))
            .unwrap_or_else(|e| panic!("heartbeat {id}: {e:?}"));
        node.last_seen = self.now;
        node.restored = false;
    }

    fn deregister(&mut self, n: u8, session: Session) {
        let id = node_id(n);
        let Some(node) = self.nodes.get(&n) else {
            let result = self.registry.deregister(&id, 0, None);
            assert!(
                matches!(result, Err(RegistryError::NodeNotFound { .. })),
                "{id} should be unknown: {result:?}"
            );
            return;
        };
        let result = match session {
            Session::Current => {
                self.registry
                    .deregister(&id, node.session.0, Some(&node.session.1))
            }
            Session::Admin => self.registry.deregister(&id, 0, None),
            Session::Previous => {
                if let Some((old, secret)) = &node.previous
                    && *old != node.session.0
                {
                    let result = self.registry.deregister(&id, *old, Some(secret));
                    assert!(
                        matches!(result, Err(RegistryError::SessionSuperseded { .. })),
                        "stale deregister of {id}: {result:?}"
                    );
                }
                return;
            }
            Session::WrongSecret => {
                let result = self.registry.deregister(&id, node.session.0, Some("wrong"));
                assert!(
                    matches!(result, Err(RegistryError::PermissionDenied(_))),
                    "wrong secret for {id}: {result:?}"
                );
                return;
            }
        };
        result.unwrap_or_else(|e| panic!("deregister {id}: {e:?}"));
        self.remove(n);
    }

    /// The model's side of a node leaving the map: its admin state is
    /// kept for its next registration.
    fn remove(&mut self, n: u8) {
        let node = self.nodes.remove(&n).expect("a listed node");
        if !node.admin.is_empty() {
            self.parked.insert(n, node.admin);
        }
    }

    fn cordon(&mut self, n: u8, other_reason: bool) {
        let id = node_id(n);
        let reason = if other_reason {
            "kernel upgrade"
        } else {
            "maintenance"
        };
        let result = self.registry.cordon(&id, reason, clocks(self.now));
        match self.nodes.get_mut(&n) {
            Some(node) => {
                let view = result.unwrap_or_else(|e| panic!("cordon {id}: {e:?}"));
                let admin = view.admin.expect("a node carries its admin state");
                assert!(admin.cordoned && admin.cordon_reason == reason, "{admin:?}");
                node.admin.cordoned = true;
            }
            None => assert!(
                matches!(result, Err(RegistryError::NodeNotFound { .. })),
                "cordon of unlisted {id}: {result:?}"
            ),
        }
    }

    /// Uncordon and CancelDrain: `clear` applied to the listed node's admin
    /// state, or to the one kept for it (NOT_FOUND when neither).
    fn clear_admin(
        &mut self,
        n: u8,
        result: Result<pb::Node, RegistryError>,
        clear: fn(&mut Admin),
    ) {
        let id = node_id(n);
        if let Some(node) = self.nodes.get_mut(&n) {
            result.unwrap_or_else(|e| panic!("clearing admin state of {id}: {e:?}"));
            clear(&mut node.admin);
            return;
        }
        match self.parked.get_mut(&n) {
            Some(admin) => {
                let view = result.unwrap_or_else(|e| panic!("clearing kept state of {id}: {e:?}"));
                clear(admin);
                let got = view.admin.expect("the kept admin state");
                assert_eq!(got.cordoned, admin.cordoned, "{id}");
                assert_eq!(got.drain.is_some(), admin.drain.is_some(), "{id}");
                if admin.is_empty() {
                    self.parked.remove(&n);
                }
            }
            None => assert!(
                matches!(result, Err(RegistryError::NodeNotFound { .. })),
                "clearing admin state of unknown {id}: {result:?}"
            ),
        }
    }

    fn uncordon(&mut self, n: u8) {
        let result = self.registry.uncordon(&node_id(n));
        self.clear_admin(n, result, |admin| admin.cordoned = false);
    }

    fn cancel_drain(&mut self, n: u8) {
        let result = self.registry.cancel_drain(&node_id(n));
        self.clear_admin(n, result, |admin| admin.drain = None);
    }

    fn drain(&mut self, n: u8, pool: Option<u8>, deadline_ms: Option<u16>) {
        let id = node_id(n);
        let request = DrainRequest {
            pool_ids: pool.map(|p| format!("p{p}")).into_iter().collect(),
            reason: "fuzz".into(),
            deadline: deadline_ms.map(|ms| Duration::from_millis(u64::from(ms))),
        };
        let result = self.registry.drain(&id, request, clocks(self.now));
        let Some(node) = self.nodes.get_mut(&n) else {
            assert!(
                matches!(result, Err(RegistryError::NodeNotFound { .. })),
                "drain of unlisted {id}: {result:?}"
            );
            return;
        };
        if pool.is_some_and(|p| p >= node.pools) {
            assert!(
                matches!(result, Err(RegistryError::InvalidArgument { .. })),
                "drain of a pool {id} does not have: {result:?}"
            );
            return;
        }
        let view = result.unwrap_or_else(|e| panic!("drain {id}: {e:?}"));
        assert!(view.admin.is_some_and(|a| a.drain.is_some()), "{id}");
        let deadline = deadline_ms.map(|ms| self.now + u64::from(ms));
        let same = node
            .admin
            .drain
            .is_some_and(|d| d.pool == pool && d.deadline.is_none() && deadline.is_none());
        if !same {
            node.admin.drain = Some(Drain { deadline, pool });
        }
    }

    /// Moves the clock by `ms`, stopping at every wake-up the registry asked
    /// for on the way, as the expiry task does.
    fn advance(&mut self, ms: u64) {
        let target = self.now + ms;
        while let Some(next) = self.next.filter(|&t| t <= at(target)) {
            let elapsed = next - origin();
            let now = elapsed.as_millis() as u64;
            assert_eq!(at(now), next, "a wake-up off the millisecond grid");
            assert!(now >= self.now, "a wake-up in the past");
            self.now = now;
            self.settle();
        }
        self.now = target;
        self.settle();
    }

    /// Lets the registry handle what is due now, brings the model to now
    /// and compares the two.
    fn settle(&mut self) {
        let now = self.now;
        self.next = self.registry.process_due(clocks(now));
        // The model at `now`: removals after retention, then OFFLINE nodes
        // are no longer reserved nor suspect.
        let removed: Vec<u8> = self
            .nodes
            .iter()
            .filter(|(_, node)| now >= node.removal())
            .map(|(&n, _)| n)
            .collect();
        for n in removed {
            self.remove(n);
        }
        for node in self.nodes.values_mut() {
            if !node.online(now) {
                node.restored = false;
            }
        }
        self.check();
    }

    fn check(&mut self) {
        let now = self.now;
        if let Err(broken) = self.registry.check_consistency() {
            panic!("at {now} ms: {broken}");
        }
        let revision = self.registry.revision();
        assert!(revision >= self.revision, "the revision went back");
        self.revision = revision;

        let (listed, more) = self.registry.list(&NodeFilter::default(), 0, "");
        assert!(more.is_none());
        let ids: Vec<String> = listed.iter().map(|node| node.node_id.clone()).collect();
        let want: Vec<String> = self.nodes.keys().map(|&n| node_id(n)).collect();
        assert_eq!(ids, want, "listed nodes at {now} ms");

        // The earliest moment the registry must look again.
        let mut due: Option<u64> = None;
        let mut sooner = |t: u64| due = Some(due.map_or(t, |d| d.min(t)));
        let mut online = 0;
        for (got, (n, node)) in listed.iter().zip(&self.nodes) {
            let id = node_id(*n);
            let status = if node.online(now) {
                online += 1;
                sooner(node.deadline());
                pb::NodeStatus::Online
            } else {
                sooner(node.removal());
                pb::NodeStatus::Offline
            };
            assert_eq!(got.status(), status, "{id} at {now} ms: {node:?}");
            assert_eq!(got.session_id, node.session.0, "{id}");
            let time =
                |t: &Option<prost_types::Timestamp>| t.as_ref().and_then(from_proto_timestamp);
            assert_eq!(
                time(&got.last_heartbeat_at),
                Some(wall(node.last_seen)),
                "{id}: last heartbeat"
            );
            if status == pb::NodeStatus::Offline {
                assert_eq!(
                    time(&got.status_changed_at),
                    Some(wall(node.deadline())),
                    "{id} went OFFLINE at another time than its deadline"
                );
            }
            assert_eq!(got.suspect, node.restored, "{id}: suspect");
            let admin = got.admin.clone().unwrap_or_default();
            assert_eq!(admin.cordoned, node.admin.cordoned, "{id}: cordoned");
            assert_eq!(
                admin.drain.is_some(),
                node.admin.drain.is_some(),
                "{id}: drain"
            );
            if let (Some(drain), Some(model)) = (&admin.drain, &node.admin.drain) {
                let past = model.deadline.is_some_and(|d| d <= now);
                assert!(drain.drained || !past, "{id}: drain past its deadline");
                if !drain.drained
                    && let Some(deadline) = model.deadline
                {
                    sooner(deadline);
                }
            }
        }
        let counts = self.registry.counts();
        assert_eq!(counts.online, online, "ONLINE count at {now} ms");
        assert_eq!(
            counts.online + counts.offline,
            self.nodes.len() as u64,
            "node count at {now} ms"
        );
        assert_eq!(
            self.registry.parked_admin_states(),
            self.parked.len(),
            "admin states kept at {now} ms: {:?}",
            self.parked
        );
        match (self.next, due) {
            (None, None) => {}
            (Some(next), Some(due)) => {
                assert!(next > at(now), "the next wake-up is not after now");
                assert!(
                    next <= at(due),
                    "the registry sleeps past {due} ms (wakes at {:?})",
                    next - origin()
                );
            }
            (next, due) => panic!("next wake-up {next:?} but the model's is {due:?} ms"),
        }
    }
}
