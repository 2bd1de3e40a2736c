//! One node: its slot in the map, its lock-protected state, the proto view
//! of that state and ListNodes filter matching.

use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use registry_proto::convert::to_proto_timestamp;
use registry_proto::pb;
use tokio::time::Instant;

use super::Registration;
use super::stats::PoolTally;
use crate::figures::GpuFigures;
use crate::pool_reports::{PoolReports, Readings};
use crate::schedule::Key;
use crate::signal::Signal;
use crate::view::{Live, NodeView, Registered};

/// How far a pool's free VRAM may move from the published figure before a
/// heartbeat counts as a change (512 MiB): smaller moves are noise of the
/// engine's allocator and would flood watchers.
pub const VRAM_STEP: u64 = 512 * 1024 * 1024;

/// Liveness of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heard from within the node timeout.
    Online,
    /// Silent for longer than the node timeout.
    Offline,
}

impl Liveness {
    pub(crate) fn to_proto(self) -> pb::NodeStatus {
        match self {
            Liveness::Online => pb::NodeStatus::Online,
            Liveness::Offline => pb::NodeStatus::Offline,
        }
    }
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
    /// Only nodes with a registered pool or a reported pool status serving
    /// this model (WatchNodes' `model`).
    pub model: Option<String>,
}

impl NodeFilter {
    /// Whether the node's read view passes every filter that is set. Views
    /// are what readers see, so ListNodes, GetNode and WatchNodes agree.
    pub fn matches(&self, view: &NodeView) -> bool {
        let node = view.registration();
        if self.status.is_some_and(|s| s.to_proto() != view.status()) {
            return false;
        }
        if let Some(pool_id) = &self.pool_id {
            let registered = node.pools.iter().any(|p| p.pool_id() == pool_id);
            let reported = view.pool_status().any(|p| p.pool_id == pool_id.as_str());
            if !registered && !reported {
                return false;
            }
        }
        if let Some(model) = &self.model {
            let registered = node.pools.iter().any(|p| p.model() == model);
            let reported = view.pool_status().any(|p| p.model == model.as_str());
            if !registered && !reported {
                return false;
            }
        }
        self.labels
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v.as_str()))
    }
}

/// One node: its id and its lock-protected state.
pub struct NodeSlot {
    /// The node's id, shared with the map key and the log fields.
    pub(super) id: std::sync::Arc<str>,
    /// Everything that changes, under the node's own lock.
    pub(super) state: Mutex<NodeState>,
    /// Raised when a new command is owed to the agent, so the node's open
    /// heartbeat streams wake and push it at once instead of at the next
    /// heartbeat; also when a newer stream or a newer session takes over,
    /// so a superseded stream ends at once instead of at its next message.
    /// One signal per node, not two, keeps the slot small.
    pub(super) signal: Signal,
}

