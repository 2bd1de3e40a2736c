//! Views of FindPools' and ListModels' answers.

use registry_proto::pb;

use super::node::{bytes, labels, or_dash, pool_state_word};
use super::table::Table;

/// FindPools' candidates, best first: one line each. `wide` adds the
/// node's address and labels.
pub fn candidate_table(answer: &pb::FindPoolsResponse, wide: bool) -> String {
    let mut header = vec![
        "NODE",
        "POOL",
        "MODEL",
        "ENGINE",
        "SLOTS",
        "VRAM FREE",
        "ENDPOINT",
    ];
    if wide {
        header.extend(["NODE ADDRESS", "LABELS"]);
    }
    let mut table = Table::new(header);
    for c in &answer.candidates {
        let mut row = vec![
            c.node_id.clone(),
            c.pool_id.clone(),
            c.model.clone(),
            or_dash(c.engine.clone()),
            format!("{}/{}", c.slots_free, c.slots_total),
            bytes(c.vram_free_bytes),
            or_dash(c.endpoint.clone()),
        ];
        if wide {
            row.extend([c.node_address.clone(), or_dash(labels(&c.labels))]);
        }
        table.row(row);
    }
    table.render()
}

/// ListModels' models: one line each with its counts; `wide` adds one
/// indented line per pool under its model.
pub fn model_table(answer: &pb::ListModelsResponse, wide: bool) -> String {
    let mut out = String::new();
    let mut table = Table::new([
        "MODEL",
        "NODES",
        "POOLS",
        "READY",
        "SLOTS FREE",
        "STAGED ON",
    ]);
    for m in &answer.models {
        table.row([
            m.model.clone(),
            m.nodes_serving.to_string(),
            m.pools.len().to_string(),
            m.pools_ready.to_string(),
            format!("{}/{}", m.slots_free, m.slots_total),
            or_dash(m.staged_on.join(",")),
        ]);
    }
    out.push_str(&table.render());
    if wide {
        for m in answer.models.iter().filter(|m| !m.pools.is_empty()) {
            out.push_str(&format!("\n{}:\n", m.model));
            let mut pools = Table::new([
                "NODE",
                "POOL",
                "ENGINE",
                "STATE",
                "NODE STATUS",
                "SLOTS",
                "READY",
            ])
            .indented(2);
            for p in &m.pools {
                let state = match p.state() {
                    pb::PoolState::Unspecified => "unreported".to_owned(),
                    state => pool_state_word(state),
                };
                let node_status = p
                    .node_status()
                    .as_str_name()
                    .trim_start_matches("NODE_STATUS_")
                    .to_lowercase();
                pools.row([
                    p.node_id.clone(),
                    p.pool_id.clone(),
                    or_dash(p.engine.clone()),
                    state,
                    node_status,
                    format!("{}/{}", p.slots_free, p.slots_total),
                    if p.ready { "yes" } else { "no" }.to_owned(),
                ]);
            }
            out.push_str(&pools.render());
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::output::json::JsonTranscoder;

    pub(crate) fn sample_candidates() -> pb::FindPoolsResponse {
        pb::FindPoolsResponse {
            candidates: vec![
                pb::PoolCandidate {
                    node_id: "gpu-node-1".into(),
                    pool_id: "pool-0".into(),
                    endpoint: "http://10.0.0.5:8000".into(),
                    model: "llama-3.1-8b".into(),
                    engine: "vllm".into(),
                    slots_free: 3,
                    slots_total: 4,
                    vram_free_bytes: 20 << 30,
                    node_address: "http://10.0.0.5:9200".into(),
                    labels: [("zone".to_owned(), "eu-1".to_owned())].into(),
                    ..Default::default()
                },
                pb::PoolCandidate {
                    node_id: "gpu-node-2".into(),
                    pool_id: "pool-1".into(),
                    model: "llama-3.1-8b".into(),
                    slots_free: 1,
                    slots_total: 8,
                    vram_free_bytes: 1 << 30,
                    node_address: "http://10.0.0.6:9200".into(),
                    ..Default::default()
                },
            ],
            revision: 42,
        }
    }

    pub(crate) fn sample_models() -> pb::ListModelsResponse {
        pb::ListModelsResponse {
            models: vec![
                pb::ModelAvailability {
                    model: "llama-3.1-8b".into(),
                    pools: vec![
                        pb::ModelPool {
                            node_id: "gpu-node-1".into(),
                            pool_id: "pool-0".into(),
                            engine: "vllm".into(),
                            state: pb::PoolState::Ready as i32,
                            node_status: pb::NodeStatus::Online as i32,
                            slots_total: 4,
                            slots_free: 3,
                            ready: true,
                        },
                        pb::ModelPool {
                            node_id: "gpu-node-2".into(),
                            pool_id: "pool-0".into(),
                            node_status: pb::NodeStatus::Online as i32,
                            slots_total: 4,
                            ..Default::default()
                        },
                    ],
                    nodes_serving: 2,
                    pools_ready: 1,
                    slots_total: 8,
                    slots_free: 3,
                    staged_on: vec!["gpu-node-3".into()],
                },
                pb::ModelAvailability {
                    model: "qwen2.5-7b".into(),
                    staged_on: vec!["gpu-node-1".into(), "gpu-node-3".into()],
                    ..Default::default()
                },
            ],
            revision: 42,
        }
    }

    #[test]
    fn candidates_are_one_aligned_line_each_best_first() {
        let text = candidate_table(&sample_candidates(), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("NODE") && lines[0].contains("VRAM FREE"));
        assert!(
            lines[1].contains("gpu-node-1")
                && lines[1].contains("3/4")
                && lines[1].contains("20.0 GiB")
                && lines[1].contains("http://10.0.0.5:8000"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("gpu-node-2") && lines[2].ends_with('-'),
            "{}",
            lines[2]
        );
        assert_eq!(lines[1].find("pool-0"), lines[2].find("pool-1"), "aligned");
        assert!(!text.contains("zone=eu-1"), "labels only in wide");
    }

    #[test]
    fn wide_candidates_add_address_and_labels() {
        let text = candidate_table(&sample_candidates(), true);
        assert!(text.lines().next().unwrap().contains("NODE ADDRESS"));
        assert!(
            text.contains("http://10.0.0.5:9200") && text.contains("zone=eu-1"),
            "{text}"
        );
    }

    #[test]
    fn models_show_counts_and_staged_nodes() {
        let text = model_table(&sample_models(), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let llama: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(llama, ["llama-3.1-8b", "2", "2", "1", "3/8", "gpu-node-3"]);
        let qwen: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            qwen,
            ["qwen2.5-7b", "0", "0", "0", "0/0", "gpu-node-1,gpu-node-3"]
        );
    }

    #[test]
    fn wide_models_list_their_pools() {
        let text = model_table(&sample_models(), true);
        assert!(text.contains("\nllama-3.1-8b:\n"), "{text}");
        let pool_lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  gpu-node"))
            .collect();
        assert_eq!(pool_lines.len(), 2, "{text}");
        assert!(pool_lines[0].contains("ready") && pool_lines[0].trim_end().ends_with("yes"));
        assert!(pool_lines[1].contains("unreported") && pool_lines[1].trim_end().ends_with("no"));
        assert!(
            !text.contains("qwen2.5-7b:"),
            "a model with no pools has no pool table"
        );
    }

    #[test]
    fn answers_are_canonical_proto3_json() {
        let json = JsonTranscoder::new().unwrap();
        let found: serde_json::Value =
            serde_json::from_str(&json.to_line(&sample_candidates()).unwrap()).unwrap();
        assert_eq!(found["revision"], "42");
        assert_eq!(found["candidates"][0]["endpoint"], "http://10.0.0.5:8000");
        assert_eq!(found["candidates"][0]["vramFreeBytes"], "21474836480");
        assert_eq!(found["candidates"][0]["labels"]["zone"], "eu-1");
        let models: serde_json::Value =
            serde_json::from_str(&json.to_line(&sample_models()).unwrap()).unwrap();
        assert_eq!(models["models"][0]["pools"][0]["state"], "POOL_STATE_READY");
        assert_eq!(models["models"][0]["poolsReady"], 1);
        assert_eq!(models["models"][1]["stagedOn"][1], "gpu-node-3");
    }
}
