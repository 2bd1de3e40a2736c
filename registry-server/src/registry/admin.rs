//! Cordon and drain: what operators ask of a node (`pb::AdminState`), how a
//! drain progresses from the node's pool status, the commands owed to the
//! agent, and the admin state kept for nodes that are not listed.
//!
//! Why it looks like this:
//! - Every change of a node's admin state goes through
//!   [`Registry::set_admin`], the one place that keeps the cordoned and
//!   draining gauges and that a durable store hooks to persist it. Admin
//!   state kept for an unlisted node changes only in [`Registry::park`],
//!   [`Registry::unpark`] and [`Registry::clear_parked`].
//! - A drain progresses on the node's own heartbeats, under its lock, and
//!   costs nothing while no drain or resume is pending (one `Option`
//!   check). Its deadline is one more reason to wake the node in the
//!   existing schedule, so a silent node is still marked drained on time.
//! - Commands owed to the agent (DrainCommand until it acknowledges,
//!   ResumeCommand after a cancel until the pools are no longer DRAINING)
//!   are derived from the state, numbered by `NodeState::command_gen`: a
//!   stream sends each numbered command once, and a new stream (which
//!   starts at 0) sends the owed one again. Bumping the number also wakes
//!   the node's open streams through `NodeSlot::commands`, which push the
//!   command at once instead of waiting for the next heartbeat.
//! - Admin state survives the node leaving the map (Deregister on agent
//!   shutdown, removal after retention): it is parked by node_id and put
//!   back when the node registers again. A parked entry lasts until
//!   UncordonNode / CancelDrain clear it or the node comes back; at most
//!   [`MAX_PARKED`] are kept, the oldest dropped first. Lock order: map →
//!   node → parked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use registry_proto::convert::to_proto_timestamp;
use registry_proto::pb;
use registry_proto::pb::heartbeat_response::Command;
use tokio::time::Instant;
use tracing::info;

use super::node::{NodeSlot, NodeState};
use super::sessions::not_found;
use super::{Now, Registry};
use crate::error::RegistryError;
use crate::events::EventKind;
use crate::store::Commit;

/// Most admin states kept for nodes that are not listed; beyond it the
/// longest-parked is dropped (a fleet that cordons and then retires more
/// nodes than this loses the oldest cordons, not memory).
pub const MAX_PARKED: usize = 10_000;

/// The reason sent with a ResumeCommand.
const RESUME_REASON: &str = "drain cancelled";

/// Admin state of a node that is not listed, kept to be put back when it
/// registers again.
#[derive(Debug, Clone)]
pub(super) struct Parked {
    /// The admin state as it was when the node left.
    admin: pb::AdminState,
    /// The drain's deadline on the monotonic clock, if one is pending.
    drain_deadline_at: Option<Instant>,
    /// Order of parking, to drop the oldest when full.
    seq: u64,
}

/// Admin states of unlisted nodes, by node_id.
#[derive(Debug, Default)]
pub(super) struct ParkedMap {
    /// The states.
    entries: HashMap<String, Parked>,
    /// Next parking order number.
    next_seq: u64,
}

/// A drain as DrainNode asks it, checked by the adapter (pool ids well
/// formed, reason valid text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainRequest {
    /// Pools to drain; empty means every pool of the node.
    pub pool_ids: Vec<String>,
    /// Why, shown on the node and sent to the agent.
    pub reason: String,
    /// How long until the drain counts as done regardless; `None`: never.
    pub deadline: Option<Duration>,
}

/// What a pool looks like to a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolDrain {
    /// Reported and still taking work (READY, INITIALIZING, FAILED).
    Active,
    /// Reported DRAINING with this many busy slots.
    Draining {
        /// Whether no slot is busy.
        idle: bool,
    },
    /// Reported OFFLINE, or absent from a reported status: not running.
    Stopped,
}

impl NodeState {
    /// Whether the node's admin state owes anything to readers or agents
    /// on a heartbeat: a drain not yet drained or acknowledged, or a
    /// resume not yet seen. The hot path checks only this.
    pub(super) fn admin_pending(&self) -> bool {
        self.unusual().resume.is_some()
            || self
                .admin
                .drain
                .as_ref()
                .is_some_and(|d| !d.drained || !d.acknowledged)
    }

