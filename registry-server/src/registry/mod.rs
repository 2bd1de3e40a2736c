//! The registry's state: which nodes exist, their registration, liveness and
//! latest pool status, and the schedule of per-node deadlines.
//!
//! Concurrency design (why it looks like this):
//! - Nodes live in a `BTreeMap` behind a `RwLock`, ordered by node_id so
//!   listing is deterministic and pages cheaply. Each node's mutable state has
//!   its own `Mutex` inside an `Arc<NodeSlot>`.
//! - A heartbeat stream looks its slot up once and keeps the `Arc`: every
//!   later message locks only that node's mutex. A heartbeat is O(1) and never
//!   waits on other nodes, and ListNodes (which holds the map's read lock)
//!   never stalls heartbeats.
//! - Deadlines are exact and per node, without a periodic scan: a min-heap
//!   holds one live wake-up per node. Heartbeats do not touch the heap; they
//!   only move `last_seen`. When a wake-up fires, the expiry task compares it
//!   with `last_seen + node_timeout` and either marks the node OFFLINE (the
//!   deadline really passed) or re-queues it at its real deadline.
//! - Lock order is always map → node → schedule; no lock is held across
//!   `.await`.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::ops::Bound;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use registry_proto::convert::to_proto_timestamp;
use registry_proto::pb;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::error::RegistryError;

mod input;
pub use input::{Beat, Registration};

/// The timing rules the registry enforces and tells agents about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Silence after which a node is marked OFFLINE.
    pub node_timeout: Duration,
    /// How often agents should send heartbeats (advertised, not enforced).
    pub heartbeat_interval: Duration,
    /// How long an OFFLINE node stays listed before it is removed.
    pub offline_retention: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            node_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            offline_retention: Duration::from_secs(3600),
        }
    }
}

/// Liveness of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heard from within the node timeout.
    Online,
    /// Silent for longer than the node timeout.
    Offline,
}

impl Liveness {
    fn to_proto(self) -> pb::NodeStatus {
        match self {
            Liveness::Online => pb::NodeStatus::Online,
            Liveness::Offline => pb::NodeStatus::Offline,
        }
    }
}

/// What a successful Register tells the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The new session, which heartbeat streams must name.
    pub session_id: u64,
    /// The session's secret, which heartbeat streams and Deregister present.
    pub session_secret: String,
    /// Whether the node was unknown before.
    pub created: bool,
    /// When the node was first registered.
    pub registered_at: DateTime<Utc>,
}

/// ListNodes filters; every set filter must match.
#[derive(Debug, Clone, Default)]
pub struct NodeFilter {
    /// Only nodes with this liveness.
    pub status: Option<Liveness>,
    /// Only nodes running a pool with this id.
    pub pool_id: Option<String>,
    /// Only nodes carrying all these labels with equal values.
    pub labels: Vec<(String, String)>,
}

/// How many nodes are in each state, for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Nodes currently ONLINE.
    pub online: u64,
    /// Nodes currently OFFLINE (within retention).
    pub offline: u64,
}

/// Running totals and gauges kept with relaxed atomics, so the hot path pays
/// a few uncontended increments and metrics are published off the hot path.
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful Register calls.
    pub registrations: AtomicU64,
    /// Successful Deregister calls.
    pub deregistrations: AtomicU64,
    /// Heartbeat messages accepted.
    pub heartbeats: AtomicU64,
    /// ONLINE -> OFFLINE transitions.
    pub offline_transitions: AtomicU64,
    /// OFFLINE -> ONLINE transitions.
    pub online_transitions: AtomicU64,
    /// Nodes removed after their offline retention.
    pub expired: AtomicU64,
    /// Heartbeat streams open now.
    pub open_streams: AtomicI64,
    /// Pools of ONLINE nodes by reported state, indexed by `PoolState as i32`.
    pub pools_by_state: [AtomicI64; POOL_STATES],
}

/// Number of `PoolState` values (UNSPECIFIED included, never counted).
pub const POOL_STATES: usize = 6;

/// A cloneable handle to the registry state.
#[derive(Clone)]
pub struct Registry {
    /// State shared by every handle (gRPC handlers, streams, expiry task).
    shared: Arc<Shared>,
}

struct Shared {
    /// Every known node by id; ordered for deterministic, pageable listing.
    nodes: RwLock<BTreeMap<Arc<str>, Arc<NodeSlot>>>,
    /// Earliest-first wake-ups of the expiry task; at most one live entry per
    /// node (older entries are recognised as stale and dropped).
    schedule: Mutex<BinaryHeap<Reverse<Wakeup>>>,
    /// Wakes the expiry task when a wake-up earlier than the queued ones is
    /// added, so it never oversleeps a deadline.
    schedule_changed: Notify,
    /// Timeout, interval and retention.
    timing: Timing,
    /// Source of session ids.
    sessions: SessionIds,
    /// Tie-breaker that keeps heap entries totally ordered.
    wakeup_seq: AtomicU64,
    /// Nodes ONLINE, kept on every transition so metrics need no scan.
    online: AtomicU64,
    /// Nodes OFFLINE, likewise.
    offline: AtomicU64,
    /// Most nodes the registry holds; new ones beyond are refused.
    max_nodes: usize,
    /// Totals for metrics.
    stats: Stats,
}

