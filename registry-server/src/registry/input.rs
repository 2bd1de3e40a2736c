//! What the registry accepts as input: a registration and a heartbeat that
//! passed [`crate::validate`], and the time they happen at. Plain domain
//! types, so the registry core never sees a raw protobuf request or reads a
//! clock.

use chrono::{DateTime, Utc};
use registry_proto::pb;
use tokio::time::Instant;

/// A registration that passed validation: the contract's fields, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// DNS-label node name; the registry's key.
    pub node_id: String,
    /// Host identity, to tell two hosts claiming one node_id apart.
    pub machine_id: String,
    /// Endpoint URL that orchestrators use to reach the node.
    pub address: String,
    /// Pools the node runs, unique by pool_id, each kept compact.
    pub pools: crate::pool_specs::PoolSpecs,
    /// Hardware of the node, its GPUs' ids packed (or the GPUs encoded
    /// whole), the rest shared with nodes of the same GPUs.
    pub capabilities: crate::hardware::Hardware,
    /// Version of the registering agent, for fleet audits.
    pub agent_version: String,
    /// URL of the agent's Prometheus metrics (empty: none), for service
    /// discovery.
    pub metrics_address: String,
    /// Models staged on disk but not loaded (CLOUD-5010), for ListModels
    /// and the placement index.
    pub models_available: Vec<String>,
    /// Labels that ListNodes, WatchNodes and FindPools filter on.
    pub labels: Labels,
}

/// A node's labels, sorted by key, in one boxed slice: 16 bytes in every
/// registration where a `HashMap` took 48 (with a table of at least four
/// buckets behind it), for the handful of labels a node carries. Lookups
/// are binary searches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(String, String)]>);

impl Labels {
    /// The value of `key`, if the node has that label.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    /// Every label, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many labels the node has.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the node has none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The labels as the contract's map.
    pub fn to_map(&self) -> std::collections::HashMap<String, String> {
        self.0.iter().cloned().collect()
    }

    /// [`Labels::to_map`], taking the strings.
    pub fn into_map(self) -> std::collections::HashMap<String, String> {
        self.0.into_vec().into_iter().collect()
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
        Self(labels.into_boxed_slice())
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
        assert_eq!(labels.clone().into_map(), map);
        assert!(Labels::default().is_empty());
        assert_eq!(Labels::default().get(""), None);
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
