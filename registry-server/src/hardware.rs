//! A node's hardware as the registry keeps it: the registration's
//! capabilities with their GPUs packed, beside what placement filters on.
//!
//! A node with 8 GPUs registers ~1.8 KB of them as decoded messages (a
//! `pb::GpuInfo` is ~136 bytes and four strings: UUID, name, compute
//! capability, PCI bus id), held as long as the node is; encoded they are
//! ~95 bytes a GPU. Of a GPU only its UUID and PCI bus id differ between
//! nodes of one hardware type; its index, name, memory, compute capability
//! and MIG mode are the same. So a node keeps each GPU's two ids packed
//! (24 bytes: the UUID's 16 bytes, the bus id's domain, bus, device and
//! function), and the rest is one encoded template shared by every node
//! that registered the same, beside what FindPools' GPU filters read (each
//! GPU's index, lowercased name and compute capability): one copy per
//! distinct set of GPUs (up to [`MAX_SHARED_GPU_SETS`]), not one per node.
//! The driver and CUDA versions are part of that shared set too (they
//! are the same across a hardware type but for a rollout); the CPU cores
//! and host memory, which differ by a few MiB between hosts of one type,
//! are the node's own.
//!
//! Ids pack only in the forms NVML writes them (`GPU-` and a lowercase
//! hyphenated UUID; a bus id of uppercase hex with an 8-digit domain and a
//! one-digit function, such as `00000000:17:00.0`), as they must read back
//! exactly as sent. A node with an id in any other form, or with MIG
//! instances (whose UUIDs are its own), keeps its GPUs encoded whole.
//! Only readers (GetNode, ListNodes, the watch feed, the store's record)
//! and rare paths (a pool on MIG slices, an unhealthy GPU's UUID in a
//! refusal) need the whole GPUs, and decode them as they deep-copied them
//! before.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use prost::Message;
use registry_proto::pb;

/// A registration's capabilities: the GPUs packed, the driver and CUDA
/// versions shared, the host's figures as sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hardware {
    /// `Capabilities.cpu_cores`.
    cpu_cores: u32,
    /// `Capabilities.ram_total_bytes`.
    ram_total_bytes: u64,
    /// What this node's GPUs alone have.
    own: OwnGpus,
    /// What every node that registered the same GPUs shares: the filter
    /// part and the template the node's ids complete.
    shared: Arc<GpuSet>,
}

/// What a node keeps of its GPUs itself.
#[derive(Debug, Clone, PartialEq)]
enum OwnGpus {
    /// Each GPU's UUID and PCI bus id, in the registered order; the rest of
    /// each GPU is `GpuSet::template`.
    Ids(Box<[GpuIds]>),
    /// The GPUs as `Capabilities.gpus` (tag 1) encodes them: ids in forms
    /// that do not pack, or MIG instances.
    Encoded(Box<[u8]>),
}

impl Default for OwnGpus {
    fn default() -> Self {
        Self::Ids(Box::default())
    }
}

/// What nodes that registered the same GPUs (and driver) share.
#[derive(Debug, Default, PartialEq, Eq, Hash)]
struct GpuSet {
    /// What FindPools' filters read, per GPU, in the registered order.
    traits: Box<[GpuTraits]>,
    /// The distinct GPU names, lowercased, that `traits` point into.
    names: Box<[Box<str>]>,
    /// The GPUs encoded as `Capabilities.gpus` with their UUIDs and bus
    /// ids empty, which a node's `OwnGpus::Ids` fill in; empty for nodes
    /// that keep their GPUs encoded whole.
    template: Box<[u8]>,
    /// `Capabilities.driver_version`, shared: the same on every node of a
    /// type but during a driver rollout (two sets then).
    driver_version: Box<str>,
    /// `Capabilities.cuda_version`, which goes with the driver.
    cuda_version: Box<str>,
}

/// How many distinct GPU sets are shared between nodes; past that a set
/// is kept per node, so registrations of ever new sets cannot grow the
/// shared table without bound (each is ~400 bytes at 8 GPUs: the template
/// ~300, the filter part ~100).
pub const MAX_SHARED_GPU_SETS: usize = 1024;

/// The GPU sets shared between nodes. Sets are never dropped from it: it
/// is bounded, and a fleet has a handful of hardware types and driver
/// versions (each driver rollout adds a set per type, kept for the
/// process's life; past the bound new sets are kept per node, which
/// costs memory only).
#[derive(Debug, Default)]
struct SharedSets(HashSet<Arc<GpuSet>, foldhash::fast::RandomState>);

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
    /// Its lowercased name's place in `GpuSet::names`.
    name: u32,
}

