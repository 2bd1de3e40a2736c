//! A self-check of the registry's bookkeeping against its nodes, for the
//! property tests and the fuzz targets (`fuzz/`): both drive the registry
//! through arbitrary operations and call [`Registry::check_consistency`]
//! after each, so the invariants are stated once, here, next to the state
//! they describe.
//!
//! It takes the map's read lock and every node's lock in turn (O(n)); it is
//! not meant for a serving registry's hot paths.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use registry_proto::pb;

use super::Registry;
use super::node::Liveness;
use super::stats::Counts;

impl Registry {
    /// Checks what must hold between operations (no call in flight):
    ///
    /// - every listed node is live in the map (not marked removed), under
    ///   its own id, with exactly one queued wake-up, and the schedule holds
    ///   no other entries;
    /// - that wake-up is no later than the node's next rule: an ONLINE node
    ///   not held by the guard at `last_seen + node_timeout` (its exact
    ///   deadline), an OFFLINE one at `offline_since + offline_retention`,
    ///   and a pending drain at its deadline;
    /// - OFFLINE nodes, and only they, have an `offline_since`;
    /// - the published view agrees with the state (id, status, session,
    ///   admin state) and its revision is not ahead of the feed's;
    /// - the liveness counts and the cordoned and draining gauges equal
    ///   what the nodes say.
    ///
    /// Returns the first broken invariant, naming the node.
    pub fn check_consistency(&self) -> Result<(), String> {
        let timing = self.shared.timing;
        let revision = self.revision();
        let nodes = self.read_nodes();
        let mut counted = Counts::default();
        let (mut cordoned, mut draining) = (0i64, 0i64);
        for (id, slot) in nodes.iter() {
            let st = slot.lock();
            let fail = |what: String| Err(format!("node {id}: {what}"));
            if st.removed {
                return fail("marked removed but still in the map".into());
            }
            if **id != *slot.id || st.registration.node_id() != &**id {
                return fail(format!(
                    "listed under another id (slot {}, registration {})",
                    slot.id,
                    st.registration.node_id()
                ));
            }
            let Some(wakeup) = st.wakeup else {
                return fail("no wake-up queued".into());
            };
            let wakeup_at = self.shared.schedule.due_at(&wakeup);
            match st.liveness {
                Liveness::Online => {
                    counted.online += 1;
                    if st.unusual().offline_since.is_some() {
                        return fail("ONLINE with an offline_since".into());
                    }
                    let deadline = st.last_seen + timing.node_timeout;
                    if !st.held && wakeup_at > deadline {
                        return fail(format!(
                            "woken {:?} after its deadline",
                            wakeup_at - deadline
                        ));
                    }
                }
                Liveness::Offline => {
                    counted.offline += 1;
                    let Some(since) = st.unusual().offline_since else {
                        return fail("OFFLINE without an offline_since".into());
                    };
                    let removal = since + timing.offline_retention;
                    if wakeup_at > removal {
                        return fail(format!(
                            "woken {:?} after its removal is due",
                            wakeup_at - removal
                        ));
                    }
                }
            }
            let drain_pending = st.admin.drain.as_ref().is_some_and(|d| !d.drained);
            if let Some(at) = st.unusual().drain_deadline_at.filter(|_| drain_pending)
                && wakeup_at > at
            {
                return fail(format!(
                    "woken {:?} after its drain deadline",
                    wakeup_at - at
                ));
            }
            cordoned += i64::from(st.admin.cordoned);
            draining += i64::from(st.admin.drain.is_some());
            let status = st.liveness.to_proto();
            if !Arc::ptr_eq(st.view.registered(), &st.registration) {
                return fail("published view shows another registration than the state's".into());
            }
            let view = st.view.live();
            if st.view.node_id() != &**id
                || view.status() != status
                || view.session_id != st.session_id
                || st.view.admin() != Some(&*st.admin)
            {
                return fail(format!(
                    "published view ({}, {:?}, session {}, admin {:?}) disagrees with the state \
                     ({status:?}, session {}, admin {:?})",
                    st.view.node_id(),
                    view.status(),
                    view.session_id,
                    st.view.admin(),
                    st.session_id,
                    st.admin,
                ));
            }
            if view.revision > revision {
                return fail(format!(
                    "view at revision {} is ahead of the feed's {revision}",
                    view.revision
                ));
            }
            if view.status() == pb::NodeStatus::Unspecified {
                return fail("published without a status".into());
            }
        }
        let scheduled = self.shared.schedule.len();
        let listed = nodes.len();
        drop(nodes);
        if scheduled != listed {
            return Err(format!(
                "{scheduled} wake-ups queued for {listed} listed nodes"
            ));
        }
        let counts = self.counts();
        if counts != counted {
            return Err(format!("counts {counts:?} but the nodes say {counted:?}"));
        }
        let stats = &self.shared.stats;
        let gauges = (
            stats.cordoned_nodes.load(Ordering::Relaxed),
            stats.draining_nodes.load(Ordering::Relaxed),
        );
        if gauges != (cordoned, draining) {
            return Err(format!(
                "cordoned/draining gauges {gauges:?} but the nodes say {:?}",
                (cordoned, draining)
            ));
        }
        Ok(())
    }
}
