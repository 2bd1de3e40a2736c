//! A follower's copy of the leader's durable records, and the takeover
//! that turns that copy into the leader's registry.
//!
//! Why it looks like this:
//! - A replica that does not lead keeps the same [`Registry`] a leader
//!   does, fed by the store's watch instead of by agents: each durable
//!   change (a node's record, its admin state, an ONLINE↔OFFLINE
//!   transition, a removal) is applied here and published on the change
//!   feed like any other change. So ListNodes, GetNode, WatchNodes and
//!   FindPools work on a follower through the same code, and taking over
//!   needs no reload: the copy is already in memory.
//! - Applying a record never writes to the store (the leader wrote it) and
//!   never decides liveness: on a follower no expiry task runs, and
//!   liveness is whatever the leader last recorded. Pool status and
//!   heartbeat times are not durable, so a follower's view of them is as
//!   old as the registration; the service says so on every answer.
//! - [`Registry::take_over`] is Nomad's failover TTL: the new leader cannot
//!   know how long each node has been silent, so every ONLINE node gets one
//!   node timeout from the takeover (suspect until heard from, its id
//!   reserved for its machine meanwhile), OFFLINE nodes keep their
//!   retention, and pending drains their deadlines.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use registry_proto::pb;
use tokio::time::Instant;

use super::node::{Liveness, NodeSlot, NodeState};
use super::{Now, Registry, admin};
use crate::events::EventKind;
use crate::store::{Loaded, NodeRecord};

/// Why every ONLINE node is suspect right after a takeover.
pub const TAKEOVER_SUSPECT: &str = "registry leader changed; not heard from since";

impl Registry {
    /// A follower applies a node's record written by the leader (register
    /// or re-register): a new node is listed ONLINE (until a liveness record
    /// says otherwise); a known one takes the new registration and session.
    pub fn mirror_put_node(&self, record: NodeRecord, now: Now) {
        let known = self
            .read_nodes()
            .get(record.registration.node_id())
            .cloned();
        if let Some(slot) = known {
            let mut st = slot.lock();
            if !st.removed {
                let before = st.pool_tally();
                st.set_registration(record.registration);
                st.session_id = record.session_id;
                st.secret_sha256 = record.secret_sha256;
                st.registered_at = record.registered_at;
                st.clear_reports();
                st.reported = false;
                self.shared.stats.shift_pools(&before, &st.pool_tally());
                self.publish(&mut st, EventKind::Modified);
                return;
            }
        }
        let mut nodes = self.write_nodes();
        let slot = NodeSlot::new(NodeState::from_record(record, now.at, now.wall));
        let id = slot.id.clone();
        {
            let mut st = slot.lock();
            self.unpark(&mut st);
            self.publish(&mut st, EventKind::Added);
        }
        nodes.insert(id, slot);
        drop(nodes);
        self.shared.population.add(Liveness::Online);
    }

    /// A follower applies the removal of a node's record (deregister, or
    /// removal after retention); its admin state, if any, is kept for its
    /// return like the leader keeps it.
    pub fn mirror_delete_node(&self, node_id: &str) {
        let Some(slot) = self.read_nodes().get(node_id).cloned() else {
            return;
        };
        {
            let mut st = slot.lock();
            if st.removed {
                return;
            }
            self.mark_removed(&mut st);
            self.publish(&mut st, EventKind::Deleted);
        }
        self.unlink(&slot);
    }

    /// A follower applies a node's admin state (cordon, drain) as the
    /// leader stored it; `None` clears it. An unlisted node's state is
    /// kept for its registration.
    pub fn mirror_admin(&self, node_id: &str, admin: Option<pb::AdminState>, now: Now) {
        let admin = admin.unwrap_or(pb::AdminState {
            schedulable: true,
            ..pb::AdminState::default()
        });
        let Some(slot) = self.read_nodes().get(node_id).cloned() else {
            self.forget_parked(node_id);
            if !admin.cordoned && admin.drain.is_none() {
                return;
            }
            self.park_loaded(vec![(node_id.to_owned(), admin)], now);
            return;
        };
        let mut st = slot.lock();
        if st.removed {
            return;
        }
        st.change_unusual(|u| u.drain_deadline_at = admin::drain_deadline_from_wall(&admin, now));
        if self.apply_admin(&mut st, admin) {
            self.publish(&mut st, EventKind::Modified);
        }
    }