/// One node: its id and its lock-protected state.
pub struct NodeSlot {
    /// The node's id, shared with the map key and the log fields.
    id: Arc<str>,
    /// Everything that changes, under the node's own lock.
    state: Mutex<NodeState>,
}

impl NodeSlot {
    /// The node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn lock(&self) -> MutexGuard<'_, NodeState> {
        // A panic while holding a node lock cannot leave the state torn in a
        // way that matters more than losing the node, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct NodeState {
    /// The latest accepted registration.
    registration: Registration,
    /// The current session; streams naming another one are refused.
    session_id: u64,
    /// The current session's secret (hex), known only to the registering
    /// agent, so no one else can speak for the node.
    session_secret: String,
    /// ONLINE or OFFLINE.
    liveness: Liveness,
    /// Monotonic time of the latest sign of life (register or heartbeat);
    /// the deadline is `last_seen + node_timeout`.
    last_seen: Instant,
    /// Monotonic time the node went OFFLINE, for retention.
    offline_since: Option<Instant>,
    /// Wall-clock time of first registration (kept across re-registration).
    registered_at: DateTime<Utc>,
    /// Wall-clock time of the latest sign of life, for operators.
    last_heartbeat_at: DateTime<Utc>,
    /// Wall-clock time of the latest liveness change.
    status_changed_at: DateTime<Utc>,
    /// The agent's clock in its latest heartbeat.
    agent_time: Option<DateTime<Utc>>,
    /// Pool status from the latest heartbeat.
    pool_status: Vec<pb::PoolStatus>,
    /// GPU figures from the latest heartbeat that carried any.
    gpu_stats: Vec<pb::GpuStats>,
    /// The node's one live wake-up in the schedule; heap entries at other
    /// times are stale.
    wakeup_at: Option<Instant>,
    /// Set once the node is removed, so streams holding the slot stop.
    removed: bool,
}

struct Wakeup {
    at: Instant,
    seq: u64,
    node: Arc<NodeSlot>,
}

impl PartialEq for Wakeup {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Wakeup {}
impl PartialOrd for Wakeup {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Wakeup {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Session ids: unique within a server run and, by a random base, unlikely
/// to repeat a previous run's, so an agent from before a restart cannot
/// accidentally present a valid session.
struct SessionIds {
    base: u64,
    next: AtomicU64,
}

impl SessionIds {
    fn new() -> Self {
        use std::hash::BuildHasher;
        let seed = (std::time::SystemTime::now(), std::process::id());
        Self {
            base: std::collections::hash_map::RandomState::new().hash_one(seed),
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> u64 {
        loop {
            let id = self
                .base
                .wrapping_add(self.next.fetch_add(1, AtomicOrdering::Relaxed));
            // 0 means "no session" in the contract.
            if id != 0 {
                return id;
            }
        }
    }
}

impl Registry {
    /// An empty registry enforcing `timing`, without a node cap. Run
    /// [`crate::expiry::run`] on it so deadlines take effect.
    pub fn new(timing: Timing) -> Self {
        Self::with_max_nodes(timing, usize::MAX)
    }

    /// An empty registry holding at most `max_nodes` nodes.
    pub fn with_max_nodes(timing: Timing, max_nodes: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                nodes: RwLock::new(BTreeMap::new()),
                schedule: Mutex::new(BinaryHeap::new()),
                schedule_changed: Notify::new(),
                timing,
                sessions: SessionIds::new(),
                wakeup_seq: AtomicU64::new(0),
                online: AtomicU64::new(0),
                offline: AtomicU64::new(0),
                max_nodes,
                stats: Stats::default(),
            }),
        }
    }

    /// The timing rules in force.
    pub fn timing(&self) -> Timing {
        self.shared.timing
    }

    /// Nodes by liveness.
    pub fn counts(&self) -> Counts {
        Counts {
            online: self.shared.online.load(AtomicOrdering::Relaxed),
            offline: self.shared.offline.load(AtomicOrdering::Relaxed),
        }
    }