    /// The pools a drain of `pool_ids` covers (empty: every registered or
    /// reported pool).
    fn drained_pools<'a>(&'a self, pool_ids: &'a [String]) -> Vec<&'a str> {
        if !pool_ids.is_empty() {
            return pool_ids.iter().map(String::as_str).collect();
        }
        let mut ids: Vec<&str> = self
            .registration
            .pools
            .iter()
            .map(|p| p.pool_id())
            .collect();
        for s in self.pool_status() {
            if !ids.contains(&s.pool_id) {
                ids.push(s.pool_id);
            }
        }
        ids
    }

    /// How pool `pool_id` stands, from the latest reported status; `None`
    /// before the current session reported any.
    fn pool_drain(&self, pool_id: &str) -> Option<PoolDrain> {
        if !self.reported {
            return None;
        }
        let Some(s) = self.pool_status().find(|s| s.pool_id == pool_id) else {
            return Some(PoolDrain::Stopped);
        };
        Some(match pb::PoolState::try_from(s.state) {
            Ok(pb::PoolState::Draining) => PoolDrain::Draining {
                idle: s.slots_free >= s.slots_total,
            },
            Ok(pb::PoolState::Offline) => PoolDrain::Stopped,
            _ => PoolDrain::Active,
        })
    }

    /// The command the agent is owed now, if any: a drain it has not
    /// acknowledged, else a resume whose pools are still DRAINING.
    fn owed_command(&self) -> Option<Command> {
        if let Some(drain) = &self.admin.drain {
            if drain.acknowledged {
                return None;
            }
            return Some(Command::Drain(pb::DrainCommand {
                pool_ids: drain.pool_ids.clone(),
                reason: drain.reason.clone(),
                deadline: drain.deadline,
            }));
        }
        self.unusual()
            .resume
            .as_deref()
            .cloned()
            .map(Command::Resume)
    }

    /// The admin state with the drain's progress recomputed from the pool
    /// status at `now`; `None` when nothing changed. Acknowledged follows
    /// the agent's reports (a restarted agent that forgot the drain is
    /// owed it again); drained, once true, stays true.
    fn drain_progress(&self, now: Now) -> Option<pb::AdminState> {
        let drain = self.admin.drain.as_ref()?;
        let pools = self.drained_pools(&drain.pool_ids);
        let states: Option<Vec<PoolDrain>> = pools.iter().map(|p| self.pool_drain(p)).collect();
        let acknowledged = match &states {
            Some(states) => states.iter().all(|s| *s != PoolDrain::Active),
            // Nothing reported since the latest registration: keep what
            // was known.
            None => drain.acknowledged,
        };
        let idle = states.as_ref().is_some_and(|states| {
            states
                .iter()
                .all(|s| matches!(s, PoolDrain::Stopped | PoolDrain::Draining { idle: true }))
        });
        let past_deadline = self
            .unusual()
            .drain_deadline_at
            .is_some_and(|at| at <= now.at);
        let drained = drain.drained || past_deadline || (acknowledged && idle);
        if acknowledged == drain.acknowledged && drained == drain.drained {
            return None;
        }
        let mut admin = pb::AdminState::clone(&self.admin);
        let d = admin.drain.as_mut()?;
        d.acknowledged = acknowledged;
        if drained && !d.drained {
            d.drained = true;
            d.drained_at = Some(to_proto_timestamp(now.wall));
        }
        Some(admin)
    }

    /// Whether the owed resume has been carried out: none of its pools is
    /// still reported DRAINING.
    fn resume_done(&self) -> bool {
        let Some(resume) = &self.unusual().resume else {
            return false;
        };
        if !self.reported {
            return false;
        }
        self.drained_pools(&resume.pool_ids)
            .iter()
            .all(|p| !matches!(self.pool_drain(p), Some(PoolDrain::Draining { .. })))
    }
}

#[cfg(test)]
impl Parked {
    /// A cordoned entry.
    pub(super) fn for_tests() -> Self {
        Parked {
            admin: pb::AdminState {
                cordoned: true,
                ..pb::AdminState::default()
            },
            drain_deadline_at: None,
            seq: 0,
        }
    }
}

