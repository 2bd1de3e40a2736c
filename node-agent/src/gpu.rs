//! GPU discovery behind the [`GpuSource`] trait: NVML on real hosts
//! ([`NvmlGpuSource`]), plausible fakes for hosts without GPUs and for tests
//! ([`FakeGpuSource`]), and nothing at all where NVML is missing
//! ([`NoGpus`]).
//!
//! NVML calls block (a few milliseconds each), so callers run them on
//! tokio's blocking pool. Every reading also carries each GPU's health
//! figures and the health derived from them ([`health`]); XID errors come
//! from a watcher thread ([`xid`]); the fake source injects faults
//! ([`faults`]).

pub mod faults;
pub mod health;
mod xid;

use std::ffi::OsStr;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_PENDING,
};
use nvml_wrapper::{Device, Nvml};
use registry_proto::gpu_figures::GoodOrder;
use registry_proto::pb;
use registry_proto::rules::{
    self, Field, MAX_HEALTH_REASONS, MAX_MIG_INSTANCES, MAX_XID_ERRORS, fit_text,
};

use self::faults::FaultHandle;
use self::health::HealthTracker;
use self::xid::{XidLog, XidWatcher};

use crate::config::GpuConfig;

/// The contract's limit on GPUs per node.
pub use registry_proto::rules::MAX_GPUS;

