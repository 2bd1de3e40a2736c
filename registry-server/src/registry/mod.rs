//! The registry's state: which nodes exist, their registration, liveness and
//! latest pool status. The public operations live here; each concern has
//! its own file: `node` (a node's state, proto view, filters), `admin`
//! (cordon and drain, commands owed to agents, admin state kept for
//! unlisted nodes), `sessions`
//! (ids, secrets, checks), `stats` (totals and gauges), `deadlines` (the
//! expiry rules run by [`crate::expiry`]), `guard` (the mass-failure guard
//! and the stall grace: when the registry doubts its own view) and `input`
//! (what callers pass in, clocks included), and `consistency` (a
//! self-check of the bookkeeping, for property tests and fuzzing).
//!
//! Concurrency design (why it looks like this):
//! - Nodes live in a `BTreeMap` behind a `RwLock`, ordered by node_id so
//!   listing is deterministic and pages cheaply. Each node's mutable state has
//!   its own `Mutex` inside an `Arc<NodeSlot>`.
//! - A heartbeat stream looks its slot up once and keeps the `Arc`: every
//!   later message locks only that node's mutex. A heartbeat is O(1) and never
//!   waits on other nodes, and ListNodes (which holds the map's read lock)
//!   never stalls heartbeats.
//! - Re-registering a known node takes the map's read lock and the node's
//!   lock; only a new node (or removal) takes the write lock.
//! - Deadlines are exact and per node, without a periodic scan; see
//!   `deadlines` and [`crate::schedule`].
//! - Lock order is always map → node → schedule (the guard's window, the
//!   feed and the parked admin states sit where the schedule does); no
//!   lock is held across
//!   `.await`, and nothing is logged while the map or a node is locked.
//! - The registry never reads a clock: callers pass [`Now`] (or an
//!   `Instant`) in.
//!
//! The change feed (why it looks like this):
//! - Every change a reader can see goes through [`Registry::publish`],
//!   under the node's lock: it builds the node's read view once
//!   (`Arc<pb::Node>`), and [`Feed::publish`] bumps the registry-wide
//!   revision, keeps the view for snapshots, appends the [`crate::events::Event`] to the
//!   history ring and hands it to the watchers and subscribers, in
//!   revision order. Lock order: map → node → feed; the feed and the
//!   schedule are each taken under the node, never one inside the other.
//! - Visible changes: register (ADDED), every re-registration (MODIFIED:
//!   even an identical one starts a new session, and session_id is visible),
//!   deregister and removal after retention (DELETED, with the final
//!   state), ONLINE↔OFFLINE (MODIFIED), `suspect` set or cleared
//!   (MODIFIED: a node held by the guard or given a grace, and its next
//!   heartbeat), and a heartbeat whose pool status
//!   differs materially from the published one (see
//!   `NodeState::pools_changed`) or whose GPU figures change a GPU's
//!   health or health reasons (`NodeState::gpu_health_changed`; the raw
//!   figures are liveness-only). A heartbeat that only renews liveness
//!   publishes nothing: no map write lock, no view built, no feed lock.
//! - GetNode and ListNodes clone the stored view and patch the
//!   liveness-only fields (last_heartbeat_at, agent_time, GPU figures);
//!   watch events carry the view itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use registry_proto::pb;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::error::RegistryError;
use crate::events::{ChangeSubscriber, EventKind, Feed};
use crate::figures::EncodedGpus;
use crate::schedule::Schedule;
use crate::store::{Commit, Loaded, MemoryStore, Store, secret_sha256};

mod admin;
mod consistency;
mod deadlines;
mod guard;
mod input;
pub(crate) mod lines;
mod mirror;
mod node;
mod read;
mod sessions;
mod stats;
#[cfg(test)]
pub(crate) mod tests;

