//! When the registry doubts itself: the mass-failure guard and stall
//! detection.
//!
//! A registry that stops hearing from most of the fleet at once is more
//! likely cut off (its own stall, its network, a partition) than watching
//! the fleet die, and marking every node OFFLINE would make orchestrators
//! drain a healthy fleet. So:
//!
//! - **Guard.** When a node's deadline passes, the registry counts the nodes
//!   at risk: those that went OFFLINE within the last node timeout plus the
//!   ONLINE nodes *late* now (silent for longer than [`late_after`]: they
//!   missed at least one beat and are on course to go OFFLINE within the
//!   same window). The base is the ONLINE population at the window's start:
//!   ONLINE now plus the window's OFFLINE transitions. If the base is at
//!   least `min_nodes` and more than `threshold` of it is at risk, the
//!   guard trips: no node goes OFFLINE by its deadline for the protection
//!   time; each node whose deadline passes is held ONLINE with `suspect`
//!   set (one MODIFIED event each) and re-queued for the protection's end.
//!   Counting late nodes (a look-ahead) is what keeps the first deadlines
//!   of a mass event from going OFFLINE before the guard trips; the count
//!   comes from a scan of the nodes, made at most once per [`RESCAN_EVERY`]
//!   and only when some node's deadline passes while the guard is idle.
//! - **Protection end.** When nine in ten of the held nodes (at the most)
//!   have heartbeated again, or the protection time ends, normal expiry
//!   resumes: held nodes still silent go OFFLINE at once, logged as
//!   "protection ended, N nodes OFFLINE". A held node's heartbeat clears
//!   its flag (an event) and it stays ONLINE: no flapping.
//! - **Stall.** The expiry loop knows when it asked to wake; waking more than
//!   [`stall_threshold`] later means the process (or its clock) jumped, so
//!   every deadline that passed meanwhile says nothing about the nodes.
//!   [`Registry::grace_all`] then gives every ONLINE node a fresh deadline of
//!   one node timeout, marked suspect until its next heartbeat.
//!
//! Lock order: the guard's mutex is taken under a node's lock (like the
//! schedule and the feed), never the other way round; the scans lock nodes
//! one at a time with the guard unlocked.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::node::Liveness;
use super::stats::Stats;
use super::{Now, Registry, Timing};
use crate::events::EventKind;

/// Scans of the fleet for late nodes happen at most this often while the
/// guard is idle; between them the latest count is used, less the nodes
/// that went OFFLINE since.
pub const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// Protection ends early once at most this share of the held nodes (at the
/// most held at once) is still silent: the rest came back, so the silent
/// few are individual failures.
const EARLY_END_SHARE: f64 = 0.1;

/// How the mass-failure guard is set (`--mass-offline-*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    /// Share of the ONLINE nodes (0..=1) that may go OFFLINE within one node
    /// timeout before the registry suspects itself; 0 or 1 switch the guard
    /// off (0: every single failure would trip it; 1: nothing can exceed it).
    pub threshold: f64,
    /// Fleets with fewer ONLINE nodes than this never trip the guard: in a
    /// fleet of two, one death is already half.
    pub min_nodes: usize,
    /// Longest time the guard holds nodes ONLINE; a real mass failure is
    /// reported this late at most.
    pub protection: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            min_nodes: 10,
            protection: Duration::from_secs(300),
        }
    }
}

impl GuardConfig {
    /// A guard that never trips.
    pub fn off() -> Self {
        Self {
            threshold: 0.0,
            ..Self::default()
        }
    }

    /// Whether the guard can trip at all.
    pub fn enabled(&self) -> bool {
        self.threshold > 0.0 && self.threshold < 1.0
    }
}

/// Silence after which an ONLINE node counts as late (on course to go
/// OFFLINE): half the node timeout, or the heartbeat interval if that is
/// longer, so a healthy node between two beats never counts.
pub fn late_after(timing: &Timing) -> Duration {
    (timing.node_timeout / 2).max(timing.heartbeat_interval)
}

/// How much later than asked the expiry loop may wake before the registry
/// counts it as stalled: a third of the node timeout, at least 1 s (below
/// that, scheduler jitter on a busy host would look like a stall).
pub fn stall_threshold(timing: &Timing) -> Duration {
    (timing.node_timeout / 3).max(Duration::from_secs(1))
}

