//! Faults the fake GPU source injects, on a schedule given in the
//! configuration (`--fake-gpu-faults`) or live through a [`FaultHandle`]
//! (tests), so every health rule can be exercised without a GPU.
//!
//! A schedule is a comma-separated list of `GPU:FAULT[@FROM[-UNTIL]]`:
//! GPU is the fake GPU's index, FROM and UNTIL are durations after the
//! agent started ("30s", "2m"); without FROM the fault is on from the
//! start, without UNTIL it never heals. Example:
//! `1:xid79@30s-90s,0:thermal@10s`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use registry_proto::pb;

/// One fault a fake GPU can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Volatile uncorrectable ECC errors (`ecc-uncorrectable`).
    EccUncorrectable,
    /// The correctable count grows by [`CORRECTABLE_STEP`] per reading
    /// (`ecc-correctable-burst`).
    EccCorrectableBurst,
    /// A critical XID error (`xid79`, `xid48`, `xid13`...).
    Xid(u32),
    /// Retired pages pending (`retired-pages-pending`).
    RetiredPagesPending,
    /// A row remap pending (`row-remap-pending`).
    RowRemapPending,
    /// A failed row remap (`row-remap-failed`).
    RowRemapFailed,
    /// Thermal throttling (`thermal`).
    Thermal,
    /// Power-cap throttling, drawing at the limit (`power`).
    Power,
    /// Hardware slowdown (`hw-slowdown`).
    HwSlowdown,
}

/// Growth of the correctable count per reading during a burst: well above
/// the burst threshold.
pub const CORRECTABLE_STEP: u64 = 1000;

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "ecc-uncorrectable" => Fault::EccUncorrectable,
            "ecc-correctable-burst" => Fault::EccCorrectableBurst,
            "retired-pages-pending" => Fault::RetiredPagesPending,
            "row-remap-pending" => Fault::RowRemapPending,
            "row-remap-failed" => Fault::RowRemapFailed,
            "thermal" => Fault::Thermal,
            "power" => Fault::Power,
            "hw-slowdown" => Fault::HwSlowdown,
            other => match other.strip_prefix("xid").map(str::parse) {
                Some(Ok(xid)) => Fault::Xid(xid),
                _ => {
                    return Err(format!(
                        "unknown fault {other:?} (ecc-uncorrectable, ecc-correctable-burst, \
                         xidN, retired-pages-pending, row-remap-pending, row-remap-failed, \
                         thermal, power, hw-slowdown)"
                    ));
                }
            },
        })
    }
}

/// A fault on one GPU during a time span after the agent started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledFault {
    /// The fake GPU's index.
    pub gpu: u32,
    /// What goes wrong.
    pub fault: Fault,
    /// When it starts, after the agent started.
    pub from: Duration,
    /// When it heals; `None`: never.
    pub until: Option<Duration>,
}

impl ScheduledFault {
    /// Whether the fault is on `elapsed` after the agent started.
    pub fn active_at(&self, elapsed: Duration) -> bool {
        elapsed >= self.from && self.until.is_none_or(|until| elapsed < until)
    }
}

/// Parses a schedule (see the module doc); the error names the bad entry.
pub fn parse_schedule(text: &str) -> Result<Vec<ScheduledFault>, String> {
    let duration =
        |s: &str| humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"));
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let bad = |why: String| format!("fault {entry:?}: {why}");
            let (gpu, rest) = entry
                .split_once(':')
                .ok_or_else(|| bad("expected GPU:FAULT[@FROM[-UNTIL]]".into()))?;
            let gpu = gpu
                .parse()
                .map_err(|_| bad(format!("GPU index {gpu:?} is not a number")))?;
            let (fault, span) = rest.split_once('@').unwrap_or((rest, ""));
            let fault = fault.parse().map_err(bad)?;
            let (from, until) = match span.split_once('-') {
                Some((from, until)) => (
                    duration(from).map_err(bad)?,
                    Some(duration(until).map_err(bad)?),
                ),
                None if span.is_empty() => (Duration::ZERO, None),
                None => (duration(span).map_err(bad)?, None),
            };
            if until.is_some_and(|u| u <= from) {
                return Err(bad("it heals before it starts".into()));
            }
            Ok(ScheduledFault {
                gpu,
                fault,
                from,
                until,
            })
        })
        .collect()
}

/// The fake source's faults, shared: tests inject and heal faults through
/// it while the agent runs.
#[derive(Debug, Clone, Default)]
pub struct FaultHandle {
    /// The schedule; read on every reading.
    faults: Arc<Mutex<Vec<ScheduledFault>>>,
}

