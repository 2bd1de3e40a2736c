//! Prometheus metrics. The registry keeps plain atomic totals (see
//! [`crate::registry::Stats`]); a publisher task copies them into the
//! `metrics` recorder once a second, so heartbeats pay no registry look-ups.
//! Only the heartbeat handling latency is recorded per message.
//!
//! Beside the registry's own figures the recorder holds the per-RPC metrics
//! of [`crate::grpc_metrics`], the process metrics of [`crate::process`]
//! (published here, once a second) and `registry_build_info`. The metrics
//! port serves them with the service discovery endpoints ([`crate::metrics_port`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use registry_proto::pb;
use tokio_util::sync::CancellationToken;

use crate::registry::{GPU_HEALTHS, POOL_STATES, Registry};

/// Nodes by status (`status` = online | offline).
pub const NODES: &str = "registry_nodes";
/// Pools of ONLINE nodes by reported state (`state` = ready | ...).
pub const POOLS: &str = "registry_pools";
/// Gauge: GPUs of ONLINE nodes by reported health (`health` label:
/// healthy, degraded, unhealthy, unspecified).
pub const GPUS: &str = "registry_gpus";
/// Register calls accepted.
pub const REGISTRATIONS: &str = "registry_registrations_total";
/// Register calls refused with a retry time because too many were under
/// way (see [`crate::admission`]).
pub const REGISTRATIONS_REFUSED: &str = "registry_registrations_refused_total";
/// Register calls waiting for their turn now.
pub const REGISTRATIONS_WAITING: &str = "registry_registrations_waiting";
/// How late each serving runtime last ran its lag probe (`crate::lag`).
pub const RUNTIME_LAG: &str = "registry_runtime_lag_seconds";
/// Deregister calls accepted.
pub const DEREGISTRATIONS: &str = "registry_deregistrations_total";
/// Heartbeat messages accepted.
pub const HEARTBEATS: &str = "registry_heartbeats_total";
/// Heartbeat streams open now.
pub const OPEN_STREAMS: &str = "registry_heartbeat_streams_open";
/// ONLINE -> OFFLINE transitions.
pub const OFFLINE_TRANSITIONS: &str = "registry_offline_transitions_total";
/// OFFLINE -> ONLINE transitions.
pub const ONLINE_TRANSITIONS: &str = "registry_online_transitions_total";
/// Listed nodes that are cordoned (CordonNode), kept on every change.
pub const CORDONED: &str = "registry_nodes_cordoned";
/// Listed nodes with a drain requested (DrainNode), drained or not.
pub const DRAINING: &str = "registry_nodes_draining";
/// Nodes removed after their offline retention.
pub const EXPIRED: &str = "registry_expired_nodes_total";
/// Time to validate and record one heartbeat message, in seconds. Every
/// heartbeat message the stream decodes is timed, accepted or refused (a
/// refusal ends the stream, so refused messages are at most one per
/// stream); decoding the message and sending the ack are not included.
pub const HEARTBEAT_SECONDS: &str = "registry_heartbeat_handling_seconds";

/// 1 while the mass-failure guard holds nodes ONLINE (the registry
/// suspects itself, not the fleet), else 0.
pub const GUARD_ACTIVE: &str = "registry_mass_failure_guard_active";
/// Times the mass-failure guard tripped.
pub const GUARD_TRIPS: &str = "registry_mass_failure_guard_trips_total";
/// Nodes the guard holds ONLINE past their deadline now.
pub const GUARD_HELD: &str = "registry_mass_failure_guard_held_nodes";
/// Nodes the guard held ONLINE past their deadline, in all.
pub const GUARD_HELD_TOTAL: &str = "registry_mass_failure_guard_held_nodes_total";
/// Nodes flagged suspect now (held by the guard, or in the grace after a
/// stall or restart), which placement never offers.
pub const SUSPECT: &str = "registry_suspect_nodes";
/// Stalls the expiry loop noticed (it woke far later than asked).
pub const STALLS: &str = "registry_stalls_total";
/// Embedded store transactions committed (each holds one or more writes).
pub const STORE_COMMITS: &str = "registry_store_commits_total";
/// Writes (node records, admin states) committed to the embedded store.
pub const STORE_WRITES: &str = "registry_store_writes_total";
/// Embedded store commits that failed (their callers got UNAVAILABLE).
pub const STORE_FAILURES: &str = "registry_store_commit_failures_total";
/// Time to apply and commit one batch durably (fsync included), seconds.
pub const STORE_COMMIT_SECONDS: &str = "registry_store_commit_seconds";