/// What a GPU's UUID starts with, as NVML writes it.
const UUID_PREFIX: &str = "GPU-";

/// One GPU's UUID and PCI bus id, packed (24 bytes where the two strings
/// are ~60 bytes encoded and ~100 as `String`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GpuIds {
    /// The UUID after `GPU-`, written back hyphenated in lowercase.
    uuid: [u8; 16],
    /// The bus id's PCI domain, written back as 8 uppercase hex digits.
    pci_domain: u32,
    /// Its bus, device and function, written back as `17:00.0`.
    pci_bdf: [u8; 3],
}

impl GpuIds {
    /// `gpu`'s ids packed; `None` unless they write back exactly as sent.
    /// Checked without writing them back: this runs for every GPU of every
    /// Register, and building the two strings to compare was ~4 % of the
    /// registry's CPU in a registration storm.
    fn pack(gpu: &pb::GpuInfo) -> Option<Self> {
        // Parsing forgives case and the braced, simple and URN forms;
        // what is kept is written back hyphenated in lowercase.
        let hyphenated = gpu.uuid.strip_prefix(UUID_PREFIX)?;
        // Of the forms parsing takes, only the hyphenated one is 36 long.
        if hyphenated.len() != 36 || hyphenated.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let uuid = uuid::Uuid::try_parse(hyphenated).ok()?;
        // What `pci_bus_id` writes back: `DDDDDDDD:BB:DD.F`, uppercase hex
        // digits, the function without leading zeros.
        let pci = gpu.pci_bus_id.as_bytes();
        if !matches!(pci.len(), 16 | 17) || pci[8] != b':' || pci[11] != b':' || pci[14] != b'.' {
            return None;
        }
        let function = &pci[15..];
        if function.len() == 2 && function[0] == b'0' {
            return None;
        }
        Some(Self {
            uuid: uuid.into_bytes(),
            pci_domain: upper_hex(&pci[..8])?,
            pci_bdf: [
                u8::try_from(upper_hex(&pci[9..11])?).ok()?,
                u8::try_from(upper_hex(&pci[12..14])?).ok()?,
                u8::try_from(upper_hex(function)?).ok()?,
            ],
        })
    }

    /// The UUID as registered.
    fn uuid(&self) -> String {
        let mut buf = uuid::Uuid::encode_buffer();
        let hyphenated = uuid::Uuid::from_bytes(self.uuid)
            .hyphenated()
            .encode_lower(&mut buf);
        [UUID_PREFIX, hyphenated].concat()
    }

    /// The PCI bus id as registered.
    fn pci_bus_id(&self) -> String {
        let [bus, device, function] = self.pci_bdf;
        format!(
            "{:08X}:{bus:02X}:{device:02X}.{function:X}",
            self.pci_domain
        )
    }
}

/// The value of at most 8 uppercase hex digits; `None` for any other byte.
fn upper_hex(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |value, &b| {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        Some(value << 4 | u32::from(digit))
    })
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

impl GpusOnly {
    /// `gpus` encoded as `Capabilities.gpus`.
    fn encode(gpus: Vec<pb::GpuInfo>) -> Box<[u8]> {
        Self { gpus }.encode_to_vec().into_boxed_slice()
    }

    /// The `count` GPUs that [`GpusOnly::encode`] wrote into `bytes`; one
    /// allocation for the list.
    fn decode(bytes: &[u8], count: usize) -> Vec<pb::GpuInfo> {
        let mut gpus = Self {
            gpus: Vec::with_capacity(count),
        };
        // Only `Hardware::new` encodes these bytes, from GPUs that encoded.
        gpus.merge(bytes)
            .expect("GPUs encoded by Hardware::new decode");
        gpus.gpus
    }
}

