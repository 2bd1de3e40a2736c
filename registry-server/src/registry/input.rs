//! What the registry accepts as input: a registration and a heartbeat that
//! passed [`crate::validate`], and the time they happen at. Plain domain
//! types, so the registry core never sees a raw protobuf request or reads a
//! clock.

use chrono::{DateTime, Utc};
use registry_proto::pb;
use tokio::time::Instant;

use crate::packed_strings::{self, PackedStrings};

/// A registration that passed validation: the contract's fields, checked,
/// as the registry keeps them for as long as the node is known. Its five
/// strings (id, machine id, address, agent version, metrics address) are
/// one allocation, read through accessors; build one from a
/// [`NewRegistration`].
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The node id, machine id, address, agent version and metrics
    /// address, one after the other (see the accessors).
    strings: PackedStrings<4>,
    /// Pools the node runs, unique by pool_id, each kept compact.
    pub pools: crate::pool_specs::PoolSpecs,
    /// Hardware of the node, its GPUs' ids packed (or the GPUs encoded
    /// whole), the rest shared with nodes of the same GPUs.
    pub capabilities: crate::hardware::Hardware,
    /// Models staged on disk but not loaded (CLOUD-5010), for ListModels
    /// and the placement index.
    pub models_available: Box<[String]>,
    /// Labels that ListNodes, WatchNodes and FindPools filter on.
    pub labels: Labels,
}

/// The places of a registration's strings in `Registration::strings`.
const NODE_ID: usize = 0;
const MACHINE_ID: usize = 1;
const ADDRESS: usize = 2;
const AGENT_VERSION: usize = 3;
const METRICS_ADDRESS: usize = 4;

impl Registration {
    /// DNS-label node name; the registry's key.
    pub fn node_id(&self) -> &str {
        self.strings.get(NODE_ID)
    }

    /// Host identity, to tell two hosts claiming one node_id apart.
    pub fn machine_id(&self) -> &str {
        self.strings.get(MACHINE_ID)
    }

    /// Endpoint URL that orchestrators use to reach the node.
    pub fn address(&self) -> &str {
        self.strings.get(ADDRESS)
    }

    /// Version of the registering agent, for fleet audits.
    pub fn agent_version(&self) -> &str {
        self.strings.get(AGENT_VERSION)
    }

    /// URL of the agent's Prometheus metrics (empty: none), for service
    /// discovery.
    pub fn metrics_address(&self) -> &str {
        self.strings.get(METRICS_ADDRESS)
    }

    /// Writes the registration's fields into `node`, as copies.
    pub fn put_into(&self, node: &mut pb::Node) {
        // Every field of the registration is named here and every field
        // of `Node` in `NodeView::with_fields`, so a field added to the
        // contract or to the registration does not compile until it is
        // given its part.
        let Self {
            strings: _,
            pools,
            capabilities,
            models_available,
            labels,
        } = self;
        node.node_id = self.node_id().to_owned();
        node.machine_id = self.machine_id().to_owned();
        node.address = self.address().to_owned();
        node.agent_version = self.agent_version().to_owned();
        node.metrics_address = self.metrics_address().to_owned();
        node.pools = pools.to_proto();
        node.capabilities = Some(capabilities.to_proto());
        node.models_available = models_available.to_vec();
        node.labels = labels.to_map();
    }
}

/// A registration's fields one by one, as validation (or a test) has them,
/// before the registry keeps them compact as a [`Registration`].
#[derive(Debug, Clone, Default)]
pub struct NewRegistration {
    /// See [`Registration::node_id`].
    pub node_id: String,
    /// See [`Registration::machine_id`].
    pub machine_id: String,
    /// See [`Registration::address`].
    pub address: String,
    /// See [`Registration::pools`].
    pub pools: crate::pool_specs::PoolSpecs,
    /// See [`Registration::capabilities`].
    pub capabilities: crate::hardware::Hardware,
    /// See [`Registration::agent_version`].
    pub agent_version: String,
    /// See [`Registration::metrics_address`].
    pub metrics_address: String,
    /// See [`Registration::models_available`].
    pub models_available: Vec<String>,
    /// See [`Registration::labels`].
    pub labels: Labels,
}

impl From<NewRegistration> for Registration {
    fn from(new: NewRegistration) -> Self {
        let NewRegistration {
            node_id,
            machine_id,
            address,
            pools,
            capabilities,
            agent_version,
            metrics_address,
            models_available,
            labels,
        } = new;
        Self {
            // In the order of NODE_ID, MACHINE_ID, ADDRESS, AGENT_VERSION,
            // METRICS_ADDRESS.
            strings: PackedStrings::new([
                &node_id,
                &machine_id,
                &address,
                &agent_version,
                &metrics_address,
            ]),
            pools,
            capabilities,
            // Validation fits the list to its length: no copy here.
            models_available: models_available.into_boxed_slice(),
            labels,
        }
    }
}

