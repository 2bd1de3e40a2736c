//! How cordon and drain answers read in the `table` and `wide` formats: one
//! line saying what the registry now holds, and `drain --wait`'s progress
//! lines.

use chrono::SecondsFormat;
use registry_proto::convert::from_proto_timestamp;
use registry_proto::pb;

use super::node::pool_state_word;

/// A timestamp as RFC 3339 in seconds; "-" when unset or malformed.
fn at(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(from_proto_timestamp)
        .map_or("-".to_owned(), |at| {
            at.to_rfc3339_opts(SecondsFormat::Secs, true)
        })
}

/// The node's drain, if one is requested.
fn drain(node: &pb::Node) -> Option<&pb::DrainState> {
    node.admin.as_ref().and_then(|a| a.drain.as_ref())
}

/// "yes" or "no".
fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The drained pools as a phrase: "pools pool-0,pool-1" or "every pool".
fn pools_phrase(pool_ids: &[String]) -> String {
    if pool_ids.is_empty() {
        "every pool".to_owned()
    } else {
        format!("pools {}", pool_ids.join(","))
    }
}

/// `cordon`'s line.
pub fn cordoned(node: &pb::Node) -> String {
    let admin = node.admin.clone().unwrap_or_default();
    let mut line = if admin.cordoned {
        format!("{} cordoned", node.node_id)
    } else {
        // The registry answered with the node not cordoned: say so rather
        // than claim otherwise.
        format!("{} not cordoned", node.node_id)
    };
    if !admin.cordon_reason.is_empty() {
        line.push_str(&format!(" (reason: {})", admin.cordon_reason));
    }
    line.push_str(&format!(", since {}\n", at(admin.cordoned_at.as_ref())));
    line
}

/// `uncordon`'s line, with a reminder when a drain keeps the node out of
/// placement.
pub fn uncordoned(node: &pb::Node) -> String {
    let mut line = format!("{} uncordoned", node.node_id);
    if drain(node).is_some() {
        line.push_str(
            "; a drain is still requested, so placement still skips it (undrain cancels it)",
        );
    }
    line.push('\n');
    line
}

/// `drain`'s line: what was requested.
pub fn drain_requested(node: &pb::Node) -> String {
    let Some(drain) = drain(node) else {
        return format!("{}: no drain requested\n", node.node_id);
    };
    let mut line = format!(
        "{} draining {}",
        node.node_id,
        pools_phrase(&drain.pool_ids)
    );
    if !drain.reason.is_empty() {
        line.push_str(&format!(" (reason: {})", drain.reason));
    }
    if drain.deadline.is_some() {
        line.push_str(&format!(", deadline {}", at(drain.deadline.as_ref())));
    }
    line.push('\n');
    line
}

/// `undrain`'s line.
pub fn drain_cancelled(node: &pb::Node) -> String {
    match drain(node) {
        None => format!("{} drain cancelled\n", node.node_id),
        Some(_) => format!("{}: a drain is still requested\n", node.node_id),
    }
}

/// The pools a drain covers, as the node reports them:
/// `(pool id, status if reported)`, registered pools first.
fn drained_pools<'a>(
    node: &'a pb::Node,
    drain: &'a pb::DrainState,
) -> Vec<(&'a str, Option<&'a pb::PoolStatus>)> {
    let mut ids: Vec<&str> = if drain.pool_ids.is_empty() {
        node.pools.iter().map(|p| p.pool_id.as_str()).collect()
    } else {
        drain.pool_ids.iter().map(String::as_str).collect()
    };
    if drain.pool_ids.is_empty() {
        for status in &node.pool_status {
            if !ids.contains(&status.pool_id.as_str()) {
                ids.push(&status.pool_id);
            }
        }
    }
    ids.into_iter()
        .map(|id| (id, node.pool_status.iter().find(|s| s.pool_id == id)))
        .collect()
}

/// Busy slots of one pool status.
fn busy(status: &pb::PoolStatus) -> u32 {
    status.slots_total.saturating_sub(status.slots_free)
}

/// One progress line of `drain --wait` (without the elapsed time): whether
/// the agent acknowledged and the node is drained, then each drained
/// pool's state and busy slots. `None` when no drain is requested.
pub fn drain_progress(node: &pb::Node) -> Option<String> {
    let drain = drain(node)?;
    let pools: Vec<String> = drained_pools(node, drain)
        .into_iter()
        .map(|(id, status)| match status {
            Some(s) => format!(
                "{id} {} {}/{} busy",
                pool_state_word(s.state()),
                busy(s),
                s.slots_total
            ),
            None => format!("{id} unreported"),
        })
        .collect();
    let pools = if pools.is_empty() {
        "no pools".to_owned()
    } else {
        pools.join(", ")
    };
    Some(format!(
        "{}: {}, acknowledged {}, drained {}; {pools}",
        node.node_id,
        super::node::status_word(Some(node)),
        yes_no(drain.acknowledged),
        yes_no(drain.drained)
    ))
}

