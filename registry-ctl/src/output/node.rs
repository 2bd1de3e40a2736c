//! How nodes read in the `table` and `wide` formats: the list's columns
//! and `get`'s description.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use registry_proto::convert::from_proto_timestamp;
use registry_proto::pb;

use super::table::Table;

/// The word `status` prints for a node's status (or its absence).
pub fn status_word(node: Option<&pb::Node>) -> &'static str {
    match node.map(pb::Node::status) {
        None => "absent",
        Some(pb::NodeStatus::Online) => "online",
        Some(pb::NodeStatus::Offline) => "offline",
        Some(pb::NodeStatus::Unspecified) => "unspecified",
    }
}

/// One line per node under a header: `NODE STATUS GPUS POOLS ADDRESS
/// HEARTBEAT` (the last heartbeat's age at `now`), and with `wide` also
/// `MACHINE AGENT SESSION LABELS`. The first four columns are what
/// scripts/compose-test.sh reads.
pub fn node_table(nodes: &[pb::Node], now: DateTime<Utc>, wide: bool) -> String {
    let mut header = vec!["NODE", "STATUS", "GPUS", "POOLS", "ADDRESS", "HEARTBEAT"];
    if wide {
        header.extend(["MACHINE", "AGENT", "SESSION", "LABELS"]);
    }
    let mut table = Table::new(header);
    for node in nodes {
        let pools: Vec<&str> = node
            .pools
            .iter()
            .map(|pool| pool.pool_id.as_str())
            .collect();
        let mut row = vec![
            node.node_id.clone(),
            status_word(Some(node)).to_owned(),
            gpu_count(node).to_string(),
            or_dash(pools.join(",")),
            or_dash(node.address.clone()),
            age_at(node.last_heartbeat_at.as_ref(), now),
        ];
        if wide {
            row.extend([
                or_dash(node.machine_id.clone()),
                or_dash(node.agent_version.clone()),
                node.session_id.to_string(),
                or_dash(labels(&node.labels)),
            ]);
        }
        table.row(row);
    }
    table.render()
}

/// `get`'s description of one node: its fields, then its pools with their
/// latest reported status, then its GPUs with their latest figures. `wide`
/// adds the session, the agent's clock, GPU UUIDs and PCI bus ids.
pub fn describe(node: &pb::Node, now: DateTime<Utc>, wide: bool) -> String {
    let mut fields = Table::new(["Node:", node.node_id.as_str()]);
    let when = |at: Option<&prost_types::Timestamp>| match at.and_then(from_proto_timestamp) {
        Some(at) => format!(
            "{} ({} ago)",
            at.to_rfc3339_opts(SecondsFormat::Secs, true),
            age(now.signed_duration_since(at).to_std().unwrap_or_default())
        ),
        None => "-".to_owned(),
    };
    fields.row([
        "Status:".to_owned(),
        format!(
            "{}, since {}",
            status_word(Some(node)),
            when(node.status_changed_at.as_ref())
        ),
    ]);
    fields.row(["Address:".to_owned(), or_dash(node.address.clone())]);
    fields.row(["Machine:".to_owned(), or_dash(node.machine_id.clone())]);
    fields.row(["Agent:".to_owned(), or_dash(node.agent_version.clone())]);
    fields.row(["Registered:".to_owned(), when(node.registered_at.as_ref())]);
    fields.row([
        "Last heartbeat:".to_owned(),
        when(node.last_heartbeat_at.as_ref()),
    ]);
    fields.row(["Labels:".to_owned(), or_dash(labels(&node.labels))]);
    if !node.models_available.is_empty() {
        fields.row(["Staged models:".to_owned(), node.models_available.join(",")]);
    }
    if let Some(caps) = &node.capabilities {
        fields.row([
            "Host:".to_owned(),
            format!(
                "{} CPU cores, {} RAM, driver {}, CUDA {}",
                caps.cpu_cores,
                bytes(caps.ram_total_bytes),
                or_dash(caps.driver_version.clone()),
                or_dash(caps.cuda_version.clone())
            ),
        ]);
    }
    if wide {
        fields.row(["Session:".to_owned(), node.session_id.to_string()]);
        fields.row(["Agent clock:".to_owned(), when(node.agent_time.as_ref())]);
    }
    let mut out = fields.render();
    out.push_str(&pools_section(node, wide));
    out.push_str(&gpus_section(node, wide));
    out
}

