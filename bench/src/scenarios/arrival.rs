//! Scenario 10, agents arriving at once (issue 13): a registered fleet
//! heartbeats while a second fleet starts with every node at once (ramp
//! 0), against a registry with the embedded store, once with Register's
//! admission control and once without it (running and queued limits far
//! above the storm). What it reports: how long until every arriving node
//! is registered and heartbeating, the Register calls deferred with a
//! retry time and those that failed, and the registered fleet's ack
//! latency over the storm: the heartbeats that must not wait. The two
//! fleets run on separate runtimes, so the arriving fleet's own work does
//! not delay the registered fleet's acks in the bench itself.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_sim::{Fleet, LatencySummary};
use tokio::time::{Instant, sleep};
use tracing::info;

use super::{fleet_config, start_fleet, wait_attached, wait_registered};
use crate::BenchError;
use crate::plan::{ArrivalPlan, Plan};
use crate::server::{Launcher, ServerSpec};

/// Limits far above any storm here: nothing waits, nothing is deferred
/// (the registry before admission control).
const NO_ADMISSION: (usize, usize) = (1_000_000, 1_000_000);

/// One storm.
#[derive(Debug, Clone)]
pub struct ArrivalRow {
    /// "admission control (R running / Q queued)" or "none".
    pub setup: String,
    /// Storm start → the last arriving node's first successful Register.
    pub all_registered: Duration,
    /// Storm start → every arriving node heartbeating.
    pub all_attached: Duration,
    /// Register calls deferred with a retry time.
    pub deferred: u64,
    /// Register calls that failed (any error but a deferral).
    pub register_failures: u64,
    /// Latency of the successful Register calls.
    pub register: LatencySummary,
    /// Ack latency of the arriving fleet, first heartbeats included.
    pub arriving_ack: LatencySummary,
    /// Ack latency of the registered fleet from storm start until every
    /// arriving node heartbeats.
    pub registered_ack: LatencySummary,
    /// Errors of the registered fleet over the same time.
    pub registered_errors: BTreeMap<String, u64>,
}

/// Both storms.
#[derive(Debug, Clone)]
pub struct ArrivalResult {
    /// What ran.
    pub plan: ArrivalPlan,
    /// With admission control, then without.
    pub rows: Vec<ArrivalRow>,
}

/// Runs the storm with the plan's admission limits (or the registry's
/// defaults), then without admission control.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<ArrivalResult, BenchError> {
    let p = &plan.arrival;
    let defaults = registry_server::Settings::default();
    let (running, queued) = p.admission.unwrap_or((
        defaults.max_concurrent_registrations,
        defaults.max_queued_registrations,
    ));
    let with = storm(
        launcher,
        p,
        "admission",
        format!("admission control ({running} running / {queued} queued)"),
        (running, queued),
    )
    .await?;
    let without = storm(launcher, p, "none", "none".into(), NO_ADMISSION).await?;
    Ok(ArrivalResult {
        plan: p.clone(),
        rows: vec![with, without],
    })
}

async fn storm(
    launcher: &Launcher,
    p: &ArrivalPlan,
    name: &str,
    setup: String,
    (running, queued): (usize, usize),
) -> Result<ArrivalRow, BenchError> {
    let spec = ServerSpec::new(format!("arrival-{name}"))
        .timing(p.interval * 3, p.interval)
        .embedded(launcher.data_dir(&format!("arrival-{name}"))?)
        .admission(running, queued);
    let server = launcher.start(&spec).await?;
    let registered = start_fleet(
        &server,
        // Registered over one interval, so their beats are spread evenly
        // over it and the storm's first seconds always meet some: at a
        // faster ramp they beat in bursts, and the p99 depended on whether
        // the storm began in a burst or in a quiet stretch.
        fleet_config(
            "registered",
            p.registered,
            p.registered_connections,
            p.registered as f64 / p.interval.as_secs_f64(),
        ),
        p.limit,
    )
    .await?;
    sleep(p.settle).await;
    let watched = registered.stats();
    let (before, _) = watched.take_window();

    let mut config = fleet_config("arriving", p.arriving, p.arriving_connections, 0.0);
    config.registry = server.url();
    // The arriving fleet runs on threads of its own, as it would from
    // other hosts: on the bench's runtime its 50,000 tasks would queue in
    // front of the registered fleet's acks and be counted as the
    // registry's delay.
    let own_threads = OwnThreads(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("arriving-fleet")
            .enable_all()
            .build()
            .map_err(|e| BenchError::Sim(format!("the arriving fleet's runtime: {e}")))?,
    ));
    let start = Instant::now();
    let arriving = {
        let _on_own_threads = own_threads.0.as_ref().map(|rt| rt.enter());
        Fleet::start(config).map_err(|e| BenchError::Sim(e.to_string()))?
    };
    wait_registered(&arriving, p.arriving, p.limit).await?;
    let all_registered = start.elapsed();
    wait_attached(&arriving, p.arriving, p.limit).await?;
    let all_attached = start.elapsed();
    let (after, window) = watched.take_window();
    let report = arriving.stop().await;
    drop(own_threads);
    registered.stop().await;
    server.stop().await?;
    let register_failures = report.register_failures();
    let row = ArrivalRow {
        setup,
        all_registered,
        all_attached,
        deferred: report.deferred,
        register_failures,
        register: report.register_latency,
        arriving_ack: report.ack_latency,
        registered_ack: window.ack,
        registered_errors: after.errors_since(&before),
    };
    info!(
        setup = %row.setup,
        all_registered_ms = all_registered.as_millis() as u64,
        deferred = row.deferred,
        register_failures,
        registered_ack_p99_ms = row.registered_ack.p99.as_millis() as u64,
        "arrival storm done"
    );
    Ok(row)
}

/// A runtime of the bench's own, shut down without waiting when dropped
/// (a runtime dropped inside another's task would otherwise panic).
struct OwnThreads(Option<tokio::runtime::Runtime>);

impl Drop for OwnThreads {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
