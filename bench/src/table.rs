//! The figures as Markdown tables, ready for docs/BENCHMARKS.md.

use std::fmt::Write;
use std::time::Duration;

use fleet_sim::stats::{fmt_errors, fmt_ms};

use crate::Results;
use crate::plan::RestartStore;
use crate::scenarios::arrival::ArrivalResult;
use crate::scenarios::detection::DetectionResult;
use crate::scenarios::drain::DrainResult;
use crate::scenarios::feed::FeedResult;
use crate::scenarios::reads::ReadsResult;
use crate::scenarios::replicas::ReplicasResult;
use crate::scenarios::restart::RestartRow;
use crate::scenarios::scale::ScaleRow;
use crate::scenarios::store::StoreResult;
use crate::scenarios::throughput::ThroughputResult;
use crate::server::StopMode;

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Scenario 1.
pub fn scale(rows: &[ScaleRow]) -> String {
    let mut out = String::from(
        "| nodes | connections | interval | registrations/s | heartbeats/s | server CPU | server RSS (peak) | RSS/node | ack p50 | ack p99 | ack max | simulator CPU | sim timer lag p99 | errors | false OFFLINE |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.0} | {:.1} % | {} ({}) | {} | {} | {} | {} | {:.0} % | {} | {} | {} |",
            r.nodes,
            r.connections,
            humantime::format_duration(r.interval),
            r.registrations_per_sec,
            r.heartbeats_per_sec,
            r.server_cpu_percent,
            mib(r.rss),
            mib(r.peak_rss),
            kib(r.rss_per_node),
            fmt_ms(r.ack.p50),
            fmt_ms(r.ack.p99),
            fmt_ms(r.ack.max),
            r.sim_cpu_percent,
            fmt_ms(r.wake_lag.p99),
            fmt_errors(&r.errors),
            r.false_offline,
        );
    }
    out
}

/// Scenario 2.
pub fn throughput(t: &ThroughputResult) -> String {
    let mut out = format!(
        "{} nodes on {} connections; the interval shrinks step by step until acks fall behind; sustained = ack p99 under {}, >= 95 % acked, no errors.\n\n\
         | offered/s | acked/s | ack p50 | ack p99 | ack max | server CPU | server CPU-s per 100k | simulator CPU | sim timer lag p99 | errors | sustained |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
        t.nodes,
        t.connections,
        fmt_ms(t.p99_limit)
    );
    for r in &t.rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {:.0} % | {:.2} | {:.0} % | {} | {} | {} |",
            r.offered,
            r.achieved,
            fmt_ms(r.ack.p50),
            fmt_ms(r.ack.p99),
            fmt_ms(r.ack.max),
            r.server_cpu_percent,
            r.cpu_seconds_per_100k,
            r.sim_cpu_percent,
            fmt_ms(r.wake_lag.p99),
            fmt_errors(&r.errors),
            if r.sustained { "yes" } else { "no" },
        );
    }
    match t.best() {
        Some(best) => {
            let _ = writeln!(
                out,
                "\nHighest sustained: **{:.0} heartbeats/s**, ack p99 {}, {:.2} server CPU-seconds per 100k heartbeats.",
                best.achieved,
                fmt_ms(best.ack.p99),
                best.cpu_seconds_per_100k
            );
        }
        None => out.push_str("\nNo rate was sustained.\n"),
    }
    if let Some(peak) = t.peak() {
        let _ = writeln!(
            out,
            "Peak acknowledged (latency aside): **{:.0} heartbeats/s** at {:.0} % server CPU, ack p99 {}.",
            peak.achieved,
            peak.server_cpu_percent,
            fmt_ms(peak.ack.p99)
        );
    }
    out
}

/// Scenario 3.
pub fn detection(d: &DetectionResult) -> String {
    format!(
        "node timeout {}, interval {}.\n\n\
         | nodes | silenced | marked OFFLINE | missed | false OFFLINE | lag p50 | lag p99 | lag max |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        humantime::format_duration(d.node_timeout),
        humantime::format_duration(d.interval),
        d.nodes,
        d.silenced,
        d.detected,
        d.missed,
        d.false_offline,
        fmt_ms(d.lag.p50),
        fmt_ms(d.lag.p99),
        fmt_ms(d.lag.max),
    )
}