#[cfg(test)]
impl ParkedMap {
    pub(super) fn insert_for_tests(&mut self, node_id: &str, parked: Parked) {
        self.insert(node_id, parked);
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn contains(&self, node_id: &str) -> bool {
        self.entries.contains_key(node_id)
    }
}

impl ParkedMap {
    /// Keeps `parked` for `node_id`, dropping the oldest entry when full.
    fn insert(&mut self, node_id: &str, mut parked: Parked) {
        parked.seq = self.next_seq;
        self.next_seq += 1;
        if self.entries.len() >= MAX_PARKED && !self.entries.contains_key(node_id) {
            // O(n) only when full, which a sane fleet never is.
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, p)| p.seq)
                .map(|(id, _)| id.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(node_id.to_owned(), parked);
    }
}

/// The admin state of a node nobody cordoned or drained: schedulable. One
/// value shared by every such node and its views, so they hold a pointer
/// instead of a state each.
pub(super) fn default_admin() -> Arc<pb::AdminState> {
    static DEFAULT: std::sync::LazyLock<Arc<pb::AdminState>> = std::sync::LazyLock::new(|| {
        Arc::new(pb::AdminState {
            schedulable: true,
            ..pb::AdminState::default()
        })
    });
    Arc::clone(&DEFAULT)
}

/// `admin` to keep on a node: the shared default when it is the default.
fn shared_admin(admin: pb::AdminState) -> Arc<pb::AdminState> {
    let default = default_admin();
    if admin == *default {
        default
    } else {
        Arc::new(admin)
    }
}

/// How many of `admin`'s nodes count as cordoned and as draining.
fn admin_gauges(admin: &pb::AdminState) -> (i64, i64) {
    (i64::from(admin.cordoned), i64::from(admin.drain.is_some()))
}

impl Registry {
    /// The one path of every change of a listed node's admin state: keeps
    /// the cordoned/draining gauges, sets the new state and queues it in
    /// the store (under the node's lock, so the store sees a node's writes
    /// in order). The caller publishes the change (under the same node
    /// lock). Returns the store's answer when anything changed, `None`
    /// when nothing did: the admin RPCs await it (answered once durable);
    /// changes the registry derives itself (drain progress, a deadline
    /// passing) leave the write queued without waiting.
    pub(super) fn set_admin(&self, st: &mut NodeState, admin: pb::AdminState) -> Option<Commit> {
        self.apply_admin(st, admin)
            .then(|| self.store_admin(st.registration.node_id(), &st.admin))
    }

    /// [`Registry::set_admin`] without the store write, for a state the
    /// store already holds (a follower applying the leader's record):
    /// keeps the gauges and sets the state. True when anything changed.
    pub(super) fn apply_admin(&self, st: &mut NodeState, mut admin: pb::AdminState) -> bool {
        admin.schedulable = !admin.cordoned && admin.drain.is_none();
        if admin == *st.admin {
            return false;
        }
        let (c0, d0) = admin_gauges(&st.admin);
        let (c1, d1) = admin_gauges(&admin);
        self.shared.stats.shift_admin(c1 - c0, d1 - d0);
        st.admin = shared_admin(admin);
        true
    }

    /// A listed node's slot, or NOT_FOUND.
    fn listed(&self, node_id: &str) -> Result<Arc<NodeSlot>, RegistryError> {
        self.read_nodes()
            .get(node_id)
            .cloned()
            .ok_or_else(|| not_found(node_id))
    }

    /// Applies `change` to a listed node's admin state under its lock; a
    /// change publishes a MODIFIED event. Returns the node as readers now
    /// see it. `change` returns the new admin state, or `None` to leave
    /// the node as it is.
    fn change_admin(
        &self,
        node_id: &str,
        change: impl FnOnce(&mut NodeState) -> Result<Option<pb::AdminState>, RegistryError>,
    ) -> Result<Changed, RegistryError> {
        let slot = self.listed(node_id)?;
        let mut st = slot.lock();
        if st.removed {
            return Err(not_found(node_id));
        }
        let mut commit = None;
        if let Some(admin) = change(&mut st)? {
            commit = self.set_admin(&mut st, admin);
            if commit.is_some() {
                self.publish(&mut st, EventKind::Modified);
            }
        }
        Ok((st.read(), commit))
    }

