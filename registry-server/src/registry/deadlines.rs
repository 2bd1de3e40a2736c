//! The deadline rules: when a node must next be looked at, and what happens
//! then (ONLINE -> OFFLINE at `last_seen + node_timeout`, removal at
//! `offline_since + offline_retention`).
//!
//! The rules stay in the registry module because they change node state,
//! the gauges and the map; [`crate::schedule::Schedule`] only keeps the
//! queue, and [`crate::expiry`] only sleeps until the next entry and passes
//! in the time. The seam is [`Registry::process_due`].
//!
//! Heartbeats of an ONLINE node never touch the schedule: they only move
//! `last_seen`. When the node's entry fires, its deadline is re-computed
//! from `last_seen` and the node is either marked OFFLINE or re-queued at
//! its real deadline. So each node has exactly one entry while it is listed.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{info, warn};

use super::node::{Liveness, NodeSlot, NodeState};
use super::stats::Stats;
use super::{Now, Registry};
use crate::events::EventKind;
use crate::schedule::{Due, Key};

/// What a wake-up did, to be logged once no lock is held.
enum Outcome {
    /// The entry was stale or the node re-queued; nothing to report.
    Quiet,
    /// The node went OFFLINE after this much silence.
    WentOffline {
        /// The node's id.
        node_id: Arc<str>,
        /// Time since the node's latest sign of life.
        silent_for: std::time::Duration,
    },
    /// The node was removed after its retention.
    Removed {
        /// The node's id.
        node_id: Arc<str>,
    },
}

impl Registry {
    /// Handles every wake-up due at `now`: marks nodes whose deadline passed
    /// OFFLINE and removes nodes whose retention ended. Returns when the next
    /// wake-up is due.
    pub(crate) fn process_due(&self, now: Now) -> Option<Instant> {
        loop {
            match self.shared.schedule.pop_due(now.at) {
                Due::Now(key, slot) => match self.process_wakeup(key, &slot, now) {
                    Outcome::Quiet => {}
                    Outcome::WentOffline {
                        node_id,
                        silent_for,
                    } => warn!(
                        node_id = %node_id,
                        silent_for = %humantime::format_duration(silent_for),
                        "node offline: no heartbeat within the node timeout"
                    ),
                    Outcome::Removed { node_id } => {
                        info!(node_id = %node_id, "offline node removed after retention");
                    }
                },
                Due::At(at) => return Some(at),
                Due::Idle => return None,
            }
        }
    }

    /// Waits until a wake-up earlier than those already queued is added.
    pub(crate) async fn schedule_changed(&self) {
        self.shared.schedule.changed().await;
    }

    /// Wake-ups queued now: at most one per listed node.
    pub fn scheduled_wakeups(&self) -> usize {
        self.shared.schedule.len()
    }

    fn process_wakeup(&self, key: Key, slot: &Arc<NodeSlot>, now: Now) -> Outcome {
        let mut st = slot.lock();
        if st.removed || st.wakeup != Some(key) {
            // Stale: the node was removed or re-scheduled after the entry
            // was taken off the queue.
            return Outcome::Quiet;
        }
        st.wakeup = None;
        let timing = self.shared.timing;
        match st.liveness {
            Liveness::Online => {
                let deadline = st.last_seen + timing.node_timeout;
                if deadline > now.at {
                    self.wake_by(slot, &mut st, deadline);
                    return Outcome::Quiet;
                }
                let before = st.pool_tally();
                st.liveness = Liveness::Offline;
                // A loaded node silent through the restart grace: no
                // longer reserved for its machine, nor suspect.
                if st.restart_grace_until.take().is_some() {
                    st.suspect = None;
                }
                st.offline_since = Some(deadline);
                st.status_changed_at = now.wall;
                self.shared.stats.shift_pools(&before, &st.pool_tally());
                self.shared
                    .population
                    .shift(Liveness::Online, Liveness::Offline);
                Stats::bump(&self.shared.stats.offline_transitions);
                self.wake_by(slot, &mut st, deadline + timing.offline_retention);
                self.publish(&mut st, EventKind::Modified);
                Outcome::WentOffline {
                    node_id: slot.id.clone(),
                    silent_for: now.at.saturating_duration_since(st.last_seen),
                }
            }
            Liveness::Offline => {
                let since = st.offline_since.unwrap_or(now.at);
                let remove_at = since + timing.offline_retention;
                if remove_at > now.at {
                    self.wake_by(slot, &mut st, remove_at);
                    return Outcome::Quiet;
                }
                self.mark_removed(&mut st);
                self.publish(&mut st, EventKind::Deleted);
                // Queued under the node's lock like every write; nobody
                // waits for it (a failure is logged by the store).
                drop(self.shared.store.delete_node(&slot.id));
                drop(st);
                self.unlink(slot);
                Stats::bump(&self.shared.stats.expired);
                Outcome::Removed {
                    node_id: slot.id.clone(),
                }
            }
        }
    }

    /// Makes sure the node is woken at `at` at the latest, replacing its
    /// entry if that one is later. Call under the node's lock.
    pub(super) fn wake_by(&self, slot: &Arc<NodeSlot>, st: &mut NodeState, at: Instant) {
        self.shared
            .schedule
            .wake_by(&mut st.wakeup, at, || slot.clone());
    }
}
