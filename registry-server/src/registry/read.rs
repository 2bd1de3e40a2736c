//! Reads: GetNode and ListNodes pages, served from each node's shared read
//! view (built once per change by the publish path), patched with the
//! fields that move on every heartbeat.

use std::ops::Bound;
use std::sync::Arc;

use registry_proto::pb;

use super::Registry;
use super::node::NodeFilter;
use super::sessions::not_found;
use crate::error::RegistryError;
use crate::view::NodeView;

/// One ListNodes page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The matching nodes, in node_id order.
    pub nodes: Vec<pb::Node>,
    /// Set when more nodes match: the token of the next page.
    pub next_page_token: Option<String>,
    /// The revision the page was read at.
    pub revision: u64,
}

impl Registry {
    /// One node as the contract describes it.
    pub fn get(&self, node_id: &str) -> Result<pb::Node, RegistryError> {
        let nodes = self.read_nodes();
        let slot = nodes.get(node_id).ok_or_else(|| not_found(node_id))?;
        let st = slot.lock();
        if st.removed {
            return Err(not_found(node_id));
        }
        Ok(st.read())
    }

    /// The shared read view of one node (its latest published change), or
    /// None when it is not listed.
    pub fn view(&self, node_id: &str) -> Option<Arc<NodeView>> {
        let nodes = self.read_nodes();
        let st = nodes.get(node_id)?.lock();
        (!st.removed).then(|| st.view.clone())
    }

    /// Nodes matching `filter` in node_id order, after `page_token` (a
    /// node_id), at most `page_size` of them (0: all). Returns the page,
    /// when more nodes match the token of the next page, and the revision
    /// the page was read at (read before any node: every change up to it
    /// is in the page).
    pub fn list_page(&self, filter: &NodeFilter, page_size: usize, page_token: &str) -> Page {
        let revision = self.revision();
        let (nodes, next_page_token) = self.list(filter, page_size, page_token);
        Page {
            nodes,
            next_page_token,
            revision,
        }
    }

    /// [`Registry::list_page`] without the revision.
    pub fn list(
        &self,
        filter: &NodeFilter,
        page_size: usize,
        page_token: &str,
    ) -> (Vec<pb::Node>, Option<String>) {
        let limit = if page_size == 0 {
            usize::MAX
        } else {
            page_size
        };
        let start = if page_token.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(page_token)
        };
        let nodes = self.read_nodes();
        let mut page = Vec::new();
        for (id, slot) in nodes.range::<str, _>((start, Bound::Unbounded)) {
            let reading = {
                let st = slot.lock();
                if st.removed || !filter.matches(&st.view) {
                    continue;
                }
                st.reading()
            };
            if page.len() == limit {
                // One more node matches: the caller needs another page.
                let token = page.last().map(|n: &pb::Node| n.node_id.clone());
                debug_assert!(token.as_deref() < Some(&**id));
                return (page, token);
            }
            // The deep copy happens with the node's lock released.
            page.push(reading.into_node());
        }
        (page, None)
    }
}