    /// CordonNode: placement stops offering the node; it stays ONLINE.
    /// Cordoning a cordoned node changes only a different reason (and
    /// keeps cordoned_at); the same reason is no change and no event.
    pub fn cordon(&self, node_id: &str, reason: &str, now: Now) -> Result<pb::Node, RegistryError> {
        Ok(self.cordon_queued(node_id, reason, now)?.0)
    }

    /// [`Registry::cordon`], answering once the change is durable.
    pub async fn cordon_durably(
        &self,
        node_id: &str,
        reason: &str,
        now: Now,
    ) -> Result<pb::Node, RegistryError> {
        durable(self.cordon_queued(node_id, reason, now)?).await
    }

    fn cordon_queued(
        &self,
        node_id: &str,
        reason: &str,
        now: Now,
    ) -> Result<Changed, RegistryError> {
        let node = self.change_admin(node_id, |st| {
            if st.admin.cordoned && st.admin.cordon_reason == reason {
                return Ok(None);
            }
            let mut admin = pb::AdminState::clone(&st.admin);
            if !admin.cordoned {
                admin.cordoned = true;
                admin.cordoned_at = Some(to_proto_timestamp(now.wall));
            }
            admin.cordon_reason = reason.to_owned();
            Ok(Some(admin))
        })?;
        info!(%node_id, %reason, "node cordoned");
        Ok(node)
    }

    /// UncordonNode: the node is offered again (unless a drain is
    /// requested). Idempotent. For a node that is not listed, clears the
    /// cordon kept for it and answers a node carrying only its id and
    /// admin state; NOT_FOUND when nothing is kept either.
    pub fn uncordon(&self, node_id: &str) -> Result<pb::Node, RegistryError> {
        Ok(self.uncordon_queued(node_id)?.0)
    }

    /// [`Registry::uncordon`], answering once the change is durable.
    pub async fn uncordon_durably(&self, node_id: &str) -> Result<pb::Node, RegistryError> {
        durable(self.uncordon_queued(node_id)?).await
    }

    fn uncordon_queued(&self, node_id: &str) -> Result<Changed, RegistryError> {
        let clear = |admin: &mut pb::AdminState| {
            admin.cordoned = false;
            admin.cordon_reason.clear();
            admin.cordoned_at = None;
        };
        match self.change_admin(node_id, |st| {
            if !st.admin.cordoned {
                return Ok(None);
            }
            let mut admin = pb::AdminState::clone(&st.admin);
            clear(&mut admin);
            Ok(Some(admin))
        }) {
            Err(RegistryError::NodeNotFound { .. }) => self.clear_parked(node_id, |p| {
                clear(&mut p.admin);
            }),
            Ok(node) => {
                info!(%node_id, "node uncordoned");
                Ok(node)
            }
            Err(e) => Err(e),
        }
    }

    /// DrainNode: records the drain, owes the agent a DrainCommand and
    /// wakes its open streams to push it now. Each pool id must be a pool
    /// of the node (registered or reported). The same pools and reason
    /// without a deadline again is no change; otherwise the drain is
    /// replaced (requested_at now, progress recomputed from the current
    /// pool status).
    pub fn drain(
        &self,
        node_id: &str,
        request: DrainRequest,
        now: Now,
    ) -> Result<pb::Node, RegistryError> {
        Ok(self.drain_queued(node_id, request, now)?.0)
    }

    /// [`Registry::drain`], answering once the drain is durable.
    pub async fn drain_durably(
        &self,
        node_id: &str,
        request: DrainRequest,
        now: Now,
    ) -> Result<pb::Node, RegistryError> {
        durable(self.drain_queued(node_id, request, now)?).await
    }