pub use admin::{DrainRequest, MAX_PARKED};
pub use guard::{GuardConfig, GuardStats, GuardStatus, late_after, stall_threshold};
pub(crate) use input::fitted;
pub use input::{Beat, Labels, NewRegistration, Now, Registration};
pub use mirror::TAKEOVER_SUSPECT;
pub use node::{Liveness, NodeFilter, NodeSlot, VRAM_STEP};
pub use read::Page;
pub use sessions::secrets_equal;
pub use stats::{Counts, GPU_HEALTHS, POOL_STATES, Stats};

use node::NodeState;
use sessions::{SessionIds, check_secret, check_session, check_stream, new_secret, not_found};
use stats::Population;

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

/// A cloneable handle to the registry state.
#[derive(Clone)]
pub struct Registry {
    /// State shared by every handle (gRPC handlers, streams, expiry task).
    shared: Arc<Shared>,
}

/// The map of nodes and what is kept beside it.
struct Shared {
    /// Every known node by id; ordered for deterministic, pageable listing.
    nodes: RwLock<BTreeMap<Arc<str>, Arc<NodeSlot>>>,
    /// When the expiry task must next look at each node: one entry per
    /// listed node.
    schedule: Schedule<Arc<NodeSlot>>,
    /// Timeout, interval and retention.
    timing: Timing,
    /// Source of session ids.
    sessions: SessionIds,
    /// Nodes by liveness, kept on every transition so metrics need no scan.
    population: Population,
    /// Most nodes the registry holds; new ones beyond are refused.
    max_nodes: usize,
    /// Totals for metrics.
    stats: Stats,
    /// The revision, the history of changes, watchers and subscribers.
    feed: Feed,
    /// Which registry process this is, sent with every answer that carries
    /// the registry's view, so readers can tell a restarted registry.
    instance: pb::RegistryInstance,
    /// Admin state (cordon, drain) of nodes that left the map, put back
    /// when they register again (see `admin`). Taken under a node's lock,
    /// never the other way round.
    parked: Mutex<admin::ParkedMap>,
    /// The mass-failure guard: holds nodes ONLINE as suspect when too many
    /// go silent at once (see `guard`).
    guard: guard::Guard,
    /// Where durable records are written (register, deregister, removal,
    /// admin changes; never heartbeats).
    store: Arc<dyn Store>,
    /// Log lines per second for per-node events (see `lines`).
    lines: lines::Lines,
}

/// How a registry is built beyond its timing.
pub struct Options {
    /// Most nodes the registry holds; new ones beyond are refused.
    pub max_nodes: usize,
    /// Events kept for watchers resuming from a revision
    /// (`--watch-history`).
    pub watch_history: usize,
    /// Events a watcher may fall behind before it is ended
    /// (`--watch-queue`).
    pub watch_queue: usize,
    /// Consumers of every event, in revision order (the placement index).
    pub subscribers: Vec<Arc<dyn ChangeSubscriber>>,
    /// The revision before the first change. The server starts it at its
    /// start time in microseconds, so revisions keep increasing across
    /// restarts and a revision from before one is below the new history
    /// (OUT_OF_RANGE: relist) instead of naming another history's change.
    pub first_revision: u64,
    /// Which registry process this is (a random id and the start time).
    pub instance: pb::RegistryInstance,
    /// The mass-failure guard's settings (`--mass-offline-*`).
    pub guard: GuardConfig,
    /// Where durable records go ([`MemoryStore`] by default: nothing
    /// survives a restart).
    pub store: Arc<dyn Store>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_nodes: usize::MAX,
            watch_history: 100_000,
            watch_queue: 10_000,
            subscribers: Vec::new(),
            first_revision: 0,
            instance: new_instance(Utc::now()),
            guard: GuardConfig::default(),
            store: Arc::new(MemoryStore),
        }
    }
}

/// A registry instance started at `started_at`, with a random 64-bit id
/// (16 hex digits): unique enough to tell restarts apart.
pub fn new_instance(started_at: DateTime<Utc>) -> pb::RegistryInstance {
    let mut id = new_secret();
    id.truncate(16);
    pb::RegistryInstance {
        instance_id: id,
        started_at: Some(registry_proto::convert::to_proto_timestamp(started_at)),
    }
}

