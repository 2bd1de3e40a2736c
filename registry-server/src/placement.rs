//! Placement (CLOUD-6001–6003, 6013, 6023) and model availability
//! (CLOUD-5010/5011/5021): a model → pools index kept up to date from the
//! registry's change feed, answering FindPools and ListModels without
//! scanning the fleet.
//!
//! The index knows nothing of the registry's internals: it is fed
//! [`Event`]s (one per change a reader can see, in revision order) and
//! reads only the node's read view in them. `apply` costs O(pools of the
//! node); `find` costs O(pools serving the asked model), under a std
//! `RwLock` read that is never held across an `.await`.
//!
//! A pool is offered when, in this order (the order the no-candidate
//! reason follows, see [`Filter`]):
//! it serves the model; it is on the pinned node, if any; its node is not
//! excluded; it runs the asked engine; its node carries the asked labels;
//! its GPUs match the asked name and minimum compute capability; its node
//! is ONLINE and [`schedulable`]; its status has been reported (a node
//! registered but not yet heartbeating is never offered); it is READY; it
//! has `min_slots_free` free slots (default 1) and `min_vram_free_bytes`.
//! Static filters come first so that the reason names what the caller
//! asked for ("none is on a node with labels zone=a") before what changes
//! by the second ("none is READY").
//!
//! The score (CLOUD-6003): most free VRAM, then most free slots, then
//! `(node_id, pool_id)` ascending, so equal pools are always ranked alike.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use registry_proto::pb;
use registry_proto::rules::{self, Field};

use crate::events::{Event, EventKind};

/// Candidates returned when the request asks for none in particular.
pub const DEFAULT_LIMIT: usize = 1;
/// Most candidates one FindPools returns; more is INVALID_ARGUMENT.
pub const MAX_LIMIT: usize = 100;
/// Free slots a pool needs when the request does not say.
pub const DEFAULT_MIN_SLOTS_FREE: u32 = 1;
/// Most node ids one request may exclude, so a request stays small.
pub const MAX_EXCLUDED: usize = 1000;

/// Whether the node takes new work at all, apart from its liveness and its
/// pools' states. True today: nothing in the contract marks a node as
/// closed to new work yet. The drain issue adds cordoned and draining
/// state to `pb::Node` (e.g. `Node.cordoned`, `Node.draining`); this is the
/// one place that must then answer false for such a node, and the
/// [`Filter::Schedulable`] reason then fires.
pub fn schedulable(_node: &pb::Node) -> bool {
    true
}

/// The filters in the order they narrow the set; the first that leaves no
/// pool is named in the NOT_FOUND (or, for a pinned node,
/// FAILED_PRECONDITION) answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Filter {
    /// No pool serves the model at all.
    Model,
    /// None of the model's pools is on the pinned node.
    PinnedNode,
    /// All of the model's pools are on excluded nodes.
    Excluded,
    /// None runs the asked engine.
    Engine,
    /// None is on a node with the asked labels.
    Labels,
    /// None runs on GPUs with the asked name.
    GpuName,
    /// None runs on GPUs with the asked compute capability.
    ComputeCapability,
    /// None is on an ONLINE node.
    Online,
    /// None is on a node that takes new work (see [`schedulable`]).
    Schedulable,
    /// None has reported its status yet (no heartbeat since registration).
    Reported,
    /// None is READY.
    Ready,
    /// None READY has the asked free slots.
    SlotsFree,
    /// None READY with free slots has the asked free VRAM.
    VramFree,
}

/// A FindPools request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementQuery {
    /// The model to serve; the index is keyed by it.
    pub model: String,
    /// Only pools of this engine.
    pub engine: Option<String>,
    /// Free slots a pool needs (default 1; 0 also offers full pools).
    pub min_slots_free: u32,
    /// Free VRAM a pool needs, in bytes.
    pub min_vram_free_bytes: u64,
    /// Labels the node must carry with equal values.
    pub labels: BTreeMap<String, String>,
    /// Text every GPU name of the pool must contain, ignoring case (kept
    /// lowercased for the comparison).
    pub gpu_name: Option<String>,
    /// Compute capability every GPU of the pool must reach, as
    /// (major, minor), compared numerically ("8.10" > "8.9").
    pub min_compute_capability: Option<(u32, u32)>,
    /// Only pools of this node.
    pub node_id: Option<String>,
    /// Never pools of these nodes.
    pub exclude: HashSet<String>,
    /// How many candidates to return, 1 to [`MAX_LIMIT`].
    pub limit: usize,
}