/// "8.9" as (8, 9); `None` for anything else (empty included).
pub fn parse_compute_capability(cc: &str) -> Option<(u32, u32)> {
    let (major, minor) = cc.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// What FindPools' filters read of `gpus`: per GPU its traits, and the
/// distinct lowercased names they point into.
fn filter_part(gpus: &[pb::GpuInfo]) -> (Box<[GpuTraits]>, Box<[Box<str>]>) {
    let mut names: Vec<Box<str>> = Vec::new();
    let traits = gpus
        .iter()
        .map(|g| {
            // Nodes name their GPUs alike: an ASCII name (nearly every one)
            // is compared with the names kept without building its
            // lowercase, and lowercased only when it is new; any other name
            // is lowercased once.
            let lower = (!g.name.is_ascii()).then(|| g.name.to_lowercase());
            let same = |kept: &str| match &lower {
                Some(lower) => kept == lower,
                None => is_ascii_lowercase_of(kept, &g.name),
            };
            let name = match names.iter().position(|kept| same(kept)) {
                Some(i) => i,
                None => {
                    let lower = lower.unwrap_or_else(|| g.name.to_ascii_lowercase());
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
    (traits, names.into_boxed_slice())
}

/// Whether `lower` is the ASCII name `name` lowercased, without building
/// that (for ASCII, `to_lowercase` is `to_ascii_lowercase`).
fn is_ascii_lowercase_of(lower: &str, name: &str) -> bool {
    lower.len() == name.len()
        && lower
            .bytes()
            .zip(name.bytes())
            .all(|(l, n)| l == n.to_ascii_lowercase())
}

impl Hardware {
    /// Keeps `capabilities`.
    pub fn new(capabilities: pb::Capabilities) -> Self {
        let pb::Capabilities {
            mut gpus,
            cpu_cores,
            ram_total_bytes,
            driver_version,
            cuda_version,
        } = capabilities;
        let (traits, names) = filter_part(&gpus);
        // A MIG instance's UUID is its node's own, so such GPUs are kept
        // whole rather than sharing a template no other node has.
        let ids: Option<Box<[GpuIds]>> = gpus
            .iter()
            .map(|g| g.mig_instances.is_empty().then(|| GpuIds::pack(g))?)
            .collect();
        let (own, template) = match ids {
            Some(ids) => {
                for gpu in &mut gpus {
                    gpu.uuid = String::new();
                    gpu.pci_bus_id = String::new();
                }
                (OwnGpus::Ids(ids), GpusOnly::encode(gpus))
            }
            None => (OwnGpus::Encoded(GpusOnly::encode(gpus)), Box::default()),
        };
        let set = GpuSet {
            traits,
            names,
            template,
            driver_version: driver_version.into_boxed_str(),
            cuda_version: cuda_version.into_boxed_str(),
        };
        let shared = shared_sets()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .share(set, MAX_SHARED_GPU_SETS);
        Self {
            cpu_cores,
            ram_total_bytes,
            own,
            shared,
        }
    }

    /// How many GPUs the node registered.
    pub fn gpu_count(&self) -> usize {
        self.shared.traits.len()
    }

    /// The registered GPUs, decoded (readers and rare paths).
    pub fn gpus(&self) -> Vec<pb::GpuInfo> {
        match &self.own {
            OwnGpus::Ids(ids) => {
                let mut gpus = GpusOnly::decode(&self.shared.template, ids.len());
                for (gpu, ids) in gpus.iter_mut().zip(ids) {
                    gpu.uuid = ids.uuid();
                    gpu.pci_bus_id = ids.pci_bus_id();
                }
                gpus
            }
            OwnGpus::Encoded(bytes) => GpusOnly::decode(bytes, self.gpu_count()),
        }
    }

    /// Each registered GPU as FindPools' filters see it, in the registered
    /// order; allocates nothing.
    pub fn filter_views(&self) -> impl Iterator<Item = GpuFilterView<'_>> {
        let GpuSet { traits, names, .. } = &*self.shared;
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
            cpu_cores: self.cpu_cores,
            ram_total_bytes: self.ram_total_bytes,
            driver_version: self.shared.driver_version.to_string(),
            cuda_version: self.shared.cuda_version.to_string(),
        }
    }
}

impl From<pb::Capabilities> for Hardware {
    fn from(capabilities: pb::Capabilities) -> Self {
        Self::new(capabilities)
    }
}

/// For tests: `count` H100s of node `node` with their ids as NVML names
/// them, so a registration keeps them packed.
#[cfg(test)]
pub(crate) fn nvml_gpus(node: u32, count: u32) -> Vec<pb::GpuInfo> {
    (0..count)
        .map(|g| pb::GpuInfo {
            index: g,
            uuid: format!("GPU-{node:08x}-{g:04x}-4000-8000-00000000abcd"),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            compute_capability: "9.0".into(),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x17 + g),
            mig_enabled: false,
            mig_instances: vec![],
        })
        .collect()
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
        assert_eq!(hardware.shared.names.len(), 2);
    }

    #[test]
    fn names_that_lowercase_alike_share_one_entry() {
        let names = |list: &[&str]| {
            let gpus: Vec<_> = (0..)
                .zip(list)
                .map(|(i, name)| gpu(i, name, "9.0"))
                .collect();
            let (traits, names) = filter_part(&gpus);
            let of_each: Vec<u32> = traits.iter().map(|t| t.name).collect();
            (names.into_vec(), of_each)
        };
        assert_eq!(
            names(&["NVIDIA H100", "nvidia H100", "NVIDIA H200", "NVIDIA H100"]),
            (
                vec!["nvidia h100".into(), "nvidia h200".into()],
                vec![0, 0, 1, 0]
            )
        );
        // Other names as `to_lowercase` writes them (a final sigma too).
        assert_eq!(
            names(&["GPU ΣΑΣ", "gpu σας", "Ünï", "GPU ΣΑΣ"]),
            (vec!["gpu σας".into(), "ünï".into()], vec![0, 0, 1, 0])
        );
        assert!(is_ascii_lowercase_of("nvidia h100", "NVIDIA H100"));
        assert!(!is_ascii_lowercase_of("nvidia h100", "NVIDIA H200"));
        assert!(!is_ascii_lowercase_of("nvidia h100x", "NVIDIA H100"));
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
        assert!(Arc::ptr_eq(&one.shared, &two.shared));
        assert_eq!(two.to_proto(), other, "each keeps its own GPUs");
        // Another type is another set.
        let mut smaller = capabilities();
        smaller.gpus.pop();
        assert!(!Arc::ptr_eq(&one.shared, &Hardware::new(smaller).shared));
    }

    #[test]
    fn ids_as_nvml_writes_them_pack_and_nodes_of_one_type_share_the_rest() {
        let caps = |node| pb::Capabilities {
            gpus: nvml_gpus(node, 8),
            ..capabilities()
        };
        let one = Hardware::new(caps(1));
        let two = Hardware::new(caps(2));
        assert!(matches!(&one.own, OwnGpus::Ids(ids) if ids.len() == 8));
        assert!(Arc::ptr_eq(&one.shared, &two.shared), "one template");
        assert!(!one.shared.template.is_empty());
        assert_eq!(one.to_proto(), caps(1), "each reads back its own ids");
        assert_eq!(two.to_proto(), caps(2));
        assert_ne!(one, two);
        assert_eq!(one, Hardware::new(caps(1)));
        assert_eq!(std::mem::size_of::<GpuIds>(), 24);
    }

    #[test]
    fn the_driver_is_shared_with_the_gpus_and_the_host_figures_are_each_nodes_own() {
        let caps = |node: u32, driver: &str| pb::Capabilities {
            gpus: nvml_gpus(node, 8),
            cpu_cores: 96 + node,
            ram_total_bytes: (1 << 40) - u64::from(node) * 4096,
            driver_version: driver.into(),
            ..capabilities()
        };
        let one = Hardware::new(caps(1, "550.54.15"));
        let two = Hardware::new(caps(2, "550.54.15"));
        assert!(
            Arc::ptr_eq(&one.shared, &two.shared),
            "other host figures, one set"
        );
        assert_eq!(&*one.shared.driver_version, "550.54.15");
        assert_eq!(one.to_proto(), caps(1, "550.54.15"));
        assert_eq!(two.to_proto(), caps(2, "550.54.15"));
        // A node on a newer driver (a rollout) is another set.
        let newer = Hardware::new(caps(3, "560.35.03"));
        assert!(!Arc::ptr_eq(&one.shared, &newer.shared));
        assert_eq!(newer.to_proto(), caps(3, "560.35.03"));
        // What a node keeps itself: its GPUs' ids, its host figures, the set.
        assert_eq!(std::mem::size_of::<Hardware>(), 48);
    }

    #[test]
    fn ids_in_other_forms_and_mig_instances_keep_the_gpus_whole() {
        let cases: [fn(&mut pb::GpuInfo); 8] = [
            |g| g.uuid = g.uuid.to_uppercase(),
            |g| g.uuid = g.uuid.trim_start_matches("GPU-").into(),
            |g| g.uuid = String::new(),
            |g| g.pci_bus_id = "0000:17:00.0".into(),
            |g| g.pci_bus_id = "00000000:1a:00.0".into(),
            |g| g.pci_bus_id = "00000000:+1:00.0".into(),
            |g| g.pci_bus_id = String::new(),
            |g| {
                g.mig_instances = vec![pb::MigInstance {
                    uuid: "MIG-1".into(),
                    ..Default::default()
                }]
            },
        ];
        for (i, change) in cases.into_iter().enumerate() {
            let mut gpus = nvml_gpus(3, 8);
            change(&mut gpus[5]);
            let caps = pb::Capabilities {
                gpus,
                ..Default::default()
            };
            let hardware = Hardware::new(caps.clone());
            assert!(matches!(hardware.own, OwnGpus::Encoded(_)), "case {i}");
            assert!(hardware.shared.template.is_empty(), "case {i}");
            assert_eq!(hardware.to_proto(), caps, "case {i} reads back as sent");
        }
    }

    proptest::proptest! {
        /// Whatever the ids, a node's GPUs read back exactly as registered,
        /// packed or not.
        #[test]
        fn any_ids_read_back_as_registered(
            uuids in proptest::collection::vec(
                "(GPU-)?[0-9a-fA-F]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|.{0,12}",
                1..4,
            ),
            bus in "[0-9a-fA-F]{4,8}:[0-9A-F+]{1,2}:[0-9a-fA-F]{2}\\.[0-9a-f]|.{0,8}",
        ) {
            let gpus: Vec<_> = uuids
                .into_iter()
                .enumerate()
                .map(|(i, uuid)| pb::GpuInfo {
                    index: i as u32,
                    uuid,
                    pci_bus_id: bus.clone(),
                    ..nvml_gpus(0, 1)[0].clone()
                })
                .collect();
            let caps = pb::Capabilities { gpus, ..Default::default() };
            proptest::prop_assert_eq!(Hardware::new(caps.clone()).to_proto(), caps);
        }
    }

    proptest::proptest! {
        /// `pack` takes exactly the ids that write back as sent: the same
        /// answer as parsing, writing back and comparing.
        #[test]
        fn ids_pack_exactly_when_they_write_back(
            // Each part canonical about half the time.
            uuid in "GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\
                     (GPU-)?([0-9a-fA-F]{8}-[0-9a-f]{4}-[0-9a-fA-F]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\
                     \\{[0-9a-f-]{36}\\}|[0-9a-f]{32})",
            bus in "([0-9A-F]{8}|[0-9a-fA-F+]{7,9}):([0-9A-F]{2}|[0-9a-fA-F+]{1,3}):\
                    ([0-9A-F]{2}|[0-9a-fA-F+]{1,3})\\.([0-9A-F]{1,2}|[0-9a-fA-F+]{1,3})",
        ) {
            let gpu = pb::GpuInfo { uuid, pci_bus_id: bus, ..nvml_gpus(0, 1)[0].clone() };
            let written_back = (|| {
                let uuid = uuid::Uuid::try_parse(gpu.uuid.strip_prefix(UUID_PREFIX)?).ok()?;
                let (domain, rest) = gpu.pci_bus_id.split_once(':')?;
                let (bus, rest) = rest.split_once(':')?;
                let (device, function) = rest.split_once('.')?;
                let ids = GpuIds {
                    uuid: uuid.into_bytes(),
                    pci_domain: u32::from_str_radix(domain, 16).ok()?,
                    pci_bdf: [
                        u8::from_str_radix(bus, 16).ok()?,
                        u8::from_str_radix(device, 16).ok()?,
                        u8::from_str_radix(function, 16).ok()?,
                    ],
                };
                (ids.uuid() == gpu.uuid && ids.pci_bus_id() == gpu.pci_bus_id).then_some(ids)
            })();
            proptest::prop_assert_eq!(GpuIds::pack(&gpu), written_back);
        }
    }

    #[test]
    fn functions_pack_without_leading_zeros() {
        let with = |bus: &str| pb::GpuInfo {
            pci_bus_id: bus.into(),
            ..nvml_gpus(0, 1)[0].clone()
        };
        assert!(GpuIds::pack(&with("00000000:17:00.0")).is_some());
        assert!(GpuIds::pack(&with("00000000:17:00.1F")).is_some());
        assert!(GpuIds::pack(&with("00000000:17:00.0F")).is_none());
        assert!(GpuIds::pack(&with("00000000:17:00.00")).is_none());
        assert!(GpuIds::pack(&with("00000000:17:00.+1")).is_none());
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
            ..GpuSet::default()
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
