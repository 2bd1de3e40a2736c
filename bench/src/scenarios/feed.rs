//! Scenario 6, feed (issue 10): the change feed under a fleet whose every
//! heartbeat is a change. Every node reports 4 pools and changes slots_free
//! on every beat (fleet-sim's churn), so each heartbeat is one MODIFIED
//! event for every watcher. One server process, three phases of the same
//! length, in order:
//!
//! 1. heartbeats only, no watcher: server CPU;
//! 2. the same with `watchers` WatchNodes streams (each on its own
//!    connection, started from the current ListNodesResponse.revision, so
//!    no snapshot is sent): server CPU and delivery latency;
//! 3. the same plus a FindPools client (random model of the fleet's three,
//!    at `find_rate` per second) and a ListNodes walker (pages of
//!    `page_size` over every node, one walk started every second or as soon
//!    as the previous one ends): FindPools latency, walk time, and again
//!    server CPU and delivery latency.
//!
//! Delivery latency of one event = the watcher's wall clock on receipt
//! minus the event node's agent_time, the sent_at fleet-sim stamped on the
//! heartbeat from the same machine's clock. It therefore runs from the
//! agent's send, so it includes the heartbeat's own trip and apply (an
//! upper bound on change applied -> received). The server patches
//! agent_time into the node when it reads it; were an event delivered after
//! the node's next heartbeat (one interval later), the figure would come out
//! low, which the per-watcher delivered fraction would then show.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use fleet_sim::LatencySummary;
use hdrhistogram::Histogram;
use registry_proto::pb;
use tokio::sync::Mutex;
use tokio::time::{Instant, MissedTickBehavior, sleep};
use tonic::Code;
use tracing::info;

use super::{fleet_config, measure, start_fleet};
use crate::BenchError;
use crate::inspect;
use crate::plan::Plan;
use crate::server::{Launcher, Server, ServerSpec};

/// One phase's figures.
#[derive(Debug, Clone)]
pub struct FeedRow {
    /// What ran besides the heartbeats.
    pub phase: String,
    /// Watchers connected.
    pub watchers: usize,
    /// Heartbeats acknowledged per second.
    pub heartbeats_per_sec: f64,
    /// Server CPU, percent of one core.
    pub server_cpu_percent: f64,
    /// This process's CPU (simulator, watchers, readers), percent of one
    /// core: it shares the machine with the server.
    pub bench_cpu_percent: f64,
    /// Server CPU seconds per 100,000 acknowledged heartbeats.
    pub cpu_seconds_per_100k: f64,
    /// Heartbeat ack latency.
    pub ack: LatencySummary,
    /// Delivery latency over every watcher's MODIFIED events (none without
    /// watchers).
    pub delivery: Option<LatencySummary>,
    /// The highest per-watcher p99 delivery latency.
    pub slowest_watcher_p99: Duration,
    /// Events received by all watchers, per second.
    pub events_per_sec: f64,
    /// Fewest events one watcher received, over acked heartbeats in the
    /// phase (1.0: that watcher saw a change per heartbeat).
    pub min_delivered_fraction: f64,
    /// Watch streams that ended (RESOURCE_EXHAUSTED or other) and resumed.
    pub watch_errors: u64,
    /// Heartbeat errors.
    pub heartbeat_errors: u64,
}

/// FindPools during phase 3.
#[derive(Debug, Clone)]
pub struct FindFigures {
    /// Calls per second asked for.
    pub rate: u32,
    /// Latency of one call (OK answers).
    pub latency: LatencySummary,
    /// Calls made.
    pub calls: u64,
    /// OK answers with no candidate.
    pub empty: u64,
    /// NOT_FOUND answers.
    pub not_found: u64,
    /// Other errors.
    pub errors: u64,
}

/// ListNodes walks during phase 3.
#[derive(Debug, Clone)]
pub struct WalkFigures {
    /// Page size.
    pub page_size: u32,
    /// Time of one whole walk.
    pub latency: LatencySummary,
    /// Nodes the last walk listed.
    pub nodes_per_walk: usize,
    /// Calls the last walk took.
    pub calls_per_walk: usize,
}

impl WalkFigures {
    /// Median walk time per node listed, in microseconds.
    pub fn us_per_node(&self) -> f64 {
        if self.nodes_per_walk == 0 {
            return 0.0;
        }
        self.latency.p50.as_secs_f64() * 1e6 / self.nodes_per_walk as f64
    }
}

/// The scenario's figures.
#[derive(Debug, Clone)]
pub struct FeedResult {
    /// Virtual nodes.
    pub nodes: usize,
    /// Pools per node.
    pub pools: u32,
    /// Heartbeat interval.
    pub interval: Duration,
    /// Length of each phase.
    pub phase: Duration,
    /// The three phases.
    pub rows: Vec<FeedRow>,
    /// FindPools figures (phase 3).
    pub find: FindFigures,
    /// ListNodes walk figures (phase 3).
    pub walk: WalkFigures,
}

