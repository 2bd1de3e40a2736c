//! The agent's Prometheus metrics, served on `--metrics-listen` at
//! `/metrics` (off by default). Recorded through the `metrics` facade, so
//! without a served endpoint every call is a no-op.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `node_agent_heartbeat_acks_total` | counter | heartbeat acks received |
//! | `node_agent_heartbeat_ack_seconds` | histogram | from building a beat to its ack |
//! | `node_agent_reconnects_total` | counter | heartbeat streams that failed and are opened again |
//! | `node_agent_registrations_total{outcome}` | counter | Register calls: `ok`, `refused` (INVALID_ARGUMENT), `failed` |
//! | `node_agent_registered` | gauge | 1 while the agent holds a session, else 0 |
//! | `node_agent_pools{state}` | gauge | pools by the state last reported |
//! | `node_agent_pool_actions_total{action,outcome}` | counter | pool drain/resume actions run: `action` `drain` or `resume`, `outcome` `ok` or `failed` |
//! | `node_agent_gpu_memory_used_bytes{gpu}` | gauge | per GPU index, as last read |
//! | `node_agent_gpu_memory_free_bytes{gpu}` | gauge | |
//! | `node_agent_gpu_utilization_percent{gpu}` | gauge | |
//! | `node_agent_gpu_temperature_celsius{gpu}` | gauge | where the GPU reports it |
//! | `node_agent_gpu_health{gpu}` | gauge | 0 unreported, 1 healthy, 2 degraded, 3 unhealthy (`GpuHealth`) |
//! | `node_agent_gpu_power_draw_watts{gpu}` | gauge | where the GPU reports it |
//! | `node_agent_gpu_xid_errors{gpu}` | gauge | distinct critical XIDs in the window |

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::header;
use axum::routing::get;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use registry_proto::pb;
use tokio::net::TcpListener;

/// Heartbeat acks received.
pub const ACKS: &str = "node_agent_heartbeat_acks_total";
/// Time from building a heartbeat to its ack, in seconds.
pub const ACK_SECONDS: &str = "node_agent_heartbeat_ack_seconds";
/// Heartbeat streams that failed and are opened again.
pub const RECONNECTS: &str = "node_agent_reconnects_total";
/// Register calls by outcome.
pub const REGISTRATIONS: &str = "node_agent_registrations_total";
/// 1 while the agent holds a session.
pub const REGISTERED: &str = "node_agent_registered";
/// Pools by reported state.
pub const POOLS: &str = "node_agent_pools";
/// Pool drain/resume actions run, by action and outcome.
pub const POOL_ACTIONS: &str = "node_agent_pool_actions_total";
/// GPU memory in use, bytes.
pub const GPU_MEMORY_USED: &str = "node_agent_gpu_memory_used_bytes";
/// GPU memory free, bytes.
pub const GPU_MEMORY_FREE: &str = "node_agent_gpu_memory_free_bytes";
/// GPU utilisation, percent.
pub const GPU_UTILIZATION: &str = "node_agent_gpu_utilization_percent";
/// GPU temperature, degrees Celsius.
pub const GPU_TEMPERATURE: &str = "node_agent_gpu_temperature_celsius";
/// GPU health as its `GpuHealth` number.
pub const GPU_HEALTH: &str = "node_agent_gpu_health";
/// GPU power draw, watts.
pub const GPU_POWER: &str = "node_agent_gpu_power_draw_watts";
/// Distinct critical XIDs of the GPU within the XID window.
pub const GPU_XIDS: &str = "node_agent_gpu_xid_errors";

/// Ack latency buckets: a millisecond to ten seconds.
const ACK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often the recorder's histograms are compacted.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Why the metrics endpoint cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Another recorder is installed in this process (an embedder's).
    #[error("another metrics recorder is installed in this process")]
    RecorderTaken,
    /// The recorder cannot be built.
    #[error("metrics recorder: {0}")]
    Build(#[from] metrics_exporter_prometheus::BuildError),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The process-wide recorder: installed on first use, shared by every
/// agent of the process (tests run several).
static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The installed recorder's handle, installing it on first use.
pub fn handle() -> Result<PrometheusHandle, MetricsError> {
    let mut build_error = None;
    let installed = RECORDER.get_or_init(|| {
        let recorder = match PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(ACK_SECONDS.into()), ACK_BUCKETS)
        {
            Ok(builder) => builder.build_recorder(),
            Err(err) => {
                build_error = Some(err);
                return None;
            }
        };
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).ok()?;
        describe();
        Some(handle)
    });
    if let Some(err) = build_error {
        return Err(err.into());
    }
    installed.clone().ok_or(MetricsError::RecorderTaken)
}

fn describe() {
    describe_counter!(ACKS, "Heartbeat acks received from the registry.");
    describe_histogram!(
        ACK_SECONDS,
        Unit::Seconds,
        "Time from building a heartbeat to receiving its ack."
    );
    describe_counter!(
        RECONNECTS,
        "Heartbeat streams that failed and are opened again."
    );
    describe_counter!(
        REGISTRATIONS,
        "Register calls by outcome (ok, refused, failed)."
    );
    describe_gauge!(
        REGISTERED,
        "1 while the agent holds a registry session, else 0."
    );
    describe_gauge!(POOLS, "Pools by the state last reported to the registry.");
    describe_counter!(
        POOL_ACTIONS,
        "Pool drain and resume actions run, by action and outcome (ok, failed)."
    );
    describe_gauge!(GPU_MEMORY_USED, Unit::Bytes, "GPU memory in use.");
    describe_gauge!(GPU_MEMORY_FREE, Unit::Bytes, "GPU memory free.");
    describe_gauge!(GPU_UTILIZATION, "GPU utilisation, 0-100.");
    describe_gauge!(GPU_TEMPERATURE, "GPU core temperature in degrees Celsius.");
    describe_gauge!(
        GPU_HEALTH,
        "GPU health: 0 unreported, 1 healthy, 2 degraded, 3 unhealthy."
    );
    describe_gauge!(GPU_POWER, "GPU power draw in watts.");
    describe_gauge!(
        GPU_XIDS,
        "Distinct critical XID errors of the GPU within the XID window."
    );
}