/// The node's pools (registered and reported) with their latest status.
fn pools_section(node: &pb::Node, wide: bool) -> String {
    if node.pools.is_empty() && node.pool_status.is_empty() {
        return "Pools: none\n".to_owned();
    }
    let status: BTreeMap<&str, &pb::PoolStatus> = node
        .pool_status
        .iter()
        .map(|pool| (pool.pool_id.as_str(), pool))
        .collect();
    let mut header = vec![
        "POOL",
        "STATE",
        "SLOTS FREE",
        "VRAM FREE",
        "ENGINE",
        "MODEL",
        "GPUS",
    ];
    if wide {
        header.extend(["ENGINE VERSION", "ENDPOINT"]);
    }
    let mut table = Table::new(header).indented(2);
    let registered = node.pools.iter().map(|spec| spec.pool_id.as_str());
    let reported_only = node
        .pool_status
        .iter()
        .map(|pool| pool.pool_id.as_str())
        .filter(|id| !node.pools.iter().any(|spec| spec.pool_id == *id));
    for pool_id in registered.chain(reported_only) {
        let spec = node.pools.iter().find(|spec| spec.pool_id == pool_id);
        let live = status.get(pool_id).copied();
        let engine = live
            .map(|s| s.engine.as_str())
            .filter(|e| !e.is_empty())
            .or(spec.map(|s| s.engine.as_str()))
            .unwrap_or_default();
        let model = live
            .map(|s| s.model.as_str())
            .filter(|m| !m.is_empty())
            .or(spec.map(|s| s.model.as_str()))
            .unwrap_or_default();
        let mut row = vec![
            pool_id.to_owned(),
            live.map_or("unreported".to_owned(), |s| pool_state_word(s.state())),
            live.map_or("-".to_owned(), |s| {
                format!("{}/{}", s.slots_free, s.slots_total)
            }),
            live.map_or("-".to_owned(), |s| bytes(s.vram_free_bytes)),
            or_dash(engine.to_owned()),
            or_dash(model.to_owned()),
            or_dash(spec.map_or(String::new(), |s| join(&s.gpu_indices))),
        ];
        if wide {
            row.push(or_dash(
                spec.map_or(String::new(), |s| s.engine_version.clone()),
            ));
            // The reported endpoint overrides the registered one.
            let endpoint = live
                .map(|s| s.endpoint.as_str())
                .filter(|e| !e.is_empty())
                .or(spec.map(|s| s.endpoint.as_str()))
                .unwrap_or_default();
            row.push(or_dash(endpoint.to_owned()));
        }
        table.row(row);
    }
    format!("Pools:\n{}", table.render())
}

