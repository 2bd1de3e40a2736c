//! A node's read view: what GetNode, ListNodes, the watch feed and the
//! placement index see of a node at one revision.
//!
//! A view is two parts. The fields a registration sets (ids, address,
//! pools, GPUs, labels: ~2 KiB on the heap at 8 GPUs and 2 pools) are the
//! node's [`Registered`], one `Arc` shared by the node's state, every view
//! of that registration and the watch history's entries of those views. The rest (liveness, pool
//! status, GPU health, admin state, timestamps, revision) is built per
//! change. So a heartbeat that moves a pool's free slots builds and later
//! drops only the small part, and the registration is held once per node,
//! not once more in its view; readers that need the whole contract message
//! put it together ([`NodeView::to_proto`]), as they copied it before.

use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use registry_proto::pb;

use crate::figures::GpuFigures;
use crate::pool_reports::{PoolReading, PoolReports, Readings};
use crate::registry::Registration;

/// A node's registration as the registry holds it, shared by the node and
/// its views.
#[derive(Debug)]
pub struct Registered {
    /// The validated registration.
    registration: Registration,
}

impl Registered {
    /// Shares `registration`.
    pub fn new(registration: Registration) -> Arc<Self> {
        Arc::new(Self { registration })
    }

    /// Writes the registration's fields into `node`.
    fn put_into(&self, node: &mut pb::Node) {
        self.registration.put_into(node);
    }
}

impl Deref for Registered {
    type Target = Registration;

    fn deref(&self) -> &Registration {
        &self.registration
    }
}

/// A node's view at one revision: its shared registration and the fields
/// of this change.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// The registration the view shows, shared.
    registered: Arc<Registered>,
    /// The fields no registration sets except the pool status, the GPU
    /// figures and the admin state, in a message of their own (~150
    /// bytes, against ~680 for a whole `pb::Node` with the registration's
    /// fields left empty).
    live: Live,
    /// Pool status from the latest heartbeat, its names read from the
    /// registration's pool specs where they are the same (built against
    /// `registered`, and read only with it).
    pools: PoolReports,
    /// GPU figures from the latest heartbeat that carried any, encoded
    /// (shared with the node's state until its next beat).
    gpus: GpuFigures,
    /// What operators asked of the node, shared with the node's state and
    /// its other views until an operator changes it (a view of a node
    /// nobody cordoned holds the registry-wide default, allocating nothing).
    admin: Option<Arc<pb::AdminState>>,
}

/// The fields of a node's view that no registration sets, except the pool
/// status, the GPU figures and `admin`, numbered as the contract's `Node`
/// numbers them: their encoding is a `Node` with the registration's fields
/// (and those three) left out, so the watch history keeps and decodes it as
/// one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Live {
    /// ONLINE or OFFLINE (`Node.status`).
    #[prost(enumeration = "pb::NodeStatus", tag = "8")]
    pub status: i32,
    /// First registration (`Node.registered_at`).
    #[prost(message, optional, tag = "9")]
    pub registered_at: Option<prost_types::Timestamp>,
    /// Latest sign of life when the view was published.
    #[prost(message, optional, tag = "10")]
    pub last_heartbeat_at: Option<prost_types::Timestamp>,
    /// The current session.
    #[prost(uint64, tag = "13")]
    pub session_id: u64,
    /// Latest liveness change.
    #[prost(message, optional, tag = "14")]
    pub status_changed_at: Option<prost_types::Timestamp>,
    /// The agent's clock in its latest heartbeat.
    #[prost(message, optional, tag = "15")]
    pub agent_time: Option<prost_types::Timestamp>,
    /// The change this view was published at (0 before).
    #[prost(uint64, tag = "17")]
    pub revision: u64,
    /// Held ONLINE past its deadline because the registry doubts itself.
    #[prost(bool, tag = "20")]
    pub suspect: bool,
    /// Why the node is suspect (empty when it is not).
    #[prost(string, tag = "21")]
    pub suspect_reason: String,
}