    fn drain_queued(
        &self,
        node_id: &str,
        request: DrainRequest,
        now: Now,
    ) -> Result<Changed, RegistryError> {
        let slot = self.listed(node_id)?;
        let mut st = slot.lock();
        if st.removed {
            return Err(not_found(node_id));
        }
        for (i, pool_id) in request.pool_ids.iter().enumerate() {
            let known = st.registration.pools.iter().any(|p| p.pool_id() == pool_id)
                || st.pool_status().any(|p| p.pool_id == pool_id.as_str());
            if !known {
                return Err(RegistryError::invalid(
                    format!("pool_ids[{i}]"),
                    format!("{pool_id} is not a pool of node {node_id}"),
                ));
            }
        }
        let same = st.admin.drain.as_ref().is_some_and(|d| {
            d.pool_ids == request.pool_ids
                && d.reason == request.reason
                && d.deadline.is_none()
                && request.deadline.is_none()
        });
        if same {
            return Ok((st.read(), None));
        }
        let mut admin = pb::AdminState::clone(&st.admin);
        admin.drain = Some(pb::DrainState {
            pool_ids: request.pool_ids.clone(),
            reason: request.reason.clone(),
            requested_at: Some(to_proto_timestamp(now.wall)),
            deadline: request
                .deadline
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| to_proto_timestamp(now.wall + d)),
            acknowledged: false,
            drained: false,
            drained_at: None,
        });
        st.change_unusual(|u| {
            u.drain_deadline_at = request.deadline.map(|d| now.at + d);
            u.resume = None;
        });
        let mut commit = self.set_admin(&mut st, admin);
        // The current status may already show the drain (a repeated
        // DrainNode); zero deadline-free pools may already be idle.
        if let Some(progressed) = st.drain_progress(now) {
            // Queued after the first write: its commit covers both.
            commit = self.set_admin(&mut st, progressed).or(commit);
        }
        if let Some(at) = st.unusual().drain_deadline_at {
            self.wake_by(&slot, &mut st, at);
        }
        self.publish(&mut st, EventKind::Modified);
        self.owe_command(&slot, &mut st);
        let node = st.read();
        drop(st);
        info!(%node_id, pools = ?request.pool_ids, reason = %request.reason, "drain requested");
        Ok((node, commit))
    }

    /// CancelDrain: forgets the drain and owes the agent a ResumeCommand
    /// for its pools (pushed at once, and on new streams until the pools
    /// are no longer DRAINING). No drain: no change. For a node that is
    /// not listed, clears the drain kept for it (see [`Registry::uncordon`]).
    pub fn cancel_drain(&self, node_id: &str) -> Result<pb::Node, RegistryError> {
        Ok(self.cancel_drain_queued(node_id)?.0)
    }

    /// [`Registry::cancel_drain`], answering once the change is durable.
    pub async fn cancel_drain_durably(&self, node_id: &str) -> Result<pb::Node, RegistryError> {
        durable(self.cancel_drain_queued(node_id)?).await
    }

    fn cancel_drain_queued(&self, node_id: &str) -> Result<Changed, RegistryError> {
        let slot = match self.listed(node_id) {
            Ok(slot) => slot,
            Err(_) => return self.clear_parked(node_id, |p| p.admin.drain = None),
        };
        let mut st = slot.lock();
        if st.removed {
            drop(st);
            return self.clear_parked(node_id, |p| p.admin.drain = None);
        }
        let Some(drain) = st.admin.drain.clone() else {
            return Ok((st.read(), None));
        };
        let mut admin = pb::AdminState::clone(&st.admin);
        admin.drain = None;
        st.change_unusual(|u| {
            u.drain_deadline_at = None;
            u.resume = Some(Box::new(pb::ResumeCommand {
                pool_ids: drain.pool_ids,
                reason: RESUME_REASON.to_owned(),
            }));
        });
        let commit = self.set_admin(&mut st, admin);
        self.publish(&mut st, EventKind::Modified);
        self.owe_command(&slot, &mut st);
        let node = st.read();
        drop(st);
        info!(%node_id, "drain cancelled");
        Ok((node, commit))
    }

    /// Numbers a newly owed command and wakes the node's open streams so
    /// they push it now. Call under the node's lock.
    fn owe_command(&self, slot: &NodeSlot, st: &mut NodeState) {
        st.command_gen += 1;
        slot.signal.raise();
    }

    /// The command a stream that last sent command number `*sent` should
    /// send now for session `session_id`, if any; marks it sent. Call
    /// under the node's lock.
    pub(super) fn command_for(st: &NodeState, session_id: u64, sent: &mut u64) -> Option<Command> {
        if *sent == st.command_gen || st.session_id != session_id || st.removed {
            return None;
        }
        let command = st.owed_command()?;
        *sent = st.command_gen;
        Some(command)
    }