impl PlacementQuery {
    /// A query for `model` with every other filter at its default.
    pub fn for_model(model: impl Into<String>) -> Self {
        PlacementQuery {
            model: model.into(),
            engine: None,
            min_slots_free: DEFAULT_MIN_SLOTS_FREE,
            min_vram_free_bytes: 0,
            labels: BTreeMap::new(),
            gpu_name: None,
            min_compute_capability: None,
            node_id: None,
            exclude: HashSet::new(),
            limit: DEFAULT_LIMIT,
        }
    }

    /// Checks a FindPoolsRequest with the contract's rules; every error
    /// names the request's field.
    pub fn from_request(req: pb::FindPoolsRequest) -> Result<Self, PlacementError> {
        rules::required(Field::Name("model"), &req.model, rules::MAX_TEXT_LEN)?;
        rules::text(Field::Name("model"), &req.model)?;
        rules::text(Field::Name("engine"), &req.engine)?;
        rules::labels("labels", &req.labels)?;
        rules::text(Field::Name("gpu_name"), &req.gpu_name)?;
        rules::compute_capability(
            Field::Name("min_compute_capability"),
            &req.min_compute_capability,
        )?;
        if !req.node_id.is_empty() {
            rules::node_id(Field::Name("node_id"), &req.node_id)?;
        }
        rules::at_most(
            Field::Name("exclude_node_ids"),
            req.exclude_node_ids.len(),
            MAX_EXCLUDED,
        )?;
        for (index, id) in req.exclude_node_ids.iter().enumerate() {
            rules::node_id(
                Field::Entry {
                    list: "exclude_node_ids",
                    index,
                },
                id,
            )?;
        }
        let limit = match req.limit as usize {
            0 => DEFAULT_LIMIT,
            n if n > MAX_LIMIT => {
                return Err(PlacementError::InvalidArgument {
                    field: "limit".into(),
                    reason: format!("{n} is above the maximum of {MAX_LIMIT}"),
                });
            }
            n => n,
        };
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        Ok(PlacementQuery {
            model: req.model,
            engine: non_empty(req.engine),
            min_slots_free: req.min_slots_free.unwrap_or(DEFAULT_MIN_SLOTS_FREE),
            min_vram_free_bytes: req.min_vram_free_bytes,
            labels: req.labels.into_iter().collect(),
            gpu_name: non_empty(req.gpu_name.to_lowercase()),
            min_compute_capability: parse_compute_capability(&req.min_compute_capability),
            node_id: non_empty(req.node_id),
            exclude: req.exclude_node_ids.into_iter().collect(),
            limit,
        })
    }

    /// The first filter `pool` fails, or `None` when it is a candidate.
    fn first_failing(&self, pool: &PoolEntry) -> Option<Filter> {
        let node = &*pool.node;
        if self
            .node_id
            .as_ref()
            .is_some_and(|pin| *pin != node.node_id)
        {
            return Some(Filter::PinnedNode);
        }
        if self.exclude.contains(&node.node_id) {
            return Some(Filter::Excluded);
        }
        if self.engine.as_ref().is_some_and(|e| *e != pool.engine) {
            return Some(Filter::Engine);
        }
        if !self
            .labels
            .iter()
            .all(|(k, v)| node.labels.get(k).is_some_and(|have| have == v))
        {
            return Some(Filter::Labels);
        }
        if self.gpu_name.is_some() || self.min_compute_capability.is_some() {
            let gpus = pool_gpus(node, &pool.gpu_indices);
            if let Some(name) = &self.gpu_name {
                let named = |g: &&pb::GpuInfo| g.name.to_lowercase().contains(name.as_str());
                if gpus.is_empty() || !gpus.iter().all(named) {
                    return Some(Filter::GpuName);
                }
            }
            if let Some(min) = self.min_compute_capability {
                let reaches = |g: &&pb::GpuInfo| {
                    parse_compute_capability(&g.compute_capability).is_some_and(|cc| cc >= min)
                };
                if gpus.is_empty() || !gpus.iter().all(reaches) {
                    return Some(Filter::ComputeCapability);
                }
            }
        }
        if node.status != pb::NodeStatus::Online as i32 {
            return Some(Filter::Online);
        }
        if !schedulable(node) {
            return Some(Filter::Schedulable);
        }
        let Some(state) = pool.state else {
            return Some(Filter::Reported);
        };
        if state != pb::PoolState::Ready {
            return Some(Filter::Ready);
        }
        if pool.slots_free < self.min_slots_free {
            return Some(Filter::SlotsFree);
        }
        if pool.vram_free_bytes < self.min_vram_free_bytes {
            return Some(Filter::VramFree);
        }
        None
    }