/// Token file reloads (SIGHUP or change) that failed: unreadable,
/// deleted, empty or unparsable; the previous tokens stayed in force.
pub const AUTH_RELOAD_FAILURES: &str = "registry_auth_reload_failures_total";
/// 1 while the latest token file reload failed (the tokens in force are
/// older than the file), else 0.
pub const AUTH_RELOAD_FAILING: &str = "registry_auth_reload_failing";
/// Tokens in force (file and environment).
pub const AUTH_TOKENS: &str = "registry_auth_tokens";
/// Heartbeat streams the registry ended because something newer or
/// stricter took over (`reason` = replaced: a newer stream of the session;
/// superseded: a newer session; revoked: the stream's token was removed).
pub const STREAMS_ENDED: &str = "registry_heartbeat_streams_ended_total";
/// Requests ended because of a message's size or the bytes unfinished
/// messages held (`reason` = too_large, connection_budget, global_budget).
pub const MESSAGES_REFUSED: &str = "registry_messages_refused_total";

/// Histogram buckets for store commits: 100 µs to 1 s.
const STORE_BUCKETS: &[f64] = &[
    100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
];

/// Always 1, labelled with the registry's `version`.
pub const BUILD_INFO: &str = "registry_build_info";

/// How often the publisher copies totals into the recorder.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Histogram buckets for heartbeat handling: microseconds to 100 ms.
const HEARTBEAT_BUCKETS: &[f64] = &[
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3,
];

/// Installs the global Prometheus recorder and returns its handle, which
/// [`crate::metrics_port`] renders on `/metrics`. Nothing is served here.
pub fn install_prometheus() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HEARTBEAT_SECONDS.into()), HEARTBEAT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STORE_COMMIT_SECONDS.into()), STORE_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(crate::grpc_metrics::HANDLING_SECONDS.into()),
            crate::grpc_metrics::HANDLING_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// Describes every metric to the installed recorder.
pub fn describe() {
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    describe_counter!(
        crate::grpc_metrics::STARTED,
        "Total number of RPCs started on the server."
    );
    describe_counter!(
        crate::grpc_metrics::HANDLED,
        "Total number of RPCs completed on the server, regardless of success or failure."
    );
    describe_histogram!(
        crate::grpc_metrics::HANDLING_SECONDS,
        Unit::Seconds,
        "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server."
    );
    crate::process::describe();
    describe_gauge!(NODES, "Nodes by status (online, offline).");
    describe_gauge!(POOLS, "Pools of ONLINE nodes by reported state.");
    describe_gauge!(
        GPUS,
        "GPUs of ONLINE nodes by reported health (unspecified: the agent reports none)."
    );
    describe_counter!(REGISTRATIONS, "Register calls accepted.");
    describe_counter!(DEREGISTRATIONS, "Deregister calls accepted.");
    describe_counter!(HEARTBEATS, "Heartbeat messages accepted.");
    describe_gauge!(OPEN_STREAMS, "Heartbeat streams open now.");
    describe_counter!(
        REGISTRATIONS_REFUSED,
        "Register calls refused with RESOURCE_EXHAUSTED and a retry time: --max-queued-registrations were already waiting, the queue ahead would take longer than --max-registration-wait at the measured pace, no turn came within it, or the registry ran further behind than --max-registration-lag."
    );
    describe_gauge!(
        RUNTIME_LAG,
        Unit::Seconds,
        "How late each runtime serving calls (main, conn-N) last woke its probe timer: the delay a ready task waits before it runs. Register is refused while the largest exceeds --max-registration-lag."
    );
    describe_gauge!(
        REGISTRATIONS_WAITING,
        "Register calls waiting for one of the --max-concurrent-registrations turns."
    );
    describe_gauge!(CORDONED, "Listed nodes that are cordoned.");
    describe_gauge!(DRAINING, "Listed nodes with a drain requested.");
    describe_counter!(
        OFFLINE_TRANSITIONS,
        "Nodes marked OFFLINE after the node timeout."
    );
    describe_counter!(ONLINE_TRANSITIONS, "OFFLINE nodes that came back ONLINE.");
    describe_counter!(EXPIRED, "OFFLINE nodes removed after the retention.");
    describe_counter!(STORE_COMMITS, "Embedded store transactions committed.");
    describe_counter!(STORE_WRITES, "Writes committed to the embedded store.");
    describe_counter!(
        STORE_FAILURES,
        "Embedded store commits that failed; their callers got UNAVAILABLE."
    );
    describe_histogram!(
        STORE_COMMIT_SECONDS,
        Unit::Seconds,
        "Time to apply and durably commit one batch of store writes."
    );
    describe_histogram!(
        HEARTBEAT_SECONDS,
        Unit::Seconds,
        "Time to validate and record one heartbeat message (accepted or refused)."
    );
    describe_gauge!(
        GUARD_ACTIVE,
        "1 while the mass-failure guard holds silent nodes ONLINE as suspect."
    );
    describe_counter!(GUARD_TRIPS, "Times the mass-failure guard tripped.");
    describe_gauge!(GUARD_HELD, "Nodes the mass-failure guard holds ONLINE now.");
    describe_counter!(
        GUARD_HELD_TOTAL,
        "Nodes the mass-failure guard held ONLINE past their deadline."
    );
    describe_gauge!(
        SUSPECT,
        "Nodes flagged suspect now (guard, stall or restart grace); never offered by FindPools."
    );
    describe_counter!(
        AUTH_RELOAD_FAILURES,
        "Token file reloads that failed (unreadable, deleted, empty or unparsable); the previous tokens stayed in force."
    );
    describe_gauge!(
        AUTH_RELOAD_FAILING,
        "1 while the latest token file reload failed, else 0."
    );
    describe_gauge!(AUTH_TOKENS, "Tokens in force.");
    describe_counter!(
        STREAMS_ENDED,
        "Heartbeat streams ended by the registry because a newer stream or session took over, or their token was revoked."
    );
    describe_counter!(
        MESSAGES_REFUSED,
        "Requests ended because a message was larger than its method allows, or unfinished messages would have held more bytes than the connection's or the server's budget."
    );
    describe_counter!(
        STALLS,
        "Stalls of the registry noticed by its deadline loop; each gave every node a fresh grace."
    );
}