    /// What an open stream's wake-up should push: the command owed to the
    /// agent that this stream has not sent yet (see
    /// [`Registry::heartbeat_for`]).
    pub fn pending_command(
        &self,
        slot: &NodeSlot,
        session_id: u64,
        sent: &mut u64,
    ) -> Option<Command> {
        // Stream 0 takes part in no replacement; a stale session owes
        // nothing.
        self.pending_on_stream(slot, session_id, 0, sent)
            .ok()
            .flatten()
    }

    /// What a woken stream numbered `stream` (by
    /// [`Registry::attach_stream`]) should do: push the command it owes
    /// (`Ok(Some)`), nothing (`Ok(None)`), or end, because the node is
    /// gone, its session superseded or a newer stream took over (`Err`).
    pub fn pending_on_stream(
        &self,
        slot: &NodeSlot,
        session_id: u64,
        stream: u64,
        sent: &mut u64,
    ) -> Result<Option<Command>, RegistryError> {
        let st = slot.lock();
        super::sessions::check_stream(slot, &st, session_id, stream)?;
        Ok(Self::command_for(&st, session_id, sent))
    }

    /// Recomputes the drain's progress and the owed resume after a
    /// heartbeat (under the node's lock); true when the admin state
    /// changed and must be published. Free when nothing is pending.
    pub(super) fn admin_after_beat(&self, st: &mut NodeState, now: Now) -> bool {
        if !st.admin_pending() {
            return false;
        }
        if st.resume_done() {
            st.change_unusual(|u| u.resume = None);
        }
        let before = st.admin.drain.as_ref().map(|d| d.acknowledged);
        let Some(admin) = st.drain_progress(now) else {
            return false;
        };
        let lost_ack =
            before == Some(true) && admin.drain.as_ref().is_some_and(|d| !d.acknowledged);
        let changed = self.set_admin(st, admin).is_some();
        if lost_ack {
            // The agent forgot the drain (it restarted): owe it again, to
            // every stream.
            st.command_gen += 1;
        }
        changed
    }

    /// A new session of a listed node (under its lock): the agent may be a
    /// new process that never heard of the drain, so it must acknowledge
    /// anew (and is owed the command until it does). The caller publishes.
    pub(super) fn admin_on_register(&self, st: &mut NodeState) {
        if st.admin.drain.as_ref().is_some_and(|d| d.acknowledged) {
            let mut admin = pb::AdminState::clone(&st.admin);
            if let Some(drain) = admin.drain.as_mut() {
                drain.acknowledged = false;
            }
            // Derived: queued, not awaited (see `set_admin`).
            let _queued = self.set_admin(st, admin);
        }
    }

    /// At a wake-up (under the node's lock): a drain whose deadline passed
    /// counts as drained. True when that changed the admin state.
    pub(super) fn drain_deadline_due(&self, st: &mut NodeState, now: Now) -> bool {
        let due = st
            .unusual()
            .drain_deadline_at
            .is_some_and(|at| at <= now.at)
            && st.admin.drain.as_ref().is_some_and(|d| !d.drained);
        if !due {
            return false;
        }
        match st.drain_progress(now) {
            Some(admin) => self.set_admin(st, admin).is_some(),
            None => false,
        }
    }

    /// The drain deadline still to be woken for, if any.
    pub(super) fn drain_wakeup(st: &NodeState) -> Option<Instant> {
        st.unusual()
            .drain_deadline_at
            .filter(|_| st.admin.drain.as_ref().is_some_and(|d| !d.drained))
    }

    /// Keeps a leaving node's admin state (when it has any) for its next
    /// registration, and takes it out of the gauges. Call under the node's
    /// lock when it is removed.
    pub(super) fn park(&self, st: &NodeState) {
        let (c, d) = admin_gauges(&st.admin);
        self.shared.stats.shift_admin(-c, -d);
        if !st.admin.cordoned && st.admin.drain.is_none() {
            return;
        }
        self.parked().insert(
            st.registration.node_id(),
            Parked {
                admin: pb::AdminState::clone(&st.admin),
                drain_deadline_at: st.unusual().drain_deadline_at,
                seq: 0,
            },
        );
    }