    /// What the pools lacked once `filter` emptied the set, in words.
    fn lack(&self, filter: Filter) -> String {
        match filter {
            Filter::Model => "no pool serves it".into(),
            Filter::PinnedNode => format!(
                "none is on node {}",
                self.node_id.as_deref().unwrap_or_default()
            ),
            Filter::Excluded => "all are on excluded nodes".into(),
            Filter::Engine => format!(
                "none runs engine {}",
                self.engine.as_deref().unwrap_or_default()
            ),
            Filter::Labels => {
                let mut text = String::new();
                for (i, (k, v)) in self.labels.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    let _ = write!(text, "{sep}{k}={v}");
                }
                format!("none is on a node with labels {text}")
            }
            Filter::GpuName => format!(
                "none runs only on GPUs whose name contains {:?}",
                self.gpu_name.as_deref().unwrap_or_default()
            ),
            Filter::ComputeCapability => {
                let (major, minor) = self.min_compute_capability.unwrap_or_default();
                format!("none runs only on GPUs of compute capability {major}.{minor} or higher")
            }
            Filter::Online => "none is on an ONLINE node".into(),
            Filter::Schedulable => "none is on a node that takes new work".into(),
            Filter::Reported => {
                "none has reported its status yet (no heartbeat since registration)".into()
            }
            Filter::Ready => "none is READY".into(),
            Filter::SlotsFree => match self.min_slots_free {
                1 => "none is READY with a free slot".into(),
                n => format!("none is READY with {n} free slots"),
            },
            Filter::VramFree => format!(
                "none is READY with {} bytes of VRAM free",
                self.min_vram_free_bytes
            ),
        }
    }
}

/// "8.9" as (8, 9); `None` for anything else (empty included).
fn parse_compute_capability(cc: &str) -> Option<(u32, u32)> {
    let (major, minor) = cc.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The GPUs a pool runs on: those its `gpu_indices` name, or every GPU of
/// the node when it names none.
fn pool_gpus<'n>(node: &'n pb::Node, indices: &[u32]) -> Vec<&'n pb::GpuInfo> {
    let gpus = node.capabilities.as_ref().map(|c| c.gpus.as_slice());
    gpus.unwrap_or_default()
        .iter()
        .filter(|g| indices.is_empty() || indices.contains(&g.index))
        .collect()
}

/// Why FindPools found nothing, or refused the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// A request field is malformed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The pinned node is not registered.
    #[error("node {node_id} is not registered")]
    UnknownNode {
        /// The pinned node.
        node_id: String,
    },
    /// The pinned node is registered but none of its pools qualifies.
    #[error("node unavailable: {reason}")]
    NodeUnavailable {
        /// The pinned node.
        node_id: String,
        /// The filter that left none of its pools.
        filter: Filter,
        /// Which filter that was, in words.
        reason: String,
    },
    /// No pool qualifies.
    #[error("{reason}")]
    NoCandidate {
        /// The first filter that emptied the set.
        filter: Filter,
        /// Which filter that was, in words.
        reason: String,
    },
}

impl From<rules::RuleError> for PlacementError {
    fn from(e: rules::RuleError) -> Self {
        PlacementError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

/// One pool that can take the model's requests now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The node running the pool.
    pub node_id: String,
    /// The pool.
    pub pool_id: String,
    /// Where its engine takes requests (reported, else registered).
    pub endpoint: String,
    /// The model it serves.
    pub model: String,
    /// Its engine.
    pub engine: String,
    /// Free slots in the latest heartbeat (a score input).
    pub slots_free: u32,
    /// Total slots, to judge how loaded the pool is.
    pub slots_total: u32,
    /// Free VRAM in the latest heartbeat (the first score input).
    pub vram_free_bytes: u64,
    /// The node's address.
    pub node_address: String,
    /// The node's labels, so the caller can see why it matched.
    pub labels: HashMap<String, String>,
}

/// FindPools' answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Best first, at most the query's limit.
    pub candidates: Vec<Candidate>,
    /// The revision of the latest event the index had applied.
    pub revision: u64,
}

