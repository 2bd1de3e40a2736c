//! GPU discovery behind the [`GpuSource`] trait: NVML on real hosts
//! ([`NvmlGpuSource`]), plausible fakes for hosts without GPUs and for tests
//! ([`FakeGpuSource`]), and nothing at all where NVML is missing
//! ([`NoGpus`]).
//!
//! NVML calls block (a few milliseconds each), so callers run them on
//! tokio's blocking pool.

use std::ffi::OsStr;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use registry_proto::pb;
use registry_proto::rules::{self, Field, fit_text};

use crate::config::GpuConfig;

/// The contract's limit on GPUs per node.
pub use registry_proto::rules::MAX_GPUS;

/// What is known about the GPUs at start-up, sent with Register.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuInventory {
    /// One entry per GPU, in NVML index order.
    pub gpus: Vec<pb::GpuInfo>,
    /// NVIDIA driver version ("550.54.15"); empty without NVML.
    pub driver_version: String,
    /// Highest CUDA version the driver supports ("12.4"); empty without NVML.
    pub cuda_version: String,
}

impl GpuInventory {
    /// The inventory made to pass the registry's rules
    /// ([`rules::capabilities`]): the driver's strings are not the agent's
    /// to trust, and a registry refusing them would keep the node
    /// unregistered. Text is cut to 256 bytes without control characters,
    /// a malformed compute capability becomes unknown (empty), GPUs beyond
    /// [`MAX_GPUS`] or with a repeated index are dropped.
    pub fn fit_contract(mut self) -> Self {
        let mut seen = std::collections::HashSet::new();
        self.gpus.retain(|gpu| seen.insert(gpu.index));
        self.gpus.truncate(MAX_GPUS);
        for gpu in &mut self.gpus {
            gpu.uuid = fit_text(&gpu.uuid);
            gpu.name = fit_text(&gpu.name);
            gpu.pci_bus_id = fit_text(&gpu.pci_bus_id);
            if rules::compute_capability(Field::Name("compute_capability"), &gpu.compute_capability)
                .is_err()
            {
                gpu.compute_capability.clear();
            }
        }
        self.driver_version = fit_text(&self.driver_version);
        self.cuda_version = fit_text(&self.cuda_version);
        self
    }
}

/// Live GPU figures made to pass the registry's rules
/// ([`rules::gpu_stats`]): at most [`MAX_GPUS`], utilization at most 100.
pub fn fit_stats(mut stats: Vec<pb::GpuStats>) -> Vec<pb::GpuStats> {
    stats.truncate(MAX_GPUS);
    for gpu in &mut stats {
        gpu.utilization_percent = gpu.utilization_percent.min(100);
    }
    stats
}

/// Why GPU information could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// NVML could not be loaded or initialised (no driver, no library).
    #[error("NVML unavailable: {0}")]
    NvmlUnavailable(#[source] NvmlError),
    /// An NVML query failed.
    #[error("NVML {call} failed: {source}")]
    Nvml {
        /// The query.
        call: &'static str,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
    /// `--require-gpus` was given but no GPU was found.
    #[error("--require-gpus is set but no GPU was found")]
    NoGpus,
}

/// A source of GPU information.
pub trait GpuSource: Send + Sync {
    /// The GPUs and driver versions; read once, at start-up.
    fn inventory(&self) -> Result<GpuInventory, GpuError>;
    /// Live figures of every GPU; read for every heartbeat.
    fn stats(&self) -> Result<Vec<pb::GpuStats>, GpuError>;
}

/// Opens the source `config` asks for. Without `require`, a missing NVML is
/// logged once and the agent runs with zero GPUs; with it, that is an error.
pub fn open(config: &GpuConfig) -> Result<Arc<dyn GpuSource>, GpuError> {
    if let Some(count) = config.fake {
        tracing::info!(count, "reporting fake gpus");
        return Ok(Arc::new(FakeGpuSource::new(count, &seed())));
    }
    match NvmlGpuSource::init() {
        Ok(source) => Ok(Arc::new(source)),
        Err(e) if config.require => Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "nvml unavailable (no nvidia driver or libnvidia-ml.so); running with zero gpus");
            Ok(Arc::new(NoGpus))
        }
    }
}

/// Seed of fake UUIDs: the host, so fake agents on two hosts differ.
fn seed() -> String {
    crate::host::machine_id().unwrap_or_default()
}

/// A host without GPUs (or without NVML).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGpus;

impl GpuSource for NoGpus {
    fn inventory(&self) -> Result<GpuInventory, GpuError> {
        Ok(GpuInventory::default())
    }

    fn stats(&self) -> Result<Vec<pb::GpuStats>, GpuError> {
        Ok(Vec::new())
    }
}

/// GPUs as NVML reports them.
pub struct NvmlGpuSource {
    nvml: Nvml,
}

