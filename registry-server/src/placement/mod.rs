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
//! is ONLINE, not `suspect` (the registry holds it ONLINE only because it
//! doubts its own view, see `registry/guard.rs`) and [`schedulable`]; none
//! of its GPUs is UNHEALTHY ([`unhealthy_gpu`]); its status has been reported (a node
//! registered but not yet heartbeating is never offered); it is READY; it
//! has `min_slots_free` free slots (default 1) and `min_vram_free_bytes`.
//! Static filters come first so that the reason names what the caller
//! asked for ("none is on a node with labels zone=a") before what changes
//! by the second ("none is READY").
//!
//! The score (CLOUD-6003): most free VRAM, then most free slots, then
//! `(node_id, pool_id)` ascending, so equal pools are always ranked alike.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use registry_proto::pb;

use crate::events::{Event, EventKind};
use crate::pool_reports::PoolReading;
use crate::pool_specs::PoolSpec;
use crate::view::NodeView;

mod answer;
mod query;

pub use answer::{Candidate, ModelAvailability, ModelList, ModelPool, Placement};
pub use query::*;

/// One pool in the index: where its registered spec and latest status
/// are in the node view it came from (shared, never copied), and the
/// figures `find` ranks by. Its ids, model, engine, endpoint and slices
/// are read from the view, so an entry holds no string of its own; a
/// heartbeat updates it where it is ([`PoolEntry::refresh`]).
#[derive(Debug)]
struct PoolEntry {
    /// The node's read view from the event; the pool's strings, labels,
    /// address, liveness and GPUs are read through it.
    node: Arc<NodeView>,
    /// Where the pool's spec and status are in `node`.
    at: PoolAt,
    /// Reported state; `None` until the node's first heartbeat, which
    /// keeps a pool that nobody has seen running from being offered.
    state: Option<pb::PoolState>,
    /// Reported total slots, else registered.
    slots_total: u32,
    /// Reported free slots (0 before any report).
    slots_free: u32,
    /// Reported free VRAM (0 before any report).
    vram_free_bytes: u64,
    /// For a pool on MIG slices, the GPUs they are on and the profile they
    /// share; `None` for a pool on whole GPUs (most), which uses the GPUs
    /// its spec names.
    slices: Option<Box<Slices>>,
}

/// What a pool on MIG slices uses, worked out once per registration.
#[derive(Debug, Clone, Default, PartialEq)]
struct Slices {
    /// The GPU indices the pool names plus the parents of its slices
    /// (sorted, no repeats): a slice's health is its GPU's.
    gpu_indices: Vec<u32>,
    /// The profile its slices share ("1g.10gb"), what the `mig_profile`
    /// filter compares; `None` when they differ or are not all listed.
    profile: Option<String>,
}

/// What a pool on MIG slices uses (see [`Slices`]); `None` for a pool on
/// whole GPUs.
fn slices(node: &NodeView, spec: &PoolSpec) -> Option<Box<Slices>> {
    if spec.mig_uuids().is_empty() {
        return None;
    }
    let mut indices = spec.gpu_indices().to_vec();
    let gpus = node.registration().capabilities.gpus();
    let mut profiles = Vec::new();
    for uuid in spec.mig_uuids() {
        let found = gpus.iter().find_map(|g| {
            let slice = g.mig_instances.iter().find(|m| m.uuid == *uuid)?;
            Some((g.index, slice.profile.as_str()))
        });
        // Registration refuses unlisted slices; this only guards a view
        // built otherwise (tests, older state).
        let Some((gpu, profile)) = found else {
            return Some(Box::new(Slices {
                gpu_indices: indices,
                profile: None,
            }));
        };
        indices.push(gpu);
        profiles.push(profile);
    }
    indices.sort_unstable();
    indices.dedup();
    let first = profiles[0];
    let shared =
        (!first.is_empty() && profiles.iter().all(|p| *p == first)).then(|| first.to_owned());
    Some(Box::new(Slices {
        gpu_indices: indices,
        profile: shared,
    }))
}

/// Where one pool of a view gets its fields: its registered spec (`None`
/// for a pool reported but not registered) and its latest status (`None`
/// before any report). Borrowed from the view: reading a node's pools
/// copies nothing.
#[derive(Debug, Clone, Copy)]
struct PoolSource<'v> {
    spec: Option<&'v PoolSpec>,
    status: Option<PoolReading<'v>>,
    /// Where they are in the view.
    at: PoolAt,
}

