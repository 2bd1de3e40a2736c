//! The deadline rules: when a node must next be looked at, and what happens
//! then (ONLINE -> OFFLINE at `last_seen + node_timeout`, removal at
//! `offline_since + offline_retention`, and a requested drain counting as
//! drained at its deadline).
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
//!
//! A passed deadline is first put to the mass-failure guard (see `guard`),
//! which may hold the node ONLINE as suspect instead.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::warn;

use super::guard::Verdict;
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
    /// The mass-failure guard held the node ONLINE as suspect; when this
    /// node tripped it, the reason to warn about once.
    Held {
        /// The guard's reason, only for the node that tripped it.
        tripped: Option<String>,
    },
    /// The guard's count of late nodes is stale; scan, then look again.
    Rescan,
    /// The node was removed after its retention.
    Removed {
        /// The node's id.
        node_id: Arc<str>,
    },
}

impl Registry {
    /// Handles every wake-up due at `now`: marks nodes whose deadline passed
    /// OFFLINE (or holds them, while the mass-failure guard protects the
    /// fleet), ends a protection that is due, and removes nodes whose
    /// retention ended. Returns when the next wake-up is due.
    ///
    /// [`crate::expiry::run`] is its caller in a server; it is public so
    /// tests and the fuzz targets can drive the deadlines synchronously,
    /// at times they choose, without a runtime.
    pub fn process_due(&self, now: Now) -> Option<Instant> {
        let protection = self.end_protection_if_due(now);
        let next = loop {
            match self.shared.schedule.pop_due(now.at) {
                Due::Now(key, slot) => match self.process_wakeup(key, &slot, now) {
                    Outcome::Quiet => {}
                    Outcome::WentOffline {
                        node_id,
                        silent_for,
                    } => super::lines::budgeted!(
                        self.shared.lines.offline,
                        warn,
                        "node offline: no heartbeat within the node timeout",
                        node_id = %node_id,
                        silent_for = %humantime::format_duration(silent_for)
                    ),
                    Outcome::Held { tripped: None } => {}
                    Outcome::Held {
                        tripped: Some(reason),
                    } => warn!(
                        protection = %humantime::format_duration(self.shared.guard.config.protection),
                        "{reason}: holding nodes ONLINE as suspect instead of marking them OFFLINE"
                    ),
                    Outcome::Rescan => self.scan_late(now.at),
                    Outcome::Removed { node_id } => {
                        super::lines::budgeted!(
                            self.shared.lines.removed,
                            info,
                            "offline node removed after retention",
                            node_id = %node_id
                        );
                    }
                },
                Due::At(at) => break Some(at),
                Due::Idle => break None,
            }
        };
        // While a protection is in force the loop also looks every
        // RESCAN_EVERY whether the held nodes came back (their own entries
        // wait for the protection's end).
        let check = protection.map(|until| until.min(now.at + super::guard::RESCAN_EVERY));
        match (next, check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
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
        // A drain past its deadline is drained, silent node or not. Its
        // event is published here unless the liveness change below
        // publishes one anyway.
        let drained = self.drain_deadline_due(&mut st, now);
        let timing = self.shared.timing;
        match st.liveness {
            Liveness::Online => {
                let deadline = st.last_seen + timing.node_timeout;
                if deadline > now.at {
                    self.wake_by(slot, &mut st, deadline);
                    self.wake_for_drain(slot, &mut st, drained);
                    return Outcome::Quiet;
                }
                let online = self.shared.population.counts().online;
                match self.shared.guard.verdict(now.at, online, &timing) {
                    Verdict::Offline => {
                        self.go_offline(slot, &mut st, now, deadline);
                        self.shared.guard.went_offline(now.at);
                        Outcome::WentOffline {
                            node_id: slot.id.clone(),
                            silent_for: now.at.saturating_duration_since(st.last_seen),
                        }
                    }
                    Verdict::Hold {
                        reason,
                        until,
                        tripped,
                    } => {
                        self.wake_by(slot, &mut st, until);
                        let newly_held = !st.held;
                        if newly_held {
                            st.held = true;
                            self.shared.guard.held();
                            self.set_suspect(&mut st, &reason);
                            self.publish(&mut st, EventKind::Modified);
                        }
                        self.wake_for_drain(slot, &mut st, drained && !newly_held);
                        Outcome::Held { tripped }
                    }
                    Verdict::Rescan => {
                        // Looked at again right after the scan.
                        self.wake_by(slot, &mut st, now.at);
                        self.wake_for_drain(slot, &mut st, drained);
                        Outcome::Rescan
                    }
                }
            }
            Liveness::Offline => {
                let since = st.unusual().offline_since.unwrap_or(now.at);
                let remove_at = since + timing.offline_retention;
                if remove_at > now.at {
                    self.wake_by(slot, &mut st, remove_at);
                    self.wake_for_drain(slot, &mut st, drained);
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

    /// After a wake-up that did not remove the node: publishes the drain
    /// that just counted as drained (when `publish`), and queues the
    /// drain's deadline if it is earlier than the node's next wake-up.
    fn wake_for_drain(&self, slot: &Arc<NodeSlot>, st: &mut NodeState, publish: bool) {
        if publish {
            self.publish(st, EventKind::Modified);
        }
        if let Some(at) = Self::drain_wakeup(st) {
            self.wake_by(slot, st, at);
        }
    }

    /// Marks an ONLINE node OFFLINE as of `since` (its deadline, or the
    /// moment the guard released it), clearing any suspect flag, and queues
    /// its removal after the retention. Call under the node's lock.
    pub(super) fn go_offline(
        &self,
        slot: &Arc<NodeSlot>,
        st: &mut NodeState,
        now: Now,
        since: Instant,
    ) {
        let before = st.pool_tally();
        // A loaded node silent through the restart grace is no longer
        // reserved for its machine, nor suspect.
        // The OFFLINE time is set in the same change as the reservation is
        // cleared, so a node's unusual fields are not dropped and made
        // again in between.
        st.change_unusual(|u| {
            u.restart_grace_until = None;
            u.offline_since = Some(since);
        });
        self.clear_suspect(st);
        st.liveness = Liveness::Offline;
        st.status_changed_at = now.wall;
        drop(self.shared.store.put_liveness(
            st.registration.node_id(),
            crate::store::LivenessRecord {
                online: false,
                since: now.wall,
            },
        ));
        self.shared.stats.shift_pools(&before, &st.pool_tally());
        self.shared
            .population
            .shift(Liveness::Online, Liveness::Offline);
        Stats::bump(&self.shared.stats.offline_transitions);
        self.wake_by(slot, st, since + self.shared.timing.offline_retention);
        // The OFFLINE event also carries a drain that just counted as
        // drained; a later drain deadline stays queued.
        self.publish(st, EventKind::Modified);
        self.wake_for_drain(slot, st, false);
    }

    /// Makes sure the node is woken at `at` at the latest, replacing its
    /// entry if that one is later. Call under the node's lock.
    pub(super) fn wake_by(&self, slot: &Arc<NodeSlot>, st: &mut NodeState, at: Instant) {
        self.shared
            .schedule
            .wake_by(&mut st.wakeup, at, || slot.clone());
    }
}
