//! Per-GPU health derived from the raw NVML figures of one reading, by the
//! rules below (also the table in docs/node-agent.md). Every figure may be
//! unknown (the driver does not support the query); an unknown figure
//! never makes a GPU less healthy.
//!
//! UNHEALTHY (must not take work):
//! - volatile uncorrectable ECC errors above 0;
//! - a critical XID in the window that means lost memory or a lost device
//!   ([`UNHEALTHY_XIDS`]: 48, 64, 79, 95);
//! - a failed row remap.
//!
//! DEGRADED (usable, impaired):
//! - any other critical XID in the window;
//! - a correctable-error burst: the volatile correctable count grew by at
//!   least [`CORRECTABLE_BURST`] since the previous reading;
//! - retired pages or a row remap pending (takes effect on the next reset);
//! - thermal throttling or hardware slowdown.
//!
//! Power-cap throttling alone is reported (`throttle_power`) but is not a
//! reason: every busy GPU runs at its power cap, and calling that DEGRADED
//! would flag the whole loaded fleet.
//!
//! HEALTHY: none of the above, with at least one figure known;
//! UNSPECIFIED: no figure known at all (nothing to judge by).

use std::collections::HashMap;

use registry_proto::pb;
use registry_proto::rules::MAX_HEALTH_REASONS;

/// Growth of the volatile correctable ECC count between two readings (one
/// heartbeat apart) that counts as a burst.
pub const CORRECTABLE_BURST: u64 = 100;

/// Critical XIDs that make a GPU UNHEALTHY, with what they mean.
pub const UNHEALTHY_XIDS: [(u32, &str); 4] = [
    (48, "double-bit ECC error"),
    (64, "ECC page retirement or row remap failure"),
    (79, "GPU has fallen off the bus"),
    (95, "uncontained ECC error"),
];

/// The health and its reasons (worst first) for one reading.
/// `correctable_growth` is how much the correctable count grew since the
/// previous reading (`None` for the first one).
pub fn judge(gpu: &pb::GpuStats, correctable_growth: Option<u64>) -> (pb::GpuHealth, Vec<String>) {
    let mut unhealthy = Vec::new();
    let mut degraded = Vec::new();
    if let Some(n) = gpu.ecc_uncorrectable_volatile.filter(|n| *n > 0) {
        unhealthy.push(format!("uncorrectable ECC errors: {n}"));
    }
    for xid in &gpu.xid_errors {
        match UNHEALTHY_XIDS.iter().find(|(x, _)| x == xid) {
            Some((_, what)) => unhealthy.push(format!("xid {xid} ({what})")),
            None => degraded.push(format!("xid {xid}")),
        }
    }
    if gpu.row_remap_failed == Some(true) {
        unhealthy.push("row remap failed".to_owned());
    }
    if let Some(n) = correctable_growth.filter(|n| *n >= CORRECTABLE_BURST) {
        degraded.push(format!("correctable ECC error burst: +{n}"));
    }
    if gpu.retired_pages_pending == Some(true) {
        degraded.push("retired pages pending (reset needed)".to_owned());
    }
    if gpu.row_remap_pending == Some(true) {
        degraded.push("row remap pending (reset needed)".to_owned());
    }
    if gpu.throttle_thermal == Some(true) {
        degraded.push("thermal throttling".to_owned());
    }
    if gpu.throttle_hw_slowdown == Some(true) {
        degraded.push("hardware slowdown".to_owned());
    }
    let health = if !unhealthy.is_empty() {
        pb::GpuHealth::Unhealthy
    } else if !degraded.is_empty() {
        pb::GpuHealth::Degraded
    } else if known_any(gpu) {
        pb::GpuHealth::Healthy
    } else {
        pb::GpuHealth::Unspecified
    };
    let mut reasons = unhealthy;
    reasons.extend(degraded);
    reasons.truncate(MAX_HEALTH_REASONS);
    (health, reasons)
}

/// Whether any health figure of the reading is known.
fn known_any(gpu: &pb::GpuStats) -> bool {
    gpu.ecc_enabled.is_some()
        || gpu.ecc_uncorrectable_volatile.is_some()
        || gpu.ecc_correctable_volatile.is_some()
        || gpu.retired_pages_pending.is_some()
        || gpu.row_remap_pending.is_some()
        || gpu.row_remap_failed.is_some()
        || gpu.throttle_thermal.is_some()
        || gpu.throttle_power.is_some()
        || gpu.throttle_hw_slowdown.is_some()
        || gpu.power_draw_milliwatts.is_some()
}

/// Judges readings one after the other, remembering each GPU's previous
/// correctable count so a burst (growth between two readings) shows.
#[derive(Debug, Default)]
pub struct HealthTracker {
    /// The correctable count of each GPU's previous reading, by index.
    correctable: HashMap<u32, u64>,
}