/// Where one pool's spec is in a view's registered pools and its status in
/// the view's pool status (`None`: not registered, not reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PoolAt {
    spec: Option<u32>,
    status: Option<u32>,
}

impl PoolAt {
    /// The pool's source in `node`, the view these positions were read from.
    fn source(self, node: &NodeView) -> PoolSource<'_> {
        let at = |i: Option<u32>| i.and_then(|i| usize::try_from(i).ok());
        PoolSource {
            spec: at(self.spec).and_then(|i| node.registration().pools.get(i)),
            status: at(self.status).and_then(|i| node.pool_report(i)),
            at: self,
        }
    }
}

/// A position in a list a view holds (at most a few dozen pools).
fn position(i: usize) -> Option<u32> {
    u32::try_from(i).ok()
}

impl<'v> PoolSource<'v> {
    /// The reported value when set, else the registered one.
    fn either(
        &self,
        reported: impl Fn(PoolReading<'v>) -> &'v str,
        registered: impl Fn(&'v PoolSpec) -> &'v str,
    ) -> &'v str {
        match self.status.map(reported).filter(|r| !r.is_empty()) {
            Some(r) => r,
            None => self.spec.map_or("", registered),
        }
    }

    fn pool_id(&self) -> &'v str {
        self.either(|s| s.pool_id, |p| p.pool_id())
    }

    fn model(&self) -> &'v str {
        self.either(|s| s.model, |p| p.model())
    }

    fn engine(&self) -> &'v str {
        self.either(|s| s.engine, |p| p.engine())
    }

    fn endpoint(&self) -> &'v str {
        self.either(|s| s.endpoint, |p| p.endpoint())
    }

    /// State, total and free slots, free VRAM: reported, else the
    /// registered total and nothing free.
    fn figures(&self) -> (Option<pb::PoolState>, u32, u32, u64) {
        match self.status {
            Some(s) => (
                pb::PoolState::try_from(s.state).ok(),
                s.slots_total,
                s.slots_free,
                s.vram_free_bytes,
            ),
            None => (None, self.spec.map_or(0, PoolSpec::slots_total), 0, 0),
        }
    }
}

/// The pools of a node's view that serve a model, merged by pool id: the
/// registered ones in their order, then those reported but not registered
/// (a handoff pool that appeared between registrations serves requests
/// all the same). An iterator over the view, so a heartbeat that changes
/// no pool's identity allocates nothing here.
fn pools_of(node: &NodeView) -> impl Iterator<Item = PoolSource<'_>> + Clone {
    let specs = &node.registration().pools;
    // Agents report pools in the order they registered them: the same
    // position is tried first, so a node's pools match in one pass.
    let status_of = move |i: usize, pool_id: &str| {
        node.pool_report(i)
            .filter(|s| s.pool_id == pool_id)
            .map(|s| (i, s))
            .or_else(|| {
                node.pool_status()
                    .enumerate()
                    .find(|(_, s)| s.pool_id == pool_id)
            })
    };
    let is_registered = move |i: usize, pool_id: &str| {
        specs.get(i).is_some_and(|p| p.pool_id() == pool_id)
            || specs.iter().any(|p| p.pool_id() == pool_id)
    };
    let registered = specs.iter().enumerate().map(move |(i, spec)| {
        let status = status_of(i, spec.pool_id());
        PoolSource {
            spec: Some(spec),
            status: status.map(|(_, s)| s),
            at: PoolAt {
                spec: position(i),
                status: status.and_then(|(j, _)| position(j)),
            },
        }
    });
    let unregistered = node
        .pool_status()
        .enumerate()
        .filter(move |(i, s)| !is_registered(*i, s.pool_id))
        .map(|(i, s)| PoolSource {
            spec: None,
            status: Some(s),
            at: PoolAt {
                spec: None,
                status: position(i),
            },
        });
    registered
        .chain(unregistered)
        .filter(|source| !source.model().is_empty())
}