impl FaultHandle {
    /// A handle holding `schedule`.
    pub fn new(schedule: Vec<ScheduledFault>) -> Self {
        FaultHandle {
            faults: Arc::new(Mutex::new(schedule)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<ScheduledFault>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns `fault` on for `gpu` from now on, until healed.
    pub fn inject(&self, gpu: u32, fault: Fault) {
        self.lock().push(ScheduledFault {
            gpu,
            fault,
            from: Duration::ZERO,
            until: None,
        });
    }

    /// Takes every fault of `gpu` away, scheduled ones included.
    pub fn heal(&self, gpu: u32) {
        self.lock().retain(|f| f.gpu != gpu);
    }

    /// The faults of `gpu` on `elapsed` after the agent started.
    pub fn active(&self, gpu: u32, elapsed: Duration) -> Vec<Fault> {
        self.lock()
            .iter()
            .filter(|f| f.gpu == gpu && f.active_at(elapsed))
            .map(|f| f.fault)
            .collect()
    }
}

/// Writes the faults into a healthy reading's raw figures; `correctable`
/// is the GPU's running correctable count, grown during a burst.
pub fn apply(gpu: &mut pb::GpuStats, faults: &[Fault], correctable: &mut u64) {
    for fault in faults {
        match fault {
            Fault::EccUncorrectable => gpu.ecc_uncorrectable_volatile = Some(4),
            Fault::EccCorrectableBurst => *correctable += CORRECTABLE_STEP,
            Fault::Xid(xid) => {
                if !gpu.xid_errors.contains(xid) {
                    gpu.xid_errors.push(*xid);
                }
            }
            Fault::RetiredPagesPending => gpu.retired_pages_pending = Some(true),
            Fault::RowRemapPending => gpu.row_remap_pending = Some(true),
            Fault::RowRemapFailed => gpu.row_remap_failed = Some(true),
            Fault::Thermal => {
                gpu.throttle_thermal = Some(true);
                gpu.temperature_celsius = Some(92);
            }
            Fault::Power => {
                gpu.throttle_power = Some(true);
                gpu.power_draw_milliwatts = gpu.power_limit_milliwatts;
            }
            Fault::HwSlowdown => gpu.throttle_hw_slowdown = Some(true),
        }
    }
    gpu.ecc_correctable_volatile = Some(*correctable);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_with_spans_and_errors_name_the_entry() {
        let schedule =
            parse_schedule("1:xid79@30s-90s, 0:thermal@10s,2:ecc-uncorrectable").unwrap();
        assert_eq!(
            schedule,
            vec![
                ScheduledFault {
                    gpu: 1,
                    fault: Fault::Xid(79),
                    from: Duration::from_secs(30),
                    until: Some(Duration::from_secs(90)),
                },
                ScheduledFault {
                    gpu: 0,
                    fault: Fault::Thermal,
                    from: Duration::from_secs(10),
                    until: None,
                },
                ScheduledFault {
                    gpu: 2,
                    fault: Fault::EccUncorrectable,
                    from: Duration::ZERO,
                    until: None,
                },
            ]
        );
        assert!(schedule[0].active_at(Duration::from_secs(30)));
        assert!(!schedule[0].active_at(Duration::from_secs(29)));
        assert!(!schedule[0].active_at(Duration::from_secs(90)));
        let err = parse_schedule("0:melted").unwrap_err();
        assert!(
            err.contains("\"0:melted\"") && err.contains("unknown fault"),
            "{err}"
        );
        assert!(
            parse_schedule("x:thermal")
                .unwrap_err()
                .contains("not a number")
        );
        assert!(
            parse_schedule("0:thermal@9s-3s")
                .unwrap_err()
                .contains("heals before")
        );
        assert!(
            parse_schedule("0thermal")
                .unwrap_err()
                .contains("GPU:FAULT")
        );
    }

    #[test]
    fn every_fault_sets_its_figure() {
        let base = pb::GpuStats {
            power_limit_milliwatts: Some(700_000),
            power_draw_milliwatts: Some(100_000),
            ..Default::default()
        };
        let mut gpu = base.clone();
        let mut correctable = 0;
        apply(
            &mut gpu,
            &[
                Fault::EccUncorrectable,
                Fault::EccCorrectableBurst,
                Fault::Xid(48),
                Fault::Xid(48),
                Fault::RetiredPagesPending,
                Fault::RowRemapPending,
                Fault::RowRemapFailed,
                Fault::Thermal,
                Fault::Power,
                Fault::HwSlowdown,
            ],
            &mut correctable,
        );
        assert_eq!(gpu.ecc_uncorrectable_volatile, Some(4));
        assert_eq!(gpu.ecc_correctable_volatile, Some(CORRECTABLE_STEP));
        assert_eq!(gpu.xid_errors, vec![48]);
        assert_eq!(gpu.retired_pages_pending, Some(true));
        assert_eq!(gpu.row_remap_pending, Some(true));
        assert_eq!(gpu.row_remap_failed, Some(true));
        assert_eq!(gpu.throttle_thermal, Some(true));
        assert_eq!(gpu.throttle_power, Some(true));
        assert_eq!(gpu.power_draw_milliwatts, Some(700_000));
        assert_eq!(gpu.throttle_hw_slowdown, Some(true));
    }

    #[test]
    fn a_handle_injects_and_heals() {
        let handle = FaultHandle::new(parse_schedule("0:thermal@1h").unwrap());
        assert!(handle.active(0, Duration::ZERO).is_empty());
        handle.inject(0, Fault::Xid(79));
        assert_eq!(handle.active(0, Duration::ZERO), vec![Fault::Xid(79)]);
        assert!(handle.active(1, Duration::ZERO).is_empty());
        handle.heal(0);
        assert!(handle.active(0, Duration::from_secs(7200)).is_empty());
    }
}
