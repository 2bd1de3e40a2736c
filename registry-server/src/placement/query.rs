//! What FindPools asks: the request checked and defaulted
//! ([`PlacementQuery`]), the filters in their narrowing order, the
//! refusals, and the GPU matching rules.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use registry_proto::pb;
use registry_proto::rules::{self, Field};

use super::PoolEntry;
use crate::figures::GpuHealth;
use crate::hardware::{GpuFilterView, parse_compute_capability};
use crate::view::NodeView;

/// Candidates returned when the request asks for none in particular.
pub const DEFAULT_LIMIT: usize = 1;
/// Most candidates one FindPools returns; more is INVALID_ARGUMENT.
pub const MAX_LIMIT: usize = 100;
/// Free slots a pool needs when the request does not say.
pub const DEFAULT_MIN_SLOTS_FREE: u32 = 1;
/// Most node ids one request may exclude, so a request stays small.
pub const MAX_EXCLUDED: usize = 1000;

/// Whether the node takes new work at all, apart from its liveness and its
/// pools' states: not while it is cordoned or a drain is requested
/// (`AdminState.schedulable`). A view without admin state (none set yet)
/// is schedulable. The one place placement reads admin state; the
/// [`Filter::Schedulable`] reason fires for such a node.
pub fn schedulable(node: &NodeView) -> bool {
    node.admin().is_none_or(|a| a.schedulable)
}

/// Why an unschedulable node takes no new work, for the pinned-node
/// answer ("node unavailable: cordoned ..." / "draining ..."); `None`
/// when it is schedulable.
pub fn unschedulable_reason(node: &NodeView) -> Option<String> {
    let admin = node.admin().filter(|a| !a.schedulable)?;
    let why = |reason: &str| {
        if reason.is_empty() {
            String::new()
        } else {
            format!(" ({reason})")
        }
    };
    Some(match &admin.drain {
        Some(drain) => format!(
            "draining: node {} is being drained{} and takes no new work",
            node.node_id(),
            why(&drain.reason)
        ),
        None => format!(
            "cordoned: node {} is cordoned{} and takes no new work",
            node.node_id(),
            why(&admin.cordon_reason)
        ),
    })
}

/// The first UNHEALTHY GPU among those a pool uses (its `gpu_indices`, or
/// every GPU of the node when it names none), by the node's latest health
/// (`gpu_stats` of the view, published on every change of health); `None`
/// when all are usable. DEGRADED and unreported (UNSPECIFIED) GPUs are
/// usable. The one place placement reads GPU health; the
/// [`Filter::GpuHealth`] reason fires for such a pool.
pub fn unhealthy_gpu<'n>(node: &'n NodeView, indices: &[u32]) -> Option<&'n GpuHealth> {
    node.gpus()
        .health()
        .iter()
        .find(|g| g.is_unhealthy() && (indices.is_empty() || indices.contains(&g.index)))
}

/// An UNHEALTHY GPU in words, naming it by index, UUID and node, with its
/// reasons: "GPU 1 (GPU-8f6c...) of node gpu-7 is UNHEALTHY: xid 79 (...)".
pub fn unhealthy_gpu_reason(node: &NodeView, gpu: &GpuHealth) -> String {
    let uuid = node
        .registration()
        .capabilities
        .gpus()
        .iter()
        .find(|g| g.index == gpu.index)
        .map(|g| format!(" ({})", g.uuid))
        .unwrap_or_default();
    format!(
        "GPU {}{uuid} of node {} is UNHEALTHY: {}",
        gpu.index,
        node.node_id(),
        gpu.reasons.join("; ")
    )
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
    /// None runs on MIG slices, all of the asked profile.
    MigProfile,
    /// None is on an ONLINE node.
    Online,
    /// None is on a node the registry trusts: every one left is ONLINE but
    /// `suspect` (held by the mass-failure guard, or in the grace after a
    /// stall or restart), so its liveness is the registry's guess.
    Suspect,
    /// None is on a node that takes new work (see [`schedulable`]).
    Schedulable,
    /// None runs only on GPUs that are not UNHEALTHY (see
    /// [`unhealthy_gpu`]).
    GpuHealth,
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
    /// Only pools on MIG slices all of this profile ("1g.10gb"), compared
    /// exactly; pools on whole GPUs never match.
    pub mig_profile: Option<String>,
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
            mig_profile: None,
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
        rules::text(Field::Name("mig_profile"), &req.mig_profile)?;
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
            mig_profile: non_empty(req.mig_profile),
            node_id: non_empty(req.node_id),
            exclude: req.exclude_node_ids.into_iter().collect(),
            limit,
        })
    }

    /// The first filter `pool` fails, or `None` when it is a candidate.
    pub(super) fn first_failing(&self, pool: &PoolEntry) -> Option<Filter> {
        let node = &*pool.node;
        if self
            .node_id
            .as_ref()
            .is_some_and(|pin| pin != node.node_id())
        {
            return Some(Filter::PinnedNode);
        }
        if self.exclude.contains(node.node_id()) {
            return Some(Filter::Excluded);
        }
        if self.engine.as_ref().is_some_and(|e| e != pool.engine()) {
            return Some(Filter::Engine);
        }
        if !self.labels.iter().all(|(k, v)| {
            node.registration()
                .labels
                .get(k)
                .is_some_and(|have| have == v.as_str())
        }) {
            return Some(Filter::Labels);
        }
        if self.gpu_name.is_some() || self.min_compute_capability.is_some() {
            let gpus = pool_gpus(node, pool.gpu_indices());
            if let Some(name) = &self.gpu_name {
                let named = |g: &GpuFilterView| g.name_lowercase.contains(name.as_str());
                if gpus.is_empty() || !gpus.iter().all(named) {
                    return Some(Filter::GpuName);
                }
            }
            if let Some(min) = self.min_compute_capability {
                let reaches = |g: &GpuFilterView| g.compute_capability.is_some_and(|cc| cc >= min);
                if gpus.is_empty() || !gpus.iter().all(reaches) {
                    return Some(Filter::ComputeCapability);
                }
            }
        }
        if self
            .mig_profile
            .as_ref()
            .is_some_and(|p| pool.mig_profile() != Some(p.as_str()))
        {
            return Some(Filter::MigProfile);
        }
        if node.status() != pb::NodeStatus::Online {
            return Some(Filter::Online);
        }
        if node.live().suspect {
            return Some(Filter::Suspect);
        }
        if !schedulable(node) {
            return Some(Filter::Schedulable);
        }
        if unhealthy_gpu(node, pool.gpu_indices()).is_some() {
            return Some(Filter::GpuHealth);
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
    pub(super) fn lack(&self, filter: Filter) -> String {
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
            Filter::MigProfile => format!(
                "none runs on MIG slices of profile {:?}",
                self.mig_profile.as_deref().unwrap_or_default()
            ),
            Filter::Online => "none is on an ONLINE node".into(),
            Filter::Suspect => {
                "none is on a node the registry trusts (the rest are suspect)".into()
            }
            Filter::Schedulable => "none is on a node that takes new work".into(),
            Filter::GpuHealth => "none runs only on healthy GPUs".into(),
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

/// The GPUs a pool runs on: those its `gpu_indices` name, or every GPU of
/// the node when it names none.
fn pool_gpus<'n>(node: &'n NodeView, indices: &[u32]) -> Vec<GpuFilterView<'n>> {
    node.registration()
        .capabilities
        .filter_views()
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