/// The node's GPUs with their latest figures.
fn gpus_section(node: &pb::Node, wide: bool) -> String {
    let gpus = node
        .capabilities
        .as_ref()
        .map(|caps| caps.gpus.as_slice())
        .unwrap_or_default();
    if gpus.is_empty() {
        return "GPUs: none\n".to_owned();
    }
    let mut header = vec![
        "GPU", "NAME", "MEMORY", "USED", "UTIL", "TEMP", "CC", "MIG", "HEALTH",
    ];
    if wide {
        header.extend(["UUID", "PCI BUS"]);
    }
    let mut table = Table::new(header).indented(2);
    for gpu in gpus {
        let stats = node.gpu_stats.iter().find(|s| s.index == gpu.index);
        let mut row = vec![
            gpu.index.to_string(),
            or_dash(gpu.name.clone()),
            bytes(gpu.memory_total_bytes),
            stats.map_or("-".to_owned(), |s| bytes(s.memory_used_bytes)),
            stats.map_or("-".to_owned(), |s| format!("{}%", s.utilization_percent)),
            stats
                .and_then(|s| s.temperature_celsius)
                .map_or("-".to_owned(), |t| format!("{t}C")),
            or_dash(gpu.compute_capability.clone()),
            match (gpu.mig_enabled, gpu.mig_instances.len()) {
                (false, _) => "off".to_owned(),
                (true, 0) => "on".to_owned(),
                (true, n) => format!("on ({n})"),
            },
            stats.map_or("-".to_owned(), |s| gpu_health_word(s.health())),
        ];
        if wide {
            row.extend([or_dash(gpu.uuid.clone()), or_dash(gpu.pci_bus_id.clone())]);
        }
        table.row(row);
    }
    // Why a GPU is not healthy, one line each under the table.
    let mut reasons = String::new();
    for stats in node
        .gpu_stats
        .iter()
        .filter(|s| !s.health_reasons.is_empty())
    {
        reasons.push_str(&format!(
            "  GPU {} {}: {}\n",
            stats.index,
            gpu_health_word(stats.health()),
            stats.health_reasons.join("; ")
        ));
    }
    format!("GPUs:\n{}{reasons}", table.render())
}

/// A GPU health as a lower-case word ("unhealthy"); "-" when unreported.
pub(crate) fn gpu_health_word(health: pb::GpuHealth) -> String {
    match health {
        pb::GpuHealth::Unspecified => "-".to_owned(),
        other => other
            .as_str_name()
            .trim_start_matches("GPU_HEALTH_")
            .to_ascii_lowercase(),
    }
}

/// The node's GPU count.
fn gpu_count(node: &pb::Node) -> usize {
    node.capabilities.as_ref().map_or(0, |caps| caps.gpus.len())
}

/// A pool state as a lower-case word ("ready").
pub(crate) fn pool_state_word(state: pb::PoolState) -> String {
    state
        .as_str_name()
        .trim_start_matches("POOL_STATE_")
        .to_lowercase()
}

/// Labels as `k=v,k2=v2`, keys in order.
pub(crate) fn labels(labels: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    sorted
        .into_iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Numbers joined with commas.
fn join(numbers: &[u32]) -> String {
    numbers
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// "-" for an empty cell.
pub(crate) fn or_dash(text: String) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text
    }
}

/// How long before `now` the time `at` was, as [`age`]; "-" when unset.
fn age_at(at: Option<&prost_types::Timestamp>, now: DateTime<Utc>) -> String {
    at.and_then(from_proto_timestamp)
        .map_or("-".to_owned(), |at| {
            age(now.signed_duration_since(at).to_std().unwrap_or_default())
        })
}

