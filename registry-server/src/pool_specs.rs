//! A registration's pool specs as the registry keeps them: each pool's six
//! strings in one allocation.
//!
//! A `pb::PoolSpec` is ~200 bytes inline (six `String`s and two `Vec`s)
//! and one allocation per string, held as long as its node is: at 2 pools
//! ~700 bytes per node with the list, most of it string headers and size
//! class rounding. A [`PoolSpec`] is 72 bytes inline and keeps its pool id,
//! engine, model, engine version, metrics URL and endpoint in one boxed
//! `str`, read back through accessors. Readers that answer with the
//! contract's message (GetNode, ListNodes, the watch feed, the store's
//! record) put it back together with [`PoolSpecs::to_proto`], as they
//! deep-copied the message before.

use std::ops::Deref;

use registry_proto::pb;

use crate::packed_strings;

/// One registered pool.
#[derive(Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// The pool id, engine, model, engine version, metrics URL and endpoint,
    /// one after the other ([`packed_strings::pack`]).
    text: Box<str>,
    /// Where each of the first five strings ends in `text`.
    ends: [u32; 5],
    /// `PoolSpec.slots_total`, beside `ends` (a `PackedStrings` would
    /// leave 4 bytes of padding before it, and the spec would take 80).
    slots_total: u32,
    /// `PoolSpec.gpu_indices`, in the registered order.
    gpu_indices: Box<[u32]>,
    /// `PoolSpec.mig_uuids`, in the registered order; empty (no
    /// allocation) for a pool on whole GPUs.
    mig_uuids: Box<[String]>,
}

/// The places of the strings, in the order `PoolSpec::text` holds them.
const POOL_ID: usize = 0;
const ENGINE: usize = 1;
const MODEL: usize = 2;
const ENGINE_VERSION: usize = 3;
const METRICS_URL: usize = 4;
const ENDPOINT: usize = 5;

impl PoolSpec {
    /// Keeps `spec`.
    pub fn new(spec: pb::PoolSpec) -> Self {
        let pb::PoolSpec {
            pool_id,
            engine,
            model,
            slots_total,
            gpu_indices,
            engine_version,
            metrics_url,
            endpoint,
            mig_uuids,
        } = spec;
        // In the order of POOL_ID, ENGINE, MODEL, ENGINE_VERSION,
        // METRICS_URL, ENDPOINT.
        let (text, ends) = packed_strings::pack([
            &pool_id,
            &engine,
            &model,
            &engine_version,
            &metrics_url,
            &endpoint,
        ]);
        Self {
            text,
            ends,
            slots_total,
            gpu_indices: gpu_indices.into_boxed_slice(),
            mig_uuids: mig_uuids.into_boxed_slice(),
        }
    }

    /// The `i`-th string of `text`.
    fn string(&self, i: usize) -> &str {
        packed_strings::unpack(&self.text, &self.ends, i)
    }

    /// `PoolSpec.pool_id`.
    pub fn pool_id(&self) -> &str {
        self.string(POOL_ID)
    }

    /// `PoolSpec.engine`.
    pub fn engine(&self) -> &str {
        self.string(ENGINE)
    }

    /// `PoolSpec.model`.
    pub fn model(&self) -> &str {
        self.string(MODEL)
    }

    /// `PoolSpec.engine_version`.
    pub fn engine_version(&self) -> &str {
        self.string(ENGINE_VERSION)
    }

    /// `PoolSpec.metrics_url`.
    pub fn metrics_url(&self) -> &str {
        self.string(METRICS_URL)
    }

    /// `PoolSpec.endpoint`.
    pub fn endpoint(&self) -> &str {
        self.string(ENDPOINT)
    }

    /// `PoolSpec.slots_total`.
    pub fn slots_total(&self) -> u32 {
        self.slots_total
    }

    /// `PoolSpec.gpu_indices`.
    pub fn gpu_indices(&self) -> &[u32] {
        &self.gpu_indices
    }

    /// `PoolSpec.mig_uuids`.
    pub fn mig_uuids(&self) -> &[String] {
        &self.mig_uuids
    }

    /// The spec as the contract sends it.
    pub fn to_proto(&self) -> pb::PoolSpec {
        pb::PoolSpec {
            pool_id: self.pool_id().to_owned(),
            engine: self.engine().to_owned(),
            model: self.model().to_owned(),
            slots_total: self.slots_total,
            gpu_indices: self.gpu_indices.to_vec(),
            engine_version: self.engine_version().to_owned(),
            metrics_url: self.metrics_url().to_owned(),
            endpoint: self.endpoint().to_owned(),
            mig_uuids: self.mig_uuids.to_vec(),
        }
    }
}