    /// Puts the admin state kept for a node that registers again back on
    /// it (a new node's state, under its lock), with its gauges; true when
    /// there was one.
    pub(super) fn unpark(&self, st: &mut NodeState) -> bool {
        let Some(parked) = self.parked().entries.remove(st.registration.node_id()) else {
            return false;
        };
        st.change_unusual(|u| u.drain_deadline_at = parked.drain_deadline_at);
        let (c, d) = admin_gauges(&parked.admin);
        self.shared.stats.shift_admin(c, d);
        let mut admin = parked.admin;
        // A new agent has not been told; it acknowledges anew.
        if let Some(drain) = admin.drain.as_mut() {
            drain.acknowledged = false;
        }
        st.admin = shared_admin(admin);
        // Owed again to the new agent's streams.
        if st.admin.drain.is_some() {
            st.command_gen += 1;
        }
        true
    }

    /// UncordonNode / CancelDrain for a node that is not listed: applies
    /// `clear` to the state kept for it (dropping the entry once nothing is
    /// left) and answers a node carrying only its id and admin state.
    /// NOT_FOUND when nothing is kept for it.
    fn clear_parked(
        &self,
        node_id: &str,
        clear: impl FnOnce(&mut Parked),
    ) -> Result<Changed, RegistryError> {
        let mut parked = self.parked();
        let entry = parked
            .entries
            .get_mut(node_id)
            .ok_or_else(|| not_found(node_id))?;
        clear(entry);
        entry.admin.schedulable = !entry.admin.cordoned && entry.admin.drain.is_none();
        let admin = entry.admin.clone();
        if admin.schedulable {
            parked.entries.remove(node_id);
        }
        // Under the parked map's lock, so two clears reach the store in
        // the order they were applied.
        let commit = self.store_admin(node_id, &admin);
        drop(parked);
        info!(%node_id, "admin state of an unlisted node cleared");
        let node = pb::Node {
            node_id: node_id.to_owned(),
            admin: Some(admin),
            ..pb::Node::default()
        };
        Ok((node, Some(commit)))
    }

    /// Keeps admin states loaded from the store for nodes that are not
    /// listed (deregistered while cordoned or draining), to be put back
    /// when they register again. A drain's deadline is carried over from
    /// its wall-clock time onto the monotonic clock at `now`.
    pub fn park_loaded(&self, states: Vec<(String, pb::AdminState)>, now: Now) {
        let mut parked = self.parked();
        for (node_id, admin) in states {
            let drain_deadline_at = drain_deadline_from_wall(&admin, now);
            parked.insert(
                &node_id,
                Parked {
                    admin,
                    drain_deadline_at,
                    seq: 0,
                },
            );
        }
    }

    /// Drops the admin state kept for the unlisted node `node_id`, if any.
    pub(super) fn forget_parked(&self, node_id: &str) {
        self.parked().entries.remove(node_id);
    }

    /// Drops every admin state kept for unlisted nodes (a follower about to
    /// apply the leader's full set).
    pub(super) fn clear_all_parked(&self) {
        self.parked().entries.clear();
    }

    /// Admin states kept for nodes that are not listed.
    pub fn parked_admin_states(&self) -> usize {
        self.parked().entries.len()
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, ParkedMap> {
        self.shared.parked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What an admin change came to: the node as readers now see it, and the
/// store's answer for the write it queued (`None`: nothing changed).
type Changed = (pb::Node, Option<Commit>);

/// The node once the admin change it carries is durable (or at once when
/// nothing was written); a failed write is UNAVAILABLE: the change stands
/// in memory, and the caller may repeat the idempotent call.
async fn durable((node, commit): Changed) -> Result<pb::Node, RegistryError> {
    if let Some(commit) = commit {
        commit
            .await
            .map_err(|err| RegistryError::StoreUnavailable(err.to_string()))?;
    }
    Ok(node)
}

/// A pending drain's deadline on the monotonic clock, from its wall-clock
/// time as stored (after a restart the monotonic one is gone): a deadline
/// already past is due at `now`.
pub(super) fn drain_deadline_from_wall(admin: &pb::AdminState, now: Now) -> Option<Instant> {
    let drain = admin.drain.as_ref().filter(|d| !d.drained)?;
    let deadline = registry_proto::convert::from_proto_timestamp(drain.deadline.as_ref()?)?;
    let left = (deadline - now.wall).to_std().unwrap_or_default();
    Some(now.at + left)
}
