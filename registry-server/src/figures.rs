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
//!
//! The health part of GPUs numbered from 0 and all HEALTHY without reasons
//! (nearly every node, nearly always) is one list shared by every node,
//! not a list per node (~200 bytes each at 8 GPUs).

use std::sync::{Arc, OnceLock};

use prost::Message;
use registry_proto::pb;
use registry_proto::rules::MAX_GPUS;

/// The latest GPU figures of a node. Cloning copies the encoded figures
/// (a reader's copy, a publish without newer figures) and shares the
/// health part.
#[derive(Debug, Clone, Default)]
pub struct GpuFigures {
    /// The figures as `Node.gpu_stats` (tag 12) encodes them, in the
    /// reported order: what readers decode and the watch history appends
    /// to a view's encoded fields. A boxed slice (16 bytes, exactly the
    /// encoding's length allocated) rather than `Bytes` (32): every node
    /// holds one in its view and often another in its state, and a beat's
    /// figures move from the one to the other instead of being shared.
    encoded: Box<[u8]>,
    /// Each GPU's index, health and reasons, in the same order.
    health: HealthList,
}

impl PartialEq for GpuFigures {
    fn eq(&self, other: &Self) -> bool {
        self.encoded == other.encoded && self.health() == other.health()
    }
}

/// The health part of a node's GPU figures.
#[derive(Debug, Clone)]
enum HealthList {
    /// GPUs 0 to n - 1, every one HEALTHY without reasons: the first n of
    /// [`all_healthy`], held by no node (no count to touch either).
    AllHealthy(usize),
    /// Any other list, shared by the node's figures while it stays the same.
    Listed(Arc<[GpuHealth]>),
}

impl Default for HealthList {
    fn default() -> Self {
        HealthList::AllHealthy(0)
    }
}

impl HealthList {
    /// The health part of `gpus`.
    fn of(gpus: &[pb::GpuStats]) -> Self {
        let healthy = gpus.len() <= MAX_GPUS
            && gpus.iter().enumerate().all(|(i, g)| {
                usize::try_from(g.index) == Ok(i)
                    && g.health == pb::GpuHealth::Healthy as i32
                    && g.health_reasons.is_empty()
            });
        if healthy {
            return HealthList::AllHealthy(gpus.len());
        }
        HealthList::Listed(
            gpus.iter()
                .map(|g| GpuHealth {
                    index: g.index,
                    health: g.health,
                    reasons: g.health_reasons.clone().into_boxed_slice(),
                })
                .collect(),
        )
    }

    fn as_slice(&self) -> &[GpuHealth] {
        match self {
            HealthList::AllHealthy(n) => &all_healthy()[..*n],
            HealthList::Listed(list) => list,
        }
    }
}

/// GPUs 0 to `MAX_GPUS` - 1, each HEALTHY without reasons, built once.
fn all_healthy() -> &'static [GpuHealth] {
    static LIST: OnceLock<Box<[GpuHealth]>> = OnceLock::new();
    LIST.get_or_init(|| {
        (0..MAX_GPUS)
            .map(|i| GpuHealth {
                index: u32::try_from(i).expect("MAX_GPUS fits in u32"),
                health: pb::GpuHealth::Healthy as i32,
                reasons: Box::default(),
            })
            .collect()
    })
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
pub struct EncodedGpus(Box<[u8]>);

impl EncodedGpus {
    /// Encodes `gpus` as `Node.gpu_stats` encodes them. This runs for every
    /// beat, so each GPU is encoded once, its length written after it: the
    /// usual way (the total length first, then each message behind its
    /// length) measured every GPU twice before writing it, ~2,200 of a
    /// beat's ~48,000 instructions at 8 GPUs. They are written into this
    /// thread's scratch buffer and copied out at their exact length.
    pub fn of(gpus: &[pb::GpuStats]) -> Self {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            encode_each(gpus, buf);
            let encoded = Self(Box::from(&buf[..]));
            // A rare large beat does not keep its room on the thread.
            if buf.capacity() > MAX_KEPT_SCRATCH {
                *buf = Vec::new();
            }
            encoded
        })
    }
}

/// The scratch room [`EncodedGpus::of`] keeps between beats: 64 GPUs of
/// every figure and a few reasons each.
const MAX_KEPT_SCRATCH: usize = 16 << 10;

