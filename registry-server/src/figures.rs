//! A node's latest GPU figures as the registry keeps them: encoded, as the
//! contract sends them, beside each GPU's health.
//!
//! A `pb::GpuStats` is 144 bytes in memory, mostly `Option`s, and a node
//! holds one per GPU in its published view (and again while a newer beat's
//! raw figures are not published). Encoded, a GPU's figures are 20-50
//! bytes. Only readers (GetNode, ListNodes, the watch feed) need the
//! figures themselves, and they decode them as they copied them before;
//! the hot paths (placement, the gauges, whether a beat changes health)
//! read the health part, kept decoded.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use registry_proto::pb;

/// The latest GPU figures of a node. Cloning shares them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuFigures {
    /// The figures as `Node.gpu_stats` (tag 12) encodes them, in the
    /// reported order: what readers decode and the watch history appends
    /// to a view's encoded fields.
    encoded: Bytes,
    /// Each GPU's index, health and reasons, in the same order.
    health: Arc<[GpuHealth]>,
}

/// One GPU's health as its figures report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuHealth {
    /// The GPU's index on its node (`GpuStats.index`).
    pub index: u32,
    /// `pb::GpuHealth` as the contract numbers it.
    pub health: i32,
    /// Why it is not HEALTHY (empty when it is).
    pub reasons: Box<[String]>,
}

impl GpuHealth {
    /// Whether placement must skip the GPU.
    pub fn is_unhealthy(&self) -> bool {
        self.health == pb::GpuHealth::Unhealthy as i32
    }
}

/// `Node` with only its GPU figures: decodes them from their tag in `Node`.
#[derive(Clone, PartialEq, prost::Message)]
struct FiguresOnly {
    /// `Node.gpu_stats`.
    #[prost(message, repeated, tag = "12")]
    gpu_stats: Vec<pb::GpuStats>,
}

/// The tag of `Node.gpu_stats`, under which the figures are encoded.
const GPU_STATS_TAG: u32 = 12;

/// A beat's GPU figures encoded, before they are kept (encoding is done
/// before the node's lock is taken; what is kept is decided under it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedGpus(Bytes);

impl EncodedGpus {
    /// Encodes `gpus` as `Node.gpu_stats` encodes them.
    pub fn of(gpus: &[pb::GpuStats]) -> Self {
        use prost::encoding::message;
        let len = gpus
            .iter()
            .map(|g| message::encoded_len(GPU_STATS_TAG, g))
            .sum();
        let mut buf = Vec::with_capacity(len);
        for g in gpus {
            message::encode(GPU_STATS_TAG, g, &mut buf);
        }
        Self(Bytes::from(buf))
    }
}

impl GpuFigures {
    /// Keeps `gpus` (a beat's figures, validated).
    pub fn new(gpus: &[pb::GpuStats]) -> Self {
        GpuFigures::default().followed_by(EncodedGpus::of(gpus), gpus)
    }

    /// The figures `gpus`, encoded as `encoded`, that follow these: the
    /// health part is shared with these when it is the same (the common
    /// case: only raw figures move), so a beat allocates only its encoding.
    pub fn followed_by(&self, encoded: EncodedGpus, gpus: &[pb::GpuStats]) -> Self {
        let health = if self.health_matches(gpus) {
            Arc::clone(&self.health)
        } else {
            gpus.iter()
                .map(|g| GpuHealth {
                    index: g.index,
                    health: g.health,
                    reasons: g.health_reasons.clone().into_boxed_slice(),
                })
                .collect()
        };
        Self {
            encoded: encoded.0,
            health,
        }
    }

    /// Whether `gpus` report the same GPUs with the same health and
    /// reasons as these: no change readers must be told about.
    pub fn health_matches(&self, gpus: &[pb::GpuStats]) -> bool {
        self.health.len() == gpus.len()
            && self.health.iter().zip(gpus).all(|(old, new)| {
                old.index == new.index
                    && old.health == new.health
                    && *old.reasons == *new.health_reasons
            })
    }

    /// Whether no GPU is reported.
    pub fn is_empty(&self) -> bool {
        self.health.is_empty()
    }

    /// Each GPU's health, in the reported order.
    pub fn health(&self) -> &[GpuHealth] {
        &self.health
    }