    /// Running totals for metrics.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Adds a node or updates a known one, starting a new session. The node
    /// is ONLINE and its deadline starts now. An ONLINE node registered from
    /// another machine is not taken over (NodeTaken), and no node beyond the
    /// cap is added (LimitReached).
    pub fn register(&self, registration: Registration) -> Result<Registered, RegistryError> {
        let session_id = self.shared.sessions.next();
        let session_secret = new_secret();
        let now = Instant::now();
        let wall = Utc::now();
        let deadline = now + self.shared.timing.node_timeout;

        let mut nodes = self.write_nodes();
        if let Some(slot) = nodes.get(registration.node_id.as_str()) {
            let mut st = slot.lock();
            if !st.removed {
                if st.liveness == Liveness::Online
                    && st.registration.machine_id != registration.machine_id
                {
                    return Err(RegistryError::NodeTaken {
                        node_id: registration.node_id,
                    });
                }
                st.registration = registration;
                st.session_id = session_id;
                st.session_secret = session_secret.clone();
                st.last_seen = now;
                st.last_heartbeat_at = wall;
                // The new session reports its own pools; the old session's
                // figures would describe another incarnation.
                self.count_pools(&st, -1);
                st.pool_status.clear();
                st.gpu_stats.clear();
                if st.liveness == Liveness::Offline {
                    self.set_online(slot, &mut st, wall, "re-registered");
                }
                self.schedule_if_earlier(slot, &mut st, deadline);
                self.shared
                    .stats
                    .registrations
                    .fetch_add(1, AtomicOrdering::Relaxed);
                info!(node_id = %slot.id, session_id, "node re-registered");
                return Ok(Registered {
                    session_id,
                    session_secret,
                    created: false,
                    registered_at: st.registered_at,
                });
            }
        }
        if nodes.len() >= self.shared.max_nodes {
            return Err(RegistryError::LimitReached(format!(
                "the registry holds its maximum of {} nodes",
                self.shared.max_nodes
            )));
        }

        let id: Arc<str> = Arc::from(registration.node_id.as_str());
        let slot = Arc::new(NodeSlot {
            id: id.clone(),
            state: Mutex::new(NodeState {
                registration,
                session_id,
                session_secret: session_secret.clone(),
                liveness: Liveness::Online,
                last_seen: now,
                offline_since: None,
                registered_at: wall,
                last_heartbeat_at: wall,
                status_changed_at: wall,
                agent_time: None,
                pool_status: Vec::new(),
                gpu_stats: Vec::new(),
                wakeup_at: None,
                removed: false,
            }),
        });
        {
            let mut st = slot.lock();
            self.schedule_if_earlier(&slot, &mut st, deadline);
        }
        nodes.insert(id.clone(), slot);
        drop(nodes);
        self.shared.online.fetch_add(1, AtomicOrdering::Relaxed);
        self.shared
            .stats
            .registrations
            .fetch_add(1, AtomicOrdering::Relaxed);
        info!(node_id = %id, session_id, "node registered");
        Ok(Registered {
            session_id,
            session_secret,
            created: true,
            registered_at: wall,
        })
    }

    /// Removes a node at once. With a non-zero `session_id`, only while that
    /// is the node's current session; with a `secret`, only if it is the
    /// current session's.
    pub fn deregister(
        &self,
        node_id: &str,
        session_id: u64,
        secret: Option<&str>,
    ) -> Result<(), RegistryError> {
        let mut nodes = self.write_nodes();
        let slot = nodes
            .get(node_id)
            .cloned()
            .ok_or_else(|| not_found(node_id))?;
        let mut st = slot.lock();
        if session_id != 0 && st.session_id != session_id {
            return Err(RegistryError::SessionSuperseded {
                node_id: node_id.to_string(),
                presented: session_id,
            });
        }
        if let Some(secret) = secret {
            check_secret(&slot, &st, secret)?;
        }
        self.mark_removed(&mut st);
        drop(st);
        nodes.remove(node_id);
        self.shared
            .stats
            .deregistrations
            .fetch_add(1, AtomicOrdering::Relaxed);
        info!(node_id, "node deregistered");
        Ok(())
    }

    /// Finds the slot a heartbeat stream will speak for, checking the
    /// session and its secret.
    pub fn attach(
        &self,
        node_id: &str,
        session_id: u64,
        secret: &str,
    ) -> Result<Arc<NodeSlot>, RegistryError> {
        let slot = self
            .read_nodes()
            .get(node_id)
            .cloned()
            .ok_or_else(|| not_found(node_id))?;
        {
            let st = slot.lock();
            check_session(&slot, &st, session_id)?;
            check_secret(&slot, &st, secret)?;
        }
        Ok(slot)
    }