/// A node's labels, sorted by key, each key and value one after the other
/// in one boxed `str` with where each ends ([`packed_strings::pack_all`]):
/// 32 bytes in every registration and two allocations (~55 bytes at three
/// short labels), where a boxed slice of `(String, String)` took ~250 with an
/// allocation per string. Lookups are binary searches.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Labels {
    /// Key, value, key, value, ... in key order.
    text: Box<str>,
    /// Where each key and each value ends in `text`: two per label.
    ends: Box<[u32]>,
}

impl Labels {
    /// The `i`-th label's key.
    fn key(&self, i: usize) -> &str {
        packed_strings::unpack_all(&self.text, &self.ends, 2 * i)
    }

    /// The `i`-th label's value.
    fn value(&self, i: usize) -> &str {
        packed_strings::unpack_all(&self.text, &self.ends, 2 * i + 1)
    }

    /// The value of `key`, if the node has that label.
    pub fn get(&self, key: &str) -> Option<&str> {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let mid = low + (high - low) / 2;
            match self.key(mid).cmp(key) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Some(self.value(mid)),
            }
        }
        None
    }

    /// Every label, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        (0..self.len()).map(|i| (self.key(i), self.value(i)))
    }

    /// How many labels the node has.
    pub fn len(&self) -> usize {
        self.ends.len() / 2
    }

    /// Whether the node has none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The labels as the contract's map.
    pub fn to_map(&self) -> std::collections::HashMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

impl std::fmt::Debug for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(String, String)> for Labels {
    /// Sorted by key; of two equal keys the last one stays (as a map's
    /// insert keeps it).
    fn from_iter<I: IntoIterator<Item = (String, String)>>(labels: I) -> Self {
        let mut labels: Vec<(String, String)> = labels.into_iter().collect();
        // Stable: equal keys keep their order, and the dedup keeps the last.
        labels.sort_by(|a, b| a.0.cmp(&b.0));
        labels.reverse();
        labels.dedup_by(|later, kept| later.0 == kept.0);
        labels.reverse();
        let (text, ends) =
            packed_strings::pack_all(labels.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]));
        Self { text, ends }
    }
}

impl From<std::collections::HashMap<String, String>> for Labels {
    fn from(labels: std::collections::HashMap<String, String>) -> Self {
        labels.into_iter().collect()
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(labels: [(String, String); N]) -> Self {
        labels.into_iter().collect()
    }
}

/// One heartbeat message that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Beat {
    /// The agent's clock when it sent the message.
    pub sent_at: DateTime<Utc>,
    /// The server's clock when the message was validated: read once per
    /// message and reused as last_heartbeat_at and in the ack.
    pub received_at: DateTime<Utc>,
    /// Status of every pool, unique by pool_id.
    pub pools: Vec<pb::PoolStatus>,
    /// Live GPU figures; empty when the agent sent none.
    pub gpus: Vec<pb::GpuStats>,
}

/// Both clocks, read once by the caller (the gRPC service or the expiry
/// loop) and passed in, so the registry itself never reads a clock: its
/// rules are plain functions of their inputs, and tests drive them with
/// tokio's paused clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for deadlines and retention.
    pub at: Instant,
    /// Wall-clock time, for the timestamps operators read.
    pub wall: DateTime<Utc>,
}

impl Now {
    /// Reads both clocks.
    pub fn read() -> Self {
        Self {
            at: Instant::now(),
            wall: Utc::now(),
        }
    }
}