/// The contract's tag of `Node.admin`, a live field kept apart from
/// [`Live`].
const ADMIN_TAG: u32 = 19;

impl NodeView {
    /// The view of `registered` with `live`'s fields, `pools` (built
    /// against `registered`), `gpus` and `admin`.
    pub fn new(
        registered: Arc<Registered>,
        live: Live,
        pools: PoolReports,
        gpus: GpuFigures,
        admin: Option<Arc<pb::AdminState>>,
    ) -> Self {
        Self {
            registered,
            live,
            pools,
            gpus,
            admin,
        }
    }

    /// The view of `registered` with the fields of `node` that no
    /// registration sets (moved, not copied). `node` must leave every
    /// registration field empty: they are taken from `registered`.
    pub fn with_fields(registered: Arc<Registered>, node: pb::Node) -> Self {
        let pb::Node {
            node_id,
            machine_id,
            address,
            pools,
            capabilities,
            agent_version,
            labels,
            status,
            registered_at,
            last_heartbeat_at,
            pool_status,
            gpu_stats,
            session_id,
            status_changed_at,
            agent_time,
            metrics_address,
            revision,
            models_available,
            admin,
            suspect,
            suspect_reason,
        } = node;
        debug_assert!(
            node_id.is_empty()
                && machine_id.is_empty()
                && address.is_empty()
                && pools.is_empty()
                && capabilities.is_none()
                && agent_version.is_empty()
                && labels.is_empty()
                && metrics_address.is_empty()
                && models_available.is_empty(),
            "a view's own part sets a registration field"
        );
        let live = Live {
            status,
            registered_at,
            last_heartbeat_at,
            session_id,
            status_changed_at,
            agent_time,
            revision,
            suspect,
            suspect_reason,
        };
        let pools = PoolReports::new(&pool_status, &registered.pools);
        let gpus = GpuFigures::new(&gpu_stats);
        Self::new(registered, live, pools, gpus, admin.map(Arc::new))
    }

    /// The registration the view shows.
    pub fn registration(&self) -> &Registration {
        &self.registered
    }

    /// The shared registration, to compare identity or reuse.
    pub fn registered(&self) -> &Arc<Registered> {
        &self.registered
    }

    /// The fields no registration sets, but the pool status, the GPU
    /// figures and the admin state.
    pub fn live(&self) -> &Live {
        &self.live
    }