/// Appends `gpus` to `buf` as repeated `Node.gpu_stats` fields: each behind
/// a one-byte length while it is under 128 bytes (a GPU's figures are
/// ~20-60), widened afterwards when it is not.
fn encode_each(gpus: &[pb::GpuStats], buf: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    for g in gpus {
        encode_key(GPU_STATS_TAG, WireType::LengthDelimited, buf);
        let at = buf.len();
        buf.push(0);
        g.encode_raw(buf);
        let len = buf.len() - at - 1;
        match u8::try_from(len) {
            Ok(len) if len < 0x80 => buf[at] = len,
            _ => {
                let mut prefix = Vec::with_capacity(10);
                encode_varint(len as u64, &mut prefix);
                buf.splice(at..=at, prefix);
            }
        }
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
            self.health.clone()
        } else {
            HealthList::of(gpus)
        };
        Self {
            encoded: encoded.0,
            health,
        }
    }

    /// Whether `gpus` report the same GPUs with the same health and
    /// reasons as these: no change readers must be told about.
    pub fn health_matches(&self, gpus: &[pb::GpuStats]) -> bool {
        let health = self.health();
        health.len() == gpus.len()
            && health.iter().zip(gpus).all(|(old, new)| {
                old.index == new.index
                    && old.health == new.health
                    && *old.reasons == *new.health_reasons
            })
    }

    /// Whether no GPU is reported.
    pub fn is_empty(&self) -> bool {
        self.health().is_empty()
    }

    /// Each GPU's health, in the reported order.
    pub fn health(&self) -> &[GpuHealth] {
        self.health.as_slice()
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
            gpu_stats: Vec::with_capacity(self.health().len()),
        };
        figures
            .merge(&*self.encoded)
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
    fn each_gpu_encodes_as_prost_writes_a_repeated_field() {
        let long = "r".repeat(200);
        let sets = [
            vec![],
            vec![gpu(0, pb::GpuHealth::Healthy, &[])],
            (0..8)
                .map(|i| gpu(i, pb::GpuHealth::Healthy, &[]))
                .collect(),
            // Figures whose lengths take one, two and three bytes, the
            // longer ones between short ones.
            vec![
                gpu(0, pb::GpuHealth::Healthy, &[]),
                gpu(1, pb::GpuHealth::Unhealthy, &[&long]),
                gpu(2, pb::GpuHealth::Healthy, &[]),
                gpu(3, pb::GpuHealth::Unhealthy, &[&"x".repeat(16_400)]),
            ],
        ];
        // And figures of exactly 127 and 128 bytes, the last one-byte
        // length and the first two-byte one.
        let sized = |len: usize| {
            let mut reason = String::new();
            loop {
                let g = gpu(0, pb::GpuHealth::Unhealthy, &[&reason]);
                match g.encoded_len().cmp(&len) {
                    std::cmp::Ordering::Less => reason.push('r'),
                    std::cmp::Ordering::Equal => return g,
                    std::cmp::Ordering::Greater => panic!("no reason makes {len} bytes"),
                }
            }
        };
        let sets = sets
            .into_iter()
            .chain([vec![sized(127), sized(128)], vec![sized(128), sized(127)]]);
        let mut lengths = Vec::new();
        for gpus in sets {
            let mut expected = Vec::new();
            for g in &gpus {
                prost::encoding::message::encode(GPU_STATS_TAG, g, &mut expected);
                lengths.push(g.encoded_len());
            }
            assert_eq!(&*EncodedGpus::of(&gpus).0, &expected[..]);
        }
        assert!(lengths.contains(&127) && lengths.contains(&128));
        assert!(lengths.iter().any(|&l| l < 0x80));
        assert!(lengths.iter().any(|&l| (0x80..0x4000).contains(&l)));
        assert!(lengths.iter().any(|&l| l >= 0x4000));
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
        let sick = [gpu(0, pb::GpuHealth::Unhealthy, &["xid 79"])];
        let first = GpuFigures::new(&sick);
        let mut hotter = sick[0].clone();
        hotter.temperature_celsius = Some(90);
        let next = first.followed_by(
            EncodedGpus::of(std::slice::from_ref(&hotter)),
            &[hotter.clone()],
        );
        assert!(std::ptr::eq(first.health(), next.health()));
        assert_eq!(next.to_proto(), [hotter]);
        let well = [gpu(0, pb::GpuHealth::Healthy, &[])];
        let after = next.followed_by(EncodedGpus::of(&well), &well);
        assert!(!std::ptr::eq(next.health(), after.health()));
        assert!(!after.health()[0].is_unhealthy());
        assert_eq!(after, GpuFigures::new(&well));
    }

    #[test]
    fn healthy_gpus_numbered_from_zero_share_one_list_across_nodes() {
        let healthy = |n: u32| -> Vec<_> {
            (0..n)
                .map(|i| gpu(i, pb::GpuHealth::Healthy, &[]))
                .collect()
        };
        let one = GpuFigures::new(&healthy(8));
        let other = GpuFigures::new(&healthy(8));
        assert!(std::ptr::eq(one.health(), other.health()));
        assert!(matches!(one.health, HealthList::AllHealthy(8)));
        // Read back as reported, like a list of its own.
        let read: Vec<_> = one.health().iter().map(|g| (g.index, g.health)).collect();
        let healthy_code = pb::GpuHealth::Healthy as i32;
        assert_eq!(read, (0..8).map(|i| (i, healthy_code)).collect::<Vec<_>>());
        assert!(one.health().iter().all(|g| g.reasons.is_empty()));
        assert_eq!(GpuFigures::new(&healthy(2)).health().len(), 2);
        // The most GPUs a node may report still share it.
        let most = u32::try_from(MAX_GPUS).unwrap();
        assert!(matches!(
            GpuFigures::new(&healthy(most)).health,
            HealthList::AllHealthy(MAX_GPUS)
        ));
        // Anything else is a list of its own: other numbering, a health
        // other than HEALTHY (UNSPECIFIED from older agents too), reasons.
        let mut skipped = healthy(2);
        skipped[1].index = 5;
        let mut older = healthy(2);
        older[0].health = pb::GpuHealth::Unspecified as i32;
        let mut noted = healthy(2);
        noted[1].health_reasons = vec!["thermal throttling".into()];
        for gpus in [skipped, older, noted] {
            let figures = GpuFigures::new(&gpus);
            assert!(matches!(figures.health, HealthList::Listed(_)));
            let back: Vec<_> = figures
                .health()
                .iter()
                .map(|g| (g.index, g.health, g.reasons.to_vec()))
                .collect();
            let sent: Vec<_> = gpus
                .iter()
                .map(|g| (g.index, g.health, g.health_reasons.clone()))
                .collect();
            assert_eq!(back, sent);
            assert!(figures.health_matches(&gpus));
            assert!(!figures.health_matches(&healthy(2)));
        }
        // A node that recovers moves back to the shared list.
        let sick = [gpu(0, pb::GpuHealth::Unhealthy, &["xid 79"])];
        let well = GpuFigures::new(&sick).followed_by(EncodedGpus::of(&healthy(1)), &healthy(1));
        assert!(matches!(well.health, HealthList::AllHealthy(1)));
    }
}