/// What the guard is doing, for health and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardStatus {
    /// Why the guard holds nodes now; `None` while it is idle.
    pub active: Option<String>,
    /// Nodes held ONLINE by the guard now.
    pub held: u64,
    /// Nodes flagged suspect now, for any reason (guard, stall, restart).
    pub suspect: u64,
}

/// The guard's own totals, for metrics.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Times the guard tripped.
    pub trips: AtomicU64,
    /// Nodes held ONLINE past their deadline by the guard, in all.
    pub held_total: AtomicU64,
    /// Stalls detected by the expiry loop.
    pub stalls: AtomicU64,
    /// Nodes held now (gauge).
    pub held: AtomicU64,
    /// Nodes flagged suspect now, for any reason (gauge).
    pub suspect: AtomicU64,
}

/// One protection period.
#[derive(Debug, Clone)]
struct Protection {
    /// When normal expiry resumes at the latest.
    until: Instant,
    /// What the held nodes are flagged with.
    reason: String,
    /// Most nodes held at once in this period, for the early end.
    peak_held: u64,
}

/// The guard's window and state, behind its mutex.
#[derive(Debug, Default)]
struct Window {
    /// Times of the ONLINE -> OFFLINE transitions in the last node timeout,
    /// oldest first.
    offline: VecDeque<Instant>,
    /// ONLINE nodes late at the latest scan, less those gone OFFLINE since.
    late: usize,
    /// When the latest scan ran; `None` forces one.
    scanned_at: Option<Instant>,
    /// The protection in force, if any.
    protection: Option<Protection>,
}

/// The mass-failure guard of one registry.
#[derive(Debug, Default)]
pub(super) struct Guard {
    /// How it is set.
    pub(super) config: GuardConfig,
    /// Its window and state.
    window: Mutex<Window>,
    /// Totals and gauges for metrics.
    pub(super) stats: GuardStats,
}

/// What a passed deadline of an ONLINE node comes to.
pub(super) enum Verdict {
    /// Mark it OFFLINE.
    Offline,
    /// Hold it ONLINE as suspect with this reason until then.
    Hold {
        /// The flag's reason.
        reason: String,
        /// When to look at it again (the protection's end).
        until: Instant,
        /// Set when this node tripped the guard: the one warning to log.
        tripped: Option<String>,
    },
    /// The late-node count is stale: scan, then decide again.
    Rescan,
}