    /// A follower applies an ONLINE↔OFFLINE transition the leader recorded
    /// at `since` (wall clock). Unknown nodes are ignored: the next full
    /// relist brings them with their liveness.
    pub fn mirror_liveness(&self, node_id: &str, online: bool, since: DateTime<Utc>, now: Now) {
        let Some(slot) = self.read_nodes().get(node_id).cloned() else {
            return;
        };
        let mut st = slot.lock();
        if st.removed {
            return;
        }
        let to = if online {
            Liveness::Online
        } else {
            Liveness::Offline
        };
        if st.liveness == to {
            return;
        }
        let before = st.pool_tally();
        st.liveness = to;
        st.status_changed_at = since;
        st.change_unusual(|u| u.offline_since = (!online).then(|| instant_of(since, now)));
        self.shared.population.shift(
            if online {
                Liveness::Offline
            } else {
                Liveness::Online
            },
            to,
        );
        self.shared.stats.shift_pools(&before, &st.pool_tally());
        self.publish(&mut st, EventKind::Modified);
    }

    /// A follower replaces its copy with `loaded`, a full read of the
    /// leader's records (the first one, or a relist after the watch lost
    /// history): nodes absent from it are removed, the rest applied.
    /// Readers see only what changed.
    pub fn mirror_reset(&self, loaded: Loaded, now: Now) {
        let listed: BTreeSet<&str> = loaded
            .nodes
            .iter()
            .map(|r| r.registration.node_id())
            .collect();
        let gone: Vec<Arc<str>> = self
            .read_nodes()
            .keys()
            .filter(|id| !listed.contains(&***id))
            .cloned()
            .collect();
        for id in gone {
            self.mirror_delete_node(&id);
        }
        let mut admin: BTreeMap<String, pb::AdminState> = loaded.admin.into_iter().collect();
        for record in loaded.nodes {
            let id = record.registration.node_id().to_owned();
            let unchanged = self.view(&id).is_some_and(|view| {
                view.live().session_id == record.session_id && self.same_record(&id, &record)
            });
            if !unchanged {
                self.mirror_put_node(record, now);
            }
            let state = admin.remove(&id);
            self.mirror_admin(&id, state, now);
        }
        self.clear_all_parked();
        for (node_id, state) in admin {
            self.mirror_admin(&node_id, Some(state), now);
        }
        for (node_id, liveness) in loaded.liveness {
            self.mirror_liveness(&node_id, liveness.online, liveness.since, now);
        }
    }

    /// Makes this registry the leader's at `now`: every ONLINE node gets
    /// one node timeout from now to be heard from (suspect meanwhile, its
    /// id reserved for its machine), OFFLINE nodes are queued for removal
    /// at the end of their retention, pending drains at their deadlines.
    /// Returns how many nodes got the grace. Run the expiry task after it.
    pub fn take_over(&self, now: Now) -> usize {
        let timing = self.shared.timing;
        let reserve_until =
            now.wall + chrono::Duration::from_std(timing.node_timeout).unwrap_or_default();
        let slots: Vec<_> = self.read_nodes().values().cloned().collect();
        let mut graced = 0;
        for slot in &slots {
            let mut st = slot.lock();
            if st.removed {
                continue;
            }
            let deadline = admin::drain_deadline_from_wall(&st.admin, now);
            st.change_unusual(|u| u.drain_deadline_at = deadline);
            if let Some(at) = Self::drain_wakeup(&st) {
                self.wake_by(slot, &mut st, at);
            }
            match st.liveness {
                Liveness::Online => {
                    st.last_seen = now.at;
                    st.change_unusual(|u| u.restart_grace_until = Some(reserve_until));
                    if st.held {
                        st.held = false;
                        self.shared.guard.released();
                    }
                    self.set_suspect(&mut st, TAKEOVER_SUSPECT);
                    self.wake_by(slot, &mut st, now.at + timing.node_timeout);
                    self.publish(&mut st, EventKind::Modified);
                    graced += 1;
                }
                Liveness::Offline => {
                    let since = st.unusual().offline_since.unwrap_or(now.at);
                    self.wake_by(slot, &mut st, since + timing.offline_retention);
                }
            }
        }
        self.shared.guard.reset_window();
        graced
    }

    /// Whether the listed node `id` already holds `record` (same session,
    /// registration and first-registration time).
    fn same_record(&self, id: &str, record: &NodeRecord) -> bool {
        let Some(slot) = self.read_nodes().get(id).cloned() else {
            return false;
        };
        let st = slot.lock();
        !st.removed
            && st.session_id == record.session_id
            && st.secret_sha256 == record.secret_sha256
            && st.registered_at == record.registered_at
            && **st.registration == record.registration
    }
}

/// The monotonic instant of the wall-clock time `wall`, as seen at `now`
/// (never after `now`).
pub(super) fn instant_of(wall: DateTime<Utc>, now: Now) -> Instant {
    let ago = (now.wall - wall).to_std().unwrap_or_default();
    now.at.checked_sub(ago).unwrap_or(now.at)
}