/// Scenario 4.
pub fn reads(r: &ReadsResult) -> String {
    let mut out = format!(
        "{} nodes, {:.0} heartbeats/s flowing; one reader calling ListNodes back to back.\n\n\
         | reader | nodes per read | calls per read | read p50 | read p99 | read max | reads | ack p50 | ack p99 | ack max | server CPU |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.nodes, r.heartbeats_per_sec
    );
    for row in &r.rows {
        let (p50, p99, max, reads) = match &row.list {
            Some(l) => (
                fmt_ms(l.p50),
                fmt_ms(l.p99),
                fmt_ms(l.max),
                l.count.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {p50} | {p99} | {max} | {reads} | {} | {} | {} | {:.0} % |",
            row.phase,
            row.nodes_per_read,
            row.calls_per_read,
            fmt_ms(row.ack.p50),
            fmt_ms(row.ack.p99),
            fmt_ms(row.ack.max),
            row.server_cpu_percent,
        );
    }
    out
}

/// Scenario 5.
pub fn restart(rows: &[RestartRow]) -> String {
    let mut out = String::from(
        "| store | stop | nodes | connections | registry down | all nodes back after | re-registered | ONLINE after | false OFFLINE | accept-queue overflows | errors seen by the fleet |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let mode = match r.mode {
            StopMode::Graceful => "SIGTERM",
            StopMode::Crash => "SIGKILL",
        };
        let store = match r.store {
            RestartStore::Memory => "memory",
            RestartStore::Embedded => "embedded",
        };
        let _ = writeln!(
            out,
            "| {store} | {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.nodes,
            r.connections,
            secs(r.down),
            secs(r.all_back),
            r.reregistered,
            r.online,
            r.false_offline,
            r.listen_overflows
                .map_or_else(|| "-".to_string(), |n| n.to_string()),
            fmt_errors(&r.errors),
        );
    }
    out
}

/// Scenario 8: the store's write path.
pub fn store(s: &StoreResult) -> String {
    format!(
        "{} Registers of new nodes paced at {}/s by up to {} concurrent calls, against a registry with the embedded store (each answered once its record is committed; group commit).\n\n\
         | acknowledged | failed | wall | registrations/s | Register p50 | p99 | max |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {} | {:.0} | {} | {} | {} |\n",
        s.registrations,
        s.rate,
        s.concurrency,
        s.acknowledged,
        s.failed,
        secs(s.wall),
        s.per_sec,
        fmt_ms(s.latency.p50),
        fmt_ms(s.latency.p99),
        fmt_ms(s.latency.max),
    )
}

