//! Scenario 4, reads: ListNodes latency while heartbeats flow, and
//! heartbeat ack latency while ListNodes runs in a loop. Two readers: one
//! walks every node page by page (page_size 0: the server's largest page),
//! timing the whole walk; one asks for a small page again and again.

use std::time::Duration;

use fleet_sim::LatencySummary;
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tracing::info;

use super::{fleet_config, measure, start_fleet};
use crate::BenchError;
use crate::inspect;
use crate::plan::Plan;
use crate::server::{Launcher, ServerSpec};

/// One phase's figures.
#[derive(Debug, Clone)]
pub struct ReadsRow {
    /// What ran besides the heartbeats.
    pub phase: String,
    /// Latency of one read: a whole walk or one page (none in the baseline).
    pub list: Option<LatencySummary>,
    /// Nodes one read returned.
    pub nodes_per_read: usize,
    /// ListNodes calls one read took.
    pub calls_per_read: usize,
    /// Heartbeat ack latency in the phase.
    pub ack: LatencySummary,
    /// Server CPU, percent of one core.
    pub server_cpu_percent: f64,
}

/// The scenario's figures.
#[derive(Debug, Clone)]
pub struct ReadsResult {
    /// Virtual nodes.
    pub nodes: usize,
    /// Heartbeats per second flowing.
    pub heartbeats_per_sec: f64,
    /// Baseline, full listings, paged listings.
    pub rows: Vec<ReadsRow>,
}

/// Runs the scenario.
pub async fn run(launcher: &Launcher, plan: &Plan) -> Result<ReadsResult, BenchError> {
    let p = &plan.reads;
    let mut spec = ServerSpec::new("reads").timing(p.interval * 3, p.interval);
    spec.max_streams_per_connection = spec
        .max_streams_per_connection
        .max((p.nodes / p.connections.max(1) + 1) as u32);
    let interval = p.interval;
    let server = launcher.start(&spec).await?;
    let config = fleet_config("reads", p.nodes, p.connections, 5_000.0);
    let fleet = start_fleet(&server, config, Duration::from_secs(120)).await?;
    // One interval so the heartbeat rate is steady.
    tokio::time::sleep(interval + interval / 10).await;

    let baseline = measure(&server, &fleet, p.phase).await?;
    let heartbeats_per_sec = baseline.ack_rate();
    let mut rows = vec![ReadsRow {
        phase: "heartbeats only".into(),
        list: None,
        nodes_per_read: 0,
        calls_per_read: 0,
        ack: baseline.ack,
        server_cpu_percent: baseline.server_cpu_percent(),
    }];
    for (phase, page_size, walk) in [
        ("every node, page by page".to_string(), 0, true),
        (format!("one page of {}", p.page_size), p.page_size, false),
    ] {
        let url = server.url();
        let length = p.phase;
        let lister = tokio::spawn(async move { list_loop(&url, page_size, walk, length).await });
        let window = measure(&server, &fleet, p.phase).await?;
        let (list, nodes_per_read, calls_per_read) = lister
            .await
            .map_err(|e| BenchError::Sim(format!("ListNodes loop: {e}")))??;
        info!(phase = %phase, list_p99_us = list.p99.as_micros() as u64, ack_p99_us = window.ack.p99.as_micros() as u64, "reads phase done");
        rows.push(ReadsRow {
            phase,
            list: Some(list),
            nodes_per_read,
            calls_per_read,
            ack: window.ack,
            server_cpu_percent: window.server_cpu_percent(),
        });
    }
    fleet.stop().await;
    server.stop().await?;
    Ok(ReadsResult {
        nodes: p.nodes,
        heartbeats_per_sec,
        rows,
    })
}

/// Reads back to back for `length`, on its own connection: one page of
/// `page_size`, or (`walk`) every node following next_page_token. Returns
/// the latency of one read, and the nodes and calls of the last read.
async fn list_loop(
    url: &str,
    page_size: u32,
    walk: bool,
    length: Duration,
) -> Result<(LatencySummary, usize, usize), BenchError> {
    let mut client = inspect::client(url).await?;
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let (mut nodes, mut calls) = (0, 0);
    let end = Instant::now() + length;
    while Instant::now() < end {
        let started = Instant::now();
        (nodes, calls) = inspect::list_pages(&mut client, page_size, walk).await?;
        latency.saturating_record((started.elapsed().as_micros() as u64).max(1));
    }
    Ok((LatencySummary::of(&latency), nodes, calls))
}
