//! Wires the registry, the expiry task, health and reflection into one
//! tonic server. `run` is shared by `main` and the tests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use registry_proto::pb::node_registry_server::NodeRegistryServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::auth::{Authenticator, TokenSources};
use crate::config::Settings;
use crate::connection_threads::ConnectionThreads;
use crate::events::ChangeSubscriber;
use crate::expiry;
use crate::grpc_metrics::GrpcMetricsLayer;
use crate::metrics_port::MetricsEndpoint;
use crate::placement::PlacementIndex;
use crate::registry::{Now, Options, Registry};
use crate::replica::{Replica, ReplicaRole};
use crate::service::{NodeRegistryService, RegistryRoute};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The settings cannot work.
    #[error("invalid settings: {0}")]
    Settings(String),
    /// Reading the listener's address failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The token sources cannot be used.
    #[error("authentication: {0}")]
    Auth(#[from] crate::auth::AuthError),
    /// A TLS file cannot be read.
    #[error("TLS file {path}: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// The connection threads could not be started.
    #[error("connection threads: {0}")]
    ConnectionThreads(std::io::Error),
    /// Building the reflection service failed.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The descriptors the gRPC metrics are built from cannot be read.
    #[error("gRPC metrics: {0}")]
    GrpcMetrics(#[from] crate::grpc_metrics::DescriptorError),
    /// The store cannot be opened or read (a corrupt or unreadable file):
    /// the server refuses to start rather than start empty.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The TLS files cannot be used together (no certificate or key in
    /// them, a key that does not match the certificate).
    #[error("TLS: {0}")]
    Tls(#[from] crate::transport::TlsError),
    /// The expiry task ended before shutdown (it returned or panicked), so
    /// no node would ever go OFFLINE again; the server stops rather than
    /// serve a registry that silently lies about liveness.
    #[error("the expiry task stopped before shutdown ({0}); nodes would never go OFFLINE")]
    ExpiryStopped(String),
}

impl ServerError {
    /// Whether the error is in the configuration (a value, a file, a
    /// combination that cannot work) rather than a failure while running:
    /// `main` exits 2 for these, 1 for the rest.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            ServerError::Settings(_)
                | ServerError::Auth(_)
                | ServerError::TlsFile { .. }
                | ServerError::Tls(_)
                | ServerError::Store(_)
        )
    }
}

/// Serves the registry on `listener` until `shutdown` completes, then stops
/// gracefully: health turns NOT_SERVING, heartbeat streams end with
/// UNAVAILABLE, and in-flight calls finish. Fails with
/// [`ServerError::ExpiryStopped`] if the expiry task ends before that.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with(listener, settings, shutdown, expiry::run).await
}

/// [`run`] that also serves the metrics port (`/metrics`, `/sd/nodes`,
/// `/sd/pools`) on `metrics` until the server stops.
pub async fn run_with_metrics(
    listener: TcpListener,
    settings: Settings,
    metrics: MetricsEndpoint,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve(
        listener,
        settings,
        Some(metrics),
        shutdown,
        expiry::run,
        None,
    )
    .await
}

/// One replica of several (see [`crate::replica`]): `store` takes the
/// leader's writes (fenced by its term), `coordinator` elects and feeds
/// the follower's copy. The server runs the replica loop instead of a
/// single expiry task; `metrics`, when given, is served as by
/// [`run_with_metrics`].
pub async fn run_replica(
    listener: TcpListener,
    settings: Settings,
    replicas: Replicas,
    metrics: Option<MetricsEndpoint>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve(
        listener,
        settings,
        metrics,
        shutdown,
        expiry::run,
        Some(replicas),
    )
    .await
}

/// What a replica coordinates through: the fenced store and the election.
pub struct Replicas {
    /// Where the leader's writes go (each fenced by its term).
    pub store: Arc<dyn crate::store::Store>,
    /// Election, leader discovery and the follower's watch.
    pub coordinator: Arc<dyn crate::replica::Coordinator>,
}