/// `items` in an allocation of their own length, for lists kept as long as
/// a node or a view lives (the models staged on disk): prost's decoder
/// grows a repeated field by doubling from four, so two pools held room
/// for four (~400 bytes per registration before pool specs were kept
/// compact in `pool_specs`, ~240 per view's pool status). A copy only
/// where there is spare room. Not `Vec::shrink_to_fit`: mimalloc's realloc keeps a block
/// in place when the new size is at least half the old, and collecting
/// `into_iter()` reuses the allocation; `extend` into a fresh vector does
/// neither.
pub(crate) fn fitted<T>(items: Vec<T>) -> Vec<T> {
    if items.capacity() == items.len() {
        return items;
    }
    let mut fitted = Vec::with_capacity(items.len());
    fitted.extend(items);
    fitted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn labels_are_found_by_key_and_read_back_as_the_map_they_came_from() {
        let map: std::collections::HashMap<String, String> = [
            label("zone", "eu-1"),
            label("rack", "r7"),
            label("tier", ""),
        ]
        .into();
        let labels = Labels::from(map.clone());
        assert_eq!(labels.len(), 3);
        assert_eq!(labels.get("zone"), Some("eu-1"));
        assert_eq!(labels.get("tier"), Some(""));
        assert_eq!(labels.get("region"), None);
        let keys: Vec<&str> = labels.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["rack", "tier", "zone"], "sorted by key");
        assert_eq!(labels.to_map(), map);
        assert!(Labels::default().is_empty());
        assert_eq!(Labels::default().get(""), None);
    }

    #[test]
    fn a_registration_reads_back_its_strings_and_writes_back_every_field() {
        let new = NewRegistration {
            node_id: "gpu-node-1".into(),
            machine_id: "machine-1".into(),
            address: "http://10.0.0.1:9200".into(),
            pools: vec![pb::PoolSpec {
                pool_id: "pool-0".into(),
                ..Default::default()
            }]
            .into(),
            capabilities: pb::Capabilities {
                cpu_cores: 96,
                driver_version: "550.54.15".into(),
                ..Default::default()
            }
            .into(),
            agent_version: "0.4.0".into(),
            metrics_address: String::new(),
            models_available: vec!["llama-3.1-70b".into()],
            labels: [label("zone", "eu-1")].into(),
        };
        let registration = Registration::from(new.clone());
        assert_eq!(registration.node_id(), "gpu-node-1");
        assert_eq!(registration.machine_id(), "machine-1");
        assert_eq!(registration.address(), "http://10.0.0.1:9200");
        assert_eq!(registration.agent_version(), "0.4.0");
        assert_eq!(registration.metrics_address(), "");
        let mut node = pb::Node::default();
        registration.put_into(&mut node);
        assert_eq!(
            (node.node_id, node.machine_id, node.address),
            (new.node_id, new.machine_id, new.address)
        );
        assert_eq!(
            (node.agent_version, node.metrics_address),
            (new.agent_version, new.metrics_address)
        );
        assert_eq!(node.pools, new.pools.to_proto());
        assert_eq!(node.capabilities, Some(new.capabilities.to_proto()));
        assert_eq!(node.models_available, new.models_available);
        assert_eq!(node.labels, new.labels.to_map());
        // Five strings in one allocation, the labels in two: 144 bytes
        // inline, 160 in the view's `Arc` (the 160-byte size class; 320
        // with five `String`s and the capabilities' own strings).
        assert_eq!(std::mem::size_of::<Registration>(), 144);
    }

    #[test]
    fn many_labels_and_empty_strings_are_found_by_binary_search() {
        let map: std::collections::HashMap<String, String> = (0..64)
            .map(|i| {
                (
                    format!("key-{i:02}"),
                    if i % 3 == 0 {
                        String::new()
                    } else {
                        format!("v{i}")
                    },
                )
            })
            .chain([(String::new(), "empty key".to_string())])
            .collect();
        let labels = Labels::from(map.clone());
        assert_eq!(labels.len(), 65);
        for (k, v) in &map {
            assert_eq!(labels.get(k), Some(v.as_str()), "{k}");
        }
        for absent in ["key-", "key-64", "key-00x", "zzz", "a"] {
            assert_eq!(labels.get(absent), None, "{absent}");
        }
        assert_eq!(labels.to_map(), map);
        let small = Labels::from([label("zone", "eu-1"), label("rack", "")]);
        assert_eq!(format!("{small:?}"), r#"{"rack": "", "zone": "eu-1"}"#);
    }

    proptest::proptest! {
        /// Whatever the keys and values (multi-byte characters included),
        /// every label is found and the map reads back as given.
        #[test]
        fn any_labels_read_back_as_given(
            map in proptest::collection::hash_map(".{0,8}", ".{0,8}", 0..12),
        ) {
            let labels = Labels::from(map.clone());
            proptest::prop_assert_eq!(labels.len(), map.len());
            for (k, v) in &map {
                proptest::prop_assert_eq!(labels.get(k), Some(v.as_str()));
            }
            proptest::prop_assert_eq!(labels.to_map(), map);
        }
    }

    #[test]
    fn of_two_equal_keys_the_last_stays() {
        let labels: Labels = [label("zone", "a"), label("rack", "r1"), label("zone", "b")]
            .into_iter()
            .collect();
        assert_eq!(labels.len(), 2);
        assert_eq!(labels.get("zone"), Some("b"));
    }
}