/// Scenario 6.
pub fn feed(f: &FeedResult) -> String {
    let mut out = format!(
        "{} nodes, {} pools each, slots_free changing on every beat, heartbeat every {}; each phase {} on one server process. \
         Delivery = watcher receive time - the event node's agent_time (the heartbeat's sent_at, same machine's clock), over every watcher's MODIFIED events; \
         slowest watcher = the highest per-watcher p99; delivered = the fewest events one watcher received / heartbeats acked.\n\n\
         | phase | heartbeats/s | server CPU | server CPU-s per 100k heartbeats | bench process CPU | ack p99 | events received/s (all watchers) | delivery p50 | delivery p99 | delivery max | slowest watcher p99 | delivered (min watcher) | watch restarts | heartbeat errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        f.nodes,
        f.pools,
        humantime::format_duration(f.interval),
        humantime::format_duration(f.phase),
    );
    for r in &f.rows {
        let (p50, p99, max, slowest, delivered) = match &r.delivery {
            Some(d) => (
                fmt_ms(d.p50),
                fmt_ms(d.p99),
                fmt_ms(d.max),
                fmt_ms(r.slowest_watcher_p99),
                format!("{:.2}", r.min_delivered_fraction),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} % | {:.2} | {:.0} % | {} | {:.0} | {p50} | {p99} | {max} | {slowest} | {delivered} | {} | {} |",
            r.phase,
            r.heartbeats_per_sec,
            r.server_cpu_percent,
            r.cpu_seconds_per_100k,
            r.bench_cpu_percent,
            fmt_ms(r.ack.p99),
            r.events_per_sec,
            r.watch_errors,
            r.heartbeat_errors,
        );
    }
    let find = &f.find;
    let walk = &f.walk;
    let _ = write!(
        out,
        "\nDuring the last phase:\n\n\
         | reader | calls | p50 | p99 | max | other |\n\
         |---|---:|---:|---:|---:|---|\n\
         | FindPools, random model, limit 10, {}/s | {} | {} | {} | {} | empty {}, NOT_FOUND {}, other errors {} |\n\
         | ListNodes walk, pages of {} | {} walks | {} | {} | {} | {} nodes in {} calls per walk, {:.2} µs per node (p50) |\n",
        find.rate,
        find.calls,
        fmt_ms(find.latency.p50),
        fmt_ms(find.latency.p99),
        fmt_ms(find.latency.max),
        find.empty,
        find.not_found,
        find.errors,
        walk.page_size,
        walk.latency.count,
        fmt_ms(walk.latency.p50),
        fmt_ms(walk.latency.p99),
        fmt_ms(walk.latency.max),
        walk.nodes_per_walk,
        walk.calls_per_walk,
        walk.us_per_node(),
    );
    out
}

/// Every scenario that ran, with headings.
pub fn all(results: &Results) -> String {
    let mut out = String::new();
    if let Some(rows) = &results.scale {
        let _ = writeln!(out, "### 1. Scale\n\n{}", scale(rows));
    }
    if let Some(t) = &results.throughput {
        let _ = writeln!(out, "### 2. Throughput\n\n{}", throughput(t));
    }
    if let Some(d) = &results.detection {
        let _ = writeln!(out, "### 3. Detection\n\n{}", detection(d));
    }
    if let Some(r) = &results.reads {
        let _ = writeln!(out, "### 4. Reads\n\n{}", reads(r));
    }
    if let Some(rows) = &results.restart {
        let _ = writeln!(out, "### 5. Restart storm\n\n{}", restart(rows));
    }
    if let Some(f) = &results.feed {
        let _ = writeln!(out, "### 6. Change feed\n\n{}", feed(f));
    }
    if let Some(s) = &results.store {
        let _ = writeln!(out, "### 8. Store write path\n\n{}", store(s));
    }
    if let Some(d) = &results.drain {
        let _ = writeln!(out, "### 7. Drain round trip\n\n{}", drain(d));
    }
    if let Some(r) = &results.replicas {
        let _ = writeln!(out, "### 9. Replicas on etcd\n\n{}", replicas(r));
    }
    if let Some(a) = &results.arrival {
        let _ = writeln!(out, "### 10. Agents arriving at once\n\n{}", arrival(a));
    }
    out
}

/// Scenario 10.
pub fn arrival(a: &ArrivalResult) -> String {
    let p = &a.plan;
    let mut out = format!(
        "{} nodes registered on {} connections heartbeat every {} ({} of it before the storm); then {} nodes on {} connections \
         start at once (ramp 0), 8 GPUs and 2 pools each, embedded store. Deferred = Register answered RESOURCE_EXHAUSTED with a \
         retry time (retried then); registered fleet = its acks from the storm's start until every arriving node heartbeats.\n\n\
         | admission | all registered | all heartbeating | deferred | Register failures | Register p50 | p99 | arriving ack p99 | registered fleet ack p50 | p99 | max | registered fleet errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        p.registered,
        p.registered_connections,
        humantime::format_duration(p.interval),
        humantime::format_duration(p.settle),
        p.arriving,
        p.arriving_connections,
    );
    for r in &a.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.setup,
            secs(r.all_registered),
            secs(r.all_attached),
            r.deferred,
            r.register_failures,
            fmt_ms(r.register.p50),
            fmt_ms(r.register.p99),
            fmt_ms(r.arriving_ack.p99),
            fmt_ms(r.registered_ack.p50),
            fmt_ms(r.registered_ack.p99),
            fmt_ms(r.registered_ack.max),
            fmt_errors(&r.registered_errors),
        );
    }
    out
}