impl HealthTracker {
    /// Sets `health` and `health_reasons` of every reading.
    pub fn assess(&mut self, stats: &mut [pb::GpuStats]) {
        for gpu in stats {
            let growth = gpu.ecc_correctable_volatile.and_then(|now| {
                // A count that went down was reset (driver reload): no burst.
                self.correctable
                    .insert(gpu.index, now)
                    .map(|before| now.saturating_sub(before))
            });
            let (health, reasons) = judge(gpu, growth);
            gpu.health = health as i32;
            gpu.health_reasons = reasons;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reading of a GPU with every figure known and nothing wrong.
    fn fine() -> pb::GpuStats {
        registry_proto::gpu_figures::GoodOrder {
            ecc_correctable: Some(3),
            power_draw_milliwatts: 300_000,
            power_limit_milliwatts: 700_000,
        }
        .figures(pb::GpuStats::default())
    }

    #[test]
    fn a_gpu_with_nothing_wrong_is_healthy() {
        assert_eq!(judge(&fine(), Some(0)), (pb::GpuHealth::Healthy, vec![]));
        // Power-cap throttling alone is normal under load.
        let capped = pb::GpuStats {
            throttle_power: Some(true),
            ..fine()
        };
        assert_eq!(judge(&capped, None).0, pb::GpuHealth::Healthy);
    }

    #[test]
    fn nothing_known_is_unspecified_not_healthy() {
        let unknown = pb::GpuStats::default();
        assert_eq!(judge(&unknown, None), (pb::GpuHealth::Unspecified, vec![]));
    }

    #[test]
    fn uncorrectable_errors_lost_devices_and_failed_remaps_are_unhealthy() {
        let ecc = pb::GpuStats {
            ecc_uncorrectable_volatile: Some(2),
            ..fine()
        };
        assert_eq!(
            judge(&ecc, None),
            (
                pb::GpuHealth::Unhealthy,
                vec!["uncorrectable ECC errors: 2".to_owned()]
            )
        );
        for xid in [48, 64, 79, 95] {
            let lost = pb::GpuStats {
                xid_errors: vec![xid],
                ..fine()
            };
            let (health, reasons) = judge(&lost, None);
            assert_eq!(health, pb::GpuHealth::Unhealthy, "xid {xid}");
            assert!(
                reasons[0].starts_with(&format!("xid {xid} (")),
                "{reasons:?}"
            );
        }
        let remap = pb::GpuStats {
            row_remap_failed: Some(true),
            ..fine()
        };
        assert_eq!(
            judge(&remap, None),
            (
                pb::GpuHealth::Unhealthy,
                vec!["row remap failed".to_owned()]
            )
        );
    }

    #[test]
    fn impairments_are_degraded_and_unhealthy_reasons_come_first() {
        let cases = [
            (
                pb::GpuStats {
                    throttle_thermal: Some(true),
                    ..fine()
                },
                "thermal throttling",
            ),
            (
                pb::GpuStats {
                    throttle_hw_slowdown: Some(true),
                    ..fine()
                },
                "hardware slowdown",
            ),
            (
                pb::GpuStats {
                    retired_pages_pending: Some(true),
                    ..fine()
                },
                "retired pages pending (reset needed)",
            ),
            (
                pb::GpuStats {
                    row_remap_pending: Some(true),
                    ..fine()
                },
                "row remap pending (reset needed)",
            ),
            (
                pb::GpuStats {
                    xid_errors: vec![13],
                    ..fine()
                },
                "xid 13",
            ),
        ];
        for (gpu, reason) in cases {
            assert_eq!(
                judge(&gpu, None),
                (pb::GpuHealth::Degraded, vec![reason.to_owned()])
            );
        }
        let both = pb::GpuStats {
            throttle_thermal: Some(true),
            xid_errors: vec![79],
            ..fine()
        };
        assert_eq!(
            judge(&both, None),
            (
                pb::GpuHealth::Unhealthy,
                vec![
                    "xid 79 (GPU has fallen off the bus)".to_owned(),
                    "thermal throttling".to_owned()
                ]
            )
        );
    }

    #[test]
    fn a_correctable_burst_between_readings_is_degraded_and_passes() {
        let mut tracker = HealthTracker::default();
        let reading = |count| {
            vec![pb::GpuStats {
                ecc_correctable_volatile: Some(count),
                ..fine()
            }]
        };
        let mut first = reading(5000);
        tracker.assess(&mut first);
        // The first reading has nothing to compare with: a high count
        // accumulated since the driver loaded is no burst.
        assert_eq!(first[0].health, pb::GpuHealth::Healthy as i32);
        let mut burst = reading(5000 + CORRECTABLE_BURST);
        tracker.assess(&mut burst);
        assert_eq!(burst[0].health, pb::GpuHealth::Degraded as i32);
        assert_eq!(
            burst[0].health_reasons,
            vec![format!("correctable ECC error burst: +{CORRECTABLE_BURST}")]
        );
        let mut calm = reading(5000 + CORRECTABLE_BURST + 1);
        tracker.assess(&mut calm);
        assert_eq!(calm[0].health, pb::GpuHealth::Healthy as i32);
        // A reset counter (driver reload) is no burst.
        let mut reset = reading(0);
        tracker.assess(&mut reset);
        assert_eq!(reset[0].health, pb::GpuHealth::Healthy as i32);
    }
}
