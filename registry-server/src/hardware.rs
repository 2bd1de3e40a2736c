//! A node's hardware as the registry keeps it: the registration's
//! capabilities with their GPUs encoded, as the contract sends them, beside
//! what placement filters on.
//!
//! A node with 8 GPUs registers ~1.8 KB of them as decoded messages (a
//! `pb::GpuInfo` is ~136 bytes and four strings: UUID, name, compute
//! capability, PCI bus id), held as long as the node is. Encoded they are
//! ~90 bytes a GPU. Only readers (GetNode, ListNodes, the watch feed, the
//! store's record) and rare paths (a pool on MIG slices, an unhealthy GPU's
//! UUID in a refusal) need the whole GPU, and decode it as they deep-copied
//! it before; FindPools' GPU filters read each GPU's index, lowercased name
//! and compute capability, kept decoded (one name per distinct name, which
//! on a node is nearly always one). Nodes of one hardware type register
//! the same filter part, so it is shared: one copy per distinct set of
//! GPUs (up to [`MAX_SHARED_GPU_SETS`]), not one per node (~200 bytes each
//! at 8 GPUs).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use prost::Message;
use registry_proto::pb;

/// A registration's capabilities: the GPUs encoded, the rest as sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hardware {
    /// The capabilities without their GPUs (CPU cores, RAM, driver and
    /// CUDA versions).
    rest: pb::Capabilities,
    /// The GPUs as `Capabilities.gpus` (tag 1) encodes them, in the
    /// registered order.
    gpus: Box<[u8]>,
    /// What FindPools filters on, shared with every node that registered
    /// the same.
    filter: Arc<GpuSet>,
}

/// What FindPools' GPU filters read of a node's registered GPUs.
#[derive(Debug, Default, PartialEq, Eq, Hash)]
struct GpuSet {
    /// Per GPU, in the registered order.
    traits: Box<[GpuTraits]>,
    /// The distinct GPU names, lowercased, that `traits` point into.
    names: Box<[Box<str>]>,
}

/// How many distinct GPU sets are shared between nodes; past that a set
/// is kept per node, so registrations of ever new sets cannot grow the
/// shared table without bound (each is a few hundred bytes).
pub const MAX_SHARED_GPU_SETS: usize = 1024;

/// The GPU sets shared between nodes. Sets are never dropped from it: it
/// is bounded, and a fleet has a handful of hardware types.
#[derive(Debug, Default)]
struct SharedSets(HashSet<Arc<GpuSet>>);

impl SharedSets {
    /// The shared copy of `set`, added while there is room; `set` itself
    /// (held by its node alone) when the table is full.
    fn share(&mut self, set: GpuSet, max: usize) -> Arc<GpuSet> {
        if let Some(shared) = self.0.get(&set) {
            return Arc::clone(shared);
        }
        let set = Arc::new(set);
        if self.0.len() < max {
            self.0.insert(Arc::clone(&set));
        }
        set
    }
}

/// The registry-wide table of shared GPU sets.
fn shared_sets() -> &'static Mutex<SharedSets> {
    static SETS: OnceLock<Mutex<SharedSets>> = OnceLock::new();
    SETS.get_or_init(Mutex::default)
}

/// What FindPools' GPU filters read of one registered GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GpuTraits {
    /// The GPU's index on its node.
    index: u32,
    /// Its compute capability as (major, minor); `None` when unparsable.
    compute_capability: Option<(u32, u32)>,
    /// Its lowercased name's place in `Hardware::names`.
    name: u32,
}

/// One registered GPU as FindPools' filters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuFilterView<'h> {
    /// The GPU's index on its node.
    pub index: u32,
    /// Its name, lowercased.
    pub name_lowercase: &'h str,
    /// Its compute capability as (major, minor); `None` when unparsable.
    pub compute_capability: Option<(u32, u32)>,
}

/// `Capabilities` with only its GPUs: decodes them from their tag.
#[derive(Clone, PartialEq, prost::Message)]
struct GpusOnly {
    /// `Capabilities.gpus`.
    #[prost(message, repeated, tag = "1")]
    gpus: Vec<pb::GpuInfo>,
}