/// Why a node loaded from the store at start is listed as suspect until
/// its agent is heard from.
pub const RESTART_SUSPECT: &str = "registry restarted; not heard from since";

/// A registration applied in memory and its write queued in the store.
type Queued = (Registered, Commit);

/// What renewing a known node's registration came to.
// Short-lived and moved once; boxing the registration would cost an
// allocation per re-registration for nothing (the lint fired when
// Registration gained metrics_address).
#[allow(clippy::large_enum_variant)]
enum Renewal {
    /// The node was listed; renewed (reporting whether it came back
    /// ONLINE) or refused.
    Done(Result<(Registered, bool, Commit), RegistryError>),
    /// The node was removed meanwhile; the registration is handed back to
    /// be added as a new node (boxed: a registration is much larger than
    /// the other variant, and this path is rare).
    Gone(Box<Registration>),
}

impl Registry {
    /// An empty registry enforcing `timing`, without a node cap. Run
    /// [`crate::expiry::run`] on it so deadlines take effect.
    pub fn new(timing: Timing) -> Self {
        Self::with_max_nodes(timing, usize::MAX)
    }

    /// An empty registry holding at most `max_nodes` nodes.
    pub fn with_max_nodes(timing: Timing, max_nodes: usize) -> Self {
        Self::with_options(
            timing,
            Options {
                max_nodes,
                ..Options::default()
            },
        )
    }

    /// An empty registry built with `options`.
    pub fn with_options(timing: Timing, options: Options) -> Self {
        let max_nodes = options.max_nodes;
        Self {
            shared: Arc::new(Shared {
                feed: Feed::new(
                    options.watch_history,
                    options.watch_queue,
                    options.first_revision,
                    options.subscribers,
                ),
                nodes: RwLock::new(BTreeMap::new()),
                schedule: Schedule::new(),
                timing,
                sessions: SessionIds::new(),
                population: Population::default(),
                max_nodes,
                stats: Stats::default(),
                instance: options.instance,
                parked: Mutex::default(),
                guard: guard::Guard::new(options.guard),
                store: options.store,
                lines: lines::Lines::default(),
            }),
        }
    }

    /// The timing rules in force.
    pub fn timing(&self) -> Timing {
        self.shared.timing
    }

    /// Which registry process this is (see `pb::RegistryInstance`).
    pub fn instance(&self) -> &pb::RegistryInstance {
        &self.shared.instance
    }

    /// Nodes by liveness.
    pub fn counts(&self) -> Counts {
        self.shared.population.counts()
    }

    /// Running totals for metrics.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The change feed: revision, history, watchers.
    pub fn feed(&self) -> &Feed {
        &self.shared.feed
    }

    /// The latest revision.
    pub fn revision(&self) -> u64 {
        self.shared.feed.revision()
    }

    /// The one path of every visible change: builds the node's view, has
    /// the feed publish it at the next revision, and keeps it on the node.
    /// Call under the node's lock (lock order map → node → feed).
    fn publish(&self, st: &mut NodeState, kind: EventKind) -> u64 {
        let view = self.shared.feed.publish(kind, st.new_view());
        let revision = view.revision();
        st.view = view;
        revision
    }

    /// Adds a node or updates a known one at `now`, starting a new session.
    /// The node is ONLINE and its deadline starts now. An ONLINE node
    /// registered from another machine is not taken over (NodeTaken), and no
    /// node beyond the cap is added (LimitReached). The store write is
    /// queued but not awaited; Register's handler uses
    /// [`Registry::register_durably`].
    pub fn register(
        &self,
        registration: Registration,
        now: Now,
    ) -> Result<Registered, RegistryError> {
        self.register_queued(registration, now)
            .map(|(registered, _)| registered)
    }

