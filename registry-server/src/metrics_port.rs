//! The metrics port's small HTTP server: `/metrics` (the Prometheus
//! recorder's text), `/sd/nodes` and `/sd/pools` (HTTP service discovery,
//! see [`crate::sd`]) and `/health` (whether the registry trusts its own
//! view of the fleet).
//!
//! `/health` answers 200 with `{"status":"ok"}`, or 200 with
//! `{"status":"degraded","reason":"..."}` while the mass-failure guard holds
//! nodes or nodes are suspect after a stall or restart. Degraded is still
//! 200 and gRPC health stays SERVING: the registry works (heartbeats are
//! taken, placement answers without suspect nodes), and a probe that failed
//! it would restart or unroute the one process that can see the fleet come
//! back. Alert on `registry_mass_failure_guard_active` instead.
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
        .route("/health", get(health))
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

/// What `/health` answers.
#[derive(Debug, serde::Serialize)]
struct Health {
    /// `ok`, or `degraded` while the registry doubts its own view.
    status: &'static str,
    /// Why it is degraded; absent when ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

async fn health(State(state): State<AppState>) -> Response {
    let reason = state.registry.degraded();
    let body = Health {
        status: if reason.is_some() { "degraded" } else { "ok" },
        reason,
    };
    match serde_json::to_vec(&body) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// `groups` as Prometheus' HTTP SD wants them: 200, application/json.
fn json(groups: &[sd::TargetGroup]) -> Response {
    match serde_json::to_vec(groups) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use metrics_exporter_prometheus::PrometheusBuilder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::registry::{NewRegistration, Now, Registration, Timing};

    /// A plain HTTP/1.0 GET of `path`: the status code and the body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, body.to_owned())
    }

    #[tokio::test]
    async fn health_says_degraded_with_the_reason_while_nodes_are_suspect() {
        let registry = Registry::new(Timing::default());
        registry
            .register(
                Registration::from(NewRegistration {
                    node_id: "n1".into(),
                    machine_id: "m1".into(),
                    address: "http://n1:9200".into(),
                    pools: Default::default(),
                    capabilities: Default::default(),
                    agent_version: "test".into(),
                    metrics_address: String::new(),
                    models_available: Vec::new(),
                    labels: Default::default(),
                }),
                Now::read(),
            )
            .unwrap();
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(registry.clone(), handle);
        tokio::spawn(async move { axum::serve(listener, app).await });

        let (status, body) = get(addr, "/health").await;
        assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

        registry.grace_all(Now::read(), "registry restarted");
        let (status, body) = get(addr, "/health").await;
        assert_eq!(status, 200, "degraded is still serving");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["status"], "degraded");
        assert!(
            body["reason"]
                .as_str()
                .unwrap()
                .starts_with("1 node suspect: "),
            "{body}"
        );
    }
}