/// [`run`] with the deadline loop built by `expiry` from the registry and
/// the stop token (production passes [`expiry::run`]; tests pass a loop
/// that fails, to show the server does not outlive it).
pub async fn run_with<E, F>(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    expiry: E,
) -> Result<(), ServerError>
where
    E: Fn(Registry, CancellationToken) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    serve(listener, settings, None, shutdown, expiry, None).await
}

/// The server, with the metrics port when `metrics` is given.
async fn serve<E, F>(
    listener: TcpListener,
    settings: Settings,
    metrics: Option<MetricsEndpoint>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    expiry: E,
    replicas: Option<Replicas>,
) -> Result<(), ServerError>
where
    E: Fn(Registry, CancellationToken) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    settings.check().map_err(ServerError::Settings)?;
    let local_addr = listener.local_addr()?;
    let auth = Authenticator::from_sources(TokenSources {
        file: settings.auth_token_file.clone(),
        admin_token: settings.auth_token.clone(),
    })?;
    if auth.is_open() {
        settings
            .check_exposure(local_addr, true)
            .map_err(ServerError::Settings)?;
        warn!(
            "authentication is off: anyone who reaches this port may register, remove and read nodes"
        );
    }
    let tls = tls_config(&settings)?;
    let connection_threads = std::num::NonZeroUsize::new(settings.connection_threads())
        .map(ConnectionThreads::start)
        .transpose()
        .map_err(ServerError::ConnectionThreads)?;
    // Everything stored is read before anything is served; a store that
    // cannot be read stops the start (exit 2), never an empty registry.
    // A replica reads its records in its replica loop (a follower's copy,
    // kept current by the watch); a single registry reads them here.
    let (store, coordinator) = match replicas {
        Some(Replicas { store, coordinator }) => (store, Some(coordinator)),
        None => (crate::store::open(&settings)?, None),
    };
    let loaded = match coordinator {
        Some(_) => crate::store::Loaded::default(),
        None => store.load().await?,
    };
    info!(store = %store.describe(), nodes = loaded.nodes.len(), admin_states = loaded.admin.len(), "store loaded");
    // FindPools and ListModels answer from this index, fed by the registry
    // core's change feed: one `apply` per event, in revision order.
    let placement = PlacementIndex::new();
    let registry = Registry::with_options(
        settings.timing(),
        Options {
            max_nodes: settings.max_nodes,
            watch_history: settings.watch_history,
            watch_queue: settings.watch_queue,
            subscribers: vec![Arc::new(placement.clone()) as Arc<dyn ChangeSubscriber>],
            first_revision: settings.revision_base.first_revision(),
            guard: settings.guard(),
            store: store.clone(),
            ..Options::default()
        },
    );
    let now = Now::read();
    let parked = registry.restore(loaded, now);
    if !parked.is_empty() {
        info!(
            nodes = parked.len(),
            "admin states of nodes that are not registered are kept for their next registration"
        );
        registry.park_loaded(parked, now);
    }
    let stop = CancellationToken::new();
    let role = match coordinator {
        Some(_) => ReplicaRole::starting_follower(),
        None => ReplicaRole::single(),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    // Set before the replica loop starts, which alone changes it from then
    // on: set after, it could overwrite the SERVING of a term just won.
    if role.leads() {
        health
            .set_serving::<NodeRegistryServer<NodeRegistryService>>()
            .await;
    } else {
        // A replica: SERVING once it leads (the replica loop says so).
        health
            .set_not_serving::<NodeRegistryServer<NodeRegistryService>>()
            .await;
    }
    // The deadline loop: a single registry's expiry task, or the replica
    // loop that runs one per leadership term. Either ending before
    // shutdown stops the server.
    let mut expiry_task = match coordinator {
        None => tokio::spawn({
            let run = expiry(registry.clone(), stop.clone());
            async move {
                run.await;
                Ok(())
            }
        }),
        Some(coordinator) => {
            let replica = Replica {
                registry: registry.clone(),
                role: role.clone(),
                coordinator,
                health: health.clone(),
            };
            let stop = stop.clone();
            tokio::spawn(async move { replica.run(stop, expiry).await.map_err(|e| e.0) })
        }
    };
    let metrics_task = tokio::spawn(crate::metrics::publish(registry.clone(), stop.clone()));
    let auth_task = tokio::spawn(auth.clone().watch(stop.clone()));
    let http_task = metrics.map(|endpoint| {
        let (registry, stop) = (registry.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(err) = crate::metrics_port::serve(endpoint, registry, stop).await {
                error!(error = %err, "the metrics port stopped serving");
            }
        })
    });

    health
        .set_service_status(
            registry_proto::LIVENESS_HEALTH_SERVICE,
            ServingStatus::Serving,
        )
        .await;
    let liveness_task = tokio::spawn(follow_liveness(
        registry.clone(),
        health.clone(),
        stop.clone(),
    ));

    // Both reflection versions: grpcurl 1.8 speaks only v1alpha, newer
    // tools prefer v1.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(registry_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(registry_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // The lag of every runtime that serves calls: the main one (probe 0)
    // and each connection thread's; none are probed when the check is off.
    let runtime_lag = crate::lag::RuntimeLag::new(
        1 + connection_threads
            .as_ref()
            .map_or(0, ConnectionThreads::len),
    );
    let service =
        NodeRegistryService::new(registry.clone(), &settings, auth, stop.clone(), placement)
            .with_role(role)
            .with_lag(runtime_lag.clone(), settings.max_registration_lag);
    // Heartbeat streams are served over the service's own framing and
    // Register takes its turn before its body is decoded (see
    // `service::route`); the rest is the generated server's.
    let registry_service = RegistryRoute::new(
        NodeRegistryServer::new(service.clone())
            .max_decoding_message_size(settings.max_message_size),
        service,
    );

    let on_shutdown = {
        let health = health.clone();
        let stop = stop.clone();
        async move {
            shutdown.await;
            info!("shutting down: health NOT_SERVING, closing heartbeat streams");
            health
                .set_not_serving::<NodeRegistryServer<NodeRegistryService>>()
                .await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            stop.cancel();
        }
    };

    info!(
        addr = %local_addr,
        node_timeout = %humantime::format_duration(settings.node_timeout),
        heartbeat_interval = %humantime::format_duration(settings.heartbeat_interval),
        offline_retention = %humantime::format_duration(settings.offline_retention),
        mass_offline_threshold = settings.mass_offline_threshold.0,
        // The runtime's thread count (`--worker-threads`), so a log says
        // what the figures it is compared with ran on.
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        // `--connection-threads`: where connections are served (0: on the
        // workers above).
        connection_threads = connection_threads.as_ref().map_or(0, ConnectionThreads::len),
        // `--huge-pages`, as the kernel has it: memory per node depends on it.
        huge_pages = crate::huge_pages::current(),
        "registry listening"
    );
    // Every method the server answers, known up front (see grpc_metrics).
    let grpc_metrics = GrpcMetricsLayer::from_descriptor_sets(&[
        registry_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])?;
    let mut routes = tonic::service::Routes::builder();
    routes.add_service(health_service);
    if !settings.disable_reflection {
        routes.add_service(reflection_v1);
        routes.add_service(reflection_v1alpha);
    }
    routes.add_service(registry_service);
    // What unfinished messages may hold (see `budget`), outermost but for
    // the metrics, so a refused message is counted like any answer.
    let budgets = crate::budget::Budgets::new(crate::budget::BudgetLimits {
        max_message: settings.max_message_size,
        max_heartbeat_message: settings.max_heartbeat_message_size,
        per_connection: settings.max_buffered_bytes_per_connection,
        global: settings.max_buffered_bytes,
    });
    let stack = tower::ServiceBuilder::new()
        .layer(grpc_metrics)
        // Heartbeat is served by `RegistryRoute`, which holds its streams
        // to the budgets itself.
        .layer(crate::budget::BudgetLayer::new(budgets).with_heartbeat_route())
        .service(routes.routes().prepare());
    let http2 = crate::transport::Http2Settings {
        // Server pings find dead connections; they never count as liveness.
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
        max_concurrent_streams: settings.max_streams_per_connection,
        // h2 tears a connection down (GOAWAY) once more than 20 of its
        // streams were reset by the client before the server accepted them
        // (its rapid-reset guard). A connection shared by many agents (a
        // proxy, fleet-sim) cancels that many in a burst whenever it gives
        // up on a slow registry, and losing the connection then drops every
        // stream on it. Allowing as many as the connection may have open
        // keeps the guard's bound (work per connection) without the cascade.
        max_pending_accept_reset_streams: (settings.max_streams_per_connection as usize).max(20),
        // Bounds unary calls; a streaming call's response starts at once,
        // so heartbeat streams are not cut by it.
        request_timeout: settings.request_timeout,
    };
    // Started once nothing can fail before serving (an early return would
    // leave them parked).
    let lag_probe = (!settings.max_registration_lag.is_zero()).then(|| {
        if let Some(threads) = &connection_threads {
            threads.spawn_on_each(|i| runtime_lag.probe(i + 1, format!("conn-{i}")));
        }
        tokio::spawn(runtime_lag.probe(0, "main".into()))
    });
    let serve = crate::transport::serve(
        crate::limits::incoming(
            listener,
            crate::limits::ConnectionLimits {
                max: settings.max_connections,
                per_address: settings.max_connections_per_address,
                handshake_within: settings.request_timeout,
            },
        ),
        stack,
        http2,
        tls,
        connection_threads.as_ref(),
        on_shutdown,
    );
    // Graceful shutdown waits for every connection; a client that holds one
    // open must not keep the process alive past the grace period.
    let grace_over = async {
        stop.cancelled().await;
        tokio::time::sleep(settings.shutdown_grace).await;
    };
    // The expiry task must live as long as the server serves: ending after
    // shutdown began is its normal way out, ending before is fatal.
    let mut expiry_joined = false;
    let expiry_ended = async {
        let joined = (&mut expiry_task).await;
        expiry_joined = true;
        if stop.is_cancelled() && joined.is_ok() {
            return std::future::pending().await;
        }
        match joined {
            Ok(Ok(())) => "it returned".to_string(),
            Ok(Err(why)) => why,
            Err(err) => join_failure(err),
        }
    };
    let ended = tokio::select! {
        () = serve => Ended::Served,
        () = grace_over => {
            warn!(
                grace = %humantime::format_duration(settings.shutdown_grace),
                "connections still open after the shutdown grace period; closing them"
            );
            Ended::Served
        }
        why = expiry_ended => Ended::ExpiryStopped(why),
    };
    stop.cancel();
    // Connections still open past the grace period end with their
    // threads' runtimes, before the store they write to is closed.
    // Bounded: a task whose drop blocks must not keep the store open (and
    // the process alive) for ever.
    if let Some(threads) = connection_threads
        && tokio::time::timeout(settings.shutdown_grace, threads.stop())
            .await
            .is_err()
    {
        warn!(
            grace = %humantime::format_duration(settings.shutdown_grace),
            "connection threads still dropping their connections after the shutdown grace period; closing the store"
        );
    }
    if !expiry_joined {
        let _ = expiry_task.await;
    }
    if let Some(probe) = lag_probe {
        probe.abort();
    }
    let _ = metrics_task.await;
    let _ = liveness_task.await;
    let _ = auth_task.await;
    if let Some(task) = http_task {
        let _ = task.await;
    }
    // Queued writes finish and the file is released (a registry restarted
    // in this process, as the tests do, opens it again).
    store.close().await;
    match ended {
        Ended::Served => {}
        Ended::ExpiryStopped(why) => {
            let err = ServerError::ExpiryStopped(why);
            error!(error = %err, "registry stopping");
            return Err(err);
        }
    }
    info!("registry stopped");
    Ok(())
}