/// A short age in at most two units, like kubectl's AGE: "42s", "3m7s",
/// "5h12m", "9d3h".
pub fn age(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// Bytes in binary units with one decimal ("80.0 GiB").
pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The time the sample is printed at.
    pub(crate) fn now() -> DateTime<Utc> {
        "2026-11-23T12:00:00Z".parse().unwrap()
    }

    fn timestamp(text: &str) -> Option<prost_types::Timestamp> {
        let at: DateTime<Utc> = text.parse().unwrap();
        Some(registry_proto::convert::to_proto_timestamp(at))
    }

    /// A node with every field set, for the output tests.
    pub(crate) fn sample_node() -> pb::Node {
        pb::Node {
            node_id: "gpu-node-1".into(),
            machine_id: "machine-1".into(),
            address: "http://10.0.0.5:9200".into(),
            pools: vec![pb::PoolSpec {
                pool_id: "pool-0".into(),
                engine: "vllm".into(),
                model: "llama-3.1-8b".into(),
                slots_total: 4,
                gpu_indices: vec![0, 1],
                engine_version: "0.6.1".into(),
                ..Default::default()
            }],
            capabilities: Some(pb::Capabilities {
                gpus: vec![
                    pb::GpuInfo {
                        index: 0,
                        uuid: "GPU-aaaa".into(),
                        name: "NVIDIA H100 80GB HBM3".into(),
                        memory_total_bytes: 80 << 30,
                        compute_capability: "9.0".into(),
                        pci_bus_id: "00000000:17:00.0".into(),
                        mig_enabled: false,
                        ..Default::default()
                    },
                    pb::GpuInfo {
                        index: 1,
                        uuid: "GPU-bbbb".into(),
                        name: "NVIDIA H100 80GB HBM3".into(),
                        memory_total_bytes: 80 << 30,
                        compute_capability: "9.0".into(),
                        pci_bus_id: "00000000:18:00.0".into(),
                        mig_enabled: true,
                        ..Default::default()
                    },
                ],
                cpu_cores: 64,
                ram_total_bytes: 512 << 30,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
            }),
            agent_version: "node-agent 0.1.0".into(),
            labels: [("zone", "eu-1"), ("rack", "r7")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            status: pb::NodeStatus::Online as i32,
            registered_at: timestamp("2026-11-23T10:00:00Z"),
            last_heartbeat_at: timestamp("2026-11-23T11:59:58.5Z"),
            pool_status: vec![pb::PoolStatus {
                pool_id: "pool-0".into(),
                state: pb::PoolState::Ready as i32,
                slots_total: 4,
                slots_free: 3,
                vram_free_bytes: 10 << 30,
                model: "llama-3.1-8b".into(),
                engine: "vllm".into(),
                endpoint: String::new(),
            }],
            gpu_stats: vec![pb::GpuStats {
                index: 0,
                memory_used_bytes: 70 << 30,
                memory_free_bytes: 10 << 30,
                utilization_percent: 87,
                temperature_celsius: Some(41),
                health: pb::GpuHealth::Degraded as i32,
                health_reasons: vec!["thermal throttling".into()],
                ..Default::default()
            }],
            session_id: u64::MAX,
            status_changed_at: timestamp("2026-11-23T11:55:00Z"),
            agent_time: timestamp("2026-11-23T11:59:58Z"),
            ..Default::default()
        }
    }

    #[test]
    fn status_words() {
        assert_eq!(status_word(None), "absent");
        let mut node = sample_node();
        assert_eq!(status_word(Some(&node)), "online");
        node.status = pb::NodeStatus::Offline as i32;
        assert_eq!(status_word(Some(&node)), "offline");
    }

    #[test]
    fn the_table_is_aligned() {
        let bare = pb::Node {
            node_id: "b".into(),
            status: pb::NodeStatus::Offline as i32,
            ..Default::default()
        };
        let table = node_table(&[sample_node(), bare], now(), false);
        assert_eq!(
            table,
            concat!(
                "NODE        STATUS   GPUS  POOLS   ADDRESS               HEARTBEAT\n",
                "gpu-node-1  online   2     pool-0  http://10.0.0.5:9200  1s\n",
                "b           offline  0     -       -                     -\n",
            )
        );
    }

    #[test]
    fn the_wide_table_has_more_columns() {
        let table = node_table(&[sample_node()], now(), true);
        assert_eq!(
            table,
            concat!(
                "NODE        STATUS  GPUS  POOLS   ADDRESS               HEARTBEAT  MACHINE    AGENT             SESSION               LABELS\n",
                "gpu-node-1  online  2     pool-0  http://10.0.0.5:9200  1s         machine-1  node-agent 0.1.0  18446744073709551615  rack=r7,zone=eu-1\n",
            )
        );
    }

    #[test]
    fn a_node_is_described() {
        assert_eq!(
            describe(&sample_node(), now(), false),
            concat!(
                "Node:            gpu-node-1\n",
                "Status:          online, since 2026-11-23T11:55:00Z (5m0s ago)\n",
                "Address:         http://10.0.0.5:9200\n",
                "Machine:         machine-1\n",
                "Agent:           node-agent 0.1.0\n",
                "Registered:      2026-11-23T10:00:00Z (2h0m ago)\n",
                "Last heartbeat:  2026-11-23T11:59:58Z (1s ago)\n",
                "Labels:          rack=r7,zone=eu-1\n",
                "Host:            64 CPU cores, 512.0 GiB RAM, driver 550.54.15, CUDA 12.4\n",
                "Pools:\n",
                "  POOL    STATE  SLOTS FREE  VRAM FREE  ENGINE  MODEL         GPUS\n",
                "  pool-0  ready  3/4         10.0 GiB   vllm    llama-3.1-8b  0,1\n",
                "GPUs:\n",
                "  GPU  NAME                   MEMORY    USED      UTIL  TEMP  CC   MIG  HEALTH\n",
                "  0    NVIDIA H100 80GB HBM3  80.0 GiB  70.0 GiB  87%   41C   9.0  off  degraded\n",
                "  1    NVIDIA H100 80GB HBM3  80.0 GiB  -         -     -     9.0  on   -\n",
                "  GPU 0 degraded: thermal throttling\n",
            )
        );
    }

    #[test]
    fn the_wide_description_adds_session_clock_and_gpu_ids() {
        let text = describe(&sample_node(), now(), true);
        assert!(
            text.contains("Session:         18446744073709551615\n"),
            "{text}"
        );
        assert!(
            text.contains("Agent clock:     2026-11-23T11:59:58Z (2s ago)\n"),
            "{text}"
        );
        assert!(text.contains("ENGINE VERSION"), "{text}");
        assert!(text.contains("GPU-bbbb  00000000:18:00.0"), "{text}");
    }

    #[test]
    fn staged_models_and_pool_endpoints_are_described() {
        let mut node = sample_node();
        assert!(!describe(&node, now(), false).contains("Staged models:"));
        node.models_available = vec!["qwen2.5-7b".into(), "mistral-7b".into()];
        node.pools[0].endpoint = "http://10.0.0.5:8000".into();
        let text = describe(&node, now(), false);
        assert!(
            text.contains("Staged models:   qwen2.5-7b,mistral-7b\n"),
            "{text}"
        );
        assert!(
            !text.contains("http://10.0.0.5:8000"),
            "endpoints only in wide: {text}"
        );
        let text = describe(&node, now(), true);
        assert!(
            text.contains("ENDPOINT") && text.contains("http://10.0.0.5:8000"),
            "{text}"
        );
        node.pool_status[0].endpoint = "http://10.0.0.5:9000".into();
        let text = describe(&node, now(), true);
        assert!(
            text.contains("http://10.0.0.5:9000") && !text.contains(":8000"),
            "{text}"
        );
    }

    #[test]
    fn a_bare_node_is_described_without_sections() {
        let bare = pb::Node {
            node_id: "b".into(),
            ..Default::default()
        };
        let text = describe(&bare, now(), false);
        assert!(text.ends_with("Pools: none\nGPUs: none\n"), "{text}");
        assert!(text.contains("Registered:      -\n"), "{text}");
    }

    #[test]
    fn ages_and_sizes_read_short() {
        assert_eq!(age(Duration::from_millis(900)), "0s");
        assert_eq!(age(Duration::from_secs(187)), "3m7s");
        assert_eq!(age(Duration::from_secs(5 * 3600 + 12 * 60 + 5)), "5h12m");
        assert_eq!(age(Duration::from_secs(9 * 86400 + 3 * 3600)), "9d3h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(80 << 30), "80.0 GiB");
    }
}
