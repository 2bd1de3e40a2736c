//! A fleet: the virtual nodes, the connections they share, and the controls
//! a benchmark needs while they run (change the interval, silence the chosen
//! nodes, stop and report).

use std::sync::Arc;
use std::time::Duration;

use registry_proto::endpoints::{Dialer, Replicas, parse_list};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tracing::info;

use crate::config::FleetConfig;
use crate::error::SimError;
use crate::limits;
use crate::node::{self, Shared};
use crate::stats::{Report, Stats, fmt_errors};

/// A running fleet. Dropping it without [`Fleet::stop`] leaves the nodes
/// running until their runtime ends.
pub struct Fleet {
    /// State shared with the node tasks.
    shared: Arc<Shared>,
    /// The task that starts nodes at the ramp rate; it hands back the node
    /// tasks so `stop` can wait for them.
    spawner: tokio::task::JoinHandle<JoinSet<()>>,
}

impl Fleet {
    /// Starts the fleet on the current tokio runtime: raises the open-file
    /// limit, prepares the connections (opened lazily by the first call on
    /// each) and starts registering nodes at the ramp rate.
    pub fn start(config: FleetConfig) -> Result<Self, SimError> {
        config.check()?;
        let connections = config.connection_count();
        let soft_limit = limits::raise_nofile_limit()?;
        limits::check_connections(connections, soft_limit)?;
        let urls = parse_list("--registry", &config.registry)
            .map_err(|rule| SimError::Config(rule.to_string()))?;
        // One set of endpoints per connection: its nodes share one leader
        // discovery, and each set dials its own channels.
        let replicas = (0..connections)
            .map(|_| {
                let dialer = Dialer::new(|endpoint| {
                    endpoint
                        .connect_timeout(Duration::from_secs(5))
                        .tcp_nodelay(true)
                });
                Replicas::new(urls.clone(), dialer).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared::new(config, Arc::new(Stats::new())));
        info!(
            nodes = shared.config.nodes,
            connections,
            registry = %shared.config.registry,
            ramp = shared.config.ramp,
            "fleet starting"
        );
        let spawner = tokio::spawn(spawn_nodes(shared.clone(), replicas));
        Ok(Self { shared, spawner })
    }

    /// The fleet's live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// The options the fleet runs with.
    pub fn config(&self) -> &FleetConfig {
        &self.shared.config
    }

    /// Every node waits `interval` (with jitter) from its next heartbeat on.
    pub fn set_interval(&self, interval: Duration) {
        self.shared.set_interval(interval);
    }

    /// The chosen nodes (see [`FleetConfig::is_silenced`]) stop sending now
    /// and keep their streams open.
    pub fn silence(&self) {
        info!(
            nodes = self.shared.config.silenced_ids().len(),
            "fleet silencing nodes"
        );
        self.shared.silence.cancel();
    }

    /// Stops every node (streams are dropped, nothing is deregistered) and
    /// returns the run's report.
    pub async fn stop(self) -> Report {
        self.shared.stop.cancel();
        if let Ok(mut nodes) = self.spawner.await {
            while nodes.join_next().await.is_some() {}
        }
        let config = &self.shared.config;
        self.shared
            .stats
            .report(config.nodes, config.connection_count())
    }
}

/// Starts node `i` at `start + i / ramp`, until all run or the fleet stops.
async fn spawn_nodes(shared: Arc<Shared>, connections: Vec<Arc<Replicas>>) -> JoinSet<()> {
    let mut nodes = JoinSet::new();
    let start = Instant::now();
    let ramp = shared.config.ramp;
    for index in 0..shared.config.nodes {
        if ramp > 0.0 {
            let at = start + Duration::from_secs_f64(index as f64 / ramp);
            if at > Instant::now() {
                tokio::select! {
                    () = shared.stop.cancelled() => break,
                    () = sleep_until(at) => {}
                }
            }
        }
        if shared.stop.is_cancelled() {
            break;
        }
        let replicas = connections[index % connections.len()].clone();
        nodes.spawn(node::run(index, shared.clone(), replicas));
    }
    nodes
}

/// Runs a fleet for `config.duration` (silencing at `config.silence_at`),
/// logging progress every `progress` and ending early when `interrupt`
/// completes. Returns the report.
pub async fn run(
    config: FleetConfig,
    progress: Duration,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, SimError> {
    let duration = config.duration;
    let silence_at = config.silence_at;
    let fleet = Fleet::start(config)?;
    let stats = fleet.stats();
    let start = Instant::now();
    let end = start + duration;
    let mut silence_due = silence_at.map(|at| start + at);
    let mut previous = stats.snapshot();
    tokio::pin!(interrupt);
    loop {
        let mut wake = (Instant::now() + progress).min(end);
        if let Some(at) = silence_due {
            wake = wake.min(at);
        }
        tokio::select! {
            () = &mut interrupt => {
                info!("interrupted; stopping the fleet");
                break;
            }
            () = sleep_until(wake) => {}
        }
        let now = Instant::now();
        if silence_due.is_some_and(|at| at <= now) {
            fleet.silence();
            silence_due = None;
        }
        if now.into_std().duration_since(previous.at) >= progress.mul_f64(0.9) || now >= end {
            // The window's latency since the last line (the report's
            // totals are kept apart): how a storm's seconds differ.
            let (snapshot, window) = stats.take_window();
            info!(
                elapsed_s = now.duration_since(start).as_secs(),
                registrations = snapshot.registrations,
                attached = snapshot.attached,
                sent = snapshot.sent,
                acked = snapshot.acked,
                acks_per_sec = snapshot.ack_rate_since(&previous) as u64,
                ack_p99_ms = format_args!("{:.2}", window.ack.p99.as_secs_f64() * 1e3),
                ack_max_ms = format_args!("{:.2}", window.ack.max.as_secs_f64() * 1e3),
                errors = %fmt_errors(&snapshot.errors),
                "fleet progress"
            );
            previous = snapshot;
        }
        if now >= end {
            break;
        }
    }
    Ok(fleet.stop().await)
}