impl Guard {
    /// A guard set by `config`.
    pub(super) fn new(config: GuardConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        // Plain counters and a queue, never left torn by a panic.
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides for a node whose deadline passed at `now`, with `online` the
    /// ONLINE population (the node included). Call under the node's lock.
    pub(super) fn verdict(&self, now: Instant, online: u64, timing: &Timing) -> Verdict {
        if !self.config.enabled() {
            return Verdict::Offline;
        }
        let mut w = self.lock();
        if let Some(p) = &w.protection {
            return Verdict::Hold {
                reason: p.reason.clone(),
                until: p.until,
                tripped: None,
            };
        }
        if w.scanned_at.is_none_or(|at| now >= at + RESCAN_EVERY) {
            return Verdict::Rescan;
        }
        let window_start = now.checked_sub(timing.node_timeout);
        while w
            .offline
            .front()
            .is_some_and(|&t| window_start.is_some_and(|start| t <= start))
        {
            w.offline.pop_front();
        }
        let gone = w.offline.len() as u64;
        let base = online + gone;
        // The node itself is late; count it even if the scan missed it.
        let at_risk = gone + (w.late as u64).max(1);
        if base < self.config.min_nodes as u64
            || at_risk as f64 <= self.config.threshold * base as f64
        {
            return Verdict::Offline;
        }
        let until = now + self.config.protection;
        let reason = format!(
            "mass-failure guard: {at_risk} of {base} nodes silent within one node timeout; the registry suspects itself (stall, network, partition), not the nodes"
        );
        w.protection = Some(Protection {
            until,
            reason: reason.clone(),
            peak_held: 0,
        });
        Stats::bump(&self.stats.trips);
        Verdict::Hold {
            reason: reason.clone(),
            until,
            tripped: Some(reason),
        }
    }

    /// Records an ONLINE -> OFFLINE transition by deadline at `now`.
    pub(super) fn went_offline(&self, now: Instant) {
        if !self.config.enabled() {
            return;
        }
        let mut w = self.lock();
        w.offline.push_back(now);
        w.late = w.late.saturating_sub(1);
    }

    /// Records that one more node is held.
    pub(super) fn held(&self) {
        let held = self.stats.held.fetch_add(1, Ordering::Relaxed) + 1;
        Stats::bump(&self.stats.held_total);
        if let Some(p) = &mut self.lock().protection {
            p.peak_held = p.peak_held.max(held);
        }
    }

    /// Records that a held node is held no more (it beat, was re-registered,
    /// removed, given a grace or released).
    pub(super) fn released(&self) {
        let _ = self
            .stats
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Stores a fresh late-node count taken at `at`.
    fn scanned(&self, at: Instant, late: usize) {
        let mut w = self.lock();
        w.late = late;
        w.scanned_at = Some(at);
    }

    /// Ends the protection if its time is over at `now` or most held nodes
    /// came back; returns why it ended.
    fn end_due(&self, now: Instant) -> Option<&'static str> {
        let mut w = self.lock();
        let p = w.protection.as_ref()?;
        let held = self.stats.held.load(Ordering::Relaxed);
        let why = if now >= p.until {
            "protection time over"
        } else if p.peak_held > 0 && held as f64 <= EARLY_END_SHARE * p.peak_held as f64 {
            "the held nodes came back"
        } else {
            return None;
        };
        w.protection = None;
        // The released nodes are judged now; the window starts afresh.
        w.offline.clear();
        w.scanned_at = None;
        Some(why)
    }

    /// When the protection ends at the latest, if one is in force.
    fn until(&self) -> Option<Instant> {
        self.lock().protection.as_ref().map(|p| p.until)
    }

    /// Forgets the window (after a stall: what passed meanwhile means
    /// nothing).
    pub(super) fn reset_window(&self) {
        let mut w = self.lock();
        w.offline.clear();
        w.scanned_at = None;
        w.late = 0;
    }

    /// What the guard is doing now.
    pub(super) fn status(&self) -> GuardStatus {
        GuardStatus {
            active: self.lock().protection.as_ref().map(|p| p.reason.clone()),
            held: self.stats.held.load(Ordering::Relaxed),
            suspect: self.stats.suspect.load(Ordering::Relaxed),
        }
    }
}

/// "1 node", "2 nodes".
fn nodes(n: u64) -> String {
    format!("{n} node{}", if n == 1 { "" } else { "s" })
}

impl Registry {
    /// What the mass-failure guard is doing, and how many nodes are suspect.
    pub fn guard_status(&self) -> GuardStatus {
        self.shared.guard.status()
    }

    /// The guard's totals, for metrics.
    pub fn guard_stats(&self) -> &GuardStats {
        &self.shared.guard.stats
    }

    /// Why the registry's liveness judgement is degraded now, if it is:
    /// the guard holds nodes, or nodes are suspect after a stall or
    /// restart. gRPC health stays SERVING either way (the registry works);
    /// this is what the metrics port's `/health` reports.
    pub fn degraded(&self) -> Option<String> {
        let status = self.guard_status();
        if let Some(reason) = status.active {
            return Some(format!(
                "{reason}; {} held ONLINE as suspect",
                nodes(status.held)
            ));
        }
        (status.suspect > 0).then(|| {
            format!(
                "{} suspect: the registry doubts its own view of them until their next heartbeat",
                nodes(status.suspect)
            )
        })
    }

    /// Gives every ONLINE node a fresh deadline of one node timeout from
    /// `now` and flags it suspect with `reason` until its next heartbeat
    /// (one MODIFIED event per node). For a registry that cannot trust the
    /// silence it saw: after a stall (see [`Registry::woke`]) or a restart
    /// from stored state. Returns how many nodes got the grace.
    pub fn grace_all(&self, now: Now, reason: &str) -> usize {
        let slots: Vec<_> = self.read_nodes().values().cloned().collect();
        let mut graced = 0;
        for slot in &slots {
            let mut st = slot.lock();
            if st.removed || st.liveness != Liveness::Online {
                continue;
            }
            st.last_seen = now.at;
            if st.held {
                st.held = false;
                self.shared.guard.released();
            }
            self.set_suspect(&mut st, reason);
            self.wake_by(slot, &mut st, now.at + self.shared.timing.node_timeout);
            self.publish(&mut st, EventKind::Modified);
            graced += 1;
        }
        self.shared.guard.reset_window();
        graced
    }

