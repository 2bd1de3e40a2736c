//! Reading the registry's view through the contract (ListNodes, paged): who
//! is ONLINE, who went OFFLINE, and how late.

use std::collections::HashSet;
use std::time::Duration;

use registry_proto::convert::from_proto_timestamp;
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use tonic::transport::Channel;

use crate::BenchError;

/// Nodes per ListNodes page: large pages, few calls, well under the 64 MiB
/// the client accepts.
const PAGE: u32 = 2000;

/// Largest ListNodes response the benchmark client decodes (an unpaged
/// listing of 10k nodes is about 20 MB).
pub const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// A client for `url`, accepting large listings.
pub async fn client(url: &str) -> Result<NodeRegistryClient<Channel>, BenchError> {
    let channel = Channel::from_shared(url.to_string())
        .map_err(|e| BenchError::Server(format!("{url}: {e}")))?
        .connect()
        .await
        .map_err(|e| BenchError::Server(format!("connecting to {url}: {e}")))?;
    Ok(NodeRegistryClient::new(channel).max_decoding_message_size(MAX_RESPONSE))
}

/// Lists nodes in pages of `page_size`: one page, or with `walk` every
/// page to the end. Returns the nodes listed and the calls made.
pub async fn list_pages(
    client: &mut NodeRegistryClient<Channel>,
    page_size: u32,
    walk: bool,
) -> Result<(usize, usize), BenchError> {
    let (mut nodes, mut calls) = (0, 0);
    let mut page_token = String::new();
    loop {
        let page = client
            .list_nodes(pb::ListNodesRequest {
                page_size,
                page_token,
                ..Default::default()
            })
            .await
            .map_err(|s| BenchError::Server(format!("ListNodes: {}", s.message())))?
            .into_inner();
        nodes += page.nodes.len();
        calls += 1;
        if !walk || page.next_page_token.is_empty() {
            return Ok((nodes, calls));
        }
        page_token = page.next_page_token;
    }
}

/// Every node with `status` (UNSPECIFIED: all), page by page.
pub async fn list_all(
    client: &mut NodeRegistryClient<Channel>,
    status: pb::NodeStatus,
) -> Result<Vec<pb::Node>, BenchError> {
    let mut nodes = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_nodes(pb::ListNodesRequest {
                status: status as i32,
                page_size: PAGE,
                page_token,
                ..Default::default()
            })
            .await
            .map_err(|s| BenchError::Server(format!("ListNodes: {}", s.message())))?
            .into_inner();
        nodes.extend(page.nodes);
        if page.next_page_token.is_empty() {
            return Ok(nodes);
        }
        page_token = page.next_page_token;
    }
}

/// How the registry sees a fleet that should be entirely ONLINE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Nodes listed.
    pub listed: usize,
    /// Nodes ONLINE now.
    pub online: usize,
    /// Nodes that are OFFLINE now or were OFFLINE at some point of this
    /// server's life (their status changed after registration): a node
    /// that never stopped sending is a false OFFLINE.
    pub false_offline: usize,
}

/// Counts ONLINE nodes and false OFFLINEs among nodes not in `silenced`.
pub async fn census(
    client: &mut NodeRegistryClient<Channel>,
    silenced: &HashSet<String>,
) -> Result<Census, BenchError> {
    let nodes = list_all(client, pb::NodeStatus::Unspecified).await?;
    let mut census = Census {
        listed: nodes.len(),
        ..Census::default()
    };
    for node in nodes.iter().filter(|n| !silenced.contains(&n.node_id)) {
        let online = node.status() == pb::NodeStatus::Online;
        if online {
            census.online += 1;
        }
        if !online || node.status_changed_at != node.registered_at {
            census.false_offline += 1;
        }
    }
    Ok(census)
}

/// How late the registry marked a node OFFLINE: status_changed_at minus
/// (last_heartbeat_at + node_timeout), all three the server's own clock.
pub fn offline_lag(node: &pb::Node, node_timeout: Duration) -> Option<Duration> {
    let changed = from_proto_timestamp(node.status_changed_at.as_ref()?)?;
    let last = from_proto_timestamp(node.last_heartbeat_at.as_ref()?)?;
    let deadline = last + chrono::Duration::from_std(node_timeout).ok()?;
    // A negative lag would be a node marked OFFLINE early: clamp to zero and
    // let the caller see it as the minimum.
    Some((changed - deadline).to_std().unwrap_or(Duration::ZERO))
}

/// Node id -> session id, as the registry at `url` lists them: whose
/// session changed across a restart or failover had to register again.
pub async fn sessions(url: &str) -> Result<std::collections::HashMap<String, u64>, BenchError> {
    let mut client = client(url).await?;
    let nodes = list_all(&mut client, pb::NodeStatus::Unspecified).await?;
    Ok(nodes
        .into_iter()
        .map(|n| (n.node_id, n.session_id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_counts_from_the_deadline() {
        let ts = |s: i64, ms: i32| prost_types::Timestamp {
            seconds: s,
            nanos: ms * 1_000_000,
        };
        let node = pb::Node {
            last_heartbeat_at: Some(ts(100, 250)),
            status_changed_at: Some(ts(105, 262)),
            ..Default::default()
        };
        assert_eq!(
            offline_lag(&node, Duration::from_secs(5)),
            Some(Duration::from_millis(12))
        );
        assert_eq!(
            offline_lag(&pb::Node::default(), Duration::from_secs(5)),
            None
        );
    }
}