    /// Records a heartbeat: the node is alive now, with this pool status.
    /// Touches only this node's lock (and the schedule when an OFFLINE node
    /// comes back).
    pub fn heartbeat(
        &self,
        slot: &Arc<NodeSlot>,
        session_id: u64,
        beat: Beat,
    ) -> Result<(), RegistryError> {
        let now = Instant::now();
        let wall = beat.received_at;
        let mut st = slot.lock();
        check_session(slot, &st, session_id)?;
        st.last_seen = now;
        st.last_heartbeat_at = wall;
        st.agent_time = Some(beat.sent_at);
        self.count_pools(&st, -1);
        st.pool_status = beat.pools;
        if !beat.gpus.is_empty() {
            st.gpu_stats = beat.gpus;
        }
        if st.liveness == Liveness::Offline {
            self.set_online(slot, &mut st, wall, "heartbeat resumed");
            self.schedule_if_earlier(slot, &mut st, now + self.shared.timing.node_timeout);
        }
        self.count_pools(&st, 1);
        self.shared
            .stats
            .heartbeats
            .fetch_add(1, AtomicOrdering::Relaxed);
        Ok(())
    }

    /// One node as the contract describes it.
    pub fn get(&self, node_id: &str) -> Result<pb::Node, RegistryError> {
        let nodes = self.read_nodes();
        let slot = nodes.get(node_id).ok_or_else(|| not_found(node_id))?;
        Ok(to_proto(&slot.lock()))
    }

    /// Nodes matching `filter` in node_id order, after `page_token` (a
    /// node_id), at most `page_size` of them (0: all). Returns the page and,
    /// when more nodes match, the token of the next page.
    pub fn list(
        &self,
        filter: &NodeFilter,
        page_size: usize,
        page_token: &str,
    ) -> (Vec<pb::Node>, Option<String>) {
        let limit = if page_size == 0 {
            usize::MAX
        } else {
            page_size
        };
        let start = if page_token.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(page_token)
        };
        let nodes = self.read_nodes();
        let mut page = Vec::new();
        for (id, slot) in nodes.range::<str, _>((start, Bound::Unbounded)) {
            let st = slot.lock();
            if !matches(&st, filter) {
                continue;
            }
            if page.len() == limit {
                // One more node matches: the caller needs another page.
                let token = page.last().map(|n: &pb::Node| n.node_id.clone());
                debug_assert!(token.as_deref() < Some(&**id));
                return (page, token);
            }
            page.push(to_proto(&st));
        }
        (page, None)
    }

    /// Handles every wake-up due at `now`: marks nodes whose deadline passed
    /// OFFLINE and removes nodes whose retention ended. Returns when the next
    /// wake-up is due.
    pub(crate) fn process_due(&self, now: Instant) -> Option<Instant> {
        loop {
            let wakeup = {
                let mut schedule = self.lock_schedule();
                match schedule.peek() {
                    Some(Reverse(head)) if head.at <= now => schedule.pop().expect("peeked").0,
                    Some(Reverse(head)) => return Some(head.at),
                    None => return None,
                }
            };
            self.process_wakeup(wakeup, now);
        }
    }

    /// Waits until a wake-up earlier than those already queued is added.
    pub(crate) async fn schedule_changed(&self) {
        self.shared.schedule_changed.notified().await;
    }

    fn process_wakeup(&self, wakeup: Wakeup, now: Instant) {
        let slot = wakeup.node;
        let mut st = slot.lock();
        if st.removed || st.wakeup_at != Some(wakeup.at) {
            return; // stale: the node was removed or re-scheduled earlier
        }
        st.wakeup_at = None;
        let timing = self.shared.timing;
        match st.liveness {
            Liveness::Online => {
                let deadline = st.last_seen + timing.node_timeout;
                if deadline <= now {
                    self.count_pools(&st, -1);
                    st.liveness = Liveness::Offline;
                    st.offline_since = Some(deadline);
                    st.status_changed_at = Utc::now();
                    self.shared.online.fetch_sub(1, AtomicOrdering::Relaxed);
                    self.shared.offline.fetch_add(1, AtomicOrdering::Relaxed);
                    self.shared
                        .stats
                        .offline_transitions
                        .fetch_add(1, AtomicOrdering::Relaxed);
                    let late = now.saturating_duration_since(deadline);
                    warn!(
                        node_id = %slot.id,
                        silent_for = %humantime::format_duration(timing.node_timeout + late),
                        "node offline: no heartbeat within the node timeout"
                    );
                    self.schedule_if_earlier(&slot, &mut st, deadline + timing.offline_retention);
                } else {
                    self.schedule_if_earlier(&slot, &mut st, deadline);
                }
            }
            Liveness::Offline => {
                let since = st.offline_since.unwrap_or(now);
                let remove_at = since + timing.offline_retention;
                if remove_at <= now {
                    self.mark_removed(&mut st);
                    drop(st);
                    let mut nodes = self.write_nodes();
                    // Only if the map still holds this very slot: the id may
                    // have been registered anew meanwhile.
                    if nodes.get(&slot.id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                        nodes.remove(&slot.id);
                    }
                    self.shared
                        .stats
                        .expired
                        .fetch_add(1, AtomicOrdering::Relaxed);
                    info!(node_id = %slot.id, "offline node removed after retention");
                } else {
                    self.schedule_if_earlier(&slot, &mut st, remove_at);
                }
            }
        }
    }