/// One pool serving a model, for ListModels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPool {
    /// The node running the pool.
    pub node_id: String,
    /// The pool.
    pub pool_id: String,
    /// Its engine.
    pub engine: String,
    /// Its reported state; `None` before the node's first heartbeat.
    pub state: Option<pb::PoolState>,
    /// The node's liveness.
    pub node_status: pb::NodeStatus,
    /// Total slots.
    pub slots_total: u32,
    /// Free slots in the latest heartbeat.
    pub slots_free: u32,
    /// Whether FindPools could offer it, slot and VRAM minimums aside.
    pub ready: bool,
}

/// Where one model is served or staged (ListModels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAvailability {
    /// The model.
    pub model: String,
    /// Every pool serving it, by (node_id, pool_id).
    pub pools: Vec<ModelPool>,
    /// Distinct nodes with a pool serving it.
    pub nodes_serving: u32,
    /// Pools that are `ready`.
    pub pools_ready: u32,
    /// Slots of every pool serving it.
    pub slots_total: u32,
    /// Free slots of the ready pools: what can be used now.
    pub slots_free: u32,
    /// Nodes with it staged on disk but no pool serving it, by id.
    pub staged_on: Vec<String>,
}

/// ListModels' answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelList {
    /// By model name.
    pub models: Vec<ModelAvailability>,
    /// The revision of the latest event the index had applied.
    pub revision: u64,
}

/// One pool in the index: its registered spec merged with its latest
/// status, and the node view it came from (shared, never copied).
#[derive(Debug)]
struct PoolEntry {
    /// The node's read view from the event; labels, address, liveness and
    /// GPUs are read through it.
    node: Arc<pb::Node>,
    /// The pool's id.
    pool_id: String,
    /// Reported model, else registered: the index key.
    model: String,
    /// Reported engine, else registered.
    engine: String,
    /// Reported state; `None` until the node's first heartbeat, which
    /// keeps a pool that nobody has seen running from being offered.
    state: Option<pb::PoolState>,
    /// Reported total slots, else registered.
    slots_total: u32,
    /// Reported free slots (0 before any report).
    slots_free: u32,
    /// Reported free VRAM (0 before any report).
    vram_free_bytes: u64,
    /// Reported endpoint when set, else the registered one (CLOUD-3021).
    endpoint: String,
    /// The GPUs the pool uses; empty means all of the node's.
    gpu_indices: Vec<u32>,
}

/// The pools of a node's view, with a model, merged by pool id.
fn pools_of(node: &Arc<pb::Node>) -> Vec<PoolEntry> {
    let status: HashMap<&str, &pb::PoolStatus> = node
        .pool_status
        .iter()
        .map(|s| (s.pool_id.as_str(), s))
        .collect();
    let or = |reported: &str, registered: &str| {
        if reported.is_empty() {
            registered.to_owned()
        } else {
            reported.to_owned()
        }
    };
    let state = |s: &pb::PoolStatus| pb::PoolState::try_from(s.state).ok();
    let mut pools: Vec<PoolEntry> = node
        .pools
        .iter()
        .map(|spec| match status.get(spec.pool_id.as_str()) {
            Some(s) => PoolEntry {
                node: Arc::clone(node),
                pool_id: spec.pool_id.clone(),
                model: or(&s.model, &spec.model),
                engine: or(&s.engine, &spec.engine),
                state: state(s),
                slots_total: s.slots_total,
                slots_free: s.slots_free,
                vram_free_bytes: s.vram_free_bytes,
                endpoint: or(&s.endpoint, &spec.endpoint),
                gpu_indices: spec.gpu_indices.clone(),
            },
            None => PoolEntry {
                node: Arc::clone(node),
                pool_id: spec.pool_id.clone(),
                model: spec.model.clone(),
                engine: spec.engine.clone(),
                state: None,
                slots_total: spec.slots_total,
                slots_free: 0,
                vram_free_bytes: 0,
                endpoint: spec.endpoint.clone(),
                gpu_indices: spec.gpu_indices.clone(),
            },
        })
        .collect();
    // A pool reported but not registered (a handoff pool that appeared
    // between registrations) serves requests all the same.
    let registered: HashSet<&str> = node.pools.iter().map(|p| p.pool_id.as_str()).collect();
    pools.extend(
        node.pool_status
            .iter()
            .filter(|s| !registered.contains(s.pool_id.as_str()))
            .map(|s| PoolEntry {
                node: Arc::clone(node),
                pool_id: s.pool_id.clone(),
                model: s.model.clone(),
                engine: s.engine.clone(),
                state: state(s),
                slots_total: s.slots_total,
                slots_free: s.slots_free,
                vram_free_bytes: s.vram_free_bytes,
                endpoint: s.endpoint.clone(),
                gpu_indices: Vec::new(),
            }),
    );
    pools.retain(|p| !p.model.is_empty());
    pools
}

