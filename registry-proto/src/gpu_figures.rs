//! GPU figures as a data-centre GPU in good order reports them, for the
//! contract's fake senders: node-agent's fake GPU source, fleet-sim's
//! `--all-gpu-figures` beats and the codec's buffer test. One spelling of
//! "every NVML figure node-agent reads" keeps the three alike when a figure
//! is added to the contract.

use crate::pb;

/// What varies between the fake senders; the rest of the figures say
/// nothing is wrong.
#[derive(Debug, Clone, Copy)]
pub struct GoodOrder {
    /// Corrected ECC errors since the driver loaded (`None`: not read).
    pub ecc_correctable: Option<u64>,
    /// Power drawn now, in milliwatts.
    pub power_draw_milliwatts: u32,
    /// The enforced power limit, in milliwatts.
    pub power_limit_milliwatts: u32,
}

impl GoodOrder {
    /// `basic` (memory, utilisation, temperature, health) with every other
    /// figure node-agent reads from NVML: ECC on without uncorrectable
    /// errors, no page retirement or row remapping pending or failed, no
    /// throttling, and the power figures of `self`.
    pub fn figures(self, basic: pb::GpuStats) -> pb::GpuStats {
        pb::GpuStats {
            ecc_enabled: Some(true),
            ecc_uncorrectable_volatile: Some(0),
            ecc_correctable_volatile: self.ecc_correctable,
            retired_pages_pending: Some(false),
            row_remap_pending: Some(false),
            row_remap_failed: Some(false),
            throttle_thermal: Some(false),
            throttle_power: Some(false),
            throttle_hw_slowdown: Some(false),
            power_draw_milliwatts: Some(self.power_draw_milliwatts),
            power_limit_milliwatts: Some(self.power_limit_milliwatts),
            ..basic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_basic_figures_stay_and_every_other_one_is_set() {
        let basic = pb::GpuStats {
            index: 3,
            memory_used_bytes: 1 << 30,
            memory_free_bytes: 79 << 30,
            utilization_percent: 40,
            temperature_celsius: Some(50),
            health: pb::GpuHealth::Healthy as i32,
            ..Default::default()
        };
        let good = GoodOrder {
            ecc_correctable: Some(2),
            power_draw_milliwatts: 300_000,
            power_limit_milliwatts: 700_000,
        };
        let all = good.figures(basic.clone());
        assert_eq!(
            (all.index, all.memory_used_bytes, all.utilization_percent),
            (3, 1 << 30, 40)
        );
        assert_eq!(all.temperature_celsius, basic.temperature_celsius);
        assert_eq!(all.ecc_correctable_volatile, Some(2));
        assert_eq!(all.power_draw_milliwatts, Some(300_000));
        assert!(all.throttle_thermal.is_some() && all.row_remap_failed.is_some());
        // Nothing left unset that a real agent sends, but the xids and
        // health reasons of a sick GPU.
        assert_eq!(all.ecc_uncorrectable_volatile, Some(0));
        assert_eq!(all.power_limit_milliwatts, Some(700_000));
    }
}