impl std::fmt::Debug for PoolSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_proto().fmt(f)
    }
}

impl From<pb::PoolSpec> for PoolSpec {
    fn from(spec: pb::PoolSpec) -> Self {
        Self::new(spec)
    }
}

/// A registration's pools, in the registered order, in an allocation of
/// their own length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolSpecs(Box<[PoolSpec]>);

impl PoolSpecs {
    /// The pools as the contract sends them.
    pub fn to_proto(&self) -> Vec<pb::PoolSpec> {
        self.0.iter().map(PoolSpec::to_proto).collect()
    }
}

impl Deref for PoolSpecs {
    type Target = [PoolSpec];

    fn deref(&self) -> &[PoolSpec] {
        &self.0
    }
}

impl FromIterator<pb::PoolSpec> for PoolSpecs {
    fn from_iter<I: IntoIterator<Item = pb::PoolSpec>>(specs: I) -> Self {
        Self(specs.into_iter().map(PoolSpec::new).collect())
    }
}

impl From<Vec<pb::PoolSpec>> for PoolSpecs {
    fn from(specs: Vec<pb::PoolSpec>) -> Self {
        specs.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::PoolSpec {
        pb::PoolSpec {
            pool_id: "pool-a".into(),
            engine: "vllm".into(),
            model: "llama-3.1-8b".into(),
            slots_total: 16,
            gpu_indices: vec![3, 1],
            engine_version: "0.6.3".into(),
            metrics_url: "http://node-1:8000/metrics".into(),
            endpoint: "http://node-1:8000".into(),
            mig_uuids: vec!["MIG-1".into()],
        }
    }

    #[test]
    fn a_spec_reads_back_as_registered_field_by_field() {
        let kept = PoolSpec::new(spec());
        assert_eq!(kept.pool_id(), "pool-a");
        assert_eq!(kept.engine(), "vllm");
        assert_eq!(kept.model(), "llama-3.1-8b");
        assert_eq!(kept.engine_version(), "0.6.3");
        assert_eq!(kept.metrics_url(), "http://node-1:8000/metrics");
        assert_eq!(kept.endpoint(), "http://node-1:8000");
        assert_eq!(kept.slots_total(), 16);
        assert_eq!(kept.gpu_indices(), [3, 1]);
        assert_eq!(kept.mig_uuids(), ["MIG-1"]);
        assert_eq!(kept.to_proto(), spec());
        assert_eq!(format!("{kept:?}"), format!("{:?}", spec()));
    }

    #[test]
    fn empty_strings_and_lists_read_back_empty() {
        let kept = PoolSpec::new(pb::PoolSpec::default());
        assert_eq!(kept.to_proto(), pb::PoolSpec::default());
        let only_endpoint = pb::PoolSpec {
            endpoint: "http://e".into(),
            ..Default::default()
        };
        let kept = PoolSpec::new(only_endpoint.clone());
        assert_eq!((kept.pool_id(), kept.endpoint()), ("", "http://e"));
        assert_eq!(kept.to_proto(), only_endpoint);
    }

    #[test]
    fn a_list_keeps_its_order_and_compares_by_content() {
        let mut other = spec();
        other.pool_id = "pool-b".into();
        let specs = PoolSpecs::from(vec![spec(), other.clone()]);
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].pool_id(), "pool-b");
        assert_eq!(specs.to_proto(), vec![spec(), other.clone()]);
        assert_eq!(specs, PoolSpecs::from(vec![spec(), other.clone()]));
        assert_ne!(specs, PoolSpecs::from(vec![other, spec()]));
        assert!(PoolSpecs::default().is_empty());
        assert_eq!(std::mem::size_of::<PoolSpec>(), 72);
    }

    proptest::proptest! {
        /// Whatever the strings (multi-byte characters included), a spec
        /// reads back exactly.
        #[test]
        fn any_spec_reads_back_as_registered(
            strings in proptest::collection::vec(".{0,12}", 6),
            slots_total in 0u32..100,
            gpu_indices in proptest::collection::vec(0u32..64, 0..4),
        ) {
            let spec = pb::PoolSpec {
                pool_id: strings[0].clone(),
                engine: strings[1].clone(),
                model: strings[2].clone(),
                slots_total,
                gpu_indices,
                engine_version: strings[3].clone(),
                metrics_url: strings[4].clone(),
                endpoint: strings[5].clone(),
                mig_uuids: vec![],
            };
            proptest::prop_assert_eq!(PoolSpec::new(spec.clone()).to_proto(), spec);
        }
    }
}