    /// Pool status from the latest heartbeat, in the reported order.
    pub fn pool_status(&self) -> Readings<'_> {
        self.pools.iter(&self.registered.pools)
    }

    /// The `index`-th pool of the latest heartbeat.
    pub fn pool_report(&self, index: usize) -> Option<PoolReading<'_>> {
        self.pools.get(index, &self.registered.pools)
    }

    /// The pool status as kept, to carry into the node's next view.
    pub fn pool_reports(&self) -> &PoolReports {
        &self.pools
    }

    /// GPU figures from the latest heartbeat that carried any.
    pub fn gpus(&self) -> &GpuFigures {
        &self.gpus
    }

    /// What operators asked of the node (`None` only before the node's
    /// first publish).
    pub fn admin(&self) -> Option<&pb::AdminState> {
        self.admin.as_deref()
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        self.registered.node_id()
    }

    /// The revision of the change this view was published at (0 before).
    pub fn revision(&self) -> u64 {
        self.live.revision
    }

    /// Stamps the revision the feed publishes the view at.
    pub(crate) fn set_revision(&mut self, revision: u64) {
        self.live.revision = revision;
    }

    /// The node's liveness as the contract reports it.
    pub fn status(&self) -> pb::NodeStatus {
        self.live.status()
    }

    /// The whole contract message (a deep copy), for a reader's response.
    pub fn to_proto(&self) -> pb::Node {
        self.to_proto_with(&self.gpus)
    }

    /// [`NodeView::to_proto`] showing `gpus` instead of the view's GPU
    /// figures (newer ones the node holds apart), each decoded once.
    pub fn to_proto_with(&self, gpus: &GpuFigures) -> pb::Node {
        let Live {
            status,
            registered_at,
            last_heartbeat_at,
            session_id,
            status_changed_at,
            agent_time,
            revision,
            suspect,
            suspect_reason,
        } = &self.live;
        let mut node = pb::Node {
            status: *status,
            registered_at: *registered_at,
            last_heartbeat_at: *last_heartbeat_at,
            pool_status: self.pools.to_proto(&self.registered.pools),
            gpu_stats: gpus.to_proto(),
            session_id: *session_id,
            status_changed_at: *status_changed_at,
            agent_time: *agent_time,
            revision: *revision,
            admin: self.admin.as_deref().cloned(),
            suspect: *suspect,
            suspect_reason: suspect_reason.clone(),
            ..pb::Node::default()
        };
        self.registered.put_into(&mut node);
        node
    }

    /// Splits a whole contract message into a view with a registration of
    /// its own (tests, which describe nodes as whole messages).
    #[cfg(test)]
    pub fn from_proto(node: pb::Node) -> Self {
        let live = live_fields(&node);
        let registered = Registered::new(Registration::from(crate::registry::NewRegistration {
            node_id: node.node_id,
            machine_id: node.machine_id,
            address: node.address,
            pools: node.pools.into(),
            capabilities: node.capabilities.unwrap_or_default().into(),
            agent_version: node.agent_version,
            metrics_address: node.metrics_address,
            models_available: node.models_available,
            labels: node.labels.into(),
        }));
        Self::with_fields(registered, live)
    }

    /// The view's own fields, encoded as a `Node` without the
    /// registration's: what the watch history keeps of an older view
    /// besides its shared registration (~0.4 KiB at 8 GPUs and 2 pools,
    /// against ~1 KiB on the heap as a message).
    pub fn encode_live(&self) -> Bytes {
        let admin_len = self.admin.as_deref().map_or(0, |admin| {
            prost::encoding::message::encoded_len(ADMIN_TAG, admin)
        });
        let gpus = self.gpus.encoded();
        let specs = &self.registered.pools;
        let pools_len = self.pools.encoded_len(specs);
        let mut buf =
            Vec::with_capacity(self.live.encoded_len() + pools_len + gpus.len() + admin_len);
        // Tags may come in any order; the pool status, the figures and the
        // admin state are written last, the figures as they are kept.
        self.live.encode_raw(&mut buf);
        self.pools.encode(specs, &mut buf);
        buf.extend_from_slice(gpus);
        if let Some(admin) = self.admin.as_deref() {
            prost::encoding::message::encode(ADMIN_TAG, admin, &mut buf);
        }
        Bytes::from(buf)
    }

    /// The view that [`NodeView::encode_live`] encoded `live` from, showing
    /// `registered`.
    pub fn decode(registered: Arc<Registered>, live: Bytes) -> Result<Self, prost::DecodeError> {
        Ok(Self::with_fields(registered, pb::Node::decode(live)?))
    }
}