/// The closing line once the node is drained; says so when the deadline,
/// not idle pools, ended the drain.
pub fn drained(node: &pb::Node) -> String {
    let Some(drain) = drain(node) else {
        return format!("{} drained\n", node.node_id);
    };
    let still_busy: u32 = drained_pools(node, drain)
        .into_iter()
        .filter_map(|(_, s)| s)
        .filter(|s| s.state() == pb::PoolState::Draining)
        .map(busy)
        .sum();
    let mut line = format!(
        "{} drained at {}",
        node.node_id,
        at(drain.drained_at.as_ref())
    );
    if still_busy > 0 {
        line.push_str(&format!(
            " (the deadline passed with {still_busy} slots still busy)"
        ));
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::node::tests::sample_node;

    fn timestamp(text: &str) -> Option<prost_types::Timestamp> {
        let at: chrono::DateTime<chrono::Utc> = text.parse().unwrap();
        Some(registry_proto::convert::to_proto_timestamp(at))
    }

    fn pool(id: &str, state: pb::PoolState, free: u32, total: u32) -> pb::PoolStatus {
        pb::PoolStatus {
            pool_id: id.into(),
            state: state as i32,
            slots_free: free,
            slots_total: total,
            ..Default::default()
        }
    }

    fn draining_node(pool_ids: &[&str]) -> pb::Node {
        let mut node = sample_node();
        node.pools.push(pb::PoolSpec {
            pool_id: "pool-1".into(),
            slots_total: 8,
            ..Default::default()
        });
        node.pool_status = vec![
            pool("pool-0", pb::PoolState::Draining, 2, 4),
            pool("pool-1", pb::PoolState::Ready, 8, 8),
        ];
        node.admin = Some(pb::AdminState {
            schedulable: false,
            drain: Some(pb::DrainState {
                pool_ids: pool_ids.iter().map(|s| (*s).to_owned()).collect(),
                reason: "kernel update".into(),
                requested_at: timestamp("2026-11-23T12:00:00Z"),
                deadline: timestamp("2026-11-23T12:10:00Z"),
                ..Default::default()
            }),
            ..Default::default()
        });
        node
    }

    #[test]
    fn cordon_lines_say_what_the_registry_holds() {
        let mut node = sample_node();
        node.admin = Some(pb::AdminState {
            cordoned: true,
            cordon_reason: "bad fan".into(),
            cordoned_at: timestamp("2026-11-23T12:00:00Z"),
            ..Default::default()
        });
        assert_eq!(
            cordoned(&node),
            "gpu-node-1 cordoned (reason: bad fan), since 2026-11-23T12:00:00Z\n"
        );
        node.admin = None;
        assert_eq!(uncordoned(&node), "gpu-node-1 uncordoned\n");
        let node = draining_node(&[]);
        assert!(
            uncordoned(&node).contains("a drain is still requested"),
            "{}",
            uncordoned(&node)
        );
    }

    #[test]
    fn drain_lines_name_the_pools_reason_and_deadline() {
        assert_eq!(
            drain_requested(&draining_node(&["pool-0"])),
            "gpu-node-1 draining pools pool-0 (reason: kernel update), deadline 2026-11-23T12:10:00Z\n"
        );
        let mut every = draining_node(&[]);
        if let Some(d) = every.admin.as_mut().and_then(|a| a.drain.as_mut()) {
            d.reason.clear();
            d.deadline = None;
        }
        assert_eq!(drain_requested(&every), "gpu-node-1 draining every pool\n");
        let mut cancelled = every.clone();
        cancelled.admin = Some(pb::AdminState::default());
        assert_eq!(drain_cancelled(&cancelled), "gpu-node-1 drain cancelled\n");
        assert_eq!(
            drain_requested(&cancelled),
            "gpu-node-1: no drain requested\n"
        );
    }

    #[test]
    fn progress_shows_the_drained_pools_and_their_busy_slots() {
        let node = draining_node(&["pool-0"]);
        assert_eq!(
            drain_progress(&node).unwrap(),
            "gpu-node-1: online, acknowledged no, drained no; pool-0 draining 2/4 busy"
        );
        let mut every = draining_node(&[]);
        every.pool_status.pop();
        assert_eq!(
            drain_progress(&every).unwrap(),
            "gpu-node-1: online, acknowledged no, drained no; pool-0 draining 2/4 busy, pool-1 unreported"
        );
        every.admin = None;
        assert_eq!(drain_progress(&every), None);
    }

    #[test]
    fn the_closing_line_says_when_the_deadline_ended_the_drain() {
        let mut node = draining_node(&["pool-0"]);
        if let Some(d) = node.admin.as_mut().and_then(|a| a.drain.as_mut()) {
            d.acknowledged = true;
            d.drained = true;
            d.drained_at = timestamp("2026-11-23T12:10:00Z");
        }
        assert_eq!(
            drained(&node),
            "gpu-node-1 drained at 2026-11-23T12:10:00Z (the deadline passed with 2 slots still busy)\n"
        );
        node.pool_status[0].slots_free = 4;
        assert_eq!(
            drained(&node),
            "gpu-node-1 drained at 2026-11-23T12:10:00Z\n"
        );
    }
}