impl NvmlGpuSource {
    /// Loads NVML: `libnvidia-ml.so.1` (what the driver and container
    /// runtimes install), else the unversioned `libnvidia-ml.so` that some
    /// hand-made installs have instead.
    pub fn init() -> Result<Self, GpuError> {
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(NvmlError::LibloadingError(first)) => Nvml::builder()
                .lib_path(OsStr::new("libnvidia-ml.so"))
                .init()
                .map_err(|e| match e {
                    // Report the first failure: it names the usual library.
                    NvmlError::LibloadingError(_) => {
                        GpuError::NvmlUnavailable(NvmlError::LibloadingError(first))
                    }
                    other => GpuError::NvmlUnavailable(other),
                })?,
            Err(e) => return Err(GpuError::NvmlUnavailable(e)),
        };
        Ok(NvmlGpuSource { nvml })
    }

    fn count(&self) -> Result<u32, GpuError> {
        let count = self.nvml.device_count().map_err(|source| GpuError::Nvml {
            call: "device_count",
            source,
        })?;
        if count as usize > MAX_GPUS {
            tracing::warn!(
                count,
                "more gpus than the registry accepts; reporting the first 64"
            );
        }
        Ok(count.min(MAX_GPUS as u32))
    }
}

impl GpuSource for NvmlGpuSource {
    fn inventory(&self) -> Result<GpuInventory, GpuError> {
        let mut gpus = Vec::new();
        for index in 0..self.count()? {
            match nvml_gpu_info(&self.nvml, index) {
                Ok(info) => gpus.push(info),
                // One broken device (fallen off the bus) must not hide the
                // others.
                Err(e) => tracing::warn!(index, error = %e, "skipping gpu nvml cannot describe"),
            }
        }
        let driver_version = self.nvml.sys_driver_version().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "nvml gives no driver version");
            String::new()
        });
        let cuda_version = match self.nvml.sys_cuda_driver_version() {
            Ok(v) => format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            ),
            Err(e) => {
                tracing::warn!(error = %e, "nvml gives no cuda version");
                String::new()
            }
        };
        Ok(GpuInventory {
            gpus,
            driver_version,
            cuda_version,
        })
    }

    fn stats(&self) -> Result<Vec<pb::GpuStats>, GpuError> {
        let mut stats = Vec::new();
        for index in 0..self.count()? {
            let device = match self.nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(index, error = %e, "gpu unavailable for stats");
                    continue;
                }
            };
            let Ok(memory) = device.memory_info() else {
                continue;
            };
            stats.push(pb::GpuStats {
                index,
                memory_used_bytes: memory.used,
                memory_free_bytes: memory.free,
                // Not supported on some devices (MIG-enabled ones): 0.
                utilization_percent: device.utilization_rates().map(|u| u.gpu).unwrap_or(0),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
            });
        }
        Ok(stats)
    }
}

fn nvml_gpu_info(nvml: &Nvml, index: u32) -> Result<pb::GpuInfo, GpuError> {
    let nvml_err = |call: &'static str| move |source| GpuError::Nvml { call, source };
    let device = nvml
        .device_by_index(index)
        .map_err(nvml_err("device_by_index"))?;
    let uuid = device.uuid().map_err(nvml_err("uuid"))?;
    let name = device.name().map_err(nvml_err("name"))?;
    let memory_total_bytes = device.memory_info().map_err(nvml_err("memory_info"))?.total;
    let compute_capability = device
        .cuda_compute_capability()
        .map(|cc| format!("{}.{}", cc.major, cc.minor))
        .unwrap_or_default();
    let pci_bus_id = device.pci_info().map(|p| p.bus_id).unwrap_or_default();
    // NotSupported on GPUs without MIG: reported as disabled.
    let mig_enabled = device.mig_mode().is_ok_and(|m| m.current == 1);
    Ok(pb::GpuInfo {
        index,
        uuid,
        name,
        memory_total_bytes,
        compute_capability,
        pci_bus_id,
        mig_enabled,
    })
}

/// `count` H100s that never change, for hosts without GPUs and for tests.
#[derive(Debug, Clone)]
pub struct FakeGpuSource {
    gpus: Vec<pb::GpuInfo>,
}

impl FakeGpuSource {
    /// Memory of each fake GPU: 80 GiB.
    pub const MEMORY_BYTES: u64 = 80 * 1024 * 1024 * 1024;
    /// Memory each fake GPU has in use: 512 MiB (driver and context).
    pub const USED_BYTES: u64 = 512 * 1024 * 1024;

    /// `count` GPUs (at most 64) whose UUIDs derive from `seed`, so they are
    /// distinct on one host and differ between hosts with different seeds.
    pub fn new(count: u32, seed: &str) -> Self {
        let gpus = (0..count.min(MAX_GPUS as u32))
            .map(|index| pb::GpuInfo {
                index,
                uuid: fake_uuid(seed, index),
                name: "NVIDIA H100 80GB HBM3".to_owned(),
                memory_total_bytes: Self::MEMORY_BYTES,
                compute_capability: "9.0".to_owned(),
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x17 + index),
                mig_enabled: false,
            })
            .collect();
        FakeGpuSource { gpus }
    }
}