/// Key of a pool in a model's map: ranks pools by node then pool id.
type PoolKey = (String, String);

/// What the index holds of one node, to undo its entries on the next event.
#[derive(Debug)]
struct NodeEntry {
    /// Revision of the latest event applied for the node; an older one
    /// arriving late is ignored.
    revision: u64,
    /// (model, pool_id) of each entry in `by_model`.
    pools: Vec<(String, String)>,
    /// The node's staged models, entries in `staged`.
    staged: Vec<String>,
}

/// The index behind the lock.
#[derive(Debug, Default)]
struct Inner {
    /// Revision of the latest event applied.
    revision: u64,
    /// Every node seen and not deleted, so a pinned node can be told
    /// unknown (NOT_FOUND) from unable to serve (FAILED_PRECONDITION).
    nodes: HashMap<String, NodeEntry>,
    /// Model → its pools, the map `find` walks.
    by_model: HashMap<String, BTreeMap<PoolKey, Arc<PoolEntry>>>,
    /// Model → nodes that have it staged (Node.models_available).
    staged: HashMap<String, BTreeSet<String>>,
}

impl Inner {
    /// Takes the node's entries out of the maps.
    fn remove(&mut self, node_id: &str) -> Option<NodeEntry> {
        let entry = self.nodes.remove(node_id)?;
        for (model, pool_id) in &entry.pools {
            if let Some(pools) = self.by_model.get_mut(model) {
                pools.remove(&(node_id.to_owned(), pool_id.clone()));
                if pools.is_empty() {
                    self.by_model.remove(model);
                }
            }
        }
        for model in &entry.staged {
            if let Some(nodes) = self.staged.get_mut(model) {
                nodes.remove(node_id);
                if nodes.is_empty() {
                    self.staged.remove(model);
                }
            }
        }
        Some(entry)
    }

    /// Puts the node's current view in, its pools built beforehand.
    fn insert(&mut self, revision: u64, node: &Arc<pb::Node>, pools: Vec<PoolEntry>) {
        let node_id = node.node_id.clone();
        let keys = pools
            .iter()
            .map(|p| (p.model.clone(), p.pool_id.clone()))
            .collect();
        for pool in pools {
            self.by_model
                .entry(pool.model.clone())
                .or_default()
                .insert((node_id.clone(), pool.pool_id.clone()), Arc::new(pool));
        }
        let staged: Vec<String> = node.models_available.clone();
        for model in &staged {
            self.staged
                .entry(model.clone())
                .or_default()
                .insert(node_id.clone());
        }
        self.nodes.insert(
            node_id,
            NodeEntry {
                revision,
                pools: keys,
                staged,
            },
        );
    }