/// What is known about the GPUs at start-up, sent with Register.
#[derive(Debug, Clone, Default, PartialEq)]
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
            gpu.mig_instances.truncate(MAX_MIG_INSTANCES);
            for mig in &mut gpu.mig_instances {
                mig.uuid = fit_text(&mig.uuid);
                mig.profile = fit_text(&mig.profile);
            }
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
/// ([`rules::gpu_stats`]): at most [`MAX_GPUS`], utilization at most 100,
/// reasons and XIDs within their limits.
pub fn fit_stats(mut stats: Vec<pb::GpuStats>) -> Vec<pb::GpuStats> {
    stats.truncate(MAX_GPUS);
    for gpu in &mut stats {
        gpu.utilization_percent = gpu.utilization_percent.min(100);
        gpu.health_reasons.truncate(MAX_HEALTH_REASONS);
        for reason in &mut gpu.health_reasons {
            *reason = fit_text(reason);
        }
        gpu.xid_errors.truncate(MAX_XID_ERRORS);
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
        tracing::info!(
            count,
            faults = config.fake_faults.len(),
            "reporting fake gpus"
        );
        let source = FakeGpuSource::new(count, &seed())
            .with_faults(FaultHandle::new(config.fake_faults.clone()))
            .with_mig(&config.fake_mig);
        return Ok(Arc::new(source));
    }
    match NvmlGpuSource::init_with(config.xid_window) {
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

/// How long a critical XID keeps counting in a GPU's health by default.
pub const DEFAULT_XID_WINDOW: Duration = Duration::from_secs(600);

/// GPUs as NVML reports them.
pub struct NvmlGpuSource {
    /// The loaded library, shared with the XID watcher thread.
    nvml: Arc<Nvml>,
    /// XIDs the watcher recorded.
    xids: Arc<XidLog>,
    /// How long an XID counts in the health.
    xid_window: Duration,
    /// Previous correctable counts, for bursts.
    tracker: Mutex<HealthTracker>,
    /// The XID watcher thread; stopped when the source is dropped. `None`
    /// where the thread could not start (XIDs then go unreported).
    _watcher: Option<XidWatcher>,
}

impl NvmlGpuSource {
    /// [`NvmlGpuSource::init_with`] the default XID window.
    pub fn init() -> Result<Self, GpuError> {
        Self::init_with(DEFAULT_XID_WINDOW)
    }

    /// Loads NVML: `libnvidia-ml.so.1` (what the driver and container
    /// runtimes install), else the unversioned `libnvidia-ml.so` that some
    /// hand-made installs have instead; then starts the XID watcher.
    pub fn init_with(xid_window: Duration) -> Result<Self, GpuError> {
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
        let nvml = Arc::new(nvml);
        let xids = Arc::new(XidLog::default());
        let count = nvml.device_count().unwrap_or(0).min(MAX_GPUS as u32);
        let watcher = XidWatcher::start(nvml.clone(), count, xids.clone())
            .inspect_err(|e| tracing::warn!(error = %e, "cannot start the xid watcher thread"))
            .ok();
        Ok(NvmlGpuSource {
            nvml,
            xids,
            xid_window,
            tracker: Mutex::default(),
            _watcher: watcher,
        })
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
            let mut gpu = pb::GpuStats {
                index,
                memory_used_bytes: memory.used,
                memory_free_bytes: memory.free,
                // Not supported on some devices (MIG-enabled ones): 0.
                utilization_percent: device.utilization_rates().map(|u| u.gpu).unwrap_or(0),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                xid_errors: self.xids.recent(index, self.xid_window, Instant::now()),
                ..Default::default()
            };
            read_health_figures(&device, &mut gpu);
            stats.push(gpu);
        }
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .assess(&mut stats);
        Ok(stats)
    }
}

/// The raw health figures of one device, each its own cheap NVML call: a
/// call the driver does not support (or that fails) leaves its figure
/// unknown and never fails the reading.
fn read_health_figures(device: &Device<'_>, gpu: &mut pb::GpuStats) {
    let ok = |call: &'static str| {
        move |e: NvmlError| {
            if !matches!(e, NvmlError::NotSupported) {
                tracing::debug!(index = gpu_index(device), call, error = %e, "nvml health figure unknown");
            }
        }
    };
    gpu.ecc_enabled = device
        .is_ecc_enabled()
        .map(|m| m.currently_enabled)
        .map_err(ok("is_ecc_enabled"))
        .ok();
    if gpu.ecc_enabled == Some(true) {
        gpu.ecc_uncorrectable_volatile = device
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            .map_err(ok("total_ecc_errors(uncorrected)"))
            .ok();
        gpu.ecc_correctable_volatile = device
            .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
            .map_err(ok("total_ecc_errors(corrected)"))
            .ok();
        // Page retirement is the pre-Ampere mechanism; Ampere and later
        // remap rows instead (and answer NotSupported here).
        gpu.retired_pages_pending = device
            .are_pages_pending_retired()
            .map_err(ok("are_pages_pending_retired"))
            .ok();
    }
    let fields = [
        FieldId(NVML_FI_DEV_REMAPPED_PENDING),
        FieldId(NVML_FI_DEV_REMAPPED_FAILURE),
    ];
    if let Ok(values) = device.field_values_for(&fields).map_err(ok("field_values")) {
        let flag = |i: usize| -> Option<bool> {
            let value = values.get(i)?.as_ref().ok()?.value.as_ref().ok()?;
            use nvml_wrapper::enums::device::SampleValue;
            Some(match value {
                SampleValue::U32(v) => *v != 0,
                SampleValue::U64(v) => *v != 0,
                SampleValue::I64(v) => *v != 0,
                SampleValue::F64(v) => *v != 0.0,
            })
        };
        gpu.row_remap_pending = flag(0);
        gpu.row_remap_failed = flag(1);
    }
    if let Ok(reasons) = device
        .current_throttle_reasons()
        .map_err(ok("current_throttle_reasons"))
    {
        gpu.throttle_thermal = Some(reasons.intersects(
            ThrottleReasons::SW_THERMAL_SLOWDOWN | ThrottleReasons::HW_THERMAL_SLOWDOWN,
        ));
        gpu.throttle_power =
            Some(reasons.intersects(
                ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
            ));
        gpu.throttle_hw_slowdown = Some(reasons.intersects(
            ThrottleReasons::HW_SLOWDOWN
                | ThrottleReasons::HW_THERMAL_SLOWDOWN
                | ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        ));
    }
    gpu.power_draw_milliwatts = device.power_usage().map_err(ok("power_usage")).ok();
    gpu.power_limit_milliwatts = device
        .enforced_power_limit()
        .map_err(ok("enforced_power_limit"))
        .ok();
}

/// The device's index for a log line (0 where even that fails).
fn gpu_index(device: &Device<'_>) -> u32 {
    device.index().unwrap_or_default()
}