/// "8.9" as (8, 9); `None` for anything else (empty included).
pub fn parse_compute_capability(cc: &str) -> Option<(u32, u32)> {
    let (major, minor) = cc.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

impl Hardware {
    /// Keeps `capabilities`.
    pub fn new(mut capabilities: pb::Capabilities) -> Self {
        let gpus = std::mem::take(&mut capabilities.gpus);
        let mut names: Vec<Box<str>> = Vec::new();
        let traits = gpus
            .iter()
            .map(|g| {
                let lower = g.name.to_lowercase();
                let name = match names.iter().position(|n| **n == *lower) {
                    Some(i) => i,
                    None => {
                        names.push(lower.into_boxed_str());
                        names.len() - 1
                    }
                };
                GpuTraits {
                    index: g.index,
                    compute_capability: parse_compute_capability(&g.compute_capability),
                    // At most MAX_GPUS names.
                    name: u32::try_from(name).unwrap_or(u32::MAX),
                }
            })
            .collect();
        let set = GpuSet {
            traits,
            names: names.into_boxed_slice(),
        };
        let filter = shared_sets()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .share(set, MAX_SHARED_GPU_SETS);
        Self {
            rest: capabilities,
            gpus: GpusOnly { gpus }.encode_to_vec().into_boxed_slice(),
            filter,
        }
    }

    /// How many GPUs the node registered.
    pub fn gpu_count(&self) -> usize {
        self.filter.traits.len()
    }

    /// The registered GPUs, decoded (readers and rare paths).
    pub fn gpus(&self) -> Vec<pb::GpuInfo> {
        // Only `new` encodes these bytes, from GPUs that encoded; one
        // allocation for the list.
        let mut gpus = GpusOnly {
            gpus: Vec::with_capacity(self.gpu_count()),
        };
        gpus.merge(&*self.gpus)
            .expect("GPUs encoded by Hardware::new decode");
        gpus.gpus
    }

    /// Each registered GPU as FindPools' filters see it, in the registered
    /// order; allocates nothing.
    pub fn filter_views(&self) -> impl Iterator<Item = GpuFilterView<'_>> {
        let GpuSet { traits, names } = &*self.filter;
        traits.iter().map(|t| GpuFilterView {
            index: t.index,
            name_lowercase: names.get(t.name as usize).map_or("", |n| n),
            compute_capability: t.compute_capability,
        })
    }

    /// The capabilities as the contract sends them, for a reader's copy.
    pub fn to_proto(&self) -> pb::Capabilities {
        pb::Capabilities {
            gpus: self.gpus(),
            ..self.rest.clone()
        }
    }
}

impl From<pb::Capabilities> for Hardware {
    fn from(capabilities: pb::Capabilities) -> Self {
        Self::new(capabilities)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, name: &str, cc: &str) -> pb::GpuInfo {
        pb::GpuInfo {
            index,
            uuid: format!("GPU-{index:08}-aaaa-bbbb-cccc-0123456789ab"),
            name: name.into(),
            memory_total_bytes: 80 << 30,
            compute_capability: cc.into(),
            pci_bus_id: format!("00000000:{index:02}:00.0"),
            mig_enabled: index == 1,
            mig_instances: if index == 1 {
                vec![pb::MigInstance {
                    uuid: "MIG-1".into(),
                    profile: "1g.10gb".into(),
                    memory_total_bytes: 10 << 30,
                    index: 0,
                }]
            } else {
                vec![]
            },
        }
    }

    fn capabilities() -> pb::Capabilities {
        pb::Capabilities {
            gpus: vec![
                gpu(0, "NVIDIA H100 80GB HBM3", "9.0"),
                gpu(1, "NVIDIA H100 80GB HBM3", "9.0"),
                gpu(2, "NVIDIA A100-SXM4-40GB", "8.x"),
            ],
            cpu_cores: 96,
            ram_total_bytes: 1 << 40,
            driver_version: "550.54.15".into(),
            cuda_version: "12.4".into(),
        }
    }