    /// ListModels for one model.
    fn availability(&self, model: &str) -> Option<ModelAvailability> {
        let pools = self.by_model.get(model);
        let staged = self.staged.get(model);
        if pools.is_none() && staged.is_none() {
            return None;
        }
        let mut listed = Vec::new();
        let mut serving = BTreeSet::new();
        let (mut ready, mut total, mut free) = (0u32, 0u32, 0u32);
        for pool in pools.into_iter().flat_map(|p| p.values()) {
            let node = &*pool.node;
            let is_ready = node.status == pb::NodeStatus::Online as i32
                && schedulable(node)
                && pool.state == Some(pb::PoolState::Ready);
            serving.insert(node.node_id.as_str());
            total = total.saturating_add(pool.slots_total);
            if is_ready {
                ready += 1;
                free = free.saturating_add(pool.slots_free);
            }
            listed.push(ModelPool {
                node_id: node.node_id.clone(),
                pool_id: pool.pool_id.clone(),
                engine: pool.engine.clone(),
                state: pool.state,
                node_status: pb::NodeStatus::try_from(node.status)
                    .unwrap_or(pb::NodeStatus::Unspecified),
                slots_total: pool.slots_total,
                slots_free: pool.slots_free,
                ready: is_ready,
            });
        }
        let staged_on = staged
            .into_iter()
            .flatten()
            .filter(|n| !serving.contains(n.as_str()))
            .cloned()
            .collect();
        Some(ModelAvailability {
            model: model.to_owned(),
            pools: listed,
            nodes_serving: u32::try_from(serving.len()).unwrap_or(u32::MAX),
            pools_ready: ready,
            slots_total: total,
            slots_free: free,
            staged_on,
        })
    }
}

/// The placement index: a cloneable handle on one shared index, fed by
/// [`PlacementIndex::apply`] from the registry's change feed.
#[derive(Debug, Clone, Default)]
pub struct PlacementIndex {
    /// The index; `find` and `models` take the read lock, `apply` the
    /// write lock, none across an `.await`.
    inner: Arc<RwLock<Inner>>,
}

impl PlacementIndex {
    /// An empty index (answers NOT_FOUND until fed).
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are each
        // consistent; answering from them beats failing every query.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one change: Added/Modified replace the node's entries with
    /// those of its new view, Deleted removes them. O(pools of the node).
    pub fn apply(&self, event: &Event) {
        // Built before taking the write lock, so readers wait only for the
        // map updates.
        let pools = match event.kind {
            EventKind::Added | EventKind::Modified => Some(pools_of(&event.node)),
            EventKind::Deleted => None,
        };
        let mut inner = self.write();
        inner.revision = inner.revision.max(event.revision);
        let node_id = event.node.node_id.as_str();
        if inner
            .nodes
            .get(node_id)
            .is_some_and(|n| n.revision > event.revision)
        {
            return;
        }
        inner.remove(node_id);
        if let Some(pools) = pools {
            inner.insert(event.revision, &event.node, pools);
        }
    }

    /// The revision of the latest event applied.
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// The best pools for `query`, or why there are none. O(pools serving
    /// the model), plus O(k log k) to rank the k candidates.
    pub fn find(&self, query: &PlacementQuery) -> Result<Placement, PlacementError> {
        let inner = self.read();
        if let Some(pin) = &query.node_id
            && !inner.nodes.contains_key(pin)
        {
            return Err(PlacementError::UnknownNode {
                node_id: pin.clone(),
            });
        }
        let pools = inner.by_model.get(&query.model);
        let mut candidates = Vec::new();
        let mut emptied_by = Filter::Model;
        let mut serving = 0usize;
        // Pools that failed each filter first, to say how many got as far
        // as the one that emptied the set.
        let mut failed_at: HashMap<Filter, usize> = HashMap::new();
        for pool in pools.into_iter().flat_map(|p| p.values()) {
            if query
                .node_id
                .as_ref()
                .is_none_or(|pin| *pin == pool.node.node_id)
            {
                serving += 1;
            }
            match query.first_failing(pool) {
                None => candidates.push(pool),
                Some(filter) => {
                    emptied_by = emptied_by.max(filter);
                    *failed_at.entry(filter).or_default() += 1;
                }
            }
        }
        if candidates.is_empty() {
            let reached = failed_at.get(&emptied_by).copied().unwrap_or_default();
            return Err(no_candidate(query, emptied_by, serving, reached));
        }
        let rank = |a: &&Arc<PoolEntry>, b: &&Arc<PoolEntry>| -> Ordering { rank(a, b) };
        if candidates.len() > query.limit {
            candidates.select_nth_unstable_by(query.limit - 1, rank);
            candidates.truncate(query.limit);
        }
        candidates.sort_unstable_by(rank);
        Ok(Placement {
            candidates: candidates
                .into_iter()
                .map(|p| Candidate {
                    node_id: p.node.node_id.clone(),
                    pool_id: p.pool_id.clone(),
                    endpoint: p.endpoint.clone(),
                    model: p.model.clone(),
                    engine: p.engine.clone(),
                    slots_free: p.slots_free,
                    slots_total: p.slots_total,
                    vram_free_bytes: p.vram_free_bytes,
                    node_address: p.node.address.clone(),
                    labels: p.node.labels.clone(),
                })
                .collect(),
            revision: inner.revision,
        })
    }