/// The MIG slices of a device with MIG mode on; a slice NVML cannot
/// describe is skipped.
fn mig_instances(device: &Device<'_>) -> Vec<pb::MigInstance> {
    let count = match device.mig_device_count() {
        Ok(n) => n.min(MAX_MIG_INSTANCES as u32),
        Err(e) => {
            tracing::warn!(error = %e, "mig is on but nvml lists no mig devices");
            return Vec::new();
        }
    };
    (0..count)
        .filter_map(|index| {
            let mig = device.mig_device_by_index(index).ok()?;
            Some(pb::MigInstance {
                uuid: mig.uuid().ok()?,
                // NVML names a slice "<GPU name> MIG 1g.10gb".
                profile: mig
                    .name()
                    .ok()
                    .and_then(|n| n.rsplit_once("MIG ").map(|(_, p)| p.trim().to_owned()))
                    .unwrap_or_default(),
                memory_total_bytes: mig.memory_info().map(|m| m.total).unwrap_or_default(),
                index,
            })
        })
        .collect()
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
    let mig_instances = if mig_enabled {
        mig_instances(&device)
    } else {
        Vec::new()
    };
    Ok(pb::GpuInfo {
        mig_instances,
        index,
        uuid,
        name,
        memory_total_bytes,
        compute_capability,
        pci_bus_id,
        mig_enabled,
    })
}

/// `count` H100s, healthy unless faults are injected ([`faults`]), for
/// hosts without GPUs, for tests and fleet-sim.
#[derive(Debug)]
pub struct FakeGpuSource {
    /// The inventory.
    gpus: Vec<pb::GpuInfo>,
    /// The faults to show, shared with whoever injects them.
    faults: FaultHandle,
    /// When the source was made: schedules count from here.
    start: Instant,
    /// Each GPU's running correctable ECC count (grows during a burst).
    correctable: Mutex<Vec<u64>>,
    /// Previous correctable counts, for bursts.
    tracker: Mutex<HealthTracker>,
}

impl FakeGpuSource {
    /// Memory of each fake GPU: 80 GiB.
    pub const MEMORY_BYTES: u64 = 80 * 1024 * 1024 * 1024;
    /// Memory each fake GPU has in use: 512 MiB (driver and context).
    pub const USED_BYTES: u64 = 512 * 1024 * 1024;
    /// Power limit of each fake GPU: 700 W, in milliwatts.
    pub const POWER_LIMIT_MW: u32 = 700_000;
    /// Power draw of an idle fake GPU: 70 W, in milliwatts.
    pub const POWER_DRAW_MW: u32 = 70_000;

    /// `count` GPUs (at most 64) whose UUIDs derive from `seed`, so they are
    /// distinct on one host and differ between hosts with different seeds.
    pub fn new(count: u32, seed: &str) -> Self {
        let gpus: Vec<pb::GpuInfo> = (0..count.min(MAX_GPUS as u32))
            .map(|index| pb::GpuInfo {
                index,
                uuid: fake_uuid(seed, index),
                name: "NVIDIA H100 80GB HBM3".to_owned(),
                memory_total_bytes: Self::MEMORY_BYTES,
                compute_capability: "9.0".to_owned(),
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x17 + index),
                mig_enabled: false,
                mig_instances: Vec::new(),
            })
            .collect();
        FakeGpuSource {
            correctable: Mutex::new(vec![0; gpus.len()]),
            gpus,
            faults: FaultHandle::default(),
            start: Instant::now(),
            tracker: Mutex::default(),
        }
    }

    /// The same GPUs showing the faults of `faults` (a schedule, or a
    /// handle a test keeps to inject and heal faults live).
    pub fn with_faults(mut self, faults: FaultHandle) -> Self {
        self.faults = faults;
        self
    }

    /// The same GPUs with MIG mode on and these slices ("1g.10gb") on each;
    /// no change when `profiles` is empty. A slice's memory is the
    /// profile's "<N>gb" in GiB.
    pub fn with_mig(mut self, profiles: &[String]) -> Self {
        if profiles.is_empty() {
            return self;
        }
        for gpu in &mut self.gpus {
            gpu.mig_enabled = true;
            gpu.mig_instances = profiles
                .iter()
                .take(MAX_MIG_INSTANCES)
                .enumerate()
                .map(|(i, profile)| pb::MigInstance {
                    uuid: format!("MIG-{}-{i}", gpu.uuid.trim_start_matches("GPU-")),
                    profile: profile.clone(),
                    memory_total_bytes: mig_profile_memory(profile),
                    index: i as u32,
                })
                .collect();
        }
        self
    }

    /// The handle to inject and heal faults while the source is in use.
    pub fn faults(&self) -> FaultHandle {
        self.faults.clone()
    }
}