    /// [`Registry::register`], answering once the node's record is durable.
    ///
    /// Order: the registration is applied in memory and its record queued
    /// under the node's lock (so the store sees each node's writes in the
    /// registry's order), then the commit is awaited with no lock held. If
    /// the commit fails, the registration is undone: the node is removed
    /// (DELETED) if the failed session is still its current one, so no
    /// reader keeps seeing a node that a restart would not bring back, and
    /// the caller gets UNAVAILABLE and registers again.
    pub async fn register_durably(
        &self,
        registration: Registration,
        now: Now,
    ) -> Result<Registered, RegistryError> {
        let node_id = registration.node_id().to_owned();
        let (registered, commit) = self.register_queued(registration, now)?;
        if let Err(err) = commit.await {
            self.undo_registration(&node_id, registered.session_id);
            return Err(RegistryError::StoreUnavailable(err.to_string()));
        }
        Ok(registered)
    }

    /// Removes a node whose registration could not be made durable, if
    /// `session_id` is still its session (a later registration stands).
    fn undo_registration(&self, node_id: &str, session_id: u64) {
        let Some(slot) = self.read_nodes().get(node_id).cloned() else {
            return;
        };
        {
            let mut st = slot.lock();
            if st.removed || st.session_id != session_id {
                return;
            }
            self.mark_removed(&mut st);
            self.publish(&mut st, EventKind::Deleted);
        }
        self.unlink(&slot);
        warn!(node_id = %node_id, "registration undone: the store could not make it durable");
    }

    /// The registration applied in memory, with its store write queued.
    fn register_queued(
        &self,
        registration: Registration,
        now: Now,
    ) -> Result<Queued, RegistryError> {
        let session_id = self.shared.sessions.next();
        let session_secret = new_secret();

        // A known node: the map's read lock to find it, then its own lock.
        let known = self.read_nodes().get(registration.node_id()).cloned();
        let registration = match known {
            Some(slot) => match self.renew(&slot, registration, session_id, &session_secret, now) {
                Renewal::Done(result) => return log_renewal(&self.shared.lines, &slot, result),
                Renewal::Gone(registration) => *registration,
            },
            None => registration,
        };

        // A new node: the write lock, re-checking under it, since another
        // call may have added the id since the read lock was dropped.
        let mut nodes = self.write_nodes();
        let raced = nodes.get(registration.node_id()).cloned();
        let registration = match raced {
            Some(slot) => match self.renew(&slot, registration, session_id, &session_secret, now) {
                Renewal::Done(result) => {
                    drop(nodes);
                    return log_renewal(&self.shared.lines, &slot, result);
                }
                Renewal::Gone(registration) => *registration,
            },
            None => registration,
        };
        if nodes.len() >= self.shared.max_nodes {
            return Err(RegistryError::LimitReached(format!(
                "the registry holds its maximum of {} nodes",
                self.shared.max_nodes
            )));
        }
        let slot = NodeSlot::new(NodeState::new(
            registration,
            session_id,
            secret_sha256(&session_secret),
            now.at,
            now.wall,
        ));
        let id = slot.id.clone();
        let commit = {
            let mut st = slot.lock();
            self.wake_by(&slot, &mut st, now.at + self.shared.timing.node_timeout);
            // A node that left cordoned or draining comes back so.
            if self.unpark(&mut st)
                && let Some(at) = Self::drain_wakeup(&st)
            {
                self.wake_by(&slot, &mut st, at);
            }
            self.publish(&mut st, EventKind::Added);
            self.shared.store.put_node(st.record())
        };
        // Replaces a removed slot of the same id still in the map, if any.
        nodes.insert(id.clone(), slot);
        drop(nodes);
        self.shared.population.add(Liveness::Online);
        Stats::bump(&self.shared.stats.registrations);
        lines::budgeted!(self.shared.lines.registered, info, "node registered", node_id = %id, session_id = %session_id);
        Ok((
            Registered {
                session_id,
                session_secret,
                created: true,
                registered_at: now.wall,
            },
            commit,
        ))
    }

