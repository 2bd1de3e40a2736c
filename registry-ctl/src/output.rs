//! How nodes are printed.

use registry_proto::pb;

/// The word `status` prints for a node's status (or its absence).
pub fn status_word(node: Option<&pb::Node>) -> &'static str {
    match node.map(pb::Node::status) {
        None => "absent",
        Some(pb::NodeStatus::Online) => "online",
        Some(pb::NodeStatus::Offline) => "offline",
        Some(pb::NodeStatus::Unspecified) => "unspecified",
    }
}

/// One line per node, columns aligned, with a header:
/// `NODE STATUS GPUS POOLS ADDRESS`.
pub fn node_table(nodes: &[pb::Node]) -> String {
    let header = ["NODE", "STATUS", "GPUS", "POOLS", "ADDRESS"].map(str::to_owned);
    let rows: Vec<[String; 5]> = nodes
        .iter()
        .map(|node| {
            let gpus = node.capabilities.as_ref().map_or(0, |caps| caps.gpus.len());
            let pools: Vec<&str> = node
                .pools
                .iter()
                .map(|pool| pool.pool_id.as_str())
                .collect();
            [
                node.node_id.clone(),
                status_word(Some(node)).to_owned(),
                gpus.to_string(),
                if pools.is_empty() {
                    "-".to_owned()
                } else {
                    pools.join(",")
                },
                node.address.clone(),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|cell| cell.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, status: pb::NodeStatus, gpus: usize, pools: &[&str]) -> pb::Node {
        pb::Node {
            node_id: id.to_owned(),
            status: status as i32,
            address: format!("http://{id}:9200"),
            capabilities: Some(pb::Capabilities {
                gpus: vec![pb::GpuInfo::default(); gpus],
                ..Default::default()
            }),
            pools: pools
                .iter()
                .map(|id| pb::PoolSpec {
                    pool_id: (*id).to_owned(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn status_words() {
        assert_eq!(status_word(None), "absent");
        let online = node("a", pb::NodeStatus::Online, 0, &[]);
        assert_eq!(status_word(Some(&online)), "online");
        let offline = node("a", pb::NodeStatus::Offline, 0, &[]);
        assert_eq!(status_word(Some(&offline)), "offline");
    }

    #[test]
    fn the_table_is_aligned() {
        let table = node_table(&[
            node("node-a", pb::NodeStatus::Online, 2, &["pool-a", "pool-x"]),
            node("b", pb::NodeStatus::Offline, 0, &[]),
        ]);
        assert_eq!(
            table,
            concat!(
                "NODE    STATUS   GPUS  POOLS          ADDRESS\n",
                "node-a  online   2     pool-a,pool-x  http://node-a:9200\n",
                "b       offline  0     -              http://b:9200\n",
            )
        );
    }
}