impl GpuSource for FakeGpuSource {
    fn inventory(&self) -> Result<GpuInventory, GpuError> {
        Ok(GpuInventory {
            gpus: self.gpus.clone(),
            driver_version: "550.54.15".to_owned(),
            cuda_version: "12.4".to_owned(),
        })
    }

    fn stats(&self) -> Result<Vec<pb::GpuStats>, GpuError> {
        Ok(self
            .gpus
            .iter()
            .map(|g| pb::GpuStats {
                index: g.index,
                memory_used_bytes: Self::USED_BYTES,
                memory_free_bytes: g.memory_total_bytes - Self::USED_BYTES,
                utilization_percent: 0,
                temperature_celsius: Some(34 + g.index % 8),
            })
            .collect())
    }
}

/// A UUID-shaped id ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx") from a
/// seed and an index. `DefaultHasher::new()` has fixed keys, so the result
/// is the same on every run.
fn fake_uuid(seed: &str, index: u32) -> String {
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (seed, index, salt).hash(&mut h);
        h.finish()
    };
    let (a, b) = (half(0), half(1));
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_gpus_are_plausible_and_distinct() {
        let source = FakeGpuSource::new(3, "host-a");
        let inventory = source.inventory().unwrap();
        assert_eq!(inventory.gpus.len(), 3);
        assert_eq!(inventory.driver_version, "550.54.15");
        assert_eq!(inventory.cuda_version, "12.4");
        let gpu = &inventory.gpus[1];
        assert_eq!(gpu.index, 1);
        assert_eq!(gpu.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpu.memory_total_bytes, 80 << 30);
        assert_eq!(gpu.compute_capability, "9.0");
        assert!(
            gpu.uuid.starts_with("GPU-") && gpu.uuid.len() == 40,
            "{}",
            gpu.uuid
        );
        let uuids: std::collections::HashSet<_> =
            inventory.gpus.iter().map(|g| g.uuid.clone()).collect();
        assert_eq!(uuids.len(), 3);
        let other_host = FakeGpuSource::new(1, "host-b").inventory().unwrap();
        assert_ne!(other_host.gpus[0].uuid, inventory.gpus[0].uuid);
        // Stable across runs: the same seed gives the same ids.
        assert_eq!(
            FakeGpuSource::new(1, "host-a").inventory().unwrap().gpus[0].uuid,
            inventory.gpus[0].uuid
        );
    }

    #[test]
    fn fake_stats_add_up() {
        let stats = FakeGpuSource::new(2, "s").stats().unwrap();
        assert_eq!(stats.len(), 2);
        for s in &stats {
            assert_eq!(
                s.memory_used_bytes + s.memory_free_bytes,
                FakeGpuSource::MEMORY_BYTES
            );
            assert!(s.temperature_celsius.is_some());
            assert!(s.utilization_percent <= 100);
        }
    }

    #[test]
    fn fake_gpus_are_capped_at_the_contract_limit() {
        let inventory = FakeGpuSource::new(100, "s").inventory().unwrap();
        assert_eq!(inventory.gpus.len(), MAX_GPUS);
    }

    #[test]
    fn without_nvml_the_agent_runs_with_zero_gpus_unless_required() {
        // On a host with a driver NVML opens instead; check it works there.
        if let Ok(nvml) = NvmlGpuSource::init() {
            let inventory = nvml.inventory().unwrap();
            assert_eq!(nvml.stats().unwrap().len(), inventory.gpus.len());
            return;
        }
        let source = open(&GpuConfig::default()).unwrap();
        assert!(source.inventory().unwrap().gpus.is_empty());
        assert!(source.stats().unwrap().is_empty());
        let required = open(&GpuConfig {
            fake: None,
            require: true,
        });
        assert!(matches!(required, Err(GpuError::NvmlUnavailable(_))));
    }

    #[test]
    fn what_the_driver_reports_is_made_to_pass_the_registry_rules() {
        let gpu = |index: u32| pb::GpuInfo {
            index,
            uuid: "GPU-\u{7}x".into(),
            name: "N".repeat(1000),
            compute_capability: "sm_90".into(),
            ..Default::default()
        };
        let inventory = GpuInventory {
            gpus: (0..70).map(gpu).chain([gpu(0)]).collect(),
            driver_version: "550\n".into(),
            cuda_version: "12.4".into(),
        }
        .fit_contract();
        assert_eq!(inventory.gpus.len(), MAX_GPUS);
        assert_eq!(inventory.gpus[0].uuid, "GPU-x");
        assert_eq!(inventory.gpus[0].compute_capability, "");
        let caps = pb::Capabilities {
            gpus: inventory.gpus,
            driver_version: inventory.driver_version,
            cuda_version: inventory.cuda_version,
            ..Default::default()
        };
        rules::capabilities(&caps).unwrap();

        let stats = fit_stats(vec![
            pb::GpuStats {
                utilization_percent: 250,
                ..Default::default()
            };
            70
        ]);
        rules::gpu_stats(&stats).unwrap();
    }
}