impl PoolEntry {
    /// The entry for `source`, a pool of `node`'s view.
    fn new(node: &Arc<NodeView>, source: PoolSource<'_>) -> Self {
        let (state, slots_total, slots_free, vram_free_bytes) = source.figures();
        PoolEntry {
            node: Arc::clone(node),
            at: source.at,
            state,
            slots_total,
            slots_free,
            vram_free_bytes,
            slices: source.spec.and_then(|spec| slices(node, spec)),
        }
    }

    /// Brings the entry up to `source`, the same pool (id and model) in
    /// `node`'s newer view: the view, positions and figures are replaced,
    /// and the slices read again only when the registration changed. Equal
    /// to [`PoolEntry::new`] on the same arguments (a test holds it to that).
    fn refresh(&mut self, node: &Arc<NodeView>, source: PoolSource<'_>) {
        if !Arc::ptr_eq(self.node.registered(), node.registered()) {
            self.slices = source.spec.and_then(|spec| slices(node, spec));
        }
        self.node = Arc::clone(node);
        self.at = source.at;
        (
            self.state,
            self.slots_total,
            self.slots_free,
            self.vram_free_bytes,
        ) = source.figures();
    }

    /// The pool's spec and status in its view.
    fn source(&self) -> PoolSource<'_> {
        self.at.source(&self.node)
    }

    /// The pool's id.
    fn pool_id(&self) -> &str {
        self.source().pool_id()
    }

    /// Reported model, else registered: the index key.
    fn model(&self) -> &str {
        self.source().model()
    }

    /// Reported engine, else registered.
    fn engine(&self) -> &str {
        self.source().engine()
    }

    /// Reported endpoint when set, else the registered one (CLOUD-3021).
    fn endpoint(&self) -> &str {
        self.source().endpoint()
    }

    /// The GPUs the pool uses; empty means all of the node's. A pool on
    /// MIG slices uses their parent GPUs too (see [`Slices`]).
    fn gpu_indices(&self) -> &[u32] {
        match &self.slices {
            Some(slices) => &slices.gpu_indices,
            None => self.source().spec.map_or(&[], PoolSpec::gpu_indices),
        }
    }

    /// The MIG slices the pool runs on (`PoolSpec.mig_uuids`); empty for a
    /// pool on whole GPUs.
    fn mig_uuids(&self) -> &[String] {
        self.source().spec.map_or(&[], PoolSpec::mig_uuids)
    }

    /// The profile its slices share; `None` for a pool without slices, or
    /// whose slices differ or are not all listed.
    fn mig_profile(&self) -> Option<&str> {
        self.slices.as_ref().and_then(|s| s.profile.as_deref())
    }
}

/// A model's pools: a slab, so the entry of a pool that a heartbeat
/// moves is replaced at its key (an index) without a search, and a walk
/// is a pass over a vector. It has no order: answers that list pools sort
/// them (FindPools ranks them, ListModels orders by node and pool id).
type Pools = slab::Slab<PoolEntry>;

/// What the index holds of one node, to find and undo its entries on the
/// next event.
#[derive(Debug)]
struct NodeEntry {
    /// Revision of the latest event applied for the node; an older one
    /// arriving late is ignored.
    revision: u64,
    /// The view the node's entries were made from: the models and ids of
    /// its pools and its staged models are read there (shared, no copies).
    view: Arc<NodeView>,
    /// Each pool's key in its model's slab, in the order `pools_of(view)`
    /// lists them, so the next event finds them without a search.
    keys: Vec<usize>,
}

/// Puts `pool` in its model's slab (made on the model's first pool) and
/// returns its key there.
fn add_pool(by_model: &mut HashMap<String, Pools>, pool: PoolEntry) -> usize {
    match by_model.get_mut(pool.model()) {
        Some(pools) => pools.insert(pool),
        None => {
            let mut pools = Pools::new();
            let model = pool.model().to_owned();
            let key = pools.insert(pool);
            by_model.insert(model, pools);
            key
        }
    }
}