    fn set_online(&self, slot: &NodeSlot, st: &mut NodeState, wall: DateTime<Utc>, why: &str) {
        st.liveness = Liveness::Online;
        st.offline_since = None;
        st.status_changed_at = wall;
        self.shared.offline.fetch_sub(1, AtomicOrdering::Relaxed);
        self.shared.online.fetch_add(1, AtomicOrdering::Relaxed);
        self.shared
            .stats
            .online_transitions
            .fetch_add(1, AtomicOrdering::Relaxed);
        info!(node_id = %slot.id, reason = why, "node online again");
    }

    /// Adds (`sign` 1) or takes away (-1) the node's pools in the
    /// pools-by-state gauge; only ONLINE nodes' pools are counted.
    fn count_pools(&self, st: &NodeState, sign: i64) {
        if st.liveness != Liveness::Online || st.removed {
            return;
        }
        for pool in &st.pool_status {
            if let Some(gauge) = usize::try_from(pool.state)
                .ok()
                .and_then(|i| self.shared.stats.pools_by_state.get(i))
            {
                gauge.fetch_add(sign, AtomicOrdering::Relaxed);
            }
        }
    }

    fn mark_removed(&self, st: &mut NodeState) {
        self.count_pools(st, -1);
        st.removed = true;
        st.wakeup_at = None;
        let counter = match st.liveness {
            Liveness::Online => &self.shared.online,
            Liveness::Offline => &self.shared.offline,
        };
        counter.fetch_sub(1, AtomicOrdering::Relaxed);
    }

    /// Makes sure the node is woken at `at` at the latest.
    fn schedule_if_earlier(&self, slot: &Arc<NodeSlot>, st: &mut NodeState, at: Instant) {
        if st.wakeup_at.is_some_and(|queued| queued <= at) {
            // The queued wake-up comes first and will re-check then.
            return;
        }
        st.wakeup_at = Some(at);
        let seq = self.shared.wakeup_seq.fetch_add(1, AtomicOrdering::Relaxed);
        let mut schedule = self.lock_schedule();
        let earliest = schedule.peek().is_none_or(|Reverse(head)| at < head.at);
        schedule.push(Reverse(Wakeup {
            at,
            seq,
            node: slot.clone(),
        }));
        drop(schedule);
        if earliest {
            self.shared.schedule_changed.notify_one();
        }
    }