/// A copy of the fields of `node` that no registration sets, the others
/// left empty.
#[cfg(test)]
fn live_fields(node: &pb::Node) -> pb::Node {
    let pb::Node {
        node_id: _,
        machine_id: _,
        address: _,
        pools: _,
        capabilities: _,
        agent_version: _,
        labels: _,
        status,
        registered_at,
        last_heartbeat_at,
        pool_status,
        gpu_stats,
        session_id,
        status_changed_at,
        agent_time,
        metrics_address: _,
        revision,
        models_available: _,
        admin,
        suspect,
        suspect_reason,
    } = node;
    pb::Node {
        status: *status,
        registered_at: *registered_at,
        last_heartbeat_at: *last_heartbeat_at,
        pool_status: pool_status.clone(),
        gpu_stats: gpu_stats.clone(),
        session_id: *session_id,
        status_changed_at: *status_changed_at,
        agent_time: *agent_time,
        revision: *revision,
        admin: admin.clone(),
        suspect: *suspect,
        suspect_reason: suspect_reason.clone(),
        ..pb::Node::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every node holds its latest view in an `Arc` (two counts of 8
    /// bytes), and the history holds replaced ones for a while: within
    /// the allocator's 224-byte class, where GPU figures as `Bytes` put it
    /// in the 256-byte one.
    #[test]
    fn a_shared_view_fits_the_224_byte_class() {
        let arc_counts = 2 * std::mem::size_of::<usize>();
        let view = std::mem::size_of::<NodeView>() + arc_counts;
        assert!(view <= 224, "a shared view takes {view} bytes");
    }

    /// A view with every field set, none to its default.
    fn whole() -> pb::Node {
        let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 7 });
        pb::Node {
            node_id: "n1".into(),
            machine_id: "m1".into(),
            address: "http://n1:9000".into(),
            pools: vec![pb::PoolSpec {
                pool_id: "p0".into(),
                model: "llama".into(),
                gpu_indices: vec![0, 1],
                ..Default::default()
            }],
            capabilities: Some(pb::Capabilities {
                gpus: vec![pb::GpuInfo {
                    uuid: "GPU-1".into(),
                    name: "H100".into(),
                    ..Default::default()
                }],
                cpu_cores: 96,
                ..Default::default()
            }),
            agent_version: "0.1".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            status: pb::NodeStatus::Offline as i32,
            registered_at: at(1),
            last_heartbeat_at: at(2),
            pool_status: vec![pb::PoolStatus {
                pool_id: "p0".into(),
                slots_free: 3,
                ..Default::default()
            }],
            gpu_stats: vec![pb::GpuStats {
                index: 1,
                health_reasons: vec!["xid 79".into()],
                ..Default::default()
            }],
            session_id: 42,
            status_changed_at: at(3),
            agent_time: at(4),
            metrics_address: "http://n1:9101/metrics".into(),
            revision: 12,
            models_available: vec!["mistral".into()],
            admin: Some(pb::AdminState {
                schedulable: false,
                ..Default::default()
            }),
            suspect: true,
            suspect_reason: "registry stalled".into(),
        }
    }

    #[test]
    fn a_split_view_puts_the_whole_message_back_together() {
        let view = NodeView::from_proto(whole());
        assert_eq!(view.to_proto(), whole());
        assert_eq!(view.node_id(), "n1");
        assert_eq!(view.revision(), 12);
        assert_eq!(view.admin().map(|a| a.schedulable), Some(false));
    }

    #[test]
    fn views_of_one_admin_state_share_it() {
        let view = NodeView::from_proto(whole());
        let again = view.clone();
        assert!(std::ptr::eq(view.admin().unwrap(), again.admin().unwrap()));
        // Without an admin state (before a node's first publish) none is
        // made up, and none is encoded.
        let mut node = whole();
        node.admin = None;
        let view = NodeView::from_proto(node.clone());
        assert!(view.admin().is_none());
        let part = pb::Node::decode(view.encode_live()).unwrap();
        assert_eq!(part, live_fields(&node));
    }

    #[test]
    fn a_view_kept_as_its_registration_and_encoded_part_decodes_to_itself() {
        let view = NodeView::from_proto(whole());
        let live = view.encode_live();
        // The encoded part holds only the view's own fields.
        let part = pb::Node::decode(live.clone()).unwrap();
        assert_eq!(part, live_fields(&whole()));
        assert!(part.node_id.is_empty() && part.pools.is_empty() && part.capabilities.is_none());
        let back = NodeView::decode(view.registered().clone(), live).unwrap();
        assert!(Arc::ptr_eq(back.registered(), view.registered()));
        assert_eq!(back.to_proto(), whole());
    }

    #[test]
    fn an_undecodable_part_is_an_error() {
        let view = NodeView::from_proto(whole());
        let broken = Bytes::from_static(&[0x42, 0xff]);
        assert!(NodeView::decode(view.registered().clone(), broken).is_err());
    }
}