    /// The figures as `Node.gpu_stats` encodes them.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The figures as the contract sends them, for a reader's copy.
    pub fn to_proto(&self) -> Vec<pb::GpuStats> {
        // Only `EncodedGpus::of` encodes these bytes, from figures that
        // encoded; one allocation for the list.
        let mut figures = FiguresOnly {
            gpu_stats: Vec::with_capacity(self.health.len()),
        };
        figures
            .merge(self.encoded.clone())
            .expect("GPU figures encoded by EncodedGpus::of decode");
        figures.gpu_stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, health: pb::GpuHealth, reasons: &[&str]) -> pb::GpuStats {
        pb::GpuStats {
            index,
            memory_used_bytes: 40 << 30,
            memory_free_bytes: 40 << 30,
            utilization_percent: 87,
            temperature_celsius: Some(61),
            health: health as i32,
            health_reasons: reasons.iter().map(|r| r.to_string()).collect(),
            ecc_enabled: Some(true),
            ecc_uncorrectable_volatile: Some(0),
            power_draw_milliwatts: Some(350_000),
            xid_errors: if reasons.is_empty() { vec![] } else { vec![79] },
            ..Default::default()
        }
    }

    #[test]
    fn figures_read_back_as_reported_and_encode_as_a_node_field() {
        let gpus = vec![
            gpu(0, pb::GpuHealth::Healthy, &[]),
            gpu(1, pb::GpuHealth::Unhealthy, &["xid 79"]),
        ];
        let figures = GpuFigures::new(&gpus);
        assert_eq!(figures.to_proto(), gpus);
        assert!(!figures.is_empty());
        let health: Vec<_> = figures
            .health()
            .iter()
            .map(|g| (g.index, g.is_unhealthy(), g.reasons.to_vec()))
            .collect();
        assert_eq!(
            health,
            [(0, false, vec![]), (1, true, vec!["xid 79".to_string()])]
        );
        // The encoded figures are a Node's gpu_stats field.
        let node = pb::Node::decode(figures.encoded()).unwrap();
        assert_eq!(
            node,
            pb::Node {
                gpu_stats: gpus,
                ..Default::default()
            }
        );
        // Far smaller than the decoded messages.
        assert!(
            figures.encoded().len() < 2 * 60,
            "{}",
            figures.encoded().len()
        );
    }

    #[test]
    fn no_figures_are_empty_and_encode_to_nothing() {
        let none = GpuFigures::new(&[]);
        assert!(none.is_empty() && none.encoded().is_empty());
        assert_eq!(none, GpuFigures::default());
        assert!(none.to_proto().is_empty());
    }

    #[test]
    fn only_health_reasons_or_the_set_of_gpus_change_health() {
        let base = GpuFigures::new(&[gpu(0, pb::GpuHealth::Healthy, &[])]);
        let mut hotter = gpu(0, pb::GpuHealth::Healthy, &[]);
        hotter.temperature_celsius = Some(90);
        hotter.memory_used_bytes += 1;
        assert!(base.health_matches(std::slice::from_ref(&hotter)));
        let sick = [gpu(0, pb::GpuHealth::Unhealthy, &["xid 79"])];
        assert!(!base.health_matches(&sick));
        let reworded = [gpu(0, pb::GpuHealth::Unhealthy, &["xid 48"])];
        assert!(!GpuFigures::new(&sick).health_matches(&reworded));
        assert!(!base.health_matches(&[gpu(1, pb::GpuHealth::Healthy, &[])]));
        let more = [
            gpu(0, pb::GpuHealth::Healthy, &[]),
            gpu(1, pb::GpuHealth::Healthy, &[]),
        ];
        assert!(!base.health_matches(&more));
    }

    #[test]
    fn figures_that_keep_their_health_share_it() {
        let first = GpuFigures::new(&[gpu(0, pb::GpuHealth::Healthy, &[])]);
        let mut hotter = gpu(0, pb::GpuHealth::Healthy, &[]);
        hotter.temperature_celsius = Some(90);
        let next = first.followed_by(
            EncodedGpus::of(std::slice::from_ref(&hotter)),
            &[hotter.clone()],
        );
        assert!(Arc::ptr_eq(&first.health, &next.health));
        assert_eq!(next.to_proto(), [hotter]);
        let sick = [gpu(0, pb::GpuHealth::Unhealthy, &["xid 79"])];
        let after = next.followed_by(EncodedGpus::of(&sick), &sick);
        assert!(!Arc::ptr_eq(&next.health, &after.health));
        assert!(after.health()[0].is_unhealthy());
        assert_eq!(after, GpuFigures::new(&sick));
    }
}