    /// Every model served or staged, by name (ListModels).
    pub fn models(&self) -> Vec<ModelAvailability> {
        self.list_models(None).models
    }

    /// ListModels: every model, or only `model`, with the revision.
    pub fn list_models(&self, model: Option<&str>) -> ModelList {
        let inner = self.read();
        let models = match model {
            Some(name) => inner.availability(name).into_iter().collect(),
            None => {
                let names: BTreeSet<&String> =
                    inner.by_model.keys().chain(inner.staged.keys()).collect();
                names
                    .into_iter()
                    .filter_map(|name| inner.availability(name))
                    .collect()
            }
        };
        ModelList {
            models,
            revision: inner.revision,
        }
    }
}

/// The CLOUD-6003 order: most free VRAM, then most free slots, then node
/// and pool id ascending (deterministic among equals).
fn rank(a: &PoolEntry, b: &PoolEntry) -> Ordering {
    fn key(p: &PoolEntry) -> (Reverse<u64>, Reverse<u32>, &str, &str) {
        (
            Reverse(p.vram_free_bytes),
            Reverse(p.slots_free),
            p.node.node_id.as_str(),
            p.pool_id.as_str(),
        )
    }
    key(a).cmp(&key(b))
}

/// The error for an empty set: `filter` emptied it; `serving` pools of the
/// model were in it (on the pinned node only, when one is pinned), and
/// `reached` of them passed every filter before `filter`.
fn no_candidate(
    query: &PlacementQuery,
    filter: Filter,
    serving: usize,
    reached: usize,
) -> PlacementError {
    let model = &query.model;
    let lack = if reached < serving {
        format!(
            "{reached} match{} the earlier filters but {}",
            if reached == 1 { "es" } else { "" },
            query.lack(filter)
        )
    } else {
        query.lack(filter)
    };
    if let Some(pin) = &query.node_id {
        let reason = match filter {
            Filter::Model | Filter::PinnedNode => {
                format!("node {pin} runs no pool of model {model}")
            }
            _ => format!(
                "node {pin} has {serving} pool{} of model {model}{}{lack}",
                plural(serving),
                if reached < serving { "; " } else { " but " },
            ),
        };
        return PlacementError::NodeUnavailable {
            node_id: pin.clone(),
            filter,
            reason,
        };
    }
    let reason = match filter {
        Filter::Model => format!("model {model} is served by no pool"),
        _ => format!(
            "{serving} pool{} serve{} {model}{}{lack}",
            plural(serving),
            if serving == 1 { "s" } else { "" },
            if reached < serving { "; " } else { " but " },
        ),
    };
    PlacementError::NoCandidate { filter, reason }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Views built from requests, standing in for the registry core's
    //! events until the index is fed by it.

    use super::*;

    /// The view the registry builds for a node registered with `register`
    /// whose latest heartbeat reported `beat` (`None`: none yet).
    pub fn view(
        register: &pb::RegisterRequest,
        beat: Option<&[pb::PoolStatus]>,
        status: pb::NodeStatus,
    ) -> Arc<pb::Node> {
        Arc::new(pb::Node {
            node_id: register.node_id.clone(),
            machine_id: register.machine_id.clone(),
            address: register.address.clone(),
            pools: register.pools.clone(),
            capabilities: register.capabilities.clone(),
            agent_version: register.agent_version.clone(),
            labels: register.labels.clone(),
            status: status as i32,
            pool_status: beat.map(<[_]>::to_vec).unwrap_or_default(),
            metrics_address: register.metrics_address.clone(),
            models_available: register.models_available.clone(),
            ..Default::default()
        })
    }

    /// An event of `kind` at `revision` for `node`.
    pub fn event(revision: u64, kind: EventKind, node: Arc<pb::Node>) -> Event {
        Event {
            revision,
            kind,
            node,
        }
    }
}

#[cfg(test)]
mod tests;

/// The index follows the registry's change feed.
impl crate::events::ChangeSubscriber for PlacementIndex {
    fn apply(&self, event: &Event) {
        PlacementIndex::apply(self, event);
    }
}