/// The index's nodes by node id, each found through its own entry's view:
/// no copy of the id per node (a `HashMap<String, _>` kept one, 24 bytes
/// in the table and an allocation). Hashed with std's SipHash with a
/// random key per table, as node ids come from agents.
#[derive(Default)]
struct Nodes {
    /// The entries.
    table: hashbrown::HashTable<NodeEntry>,
    /// Hashes node ids.
    hasher: std::hash::RandomState,
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nodes")
            .field("len", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl Nodes {
    /// The hash of `node_id` under `hasher` (the table's own, passed apart
    /// so a rehash can use it while the table is borrowed).
    fn hash(hasher: &std::hash::RandomState, node_id: &str) -> u64 {
        std::hash::BuildHasher::hash_one(hasher, node_id)
    }

    /// Where `node_id`'s entry would be: its hash, and the test that finds
    /// it among entries of that hash.
    fn key<'a>(&self, node_id: &'a str) -> (u64, impl Fn(&NodeEntry) -> bool + 'a) {
        let hash = Self::hash(&self.hasher, node_id);
        (hash, move |entry: &NodeEntry| {
            entry.view.node_id() == node_id
        })
    }

    fn get_mut(&mut self, node_id: &str) -> Option<&mut NodeEntry> {
        let (hash, is) = self.key(node_id);
        self.table.find_mut(hash, is)
    }

    fn contains(&self, node_id: &str) -> bool {
        let (hash, is) = self.key(node_id);
        self.table.find(hash, is).is_some()
    }

    fn remove(&mut self, node_id: &str) -> Option<NodeEntry> {
        let (hash, is) = self.key(node_id);
        let found = self.table.find_entry(hash, is);
        found.ok().map(|entry| entry.remove().0)
    }

    /// Adds `entry`, whose node has none (`Inner::insert` removes first).
    fn insert(&mut self, entry: NodeEntry) {
        let hasher = &self.hasher;
        let hash = Self::hash(hasher, entry.view.node_id());
        self.table.insert_unique(hash, entry, |entry| {
            Self::hash(hasher, entry.view.node_id())
        });
    }
}

/// The index behind the lock.
#[derive(Debug, Default)]
struct Inner {
    /// Revision of the latest event applied.
    revision: u64,
    /// Every node seen and not deleted, so a pinned node can be told
    /// unknown (NOT_FOUND) from unable to serve (FAILED_PRECONDITION).
    nodes: Nodes,
    /// Model → its pools, the map `find` walks.
    by_model: HashMap<String, Pools>,
    /// Model → nodes that have it staged (Node.models_available).
    staged: HashMap<String, BTreeSet<String>>,
}

impl Inner {
    /// Takes the node's entries out of the maps.
    fn remove(&mut self, node_id: &str) -> Option<NodeEntry> {
        let entry = self.nodes.remove(node_id)?;
        for (source, key) in pools_of(&entry.view).zip(&entry.keys) {
            let model = source.model();
            if let Some(pools) = self.by_model.get_mut(model) {
                // Only the node's own pool: a key is never stale while the
                // maps and the node's entry are kept together, and this
                // keeps a bug from taking another node's pool with it.
                if pools
                    .get(*key)
                    .is_some_and(|p| p.node.node_id() == node_id && p.pool_id() == source.pool_id())
                {
                    pools.remove(*key);
                }
                if pools.is_empty() {
                    self.by_model.remove(model);
                }
            }
        }
        for model in &entry.view.registration().models_available {
            if let Some(nodes) = self.staged.get_mut(model) {
                nodes.remove(node_id);
                if nodes.is_empty() {
                    self.staged.remove(model);
                }
            }
        }
        Some(entry)
    }

    /// Puts the node's current view in.
    fn insert(&mut self, revision: u64, node: &Arc<NodeView>) {
        let keys = pools_of(node)
            .map(|source| add_pool(&mut self.by_model, PoolEntry::new(node, source)))
            .collect();
        for model in &node.registration().models_available {
            self.staged
                .entry(model.clone())
                .or_default()
                .insert(node.node_id().to_owned());
        }
        self.nodes.insert(NodeEntry {
            revision,
            view: Arc::clone(node),
            keys,
        });
    }