    /// Starts a new session of a listed node at `now`, under its lock only.
    fn renew(
        &self,
        slot: &Arc<NodeSlot>,
        registration: Registration,
        session_id: u64,
        session_secret: &str,
        now: Now,
    ) -> Renewal {
        let mut st = slot.lock();
        if st.removed {
            return Renewal::Gone(Box::new(registration));
        }
        let other_machine = st.registration.machine_id() != registration.machine_id();
        if let Some(until) = st.unusual().restart_grace_until.filter(|_| other_machine) {
            return Renewal::Done(Err(RegistryError::NodeReserved {
                node_id: registration.node_id().to_owned(),
                until: until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }));
        }
        if st.liveness == Liveness::Online && other_machine {
            return Renewal::Done(Err(RegistryError::NodeTaken {
                node_id: registration.node_id().to_owned(),
            }));
        }
        let before = st.pool_tally();
        st.set_registration(registration);
        st.session_id = session_id;
        st.secret_sha256 = secret_sha256(session_secret);
        // The owner is back: the node is no longer held for it (its
        // suspect flag is cleared below with any other doubt).
        st.end_restart_grace();
        st.last_seen = now.at;
        st.last_heartbeat_at = now.wall;
        // The new session reports its own pools; the old session's figures
        // would describe another incarnation.
        st.clear_reports();
        st.reported = false;
        // The old session's streams end now, not at their next message
        // (they find the session superseded when they wake).
        slot.signal.raise();
        self.admin_on_register(&mut st);
        // A new session is a sign of life: whatever the registry doubted
        // about the node is settled.
        self.clear_suspect(&mut st);
        let came_online = st.liveness == Liveness::Offline;
        if came_online {
            self.set_online(&mut st, now.wall);
        }
        self.shared.stats.shift_pools(&before, &st.pool_tally());
        // An ONLINE node's queued deadline is earlier and re-checks then; an
        // OFFLINE node's retention entry is replaced by the new deadline.
        self.wake_by(slot, &mut st, now.at + self.shared.timing.node_timeout);
        // Always a change: the new session_id is visible.
        self.publish(&mut st, EventKind::Modified);
        let commit = self.shared.store.put_node(st.record());
        Stats::bump(&self.shared.stats.registrations);
        Renewal::Done(Ok((
            Registered {
                session_id,
                session_secret: session_secret.to_string(),
                created: false,
                registered_at: st.registered_at,
            },
            came_online,
            commit,
        )))
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
        self.deregister_queued(node_id, session_id, secret)
            .map(drop)
    }

    /// [`Registry::deregister`], answering once the record's deletion is
    /// durable. The node is removed from memory either way; if the store
    /// fails, the caller hears UNAVAILABLE (a restart may list the node
    /// again, and it then goes OFFLINE and is removed after retention).
    pub async fn deregister_durably(
        &self,
        node_id: &str,
        session_id: u64,
        secret: Option<&str>,
    ) -> Result<(), RegistryError> {
        let commit = self.deregister_queued(node_id, session_id, secret)?;
        commit
            .await
            .map_err(|err| RegistryError::StoreUnavailable(err.to_string()))
    }

    /// The removal applied in memory, with the record's deletion queued.
    fn deregister_queued(
        &self,
        node_id: &str,
        session_id: u64,
        secret: Option<&str>,
    ) -> Result<Commit, RegistryError> {
        let slot = self
            .read_nodes()
            .get(node_id)
            .cloned()
            .ok_or_else(|| not_found(node_id))?;
        let commit = {
            let mut st = slot.lock();
            if st.removed {
                return Err(not_found(node_id));
            }
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
            self.publish(&mut st, EventKind::Deleted);
            self.shared.store.delete_node(node_id)
        };
        self.unlink(&slot);
        Stats::bump(&self.shared.stats.deregistrations);
        lines::budgeted!(self.shared.lines.deregistered, info, "node deregistered", node_id = %node_id);
        Ok(commit)
    }