/// Copies the registry's totals into the recorder until `shutdown`.
pub async fn publish(registry: Registry, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                publish_once(&registry);
                crate::process::publish();
            }
        }
    }
}

/// One copy of every total and gauge.
pub fn publish_once(registry: &Registry) {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let counts = registry.counts();
    gauge!(NODES, "status" => "online").set(counts.online as f64);
    gauge!(NODES, "status" => "offline").set(counts.offline as f64);
    let stats = registry.stats();
    for index in 1..POOL_STATES {
        let Ok(state) = pb::PoolState::try_from(index as i32) else {
            continue;
        };
        let label = state
            .as_str_name()
            .trim_start_matches("POOL_STATE_")
            .to_ascii_lowercase();
        gauge!(POOLS, "state" => label)
            .set(stats.pools_by_state[index].load(Ordering::Relaxed) as f64);
    }
    for index in 0..GPU_HEALTHS {
        let Ok(health) = pb::GpuHealth::try_from(index as i32) else {
            continue;
        };
        let label = health
            .as_str_name()
            .trim_start_matches("GPU_HEALTH_")
            .to_ascii_lowercase();
        gauge!(GPUS, "health" => label)
            .set(stats.gpus_by_health[index].load(Ordering::Relaxed) as f64);
    }
    let total = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    counter!(REGISTRATIONS).absolute(total(&stats.registrations));
    counter!(DEREGISTRATIONS).absolute(total(&stats.deregistrations));
    counter!(HEARTBEATS).absolute(total(&stats.heartbeats));
    counter!(OFFLINE_TRANSITIONS).absolute(total(&stats.offline_transitions));
    counter!(ONLINE_TRANSITIONS).absolute(total(&stats.online_transitions));
    counter!(EXPIRED).absolute(total(&stats.expired));
    gauge!(OPEN_STREAMS).set(stats.open_streams.load(Ordering::Relaxed) as f64);
    gauge!(CORDONED).set(stats.cordoned_nodes.load(Ordering::Relaxed) as f64);
    gauge!(DRAINING).set(stats.draining_nodes.load(Ordering::Relaxed) as f64);
    let guard = registry.guard_status();
    let guard_stats = registry.guard_stats();
    gauge!(GUARD_ACTIVE).set(if guard.active.is_some() { 1.0 } else { 0.0 });
    gauge!(GUARD_HELD).set(guard.held as f64);
    gauge!(SUSPECT).set(guard.suspect as f64);
    counter!(GUARD_TRIPS).absolute(total(&guard_stats.trips));
    counter!(GUARD_HELD_TOTAL).absolute(total(&guard_stats.held_total));
    counter!(STALLS).absolute(total(&guard_stats.stalls));
}
