//! `list`: the registry's nodes, filtered.

use std::io::Write;

use registry_proto::pb;

use super::Context;
use crate::cli::StatusFilter;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer, node};

/// The filters of `list`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only nodes with this status.
    pub status: Option<StatusFilter>,
    /// Only nodes that run this pool.
    pub pool: Option<String>,
    /// Only nodes carrying all of these labels.
    pub labels: Vec<(String, String)>,
}

impl Filter {
    /// The ListNodes request that applies these filters.
    pub fn request(&self) -> pb::ListNodesRequest {
        pb::ListNodesRequest {
            status: match self.status {
                None => pb::NodeStatus::Unspecified,
                Some(StatusFilter::Online) => pb::NodeStatus::Online,
                Some(StatusFilter::Offline) => pb::NodeStatus::Offline,
            } as i32,
            pool_id: self.pool.clone().unwrap_or_default(),
            labels: self.labels.iter().cloned().collect(),
            ..Default::default()
        }
    }
}

/// Prints every matching node (table: one line each under a header; JSON:
/// one Node object per line). Exit 1 when none matches; the table then
/// holds only its header.
pub async fn run<W: Write>(
    context: &Context,
    filter: &Filter,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let nodes = context
        .query_registry()
        .await?
        .list_nodes(filter.request())
        .await?;
    match printer.format() {
        Format::Table => printer.text(&node::node_table(&nodes, context.now, false))?,
        Format::Wide => printer.text(&node::node_table(&nodes, context.now, true))?,
        Format::Json => {
            for node in &nodes {
                printer.message(node)?;
            }
        }
    }
    Ok(Exit::from_answer(!nodes.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_the_request() {
        assert_eq!(Filter::default().request(), pb::ListNodesRequest::default());
        let request = Filter {
            status: Some(StatusFilter::Online),
            pool: Some("pool-0".into()),
            labels: vec![("zone".into(), "eu-1".into())],
        }
        .request();
        assert_eq!(request.status(), pb::NodeStatus::Online);
        assert_eq!(request.pool_id, "pool-0");
        assert_eq!(request.labels.get("zone").map(String::as_str), Some("eu-1"));
    }
}