    /// Finds the slot a heartbeat stream will speak for, checking the
    /// session and its secret. Takes no stream number: the server's
    /// streams use [`Registry::attach_stream`], which also replaces an
    /// older stream of the session.
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

    /// [`Registry::attach`] for a new heartbeat stream: the stream takes
    /// the session's next stream number (returned), which replaces any
    /// older stream of the session; those wake at once (the node's
    /// command signal) and end with FAILED_PRECONDITION.
    pub fn attach_stream(
        &self,
        node_id: &str,
        session_id: u64,
        secret: &str,
    ) -> Result<(Arc<NodeSlot>, u64), RegistryError> {
        let slot = self.attach(node_id, session_id, secret)?;
        let stream = {
            let mut st = slot.lock();
            st.stream_gen += 1;
            // Wakes a replaced stream; the owed command's number stays, so
            // no command is sent twice. (Were the session replaced since
            // `attach` checked it, the stream's first beat is refused by
            // its session check.)
            slot.signal.raise();
            st.stream_gen
        };
        Ok((slot, stream))
    }

    /// Records a heartbeat received at monotonic time `now` (its wall time
    /// is `beat.received_at`): the node is alive, with this pool status.
    /// Touches only this node's lock, and the schedule and the feed only
    /// when an OFFLINE node comes back, a suspect node is heard from again,
    /// or the pool status changed materially.
    pub fn heartbeat(
        &self,
        slot: &Arc<NodeSlot>,
        session_id: u64,
        beat: Beat,
        now: Instant,
    ) -> Result<(), RegistryError> {
        self.heartbeat_for(slot, session_id, beat, now, &mut 0)
            .map(drop)
    }

    /// [`Registry::heartbeat`] for a stream that has sent command number
    /// `*sent` (0: none yet): also advances a requested drain from the
    /// reported pool status and answers the command owed to the agent
    /// that this stream has not sent yet (see `admin`). Without a pending
    /// drain or resume this costs one check and allocates nothing.
    pub fn heartbeat_for(
        &self,
        slot: &Arc<NodeSlot>,
        session_id: u64,
        beat: Beat,
        now: Instant,
        sent: &mut u64,
    ) -> Result<Option<pb::heartbeat_response::Command>, RegistryError> {
        self.heartbeat_on_stream(slot, session_id, 0, beat, now, sent)
    }

    /// [`Registry::heartbeat_for`] on the stream numbered `stream` by
    /// [`Registry::attach_stream`] (0: no stream check): refused with
    /// FAILED_PRECONDITION once a newer stream of the session took over.
    /// The check is one comparison under the node lock already held.
    pub fn heartbeat_on_stream(
        &self,
        slot: &Arc<NodeSlot>,
        session_id: u64,
        stream: u64,
        beat: Beat,
        now: Instant,
        sent: &mut u64,
    ) -> Result<Option<pb::heartbeat_response::Command>, RegistryError> {
        let wall = beat.received_at;
        // Encoded before the node's lock is taken: the figures are kept so.
        let encoded = EncodedGpus::of(&beat.gpus);
        let mut st = slot.lock();
        check_stream(slot, &st, session_id, stream)?;
        // Heard from after a restart: no longer reserved (nor suspect: the
        // flag, set by `restore`, is cleared below with any other doubt).
        st.end_restart_grace();
        let before = st.pool_tally();
        let pools_changed = st.pools_changed(&beat.pools);
        let health_changed = st.gpu_health_changed(&beat.gpus);
        st.last_seen = now;
        st.last_heartbeat_at = wall;
        st.agent_time = Some(beat.sent_at);
        // A beat without figures keeps the ones before.
        let gpus = (!beat.gpus.is_empty()).then(|| st.gpu_stats().followed_by(encoded, &beat.gpus));
        st.report(beat.pools, gpus);
        st.reported = true;
        let came_online = st.liveness == Liveness::Offline;
        if came_online {
            self.set_online(&mut st, wall);
            self.wake_by(slot, &mut st, now + self.shared.timing.node_timeout);
        }
        let admin_changed = self.admin_after_beat(&mut st, Now { at: now, wall });
        // A suspect node heard from again is trusted again; a held one
        // stays ONLINE (its entry at the protection's end re-checks it).
        let trusted_again = self.clear_suspect(&mut st);
        if came_online || pools_changed || health_changed || admin_changed || trusted_again {
            self.publish(&mut st, EventKind::Modified);
        }
        self.shared.stats.shift_pools(&before, &st.pool_tally());
        Stats::bump(&self.shared.stats.heartbeats);
        let command = Self::command_for(&st, session_id, sent);
        drop(st);
        if came_online {
            lines::budgeted!(self.shared.lines.online, info, "node online again", node_id = %slot.id, reason = "heartbeat resumed");
        }
        Ok(command)
    }