/// How often the liveness health entry follows the registry's doubt.
const LIVENESS_EVERY: Duration = Duration::from_secs(1);

/// Keeps the [`registry_proto::LIVENESS_HEALTH_SERVICE`] health entry
/// NOT_SERVING while the registry doubts its own view of the fleet
/// ([`Registry::degraded`]) and SERVING otherwise, until `stop`. The
/// server's own entry stays SERVING: the registry works meanwhile.
async fn follow_liveness(
    registry: Registry,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(LIVENESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut degraded = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = registry.degraded().is_some();
        if now != degraded {
            degraded = now;
            let status = if now {
                ServingStatus::NotServing
            } else {
                ServingStatus::Serving
            };
            health
                .set_service_status(registry_proto::LIVENESS_HEALTH_SERVICE, status)
                .await;
        }
    }
}

/// How serving ended.
enum Ended {
    /// The server stopped (after shutdown).
    Served,
    /// The expiry task ended first, for this reason.
    ExpiryStopped(String),
}

/// Why a task ended abnormally, with a panic's message when it has one.
fn join_failure(err: tokio::task::JoinError) -> String {
    if !err.is_panic() {
        return err.to_string();
    }
    let payload = err.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text payload".to_string());
    format!("it panicked: {message}")
}

/// The TLS of `settings`, if TLS is on.
fn tls_config(settings: &Settings) -> Result<Option<crate::transport::Tls>, ServerError> {
    let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServerError::TlsFile {
            path: path.display().to_string(),
            source,
        })
    };
    let client_ca = settings.tls_client_ca.as_deref().map(read).transpose()?;
    let tls = crate::transport::Tls::new(&read(cert)?, &read(key)?, client_ca.as_deref())?;
    if client_ca.is_some() {
        info!("mTLS on: clients must present a certificate signed by --tls-client-ca");
    } else {
        info!("TLS on");
    }
    Ok(Some(tls))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Serves on a loopback port with `expiry` as the deadline loop and no
    /// shutdown, returning how the server ended.
    async fn serve_with<F>(expiry: fn(Registry, CancellationToken) -> F) -> ServerError
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ended = tokio::time::timeout(
            Duration::from_secs(30),
            run_with(
                listener,
                Settings::default(),
                std::future::pending(),
                expiry,
            ),
        )
        .await
        .expect("the server kept serving without its expiry task");
        ended.expect_err("the server ended cleanly without its expiry task")
    }

    #[tokio::test]
    async fn the_server_fails_when_the_expiry_task_panics() {
        async fn faulty(_: Registry, _: CancellationToken) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("injected expiry fault");
        }
        let err = serve_with(faulty).await;
        assert!(
            matches!(&err, ServerError::ExpiryStopped(why) if why.contains("injected expiry fault")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_server_fails_when_the_expiry_task_returns_early() {
        async fn quitter(_: Registry, _: CancellationToken) {}
        let err = serve_with(quitter).await;
        assert!(
            matches!(&err, ServerError::ExpiryStopped(why) if why.contains("returned")),
            "{err}"
        );
        assert!(err.to_string().contains("never go OFFLINE"), "{err}");
    }

    #[tokio::test]
    async fn an_expiry_task_ending_at_shutdown_is_a_clean_stop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = tokio::time::sleep(Duration::from_millis(100));
        let ended = tokio::time::timeout(
            Duration::from_secs(30),
            run_with(listener, Settings::default(), shutdown, expiry::run),
        )
        .await
        .expect("the server did not stop on shutdown");
        assert!(ended.is_ok(), "{ended:?}");
    }
}