/// Scenario 9.
pub fn replicas(r: &ReplicasResult) -> String {
    let p = &r.plan;
    let mut out = format!(
        "{} nodes on {} connections (1 GPU, 1 pool each), registering at {}/s, heartbeat every {}, node timeout {}; \
         3 replicas on a 3-member etcd cluster (lease TTL {}), then 1 registry with the embedded store, each under the same fleet. \
         Storm = fleet start -> every node heartbeating. Steady window {} on the leader; etcd figures over the same window \
         (txn = write transactions, keys = keys put or deleted, proposals = raft proposals committed; CPU and RSS of the 3 members together).\n\n\
         | set-up | storm | registrations/s | Register p50 | p99 | max | Register failures | heartbeats/s | leader CPU | leader CPU-s per 100k heartbeats | leader RSS/node | ack p99 | errors (window) | etcd txn/s | etcd keys/s | etcd proposals/s | etcd CPU | etcd RSS |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|\n",
        p.nodes,
        r.connections,
        p.ramp,
        humantime::format_duration(p.interval),
        humantime::format_duration(p.node_timeout),
        humantime::format_duration(p.lease_ttl),
        humantime::format_duration(p.window),
    );
    for row in &r.rows {
        let w = &row.window;
        let acked = w.acked();
        let per_100k = if acked == 0 {
            0.0
        } else {
            w.server_cpu().as_secs_f64() / acked as f64 * 100_000.0
        };
        let etcd = match &row.etcd {
            Some(e) => format!(
                "{:.2} | {:.2} | {:.2} | {:.1} % | {}",
                e.txn_per_sec,
                e.keys_per_sec,
                e.proposals_per_sec,
                e.cpu_percent,
                mib(e.rss)
            ),
            None => "- | - | - | - | -".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.0} | {:.1} % | {:.2} | {} | {} | {} | {} |",
            row.setup,
            secs(row.storm),
            row.registrations_per_sec,
            fmt_ms(row.register.p50),
            fmt_ms(row.register.p99),
            fmt_ms(row.register.max),
            row.register_failures,
            w.ack_rate(),
            w.server_cpu_percent(),
            per_100k,
            kib(w.server_after.rss / p.nodes.max(1) as u64),
            fmt_ms(w.ack.p99),
            fmt_errors(&w.errors()),
            etcd,
        );
    }
    let f = &r.failover;
    let _ = write!(
        out,
        "\nLeader SIGKILL under the fleet: a new leader SERVING after **{}**; every node heartbeating to it after **{}**; \
         nodes registered again: {}; listed by the new leader: {}, of which not ONLINE: {}; fleet errors meanwhile: {}.\n",
        secs(f.to_serving),
        secs(f.to_all_heartbeating),
        f.reregistered,
        f.listed,
        f.offline,
        fmt_errors(&f.errors),
    );
    out
}

/// Scenario 7.
pub fn drain(d: &DrainResult) -> String {
    let mut out = format!(
        "{} nodes heartbeating every {}; {} of them drained one after another. \
         Drain = DrainNode call -> WatchNodes event with the drain acknowledged (the agent reported its pools DRAINING); \
         resume = CancelDrain call -> event with no pool DRAINING.\n\n\
         | round trip | count | p50 | p99 | max |\n\
         |---|---:|---:|---:|---:|\n",
        d.nodes,
        humantime::format_duration(d.interval),
        d.drains,
    );
    for (name, l) in [
        ("DrainNode -> DRAINING", &d.drain),
        ("CancelDrain -> resumed", &d.resume),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} |",
            l.count,
            fmt_ms(l.p50),
            fmt_ms(l.p99),
            fmt_ms(l.max)
        );
    }
    if d.timed_out > 0 {
        let _ = writeln!(out, "\n{} round trips did not finish in time.", d.timed_out);
    }
    out
}