    /// Lists every node of `loaded` (read from the store at start, before
    /// serving) at `now`, and returns the admin states of nodes it does not
    /// hold (deregistered while cordoned), for the admin-state map.
    ///
    /// A loaded node is ONLINE and suspect ([`RESTART_SUSPECT`]), with no
    /// pool status (so placement offers none of its pools) and its stored
    /// session, so its agent's heartbeat stream resumes without Register.
    /// Its deadline is `now + node_timeout` (the restart grace): it is not
    /// OFFLINE before, and until it is heard from (or goes OFFLINE) its id
    /// is reserved for its machine. A node whose latest stored transition
    /// was to OFFLINE is loaded OFFLINE (since then), and removed at the
    /// end of its retention unless it comes back.
    pub fn restore(&self, loaded: Loaded, now: Now) -> Vec<(String, pb::AdminState)> {
        let timeout = self.shared.timing.node_timeout;
        let grace_until = now.wall + chrono::Duration::from_std(timeout).unwrap_or_default();
        let mut admin: BTreeMap<String, pb::AdminState> = loaded.admin.into_iter().collect();
        // Nodes whose latest recorded transition was to OFFLINE stay so.
        let offline: BTreeMap<String, DateTime<Utc>> = loaded
            .liveness
            .into_iter()
            .filter(|(_, l)| !l.online)
            .map(|(id, l)| (id, l.since))
            .collect();
        let mut restored = 0usize;
        let mut nodes = self.write_nodes();
        for record in loaded.nodes {
            let id: Arc<str> = Arc::from(record.registration.node_id());
            if nodes.contains_key(&id) {
                continue;
            }
            let mut state = NodeState::from_record(record, now.at, now.wall);
            let offline_since = offline.get(&*id).copied();
            if let Some(since) = offline_since {
                state.liveness = Liveness::Offline;
                state.status_changed_at = since;
                state.change_unusual(|u| u.offline_since = Some(mirror::instant_of(since, now)));
            } else {
                // ONLINE as last recorded: trusted again once heard from.
                self.set_suspect(&mut state, RESTART_SUSPECT);
                state.change_unusual(|u| u.restart_grace_until = Some(grace_until));
            }
            if let Some(stored) = admin.remove(&*id) {
                // Into the gauges like any admin change; the deadline of a
                // pending drain comes back onto the monotonic clock (the
                // write `set_admin` queues puts back what was loaded).
                state.change_unusual(|u| {
                    u.drain_deadline_at = admin::drain_deadline_from_wall(&stored, now)
                });
                let _same = self.set_admin(&mut state, stored);
            }
            let slot = NodeSlot::new(state);
            let liveness = {
                let mut st = slot.lock();
                let first_look = match st.unusual().offline_since {
                    Some(since) => since + self.shared.timing.offline_retention,
                    None => now.at + timeout,
                };
                self.wake_by(&slot, &mut st, first_look);
                if let Some(at) = Self::drain_wakeup(&st) {
                    self.wake_by(&slot, &mut st, at);
                }
                self.publish(&mut st, EventKind::Added);
                st.liveness
            };
            nodes.insert(id, slot);
            self.shared.population.add(liveness);
            restored += 1;
        }
        drop(nodes);
        info!(
            nodes = restored,
            grace_until = %grace_until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "nodes loaded from the store; each is ONLINE (suspect) until heard from or the restart grace ends"
        );
        admin.into_iter().collect()
    }