impl NodeSlot {
    /// A slot for the node `state` describes, with no command owed yet.
    pub(super) fn new(state: NodeState) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            id: std::sync::Arc::from(state.registration.node_id()),
            state: Mutex::new(state),
            signal: Signal::default(),
        })
    }

    /// The node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Raised when a new command is owed to the node's agent, or when a
    /// stream may have been superseded (a newer stream of the session, a
    /// newer session); a heartbeat stream listens from its first message
    /// on.
    pub fn signal(&self) -> &Signal {
        &self.signal
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, NodeState> {
        // A panic while holding a node lock cannot leave the state torn in a
        // way that matters more than losing the node, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A node's shared view and its liveness fields, read under its lock and
/// turned into the reader's copy after it.
pub(super) struct Reading {
    /// The published view.
    view: Arc<NodeView>,
    /// Wall-clock time of the latest sign of life.
    last_heartbeat_at: DateTime<Utc>,
    /// The agent's clock in its latest heartbeat.
    agent_time: Option<DateTime<Utc>>,
    /// GPU figures newer than the view's, when any were reported.
    gpu_stats: Option<GpuFigures>,
}

impl Reading {
    /// The reader's copy: the view with the liveness fields patched in.
    pub(super) fn into_node(self) -> pb::Node {
        let gpus = self.gpu_stats.as_ref().unwrap_or_else(|| self.view.gpus());
        let mut node = self.view.to_proto_with(gpus);
        node.last_heartbeat_at = Some(to_proto_timestamp(self.last_heartbeat_at));
        node.agent_time = self.agent_time.map(to_proto_timestamp);
        node
    }
}

/// Everything about a node that changes, guarded by [`NodeSlot::state`].
pub(super) struct NodeState {
    /// The latest accepted registration, shared with the node's views
    /// (set it with [`NodeState::set_registration`]).
    pub(super) registration: Arc<Registered>,
    /// The current session; streams naming another one are refused.
    pub(super) session_id: u64,
    /// SHA-256 of the current session's secret, known only to the
    /// registering agent, so no one else can speak for the node. Only the
    /// hash is kept (and stored), so a restarted registry can check a
    /// secret it never saw and the store file reveals none.
    pub(super) secret_sha256: [u8; 32],
    /// ONLINE or OFFLINE.
    pub(super) liveness: Liveness,
    /// Monotonic time of the latest sign of life (register or heartbeat),
    /// or of a grace the registry gave after doubting itself (see
    /// `Registry::grace_all`); the deadline is `last_seen + node_timeout`.
    pub(super) last_seen: Instant,
    /// Wall-clock time of first registration (kept across re-registration).
    pub(super) registered_at: DateTime<Utc>,
    /// Wall-clock time of the latest sign of life, for operators.
    pub(super) last_heartbeat_at: DateTime<Utc>,
    /// Wall-clock time of the latest liveness change.
    pub(super) status_changed_at: DateTime<Utc>,
    /// The agent's clock in its latest heartbeat.
    pub(super) agent_time: Option<DateTime<Utc>>,
    /// Pool status from the latest heartbeat, held here only while it is
    /// newer than the published view's (`None`: the view's is the latest,
    /// read it with [`NodeState::pool_status`]). A publish moves it into
    /// the new view instead of copying it, so a node whose beats are
    /// published holds its figures once.
    pub(super) newer_pool_status: Option<Vec<pb::PoolStatus>>,
    /// GPU figures from the latest heartbeat that carried any, held the
    /// same way (see [`NodeState::gpu_stats`]), encoded: a node whose raw
    /// figures move on every beat holds them apart from its view nearly
    /// always.
    pub(super) newer_gpu_stats: Option<GpuFigures>,
    /// The node's one entry in the schedule, so re-scheduling or removal
    /// deletes it instead of leaving a stale one behind.
    pub(super) wakeup: Option<Key>,
    /// Set once the node is removed, so streams holding the slot stop.
    pub(super) removed: bool,
    /// The read view published at the node's latest visible change (its
    /// `revision` says which), shared by GetNode, ListNodes and the watch
    /// events; rebuilt only when a reader can see a change.
    pub(super) view: Arc<NodeView>,
    /// What operators asked of the node (cordon, drain); kept across
    /// re-registrations. Shared with the node's views (a change replaces
    /// it), and every node nobody cordoned or drained shares one default
    /// ([`super::admin::default_admin`]), so it costs a pointer per node
    /// and per view instead of ~160 bytes in each.
    pub(super) admin: Arc<pb::AdminState>,
    /// What a node holds only while something unusual goes on (OFFLINE,
    /// suspect, draining with a deadline, a resume owed, reserved after a
    /// restart), boxed: `None`, 8 bytes, for a node in its usual state,
    /// where the fields inline took 68 and put the node's slot in the
    /// allocator's 384-byte class, not 320. Read with
    /// [`NodeState::unusual`], changed with [`NodeState::change_unusual`].
    unusual: Option<Box<Unusual>>,
    /// Number of the latest command owed to the agent; a stream sends each
    /// number once, and new streams (starting at 0) send the owed one
    /// again. Starts at 1.
    pub(super) command_gen: u64,
    /// Number of the session's live heartbeat stream (0: none yet). Each
    /// stream that binds to the node takes the next number, and a stream
    /// whose number is no longer this one has been replaced by a newer
    /// stream and is ended, so two streams never speak for one session.
    pub(super) stream_gen: u64,
    /// Whether the current session has reported pool status, so an empty
    /// status right after registration does not read as "every pool
    /// stopped".
    pub(super) reported: bool,
    /// Whether the mass-failure guard holds the node ONLINE past its
    /// deadline (it then is `suspect` too), so the guard's count and its
    /// end know which nodes it holds.
    pub(super) held: bool,
}

/// What a node holds only while something unusual goes on, boxed apart
/// from [`NodeState`] (see `NodeState::unusual`).
#[derive(Debug)]
pub(super) struct Unusual {
    /// Monotonic time the node went OFFLINE, for retention.
    pub(super) offline_since: Option<Instant>,
    /// Why the registry holds the node ONLINE past its deadline (it
    /// suspects itself, not the node); `None` when it does not.
    pub(super) suspect: Option<Box<str>>,
    /// The drain's deadline on the monotonic clock (the schedule's), so
    /// the node is woken to mark it drained; `None` without a deadline.
    pub(super) drain_deadline_at: Option<Instant>,
    /// A ResumeCommand owed to the agent after CancelDrain, until its
    /// pools are reported no longer DRAINING.
    pub(super) resume: Option<Box<pb::ResumeCommand>>,
    /// Set on nodes loaded from the store at start, until their agent is
    /// heard from: the end of the restart grace, during which the node id
    /// is reserved for its machine (wall time, for the refusal message).
    pub(super) restart_grace_until: Option<DateTime<Utc>>,
}

/// Read for a node in its usual state.
static USUAL: Unusual = Unusual::USUAL;

impl Unusual {
    /// A node's usual state: nothing unusual held.
    const USUAL: Unusual = Unusual {
        offline_since: None,
        suspect: None,
        drain_deadline_at: None,
        resume: None,
        restart_grace_until: None,
    };

    /// Whether nothing unusual is held.
    fn is_usual(&self) -> bool {
        let Unusual {
            offline_since,
            suspect,
            drain_deadline_at,
            resume,
            restart_grace_until,
        } = self;
        offline_since.is_none()
            && suspect.is_none()
            && drain_deadline_at.is_none()
            && resume.is_none()
            && restart_grace_until.is_none()
    }
}

impl NodeState {
    /// A freshly registered, ONLINE node seen at `now` / `wall`.
    pub(super) fn new(
        registration: Registration,
        session_id: u64,
        secret_sha256: [u8; 32],
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Self {
        let registration = Registered::new(registration);
        Self {
            view: Arc::new(NodeView::new(
                registration.clone(),
                Live::default(),
                PoolReports::default(),
                GpuFigures::default(),
                None,
            )),
            registration,
            session_id,
            secret_sha256,
            liveness: Liveness::Online,
            last_seen: now,
            registered_at: wall,
            last_heartbeat_at: wall,
            status_changed_at: wall,
            agent_time: None,
            newer_pool_status: None,
            newer_gpu_stats: None,
            wakeup: None,
            removed: false,
            admin: super::admin::default_admin(),
            unusual: None,
            command_gen: 1,
            stream_gen: 0,
            reported: false,
            held: false,
        }
    }

    /// What the node holds only while something unusual goes on; all
    /// `None` for a node in its usual state.
    pub(super) fn unusual(&self) -> &Unusual {
        self.unusual.as_deref().unwrap_or(&USUAL)
    }

    /// Ends the node's restart reservation, if it has one. Every beat and
    /// Register calls it, so a usual node (no box) returns at once.
    pub(super) fn end_restart_grace(&mut self) {
        if self.unusual().restart_grace_until.is_some() {
            self.change_unusual(|u| u.restart_grace_until = None);
        }
    }

    /// Changes what the node holds while something unusual goes on with
    /// `change`: the box is made when a field is set on a node in its
    /// usual state and dropped once every field is `None` again, and a
    /// change that leaves a usual node usual (clearing a field that is not
    /// set) allocates nothing.
    pub(super) fn change_unusual<R>(&mut self, change: impl FnOnce(&mut Unusual) -> R) -> R {
        match &mut self.unusual {
            Some(unusual) => {
                let changed = change(unusual);
                if unusual.is_usual() {
                    self.unusual = None;
                }
                changed
            }
            None => {
                let mut unusual = Unusual::USUAL;
                let changed = change(&mut unusual);
                if !unusual.is_usual() {
                    self.unusual = Some(Box::new(unusual));
                }
                changed
            }
        }
    }

    /// A node as its stored `record` describes it, listed ONLINE at `now`
    /// / `wall`, its liveness unchanged since its first registration.
    pub(super) fn from_record(
        record: crate::store::NodeRecord,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Self {
        let mut state = Self::new(
            record.registration,
            record.session_id,
            record.secret_sha256,
            now,
            wall,
        );
        state.registered_at = record.registered_at;
        state.status_changed_at = record.registered_at;
        state
    }

    /// Takes `registration` as the node's; views published from now on
    /// show it. The same registration again (an agent reconnecting) keeps
    /// the shared one, so its views and history entries go on sharing it.
    pub(super) fn set_registration(&mut self, registration: Registration) {
        if **self.registration != registration {
            self.registration = Registered::new(registration);
        }
    }

    /// The node's durable record, as the store keeps it.
    pub(super) fn record(&self) -> crate::store::NodeRecord {
        crate::store::NodeRecord {
            registration: Registration::clone(&self.registration),
            session_id: self.session_id,
            secret_sha256: self.secret_sha256,
            registered_at: self.registered_at,
        }
    }

    /// How this node counts in the pools-by-state and GPUs-by-health
    /// gauges: by state and health, and only while the node is ONLINE and
    /// listed. O(pools + GPUs), no allocation.
    pub(super) fn pool_tally(&self) -> PoolTally {
        let mut tally = PoolTally::default();
        if self.liveness != Liveness::Online || self.removed {
            return tally;
        }
        for pool in self.pool_status() {
            if let Some(n) = usize::try_from(pool.state)
                .ok()
                .and_then(|i| tally.pools.get_mut(i))
            {
                *n += 1;
            }
        }
        for gpu in self.gpu_stats().health() {
            if let Some(n) = usize::try_from(gpu.health)
                .ok()
                .and_then(|i| tally.gpus.get_mut(i))
            {
                *n += 1;
            }
        }
        tally
    }

    /// What a reader sees now: the published view with the liveness-only
    /// fields (last_heartbeat_at, agent_time, GPU figures), which move on
    /// every beat without a new revision, patched in.
    pub(super) fn read(&self) -> pb::Node {
        self.reading().into_node()
    }

    /// What [`NodeState::read`] needs, taken cheaply under the node's lock
    /// (an `Arc` and the liveness fields), so the deep copy of the view can
    /// happen after the lock is released.
    pub(super) fn reading(&self) -> Reading {
        Reading {
            view: self.view.clone(),
            last_heartbeat_at: self.last_heartbeat_at,
            agent_time: self.agent_time,
            // Only figures newer than the view's need patching in.
            gpu_stats: self
                .newer_gpu_stats
                .as_ref()
                .filter(|g| !g.is_empty())
                .cloned(),
        }
    }

    /// Whether a heartbeat's pool status differs from the published one in
    /// a way a reader must be told about: the set of pools, a pool's state,
    /// slots, model or engine, or free VRAM moving by more than
    /// [`VRAM_STEP`] from the published figure.
    pub(super) fn pools_changed(&self, pools: &[pb::PoolStatus]) -> bool {
        let published = self.view.pool_status();
        if published.len() != pools.len() {
            return true;
        }
        // Agents send pools in a stable order; a reordering counts as a
        // change (rare, and cheaper than matching ids).
        published.zip(pools).any(|(old, new)| {
            old.pool_id != new.pool_id
                || old.state != new.state
                || old.slots_total != new.slots_total
                || old.slots_free != new.slots_free
                || old.model != new.model
                || old.engine != new.engine
                || old.endpoint != new.endpoint
                || old.vram_free_bytes.abs_diff(new.vram_free_bytes) > VRAM_STEP
        })
    }

    /// Whether a heartbeat's GPU figures change a GPU's health or health
    /// reasons from the published ones, the part of the figures a reader
    /// must be told about (placement skips UNHEALTHY GPUs). The raw
    /// figures (memory, temperature, power, ECC counts...) move on every
    /// beat and are patched in as liveness-only fields instead. Empty
    /// `gpus` (a beat without figures) changes nothing.
    pub(super) fn gpu_health_changed(&self, gpus: &[pb::GpuStats]) -> bool {
        !gpus.is_empty() && !self.view.gpus().health_matches(gpus)
    }

    /// Pool status from the latest heartbeat (empty before any in this
    /// session).
    pub(super) fn pool_status(&self) -> Readings<'_> {
        match &self.newer_pool_status {
            Some(pools) => Readings::reported(pools),
            None => self.view.pool_status(),
        }
    }

    /// GPU figures from the latest heartbeat that carried any.
    pub(super) fn gpu_stats(&self) -> &GpuFigures {
        self.newer_gpu_stats
            .as_ref()
            .unwrap_or_else(|| self.view.gpus())
    }

    /// Takes a heartbeat's figures as the latest; a beat without GPU
    /// figures keeps the ones before.
    pub(super) fn report(&mut self, pools: Vec<pb::PoolStatus>, gpus: Option<GpuFigures>) {
        self.newer_pool_status = Some(pools);
        if gpus.is_some() {
            self.newer_gpu_stats = gpus;
        }
    }

    /// Forgets the reported figures (a new session starts unreported).
    pub(super) fn clear_reports(&mut self) {
        self.newer_pool_status = Some(Vec::new());
        self.newer_gpu_stats = Some(GpuFigures::default());
    }

    /// The node's view as it is now: its shared registration and the
    /// fields of this change, built afresh (no copy of the registration);
    /// figures newer than the published view's move into it (the pool
    /// status kept compact, its names read from the pool specs), the others
    /// are shared with it. Only the publish path calls it (which also
    /// stamps the revision and keeps the view on the node, so the figures
    /// are read from there until the next beat).
    pub(super) fn new_view(&mut self) -> NodeView {
        let specs = &self.registration.pools;
        let pools = match self.newer_pool_status.take() {
            Some(reported) => PoolReports::new(&reported, specs),
            None if Arc::ptr_eq(self.view.registered(), &self.registration) => {
                self.view.pool_reports().clone()
            }
            // Reports are cleared when the registration changes; were they
            // not, the published ones are matched to the new pool specs.
            None => self
                .view
                .pool_reports()
                .rebased(&self.view.registration().pools, specs),
        };
        let gpu_stats = self
            .newer_gpu_stats
            .take()
            .unwrap_or_else(|| self.view.gpus().clone());
        let live = Live {
            status: self.liveness.to_proto() as i32,
            registered_at: Some(to_proto_timestamp(self.registered_at)),
            last_heartbeat_at: Some(to_proto_timestamp(self.last_heartbeat_at)),
            session_id: self.session_id,
            status_changed_at: Some(to_proto_timestamp(self.status_changed_at)),
            agent_time: self.agent_time.map(to_proto_timestamp),
            revision: 0,
            suspect: self.unusual().suspect.is_some(),
            suspect_reason: self
                .unusual()
                .suspect
                .as_deref()
                .unwrap_or_default()
                .to_owned(),
        };
        NodeView::new(
            self.registration.clone(),
            live,
            pools,
            gpu_stats,
            Some(self.admin.clone()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NodeState {
        let registration = crate::registry::tests::new_registration("n1").into();
        NodeState::new(registration, 1, [0; 32], Instant::now(), Utc::now())
    }

    /// Every node holds one slot (its `Arc` adds two counts of 8 bytes):
    /// within the allocator's 320-byte class, where the unusual fields
    /// inline and GPU figures as `Bytes` put it in the 384-byte one.
    #[test]
    fn a_nodes_slot_fits_the_320_byte_class() {
        let arc_counts = 2 * std::mem::size_of::<usize>();
        let slot = std::mem::size_of::<NodeSlot>() + arc_counts;
        assert!(slot <= 320, "a node's slot takes {slot} bytes");
    }

    #[test]
    fn only_an_unusual_node_holds_the_unusual_fields_box() {
        let mut st = state();
        assert!(st.unusual.is_none() && st.unusual().suspect.is_none());
        // Clearing what is not set allocates nothing.
        st.change_unusual(|u| u.restart_grace_until = None);
        st.end_restart_grace();
        assert!(st.unusual.is_none());
        let at = Instant::now();
        st.change_unusual(|u| u.offline_since = Some(at));
        st.change_unusual(|u| u.suspect = Some("store unreachable".into()));
        assert_eq!(st.unusual().offline_since, Some(at));
        assert_eq!(st.unusual().suspect.as_deref(), Some("store unreachable"));
        // Still boxed while any field is set, dropped once none is.
        st.change_unusual(|u| u.offline_since = None);
        assert!(st.unusual.is_some());
        let taken = st.change_unusual(|u| u.suspect.take());
        assert_eq!(taken.as_deref(), Some("store unreachable"));
        assert!(st.unusual.is_none() && st.unusual().offline_since.is_none());
        // A restart reservation ends with the box when it was all it held.
        st.change_unusual(|u| u.restart_grace_until = Some(Utc::now()));
        assert!(st.unusual.is_some());
        st.end_restart_grace();
        assert!(st.unusual.is_none());
        // ... and leaves the box, and what else it holds, otherwise.
        st.change_unusual(|u| {
            u.restart_grace_until = Some(Utc::now());
            u.suspect = Some("restored".into());
        });
        st.end_restart_grace();
        assert!(st.unusual().restart_grace_until.is_none());
        assert_eq!(st.unusual().suspect.as_deref(), Some("restored"));
    }
}
