//! Totals and gauges kept with relaxed atomics, so the hot path pays a few
//! uncontended increments (none on a steady heartbeat) and metrics are
//! published off the hot path by [`crate::metrics::publish`].

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::Liveness;

/// Number of `PoolState` values (UNSPECIFIED included, never counted).
pub const POOL_STATES: usize = 6;
/// Number of `GpuHealth` values (UNSPECIFIED included: GPUs whose agent
/// reports no health).
pub const GPU_HEALTHS: usize = 4;

/// What one node adds to the fleet gauges: its pools by state and its GPUs
/// by health. Taken before and after a change and shifted by the
/// difference, so the gauges never need a scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PoolTally {
    /// Pools by state, indexed by `PoolState as i32`.
    pub(super) pools: [i64; POOL_STATES],
    /// GPUs (those in the latest GPU figures) by health, indexed by
    /// `GpuHealth as i32`.
    pub(super) gpus: [i64; GPU_HEALTHS],
}

/// How many nodes are in each state, for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Nodes currently ONLINE.
    pub online: u64,
    /// Nodes currently OFFLINE (within retention).
    pub offline: u64,
}

/// Running totals and gauges for metrics.
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
    /// GPUs of ONLINE nodes by reported health, indexed by
    /// `GpuHealth as i32`; kept with the pools on the same transitions.
    pub gpus_by_health: [AtomicI64; GPU_HEALTHS],
    /// Listed nodes that are cordoned, kept on every admin change.
    pub cordoned_nodes: AtomicI64,
    /// Listed nodes with a drain requested (drained or not).
    pub draining_nodes: AtomicI64,
}

impl Stats {
    /// Moves the pools-by-state and GPUs-by-health gauges from a node's
    /// `before` tally to its `after` tally; only counts that changed are
    /// written, so a heartbeat repeating the same states touches no gauge.
    pub(super) fn shift_pools(&self, before: &PoolTally, after: &PoolTally) {
        let pools = self
            .pools_by_state
            .iter()
            .zip(&before.pools)
            .zip(&after.pools);
        let gpus = self
            .gpus_by_health
            .iter()
            .zip(&before.gpus)
            .zip(&after.gpus);
        for ((gauge, old), new) in pools.chain(gpus) {
            if old != new {
                gauge.fetch_add(new - old, Ordering::Relaxed);
            }
        }
    }

    /// Moves the cordoned and draining gauges by these amounts.
    pub(super) fn shift_admin(&self, cordoned: i64, draining: i64) {
        if cordoned != 0 {
            self.cordoned_nodes.fetch_add(cordoned, Ordering::Relaxed);
        }
        if draining != 0 {
            self.draining_nodes.fetch_add(draining, Ordering::Relaxed);
        }
    }

    /// Adds one to a total.
    pub(super) fn bump(total: &AtomicU64) {
        total.fetch_add(1, Ordering::Relaxed);
    }
}

/// Nodes by liveness, kept on every transition so metrics need no scan.
#[derive(Debug, Default)]
pub(super) struct Population {
    /// Nodes ONLINE.
    online: AtomicU64,
    /// Nodes OFFLINE and not yet removed.
    offline: AtomicU64,
}

impl Population {
    fn gauge(&self, liveness: Liveness) -> &AtomicU64 {
        match liveness {
            Liveness::Online => &self.online,
            Liveness::Offline => &self.offline,
        }
    }

    /// A node joined with this liveness.
    pub(super) fn add(&self, liveness: Liveness) {
        self.gauge(liveness).fetch_add(1, Ordering::Relaxed);
    }

    /// A node with this liveness was removed.
    pub(super) fn remove(&self, liveness: Liveness) {
        self.gauge(liveness).fetch_sub(1, Ordering::Relaxed);
    }

    /// A node changed from `from` to `to`.
    pub(super) fn shift(&self, from: Liveness, to: Liveness) {
        if from != to {
            self.remove(from);
            self.add(to);
        }
    }

    /// The current figures.
    pub(super) fn counts(&self) -> Counts {
        Counts {
            online: self.online.load(Ordering::Relaxed),
            offline: self.offline.load(Ordering::Relaxed),
        }
    }
}