/// The memory a MIG profile name gives ("3g.40gb": 40 GiB); 0 where the
/// name does not say.
fn mig_profile_memory(profile: &str) -> u64 {
    profile
        .rsplit_once('.')
        .and_then(|(_, mem)| mem.strip_suffix("gb"))
        .and_then(|gb| gb.parse::<u64>().ok())
        .map_or(0, |gb| gb << 30)
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
        let elapsed = self.start.elapsed();
        let mut correctable = self.correctable.lock().unwrap_or_else(|p| p.into_inner());
        let mut stats: Vec<pb::GpuStats> = self
            .gpus
            .iter()
            .zip(correctable.iter_mut())
            .map(|(g, correctable)| {
                let mut gpu = GoodOrder {
                    ecc_correctable: None,
                    power_draw_milliwatts: Self::POWER_DRAW_MW,
                    power_limit_milliwatts: Self::POWER_LIMIT_MW,
                }
                .figures(pb::GpuStats {
                    index: g.index,
                    memory_used_bytes: Self::USED_BYTES,
                    memory_free_bytes: g.memory_total_bytes - Self::USED_BYTES,
                    utilization_percent: 0,
                    temperature_celsius: Some(34 + g.index % 8),
                    ..Default::default()
                });
                faults::apply(&mut gpu, &self.faults.active(g.index, elapsed), correctable);
                gpu
            })
            .collect();
        drop(correctable);
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .assess(&mut stats);
        Ok(stats)
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
    fn fake_gpus_are_healthy_until_a_fault_is_injected_and_heal_after() {
        let source = FakeGpuSource::new(2, "s");
        let health = |stats: &[pb::GpuStats]| stats.iter().map(|g| g.health).collect::<Vec<_>>();
        let healthy = pb::GpuHealth::Healthy as i32;
        let stats = source.stats().unwrap();
        assert_eq!(health(&stats), vec![healthy, healthy]);
        assert_eq!(
            stats[0].power_limit_milliwatts,
            Some(FakeGpuSource::POWER_LIMIT_MW)
        );
        let faults = source.faults();
        faults.inject(1, faults::Fault::Xid(79));
        let stats = source.stats().unwrap();
        assert_eq!(
            health(&stats),
            vec![healthy, pb::GpuHealth::Unhealthy as i32]
        );
        assert_eq!(stats[1].xid_errors, vec![79]);
        assert_eq!(
            stats[1].health_reasons,
            vec!["xid 79 (GPU has fallen off the bus)".to_owned()]
        );
        faults.heal(1);
        assert_eq!(health(&source.stats().unwrap()), vec![healthy, healthy]);
        // A correctable burst shows from the second reading on.
        faults.inject(0, faults::Fault::EccCorrectableBurst);
        source.stats().unwrap();
        let stats = source.stats().unwrap();
        assert_eq!(stats[0].health, pb::GpuHealth::Degraded as i32);
    }

    #[test]
    fn a_fault_schedule_from_the_config_is_followed() {
        let config = GpuConfig {
            fake: Some(2),
            fake_faults: faults::parse_schedule("0:ecc-uncorrectable,1:thermal@1h").unwrap(),
            ..GpuConfig::default()
        };
        let stats = open(&config).unwrap().stats().unwrap();
        assert_eq!(stats[0].health, pb::GpuHealth::Unhealthy as i32);
        // Not yet: it starts an hour after the agent.
        assert_eq!(stats[1].health, pb::GpuHealth::Healthy as i32);
        rules::gpu_stats(&fit_stats(stats)).unwrap();
    }

    #[test]
    fn fake_mig_slices_are_listed_in_the_inventory() {
        let source = FakeGpuSource::new(1, "s").with_mig(&["3g.40gb".into(), "1g.10gb".into()]);
        let gpu = &source.inventory().unwrap().gpus[0];
        assert!(gpu.mig_enabled);
        assert_eq!(gpu.mig_instances.len(), 2);
        assert_eq!(gpu.mig_instances[0].profile, "3g.40gb");
        assert_eq!(gpu.mig_instances[0].memory_total_bytes, 40 << 30);
        assert_eq!(gpu.mig_instances[1].memory_total_bytes, 10 << 30);
        assert!(gpu.mig_instances[1].uuid.starts_with("MIG-"));
        assert_ne!(gpu.mig_instances[0].uuid, gpu.mig_instances[1].uuid);
        let caps = pb::Capabilities {
            gpus: vec![gpu.clone()],
            ..Default::default()
        };
        rules::capabilities(&caps).unwrap();
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
            require: true,
            ..GpuConfig::default()
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