/// The bound metrics port.
#[derive(Debug)]
pub struct MetricsServer {
    /// Bound at start-up, so a busy port stops the agent there.
    listener: TcpListener,
    /// What `/metrics` renders.
    handle: PrometheusHandle,
}

impl MetricsServer {
    /// Installs the recorder (once per process) and binds `addr`.
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let handle = handle()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(MetricsServer { listener, handle })
    }

    /// The bound port (the one chosen when `addr` said port 0).
    pub fn port(&self) -> Option<u16> {
        self.listener.local_addr().ok().map(|a| a.port())
    }

    /// Serves `/metrics` until the task is aborted.
    pub async fn serve(self) -> std::io::Result<()> {
        let handle = self.handle.clone();
        let upkeep = async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        };
        let handle = self.handle;
        let router = Router::new().route(
            "/metrics",
            get(move || {
                let text = handle.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
            }),
        );
        tokio::select! {
            served = axum::serve(self.listener, router).into_future() => served,
            () = upkeep => Ok(()),
        }
    }
}

/// A Register call's outcome.
pub fn registration(outcome: Result<(), tonic::Code>) {
    let label = match outcome {
        Ok(()) => "ok",
        Err(tonic::Code::InvalidArgument) => "refused",
        Err(_) => "failed",
    };
    counter!(REGISTRATIONS, "outcome" => label).increment(1);
    gauge!(REGISTERED).set(if outcome.is_ok() { 1.0 } else { 0.0 });
}

/// The session is gone (deregistered, or the registry forgot it).
pub fn unregistered() {
    gauge!(REGISTERED).set(0.0);
}

/// A failed heartbeat stream is about to be opened again.
pub fn reconnect() {
    counter!(RECONNECTS).increment(1);
}

/// The pool states of one heartbeat: every state is set, absent ones to 0.
pub fn pool_states(statuses: &[pb::PoolStatus]) {
    for state in [
        pb::PoolState::Ready,
        pb::PoolState::Initializing,
        pb::PoolState::Draining,
        pb::PoolState::Failed,
        pb::PoolState::Offline,
    ] {
        let count = statuses.iter().filter(|s| s.state == state as i32).count();
        gauge!(POOLS, "state" => state_label(state)).set(count as f64);
    }
}

/// One pool action (`drain` or `resume`) finished, successfully or not.
pub fn pool_action(action: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    counter!(POOL_ACTIONS, "action" => action, "outcome" => outcome).increment(1);
}

/// `ready` for POOL_STATE_READY.
fn state_label(state: pb::PoolState) -> &'static str {
    match state {
        pb::PoolState::Ready => "ready",
        pb::PoolState::Initializing => "initializing",
        pb::PoolState::Draining => "draining",
        pb::PoolState::Failed => "failed",
        pb::PoolState::Offline => "offline",
        pb::PoolState::Unspecified => "unspecified",
    }
}

/// The GPU figures of one heartbeat.
pub fn gpu_stats(stats: &[pb::GpuStats]) {
    for gpu in stats {
        let index = gpu.index.to_string();
        gauge!(GPU_MEMORY_USED, "gpu" => index.clone()).set(gpu.memory_used_bytes as f64);
        gauge!(GPU_MEMORY_FREE, "gpu" => index.clone()).set(gpu.memory_free_bytes as f64);
        gauge!(GPU_UTILIZATION, "gpu" => index.clone()).set(f64::from(gpu.utilization_percent));
        if let Some(celsius) = gpu.temperature_celsius {
            gauge!(GPU_TEMPERATURE, "gpu" => index.clone()).set(f64::from(celsius));
        }
        if let Some(milliwatts) = gpu.power_draw_milliwatts {
            gauge!(GPU_POWER, "gpu" => index.clone()).set(f64::from(milliwatts) / 1000.0);
        }
        gauge!(GPU_XIDS, "gpu" => index.clone()).set(gpu.xid_errors.len() as f64);
        gauge!(GPU_HEALTH, "gpu" => index).set(f64::from(gpu.health));
    }
}

/// The newest beat sent, to time its ack.
#[derive(Debug)]
pub struct AckTimer {
    /// Sequence number and build time of the newest beat.
    newest: Mutex<(u64, Instant)>,
}

impl Default for AckTimer {
    fn default() -> Self {
        AckTimer {
            newest: Mutex::new((0, Instant::now())),
        }
    }
}

impl AckTimer {
    /// Beat `sequence` was built now.
    pub fn sent(&self, sequence: u64) {
        *self.newest.lock().unwrap_or_else(|e| e.into_inner()) = (sequence, Instant::now());
    }

    /// An ack of `sequence` arrived: counted, and timed when it is the
    /// newest beat's (an ack of an older one has no start time kept).
    /// Sequence 0 is a command the registry pushed unsolicited, not an
    /// ack (beats are numbered from 1): neither counted nor timed.
    pub fn acked(&self, sequence: u64) {
        if sequence == 0 {
            return;
        }
        counter!(ACKS).increment(1);
        let (newest, at) = *self.newest.lock().unwrap_or_else(|e| e.into_inner());
        if sequence == newest {
            histogram!(ACK_SECONDS).record(at.elapsed().as_secs_f64());
        }
    }
}