    fn read_nodes(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Arc<str>, Arc<NodeSlot>>> {
        self.shared.nodes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_nodes(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<Arc<str>, Arc<NodeSlot>>> {
        self.shared.nodes.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_schedule(&self) -> MutexGuard<'_, BinaryHeap<Reverse<Wakeup>>> {
        self.shared
            .schedule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn not_found(node_id: &str) -> RegistryError {
    RegistryError::NodeNotFound {
        node_id: node_id.to_string(),
    }
}

fn check_session(slot: &NodeSlot, st: &NodeState, session_id: u64) -> Result<(), RegistryError> {
    if st.removed {
        return Err(not_found(&slot.id));
    }
    if st.session_id != session_id {
        return Err(RegistryError::SessionSuperseded {
            node_id: slot.id.to_string(),
            presented: session_id,
        });
    }
    Ok(())
}

/// Compares the presented secret with the session's in constant time.
fn check_secret(slot: &NodeSlot, st: &NodeState, presented: &str) -> Result<(), RegistryError> {
    use subtle::ConstantTimeEq;
    if presented.is_empty() {
        return Err(RegistryError::PermissionDenied(format!(
            "node {} requires its session_secret (from RegisterResponse)",
            slot.id
        )));
    }
    if !bool::from(presented.as_bytes().ct_eq(st.session_secret.as_bytes())) {
        return Err(RegistryError::PermissionDenied(format!(
            "the session_secret does not match node {}'s session",
            slot.id
        )));
    }
    Ok(())
}

/// 128 random bits from the OS, as 32 hex digits.
fn new_secret() -> String {
    let mut bytes = [0u8; 16];
    // The OS random source failing is not recoverable for a server that
    // hands out credentials.
    getrandom::fill(&mut bytes).expect("the OS random number generator failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn matches(st: &NodeState, filter: &NodeFilter) -> bool {
    if filter.status.is_some_and(|s| s != st.liveness) {
        return false;
    }
    if let Some(pool_id) = &filter.pool_id {
        let registered = st.registration.pools.iter().any(|p| &p.pool_id == pool_id);
        let reported = st.pool_status.iter().any(|p| &p.pool_id == pool_id);
        if !registered && !reported {
            return false;
        }
    }
    filter
        .labels
        .iter()
        .all(|(k, v)| st.registration.labels.get(k) == Some(v))
}

fn to_proto(st: &NodeState) -> pb::Node {
    let reg = &st.registration;
    pb::Node {
        node_id: reg.node_id.clone(),
        machine_id: reg.machine_id.clone(),
        address: reg.address.clone(),
        pools: reg.pools.clone(),
        capabilities: Some(reg.capabilities.clone()),
        agent_version: reg.agent_version.clone(),
        labels: reg.labels.clone(),
        status: st.liveness.to_proto() as i32,
        registered_at: Some(to_proto_timestamp(st.registered_at)),
        last_heartbeat_at: Some(to_proto_timestamp(st.last_heartbeat_at)),
        pool_status: st.pool_status.clone(),
        gpu_stats: st.gpu_stats.clone(),
        session_id: st.session_id,
        status_changed_at: Some(to_proto_timestamp(st.status_changed_at)),
        agent_time: st.agent_time.map(to_proto_timestamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    const TIMEOUT: Duration = Duration::from_secs(30);
    const RETENTION: Duration = Duration::from_secs(3600);
    const MS: Duration = Duration::from_millis(1);

    /// A registry with its expiry task running on the paused clock.
    fn start() -> (Registry, CancellationToken) {
        let registry = Registry::new(Timing {
            node_timeout: TIMEOUT,
            heartbeat_interval: Duration::from_secs(10),
            offline_retention: RETENTION,
        });
        let stop = CancellationToken::new();
        tokio::spawn(crate::expiry::run(registry.clone(), stop.clone()));
        (registry, stop)
    }

    /// Moves the paused clock and lets the expiry task run.
    async fn advance(by: Duration) {
        tokio::time::advance(by).await;
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    fn registration(node_id: &str) -> Registration {
        Registration {
            node_id: node_id.into(),
            machine_id: format!("machine-{node_id}"),
            address: format!("http://{node_id}:9200"),
            pools: vec![pb::PoolSpec {
                pool_id: "pool-0".into(),
                ..Default::default()
            }],
            capabilities: pb::Capabilities::default(),
            agent_version: "test".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
        }
    }

    fn beat(pool_state: pb::PoolState) -> Beat {
        Beat {
            sent_at: Utc::now(),
            received_at: Utc::now(),
            pools: vec![pb::PoolStatus {
                pool_id: "pool-0".into(),
                state: pool_state as i32,
                slots_total: 4,
                slots_free: 4,
                ..Default::default()
            }],
            gpus: vec![],
        }
    }

    fn status(registry: &Registry, id: &str) -> pb::NodeStatus {
        registry.get(id).unwrap().status()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_goes_offline_exactly_at_its_deadline() {
        let (registry, _stop) = start();
        let reg = registry.register(registration("n1")).unwrap();
        let slot = registry
            .attach("n1", reg.session_id, &reg.session_secret)
            .unwrap();
        advance(Duration::from_secs(10)).await;
        registry
            .heartbeat(&slot, reg.session_id, beat(pb::PoolState::Ready))
            .unwrap();

        // The deadline is now last heartbeat + 30 s, not registration + 30 s.
        advance(TIMEOUT - MS).await;
        assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
        advance(2 * MS).await;
        assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);
        assert_eq!(
            registry.counts(),
            Counts {
                online: 0,
                offline: 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_never_streams_goes_offline_at_its_deadline() {
        let (registry, _stop) = start();
        registry.register(registration("quiet")).unwrap();
        advance(TIMEOUT - MS).await;
        assert_eq!(status(&registry, "quiet"), pb::NodeStatus::Online);
        advance(2 * MS).await;
        assert_eq!(status(&registry, "quiet"), pb::NodeStatus::Offline);
    }

    #[tokio::test(start_paused = true)]
    async fn steady_heartbeats_keep_a_node_online() {
        let (registry, _stop) = start();
        let reg = registry.register(registration("n1")).unwrap();
        let slot = registry
            .attach("n1", reg.session_id, &reg.session_secret)
            .unwrap();
        for _ in 0..20 {
            advance(Duration::from_secs(10)).await;
            registry
                .heartbeat(&slot, reg.session_id, beat(pb::PoolState::Ready))
                .unwrap();
            assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_offline_node_is_online_again_on_its_next_heartbeat() {
        let (registry, _stop) = start();
        let reg = registry.register(registration("n1")).unwrap();
        let slot = registry
            .attach("n1", reg.session_id, &reg.session_secret)
            .unwrap();
        advance(TIMEOUT + MS).await;
        assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);

        registry
            .heartbeat(&slot, reg.session_id, beat(pb::PoolState::Draining))
            .unwrap();
        let node = registry.get("n1").unwrap();
        assert_eq!(node.status(), pb::NodeStatus::Online);
        assert_eq!(node.pool_status[0].state(), pb::PoolState::Draining);
        assert_eq!(
            registry.counts(),
            Counts {
                online: 1,
                offline: 0
            }
        );

        // And its new deadline is enforced again.
        advance(TIMEOUT + MS).await;
        assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);
    }

    #[tokio::test(start_paused = true)]
    async fn re_registering_keeps_registered_at_and_refuses_the_old_session() {
        let (registry, _stop) = start();
        let first = registry.register(registration("n1")).unwrap();
        assert!(first.created);
        let old_slot = registry
            .attach("n1", first.session_id, &first.session_secret)
            .unwrap();
        advance(Duration::from_secs(5)).await;

        let mut changed = registration("n1");
        changed.address = "http://elsewhere:9200".into();
        let second = registry.register(changed).unwrap();
        assert!(!second.created);
        assert_ne!(second.session_id, first.session_id);
        assert_eq!(second.registered_at, first.registered_at);
        assert_eq!(registry.get("n1").unwrap().address, "http://elsewhere:9200");

        let err = registry
            .heartbeat(&old_slot, first.session_id, beat(pb::PoolState::Ready))
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::SessionSuperseded { presented, .. } if presented == first.session_id)
        );
        assert!(matches!(
            registry.attach("n1", first.session_id, &first.session_secret),
            Err(RegistryError::SessionSuperseded { .. })
        ));
        // The new session's id with the old secret, or none: refused too.
        assert!(matches!(
            registry.attach("n1", second.session_id, &first.session_secret),
            Err(RegistryError::PermissionDenied(_))
        ));
        assert!(matches!(
            registry.attach("n1", second.session_id, ""),
            Err(RegistryError::PermissionDenied(m)) if m.contains("requires its session_secret")
        ));
        registry
            .attach("n1", second.session_id, &second.session_secret)
            .unwrap();
        assert_ne!(first.session_secret, second.session_secret);
        assert_eq!(second.session_secret.len(), 32);
        assert_eq!(
            registry.counts(),
            Counts {
                online: 1,
                offline: 0
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn re_registering_an_offline_node_brings_it_online() {
        let (registry, _stop) = start();
        registry.register(registration("n1")).unwrap();
        advance(TIMEOUT + MS).await;
        assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);
        registry.register(registration("n1")).unwrap();
        assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
        advance(TIMEOUT - MS).await;
        assert_eq!(status(&registry, "n1"), pb::NodeStatus::Online);
    }

    #[tokio::test(start_paused = true)]
    async fn offline_nodes_are_removed_after_retention() {
        let (registry, _stop) = start();
        registry.register(registration("n1")).unwrap();
        advance(TIMEOUT + MS).await;
        advance(RETENTION - 2 * MS).await;
        assert_eq!(status(&registry, "n1"), pb::NodeStatus::Offline);
        advance(2 * MS).await;
        assert!(matches!(
            registry.get("n1"),
            Err(RegistryError::NodeNotFound { .. })
        ));
        assert_eq!(registry.counts(), Counts::default());
        // The id is free for a fresh registration.
        assert!(registry.register(registration("n1")).unwrap().created);
    }

    #[tokio::test(start_paused = true)]
    async fn deregister_removes_at_once_and_ends_the_session() {
        let (registry, _stop) = start();
        let reg = registry.register(registration("n1")).unwrap();
        let slot = registry
            .attach("n1", reg.session_id, &reg.session_secret)
            .unwrap();
        registry.register(registration("n2")).unwrap();

        assert!(matches!(
            registry.deregister("n1", reg.session_id + 1, None),
            Err(RegistryError::SessionSuperseded { .. })
        ));
        registry
            .deregister("n1", reg.session_id, Some(&reg.session_secret))
            .unwrap();
        assert!(registry.get("n1").is_err());
        assert!(matches!(
            registry.heartbeat(&slot, reg.session_id, beat(pb::PoolState::Ready)),
            Err(RegistryError::NodeNotFound { .. })
        ));
        assert!(matches!(
            registry.deregister("n1", 0, None),
            Err(RegistryError::NodeNotFound { .. })
        ));
        assert_eq!(status(&registry, "n2"), pb::NodeStatus::Online);
        assert_eq!(
            registry.counts(),
            Counts {
                online: 1,
                offline: 0
            }
        );
        // No stale wake-up of the removed node disturbs anything later.
        advance(TIMEOUT + MS).await;
        assert_eq!(
            registry.counts(),
            Counts {
                online: 0,
                offline: 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn many_nodes_each_keep_their_own_deadline() {
        let (registry, _stop) = start();
        for i in 0..50 {
            registry
                .register(registration(&format!("n{i:02}")))
                .unwrap();
            advance(Duration::from_millis(100)).await;
        }
        // n00 registered at t=0 and n49 at t=4.9 s; at t=30.05 s the first
        // nodes (deadlines 30.0 s) are offline and n01 (30.1 s) is not.
        advance(TIMEOUT - Duration::from_millis(4950)).await;
        assert_eq!(status(&registry, "n00"), pb::NodeStatus::Offline);
        assert_eq!(status(&registry, "n01"), pb::NodeStatus::Online);
        advance(Duration::from_secs(5)).await;
        assert_eq!(
            registry.counts(),
            Counts {
                online: 0,
                offline: 50
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn list_filters_and_pages_in_node_id_order() {
        let (registry, _stop) = start();
        for id in ["c", "a", "b", "d"] {
            let mut reg = registration(id);
            if id == "b" {
                reg.labels.insert("zone".into(), "b".into());
                reg.pools[0].pool_id = "pool-b".into();
            }
            registry.register(reg).unwrap();
        }
        advance(TIMEOUT + MS).await;
        let reg = registry.register(registration("d")).unwrap();
        registry.register(registration("e")).unwrap();
        let slot = registry
            .attach("d", reg.session_id, &reg.session_secret)
            .unwrap();
        registry
            .heartbeat(&slot, reg.session_id, beat(pb::PoolState::Ready))
            .unwrap();

        let ids = |filter: &NodeFilter| -> Vec<String> {
            let (nodes, next) = registry.list(filter, 0, "");
            assert!(next.is_none());
            nodes.into_iter().map(|n| n.node_id).collect()
        };
        assert_eq!(ids(&NodeFilter::default()), ["a", "b", "c", "d", "e"]);
        let online = NodeFilter {
            status: Some(Liveness::Online),
            ..Default::default()
        };
        assert_eq!(ids(&online), ["d", "e"]);
        let offline = NodeFilter {
            status: Some(Liveness::Offline),
            ..Default::default()
        };
        assert_eq!(ids(&offline), ["a", "b", "c"]);
        let pool_b = NodeFilter {
            pool_id: Some("pool-b".into()),
            ..Default::default()
        };
        assert_eq!(ids(&pool_b), ["b"]);
        let zone_a_online = NodeFilter {
            status: Some(Liveness::Online),
            labels: vec![("zone".into(), "a".into())],
            ..Default::default()
        };
        assert_eq!(ids(&zone_a_online), ["d", "e"]);
        let no_such_label = NodeFilter {
            labels: vec![("rack".into(), "1".into())],
            ..Default::default()
        };
        assert!(ids(&no_such_label).is_empty());

        let (page1, token) = registry.list(&NodeFilter::default(), 2, "");
        assert_eq!(
            page1.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(token.as_deref(), Some("b"));
        let (page2, token) = registry.list(&NodeFilter::default(), 2, "b");
        assert_eq!(
            page2.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
            ["c", "d"]
        );
        let (page3, token) = registry.list(&NodeFilter::default(), 2, token.as_deref().unwrap());
        assert_eq!(
            page3.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
            ["e"]
        );
        assert!(token.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_node_is_not_taken_over_from_another_machine() {
        let (registry, _stop) = start();
        let first = registry.register(registration("n1")).unwrap();
        let mut intruder = registration("n1");
        intruder.machine_id = "other-machine".into();
        assert!(matches!(
            registry.register(intruder.clone()),
            Err(RegistryError::NodeTaken { node_id }) if node_id == "n1"
        ));
        let node = registry.get("n1").unwrap();
        assert_eq!(node.session_id, first.session_id, "nothing changed");
        assert_eq!(node.machine_id, "machine-n1");

        // The same machine may re-register; another may once n1 is OFFLINE.
        registry.register(registration("n1")).unwrap();
        advance(TIMEOUT + MS).await;
        let moved = registry.register(intruder).unwrap();
        assert!(!moved.created);
        assert_eq!(registry.get("n1").unwrap().machine_id, "other-machine");
    }

    #[tokio::test(start_paused = true)]
    async fn no_node_beyond_the_cap_is_added() {
        let registry = Registry::with_max_nodes(Timing::default(), 2);
        registry.register(registration("a")).unwrap();
        registry.register(registration("b")).unwrap();
        assert!(matches!(
            registry.register(registration("c")),
            Err(RegistryError::LimitReached(m)) if m.contains("2 nodes")
        ));
        // Known nodes still re-register at the cap.
        registry.register(registration("a")).unwrap();
        registry.deregister("b", 0, None).unwrap();
        registry.register(registration("c")).unwrap();
    }

    #[test]
    fn session_ids_are_unique_and_never_zero() {
        let ids = SessionIds {
            base: u64::MAX - 2,
            next: AtomicU64::new(1),
        };
        let got: Vec<u64> = (0..5).map(|_| ids.next()).collect();
        assert!(!got.contains(&0));
        let unique: std::collections::HashSet<_> = got.iter().collect();
        assert_eq!(unique.len(), got.len());
    }
}