    /// Called by the expiry loop each time it wakes, with the time it had
    /// asked to wake at (`None`: it slept without a deadline or was woken
    /// early). Waking later than asked by more than [`stall_threshold`]
    /// means the registry was stalled (paused, frozen, starved): every node
    /// gets a fresh grace ([`Registry::grace_all`]). Returns the stall's
    /// length when there was one.
    pub fn woke(&self, asked: Option<Instant>, now: Now) -> Option<Duration> {
        let late = now.at.saturating_duration_since(asked?);
        if late <= stall_threshold(&self.shared.timing) {
            return None;
        }
        let shown = Duration::from_millis(late.as_millis() as u64);
        let reason = format!("registry stalled for {}", humantime::format_duration(shown));
        let graced = self.grace_all(now, &reason);
        Stats::bump(&self.shared.guard.stats.stalls);
        warn!(
            stalled_for = %humantime::format_duration(shown),
            nodes = graced,
            "the registry was stalled (its deadline loop woke far later than asked): every ONLINE node gets a fresh grace of one node timeout instead of going OFFLINE, flagged suspect until its next heartbeat"
        );
        Some(late)
    }

    /// Counts ONLINE nodes late at `now` (not held already) and stores the
    /// count in the guard. Locks the nodes one at a time.
    pub(super) fn scan_late(&self, now: Instant) {
        let late_after = late_after(&self.shared.timing);
        let slots: Vec<_> = self.read_nodes().values().cloned().collect();
        let late = slots
            .iter()
            .filter(|slot| {
                let st = slot.lock();
                !st.removed
                    && !st.held
                    && st.liveness == Liveness::Online
                    && now.saturating_duration_since(st.last_seen) >= late_after
            })
            .count();
        self.shared.guard.scanned(now, late);
    }

    /// Ends the guard's protection if it is due at `now`: held nodes still
    /// silent go OFFLINE at once. Returns when the protection ends at the
    /// latest, if one is still in force.
    pub(super) fn end_protection_if_due(&self, now: Now) -> Option<Instant> {
        let Some(why) = self.shared.guard.end_due(now.at) else {
            return self.shared.guard.until();
        };
        let timeout = self.shared.timing.node_timeout;
        let slots: Vec<_> = self.read_nodes().values().cloned().collect();
        let (mut offline, mut cleared) = (0usize, 0usize);
        for slot in &slots {
            let mut st = slot.lock();
            if st.removed || !st.held {
                continue;
            }
            st.held = false;
            self.shared.guard.released();
            if st.last_seen + timeout <= now.at {
                self.go_offline(slot, &mut st, now, now.at);
                offline += 1;
            } else {
                self.clear_suspect(&mut st);
                let deadline = st.last_seen + timeout;
                self.wake_by(slot, &mut st, deadline);
                self.publish(&mut st, EventKind::Modified);
                cleared += 1;
            }
        }
        warn!(
            why,
            offline,
            cleared,
            "mass-failure guard: protection ended, {offline} nodes OFFLINE; normal expiry resumes"
        );
        None
    }

    /// Flags the node suspect with `reason`, keeping the gauge. Call under
    /// the node's lock; the caller publishes.
    pub(super) fn set_suspect(&self, st: &mut super::node::NodeState, reason: &str) {
        if st.unusual().suspect.is_none() {
            self.shared
                .guard
                .stats
                .suspect
                .fetch_add(1, Ordering::Relaxed);
        }
        st.change_unusual(|u| u.suspect = Some(reason.into()));
    }

    /// Clears the node's suspect flag (and the guard's hold); returns
    /// whether it was set. Call under the node's lock; the caller publishes.
    pub(super) fn clear_suspect(&self, st: &mut super::node::NodeState) -> bool {
        if st.held {
            st.held = false;
            self.shared.guard.released();
        }
        if st.change_unusual(|u| u.suspect.take()).is_none() {
            return false;
        }
        let _ = self.shared.guard.stats.suspect.fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |n| n.checked_sub(1),
        );
        true
    }
}