    #[test]
    fn hardware_reads_back_as_registered() {
        let hardware = Hardware::new(capabilities());
        assert_eq!(hardware.to_proto(), capabilities());
        assert_eq!(hardware.gpus(), capabilities().gpus);
        assert_eq!(hardware.gpu_count(), 3);
        assert_eq!(hardware, Hardware::from(capabilities()));
        let mut other = capabilities();
        other.gpus[2].pci_bus_id = "00000000:99:00.0".into();
        assert_ne!(hardware, Hardware::new(other), "a GPU's field counts");
    }

    #[test]
    fn filters_see_each_gpu_lowercased_and_parsed_with_one_name_per_distinct_name() {
        let hardware = Hardware::new(capabilities());
        let views: Vec<_> = hardware.filter_views().collect();
        let h100 = "nvidia h100 80gb hbm3";
        assert_eq!(
            views,
            [
                GpuFilterView {
                    index: 0,
                    name_lowercase: h100,
                    compute_capability: Some((9, 0)),
                },
                GpuFilterView {
                    index: 1,
                    name_lowercase: h100,
                    compute_capability: Some((9, 0)),
                },
                GpuFilterView {
                    index: 2,
                    name_lowercase: "nvidia a100-sxm4-40gb",
                    compute_capability: None,
                },
            ]
        );
        assert_eq!(hardware.filter.names.len(), 2);
    }

    #[test]
    fn no_gpus_keep_nothing() {
        let hardware = Hardware::new(pb::Capabilities::default());
        assert_eq!(hardware, Hardware::default());
        assert!(hardware.gpus().is_empty() && hardware.filter_views().next().is_none());
        assert_eq!(hardware.to_proto(), pb::Capabilities::default());
    }

    #[test]
    fn compute_capabilities_parse_as_major_and_minor() {
        assert_eq!(parse_compute_capability("8.9"), Some((8, 9)));
        assert_eq!(parse_compute_capability("10.0"), Some((10, 0)));
        assert_eq!(parse_compute_capability("9"), None);
        assert_eq!(parse_compute_capability("x.1"), None);
    }

    #[test]
    fn nodes_with_the_same_gpus_share_their_filter_part() {
        let one = Hardware::new(capabilities());
        // Another node of the same type: other UUIDs and bus ids, the same
        // names, capabilities and indices.
        let mut other = capabilities();
        for gpu in &mut other.gpus {
            gpu.uuid.push('9');
            gpu.pci_bus_id = format!("0000:{}", gpu.pci_bus_id);
        }
        let two = Hardware::new(other.clone());
        assert!(Arc::ptr_eq(&one.filter, &two.filter));
        assert_eq!(two.to_proto(), other, "each keeps its own GPUs");
        // Another type is another set.
        let mut smaller = capabilities();
        smaller.gpus.pop();
        assert!(!Arc::ptr_eq(&one.filter, &Hardware::new(smaller).filter));
    }

    #[test]
    fn past_the_bound_sets_are_kept_per_node() {
        let set = |index: u32| GpuSet {
            traits: Box::new([GpuTraits {
                index,
                compute_capability: Some((9, 0)),
                name: 0,
            }]),
            names: Box::new(["nvidia h100".into()]),
        };
        let mut table = SharedSets::default();
        let first = table.share(set(0), 2);
        assert!(Arc::ptr_eq(&first, &table.share(set(0), 2)));
        let second = table.share(set(1), 2);
        assert!(Arc::ptr_eq(&second, &table.share(set(1), 2)));
        // Full: a new set is its node's own, equal but not shared.
        let third = table.share(set(2), 2);
        let again = table.share(set(2), 2);
        assert_eq!(third, again);
        assert!(!Arc::ptr_eq(&third, &again));
        assert_eq!(table.0.len(), 2);
        // The shared ones still are.
        assert!(Arc::ptr_eq(&first, &table.share(set(0), 2)));
    }
}