    /// Updates the node's pools where they are when the view keeps its
    /// set of pools, models and staged models (a heartbeat that moves
    /// slots or state, the common event): no key is built or dropped, no
    /// map is rebalanced and no entry is allocated. `false` when the set
    /// changed, nothing touched.
    fn update_in_place(
        entry: &mut NodeEntry,
        by_model: &mut HashMap<String, Pools>,
        revision: u64,
        node: &Arc<NodeView>,
    ) -> bool {
        let (was, now) = (entry.view.registration(), node.registration());
        let mut sources = pools_of(node);
        let same = (Arc::ptr_eq(entry.view.registered(), node.registered())
            || was.models_available == now.models_available)
            && pools_of(&entry.view).all(|held| {
                sources.next().is_some_and(|now| {
                    now.model() == held.model() && now.pool_id() == held.pool_id()
                })
            })
            && sources.next().is_none();
        if !same {
            return false;
        }
        entry.revision = revision;
        entry.view = Arc::clone(node);
        for (key, source) in entry.keys.iter_mut().zip(pools_of(node)) {
            let slot = by_model
                .get_mut(source.model())
                .and_then(|pools| pools.get_mut(*key))
                .filter(|slot| {
                    slot.node.node_id() == node.node_id() && slot.pool_id() == source.pool_id()
                });
            match slot {
                Some(slot) => slot.refresh(node, source),
                // The maps and the node's entry are kept together; a miss
                // would be a bug, and re-adding the pool is the repair.
                None => *key = add_pool(by_model, PoolEntry::new(node, source)),
            }
        }
        true
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
        for pool in pools
            .into_iter()
            .flat_map(|p| p.iter().map(|(_, pool)| pool))
        {
            let node = &*pool.node;
            let is_ready = node.status() == pb::NodeStatus::Online
                && !node.live().suspect
                && schedulable(node)
                && unhealthy_gpu(node, pool.gpu_indices()).is_none()
                && pool.state == Some(pb::PoolState::Ready);
            serving.insert(node.node_id());
            total = total.saturating_add(pool.slots_total);
            if is_ready {
                ready += 1;
                free = free.saturating_add(pool.slots_free);
            }
            listed.push(ModelPool {
                node_id: node.node_id().to_owned(),
                pool_id: pool.pool_id().to_owned(),
                engine: pool.engine().to_owned(),
                state: pool.state,
                node_status: node.status(),
                slots_total: pool.slots_total,
                slots_free: pool.slots_free,
                ready: is_ready,
            });
        }
        // The slab has no order; the answer lists pools by node and id.
        listed.sort_unstable_by(|a, b| (&a.node_id, &a.pool_id).cmp(&(&b.node_id, &b.pool_id)));
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
    /// Everything happens under the write lock: a beat's in-place update
    /// allocates nothing, and only an event that changes a node's set of
    /// pools (a registration, a pool appearing) builds entries there, so
    /// readers wait on the rare path only.
    pub fn apply(&self, event: &Event) {
        let mut inner = self.write();
        let inner = &mut *inner;
        inner.revision = inner.revision.max(event.revision);
        let node = &event.node;
        if let Some(entry) = inner.nodes.get_mut(node.node_id()) {
            if entry.revision > event.revision {
                return;
            }
            if event.kind != EventKind::Deleted
                && Inner::update_in_place(entry, &mut inner.by_model, event.revision, node)
            {
                return;
            }
        }
        inner.remove(node.node_id());
        if event.kind != EventKind::Deleted {
            inner.insert(event.revision, node);
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
            && !inner.nodes.contains(pin)
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
        // Why the (pinned) node is suspect, should that empty the set: the
        // reason of the first such pool by node and pool id (the walk has
        // no order), so the answer does not change with slab order.
        let mut suspect: Option<&PoolEntry> = None;
        // The first UNHEALTHY pool by node and pool id, its GPU named
        // should that empty the set.
        let mut sick: Option<&PoolEntry> = None;
        let first = |held: Option<&PoolEntry>, pool: &PoolEntry| {
            held.is_none_or(|h| {
                (h.node.node_id(), h.pool_id()) > (pool.node.node_id(), pool.pool_id())
            })
        };
        for pool in pools
            .into_iter()
            .flat_map(|p| p.iter().map(|(_, pool)| pool))
        {
            if query
                .node_id
                .as_ref()
                .is_none_or(|pin| pin == pool.node.node_id())
            {
                serving += 1;
            }
            match query.first_failing(pool) {
                None => candidates.push(pool),
                Some(filter) => {
                    if filter == Filter::Suspect && first(suspect, pool) {
                        suspect = Some(pool);
                    }
                    if filter == Filter::GpuHealth && first(sick, pool) {
                        sick = Some(pool);
                    }
                    emptied_by = emptied_by.max(filter);
                    *failed_at.entry(filter).or_default() += 1;
                }
            }
        }
        if candidates.is_empty() {
            // A pinned node closed to new work says why first: that is
            // what the caller must know, whatever else its pools lack.
            if let Some(pin) = &query.node_id
                && let Some(reason) = pools
                    .into_iter()
                    .flat_map(|p| p.iter().map(|(_, pool)| pool))
                    .find(|p| p.node.node_id() == pin)
                    .and_then(|p| unschedulable_reason(&p.node))
            {
                return Err(PlacementError::NodeUnavailable {
                    node_id: pin.clone(),
                    filter: Filter::Schedulable,
                    reason,
                });
            }
            let reached = failed_at.get(&emptied_by).copied().unwrap_or_default();
            let suspect_reason = suspect.map(|p| p.node.live().suspect_reason.as_str());
            let sick_gpu = sick.and_then(|p| {
                unhealthy_gpu(&p.node, p.gpu_indices())
                    .map(|gpu| unhealthy_gpu_reason(&p.node, gpu))
            });
            return Err(no_candidate(
                query,
                emptied_by,
                serving,
                reached,
                suspect_reason,
                sick_gpu,
            ));
        }
        let rank = |a: &&PoolEntry, b: &&PoolEntry| -> Ordering { rank(a, b) };
        if candidates.len() > query.limit {
            candidates.select_nth_unstable_by(query.limit - 1, rank);
            candidates.truncate(query.limit);
        }
        candidates.sort_unstable_by(rank);
        Ok(Placement {
            candidates: candidates
                .into_iter()
                .map(|p| Candidate {
                    node_id: p.node.node_id().to_owned(),
                    pool_id: p.pool_id().to_owned(),
                    endpoint: p.endpoint().to_owned(),
                    model: p.model().to_owned(),
                    engine: p.engine().to_owned(),
                    slots_free: p.slots_free,
                    slots_total: p.slots_total,
                    vram_free_bytes: p.vram_free_bytes,
                    node_address: p.node.registration().address().to_owned(),
                    labels: p.node.registration().labels.to_map(),
                    mig_uuids: p.mig_uuids().to_vec(),
                    mig_profile: p.mig_profile().unwrap_or_default().to_owned(),
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
            p.node.node_id(),
            p.pool_id(),
        )
    }
    key(a).cmp(&key(b))
}

/// The error for an empty set: `filter` emptied it; `serving` pools of the
/// model were in it (on the pinned node only, when one is pinned), and
/// `reached` of them passed every filter before `filter`; a pinned suspect
/// node is named with `suspect_reason`, and an UNHEALTHY GPU that emptied
/// the set with `sick_gpu` (its words, see [`unhealthy_gpu_reason`]).
fn no_candidate(
    query: &PlacementQuery,
    filter: Filter,
    serving: usize,
    reached: usize,
    suspect_reason: Option<&str>,
    sick_gpu: Option<String>,
) -> PlacementError {
    let model = &query.model;
    let mut lack = if reached < serving {
        format!(
            "{reached} match{} the earlier filters but {}",
            if reached == 1 { "es" } else { "" },
            query.lack(filter)
        )
    } else {
        query.lack(filter)
    };
    if let Some(sick) = sick_gpu.filter(|_| filter == Filter::GpuHealth) {
        lack = format!("{lack} ({sick})");
    }
    if let Some(pin) = &query.node_id {
        let reason = match filter {
            Filter::Model | Filter::PinnedNode => {
                format!("node {pin} runs no pool of model {model}")
            }
            // The caller asked for this node: say plainly why the registry
            // will not vouch for it.
            Filter::Suspect => format!("suspect ({})", suspect_reason.unwrap_or_default()),
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

    /// An event of `kind` at `revision` for `node`, split into the view
    /// the registry publishes.
    pub fn event(revision: u64, kind: EventKind, node: Arc<pb::Node>) -> Event {
        Event {
            revision,
            kind,
            node: Arc::new(NodeView::from_proto(pb::Node::clone(&node))),
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