/// One watcher's histogram per measured phase (index 1 and 2; 0 = not
/// recording).
struct WatcherStats {
    per_phase: [Histogram<u64>; 3],
    errors: [u64; 3],
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Runs the scenario.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<FeedResult, BenchError> {
    let p = &plan.feed;
    let mut spec = ServerSpec::new("feed").timing(p.interval * 3, p.interval);
    spec.max_streams_per_connection = spec
        .max_streams_per_connection
        .max((p.nodes / p.connections.max(1) + 1) as u32);
    spec.max_connections = spec.max_connections.max(p.connections + p.watchers + 16);
    let server = launcher.start(&spec).await?;
    let mut config = fleet_config("feed", p.nodes, p.connections, 5_000.0);
    config.pools = 4;
    config.churn = true;
    let fleet = start_fleet(&server, config, Duration::from_secs(120)).await?;
    tokio::time::sleep(p.interval + p.interval / 10).await;

    let mut rows = Vec::new();
    let quiet = measure(&server, &fleet, p.phase).await?;
    rows.push(row("heartbeats, no watcher", &quiet, &[]));

    // Watchers, from the current revision.
    let phase_flag = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut stats = Vec::new();
    let mut tasks = Vec::new();
    let revision = current_revision(&server).await?;
    for _ in 0..p.watchers {
        let s = Arc::new(Mutex::new(WatcherStats {
            per_phase: [histogram(), histogram(), histogram()],
            errors: [0; 3],
        }));
        stats.push(s.clone());
        let client = inspect::client(&server.url()).await?;
        tasks.push(tokio::spawn(watch(
            client,
            revision,
            s,
            phase_flag.clone(),
            stop.clone(),
        )));
    }
    // Let every watcher catch up to a steady state.
    sleep(p.interval / 2).await;

    phase_flag.store(1, Ordering::Relaxed);
    let watched = measure(&server, &fleet, p.phase).await?;
    phase_flag.store(0, Ordering::Relaxed);
    rows.push(row(
        &format!("heartbeats, {} watchers", p.watchers),
        &watched,
        &snapshot(&stats, 1).await,
    ));

    let url = server.url();
    let (rate, length) = (p.find_rate, p.phase);
    let finder = tokio::spawn(async move { find_loop(&url, rate, length).await });
    let url = server.url();
    let page_size = p.page_size;
    let walker = tokio::spawn(async move { walk_loop(&url, page_size, length).await });
    phase_flag.store(2, Ordering::Relaxed);
    let loaded = measure(&server, &fleet, p.phase).await?;
    phase_flag.store(0, Ordering::Relaxed);
    let find = finder
        .await
        .map_err(|e| BenchError::Sim(format!("FindPools loop: {e}")))??;
    let walk = walker
        .await
        .map_err(|e| BenchError::Sim(format!("ListNodes walk loop: {e}")))??;
    rows.push(row(
        &format!(
            "heartbeats, {} watchers, FindPools {}/s, ListNodes walks",
            p.watchers, p.find_rate
        ),
        &loaded,
        &snapshot(&stats, 2).await,
    ));
    for (i, r) in rows.iter().enumerate() {
        info!(
            phase = i + 1,
            cpu = r.server_cpu_percent as u64,
            delivery_p99_us = r.delivery.map_or(0, |d| d.p99.as_micros() as u64),
            "feed phase done"
        );
    }
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    fleet.stop().await;
    server.stop().await?;
    Ok(FeedResult {
        nodes: p.nodes,
        pools: 4,
        interval: p.interval,
        phase: p.phase,
        rows,
        find,
        walk,
    })
}

/// Per-watcher (histogram, errors) of `phase`.
async fn snapshot(stats: &[Arc<Mutex<WatcherStats>>], phase: usize) -> Vec<(Histogram<u64>, u64)> {
    let mut out = Vec::with_capacity(stats.len());
    for s in stats {
        let s = s.lock().await;
        out.push((s.per_phase[phase].clone(), s.errors[phase]));
    }
    out
}

fn row(phase: &str, window: &super::Window, watchers: &[(Histogram<u64>, u64)]) -> FeedRow {
    let acked = window.acked();
    let mut all = histogram();
    let mut slowest = Duration::ZERO;
    let mut min_events = u64::MAX;
    let mut events = 0;
    let mut watch_errors = 0;
    for (h, errors) in watchers {
        let _ = all.add(h);
        slowest = slowest.max(Duration::from_micros(h.value_at_quantile(0.99)));
        min_events = min_events.min(h.len());
        events += h.len();
        watch_errors += errors;
    }
    FeedRow {
        phase: phase.into(),
        watchers: watchers.len(),
        heartbeats_per_sec: window.ack_rate(),
        server_cpu_percent: window.server_cpu_percent(),
        bench_cpu_percent: window.sim_cpu_percent(),
        cpu_seconds_per_100k: if acked == 0 {
            0.0
        } else {
            window.server_cpu().as_secs_f64() * 100_000.0 / acked as f64
        },
        ack: window.ack,
        delivery: (!watchers.is_empty()).then(|| LatencySummary::of(&all)),
        slowest_watcher_p99: slowest,
        events_per_sec: events as f64 / window.wall.as_secs_f64(),
        min_delivered_fraction: if watchers.is_empty() || acked == 0 {
            0.0
        } else {
            min_events as f64 / acked as f64
        },
        watch_errors,
        heartbeat_errors: window.errors().values().sum(),
    }
}

/// The registry's current revision (ListNodesResponse.revision).
async fn current_revision(server: &Server) -> Result<u64, BenchError> {
    let mut client = inspect::client(&server.url()).await?;
    let page = client
        .list_nodes(pb::ListNodesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .map_err(|s| BenchError::Server(format!("ListNodes: {}", s.message())))?
        .into_inner();
    Ok(page.revision)
}

/// One watcher: watches every node from `revision`, resuming from the last
/// revision seen when the stream ends, and records the delivery latency of
/// each MODIFIED event into the histogram of the phase `phase` names.
async fn watch(
    mut client: pb::node_registry_client::NodeRegistryClient<tonic::transport::Channel>,
    mut revision: u64,
    stats: Arc<Mutex<WatcherStats>>,
    phase: Arc<AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
) {
    while !stop.is_cancelled() {
        let request = pb::WatchNodesRequest {
            start_revision: revision,
            ..Default::default()
        };
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            r = client.watch_nodes(request) => r,
        };
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(_) => {
                stats.lock().await.errors[phase.load(Ordering::Relaxed)] += 1;
                sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                m = stream.message() => m,
            };
            match message {
                Ok(Some(event)) => {
                    let received = SystemTime::now();
                    revision = revision.max(event.revision);
                    if event.r#type != pb::WatchEventType::Modified as i32 {
                        continue;
                    }
                    let at = phase.load(Ordering::Relaxed);
                    if at == 0 {
                        continue;
                    }
                    let Some(sent) = event
                        .node
                        .and_then(|n| n.agent_time)
                        .and_then(|t| SystemTime::try_from(t).ok())
                    else {
                        continue;
                    };
                    let us = received
                        .duration_since(sent)
                        .map_or(1, |d| d.as_micros() as u64)
                        .max(1);
                    stats.lock().await.per_phase[at].saturating_record(us);
                }
                Ok(None) | Err(_) => {
                    stats.lock().await.errors[phase.load(Ordering::Relaxed)] += 1;
                    break;
                }
            }
        }
    }
}

