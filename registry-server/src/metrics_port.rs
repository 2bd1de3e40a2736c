//! The metrics port's small HTTP server: `/metrics` (the Prometheus
//! recorder's text), `/sd/nodes` and `/sd/pools` (HTTP service discovery,
//! see [`crate::sd`]).
//!
//! The port checks no token: whoever reaches it reads the metrics and, from
//! `/sd`, every ONLINE node's id, machine id, metrics address and labels.
//! By default it binds the `--listen` host (see
//! [`crate::config::Cli::metrics_addr`]); keep it on a network only the
//! monitoring reaches.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::sd;

/// How often the recorder's histograms are compacted (what the exporter's
/// own listener did, which this server replaces).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The metrics port: where it listens and what `/metrics` renders.
#[derive(Debug)]
pub struct MetricsEndpoint {
    /// Bound before the server starts, so a busy port is a start-up error.
    pub listener: TcpListener,
    /// The installed recorder's handle.
    pub handle: PrometheusHandle,
}

/// What the handlers read.
#[derive(Clone)]
struct AppState {
    /// Renders `/metrics`.
    handle: PrometheusHandle,
    /// Read by `/sd/*`.
    registry: Registry,
}

/// The routes over `registry` and `handle` (public for tests that serve
/// them on a listener of their own).
pub fn router(registry: Registry, handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/sd/nodes", get(sd_nodes))
        .route("/sd/pools", get(sd_pools))
        .with_state(AppState { handle, registry })
}

/// Serves `endpoint` until `stop`.
pub async fn serve(
    endpoint: MetricsEndpoint,
    registry: Registry,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = {
        let handle = endpoint.handle.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => handle.run_upkeep(),
                }
            }
        })
    };
    let served = axum::serve(endpoint.listener, router(registry, endpoint.handle))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    upkeep.abort();
    served
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.handle.render(),
    )
        .into_response()
}

async fn sd_nodes(State(state): State<AppState>) -> Response {
    json(&sd::nodes(&state.registry))
}

async fn sd_pools(State(state): State<AppState>) -> Response {
    json(&sd::pools(&state.registry))
}

/// `groups` as Prometheus' HTTP SD wants them: 200, application/json.
fn json(groups: &[sd::TargetGroup]) -> Response {
    match serde_json::to_vec(groups) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}