    /// The store the registry writes through (for admin-state writes).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Queues a node's admin state in the store: deleted when it asks
    /// nothing (not cordoned, no drain), so only real admin states are
    /// kept. Call under the node's lock, like every other store write.
    pub fn store_admin(&self, node_id: &str, admin: &pb::AdminState) -> Commit {
        let nothing = !admin.cordoned && admin.drain.is_none();
        self.shared
            .store
            .put_admin(node_id, (!nothing).then(|| admin.clone()))
    }

    /// An OFFLINE node is ONLINE again as of `wall`.
    fn set_online(&self, st: &mut NodeState, wall: DateTime<Utc>) {
        st.liveness = Liveness::Online;
        st.change_unusual(|u| u.offline_since = None);
        st.status_changed_at = wall;
        // Queued under the node's lock like every write; nobody waits for
        // it (a failure is logged by the store).
        drop(self.shared.store.put_liveness(
            st.registration.node_id(),
            crate::store::LivenessRecord {
                online: true,
                since: wall,
            },
        ));
        self.shared
            .population
            .shift(Liveness::Offline, Liveness::Online);
        Stats::bump(&self.shared.stats.online_transitions);
    }

    /// Marks the node removed (streams holding its slot stop), takes it out
    /// of the gauges, parks its admin state and cancels its wake-up. The caller then unlinks it.
    fn mark_removed(&self, st: &mut NodeState) {
        let before = st.pool_tally();
        st.removed = true;
        self.park(st);
        self.clear_suspect(st);
        self.shared.stats.shift_pools(&before, &st.pool_tally());
        self.shared.schedule.cancel(&mut st.wakeup);
        self.shared.population.remove(st.liveness);
    }

    /// Raises every node's signal, so each bound heartbeat stream wakes
    /// and checks whether it may go on (the service's recheck: shutdown, a
    /// term's end, a token reload). Rare; the slots are collected under
    /// the map's read lock and raised after it is released.
    pub fn raise_every_signal(&self) {
        let slots: Vec<Arc<NodeSlot>> = self.read_nodes().values().cloned().collect();
        for slot in slots {
            slot.signal().raise();
        }
    }

    /// Takes a removed slot out of the map, unless the id has been
    /// registered anew meanwhile (the map then holds another slot).
    fn unlink(&self, slot: &Arc<NodeSlot>) {
        let mut nodes = self.write_nodes();
        if nodes.get(&slot.id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            nodes.remove(&slot.id);
        }
    }

    fn read_nodes(&self) -> RwLockReadGuard<'_, BTreeMap<Arc<str>, Arc<NodeSlot>>> {
        self.shared.nodes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_nodes(&self) -> RwLockWriteGuard<'_, BTreeMap<Arc<str>, Arc<NodeSlot>>> {
        self.shared.nodes.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Logs a renewal once every lock is released, and hands back its result.
fn log_renewal(
    lines: &lines::Lines,
    slot: &NodeSlot,
    result: Result<(Registered, bool, Commit), RegistryError>,
) -> Result<Queued, RegistryError> {
    let (registered, came_online, commit) = result?;
    if came_online {
        lines::budgeted!(lines.online, info, "node online again", node_id = %slot.id, reason = "re-registered");
    }
    lines::budgeted!(lines.registered, info, "node re-registered", node_id = %slot.id, session_id = %registered.session_id);
    Ok((registered, commit))
}