/// A cheap generator for the FindPools model choice.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// FindPools at `rate` per second for `length`, each for a random model of
/// the fleet's, limit 10.
async fn find_loop(url: &str, rate: u32, length: Duration) -> Result<FindFigures, BenchError> {
    let mut client = inspect::client(url).await?;
    let mut latency = histogram();
    let (mut calls, mut empty, mut not_found, mut errors) = (0, 0, 0, 0);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let end = Instant::now() + length;
    while Instant::now() < end {
        ticker.tick().await;
        let model = fleet_sim::fake::MODELS[(next(&mut seed) % 3) as usize];
        let started = Instant::now();
        let answer = client
            .find_pools(pb::FindPoolsRequest {
                model: model.into(),
                limit: 10,
                ..Default::default()
            })
            .await;
        calls += 1;
        match answer {
            Ok(r) => {
                latency.saturating_record((started.elapsed().as_micros() as u64).max(1));
                if r.into_inner().candidates.is_empty() {
                    empty += 1;
                }
            }
            Err(s) if s.code() == Code::NotFound => not_found += 1,
            Err(_) => errors += 1,
        }
    }
    Ok(FindFigures {
        rate,
        latency: LatencySummary::of(&latency),
        calls,
        empty,
        not_found,
        errors,
    })
}

/// Walks every node in pages of `page_size` for `length`, one walk a second
/// (or back to back when a walk takes longer).
async fn walk_loop(url: &str, page_size: u32, length: Duration) -> Result<WalkFigures, BenchError> {
    let mut client = inspect::client(url).await?;
    let mut latency = histogram();
    let (mut nodes, mut calls) = (0, 0);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let end = Instant::now() + length;
    while Instant::now() < end {
        ticker.tick().await;
        let started = Instant::now();
        (nodes, calls) = inspect::list_pages(&mut client, page_size, true).await?;
        latency.saturating_record((started.elapsed().as_micros() as u64).max(1));
    }
    Ok(WalkFigures {
        page_size,
        latency: LatencySummary::of(&latency),
        nodes_per_walk: nodes,
        calls_per_walk: calls,
    })
}
