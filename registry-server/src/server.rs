//! Wires the registry, the expiry task, health and reflection into one
//! tonic server. `run` is shared by `main` and the tests.

use std::future::Future;
use std::time::Duration;

use registry_proto::pb::node_registry_server::NodeRegistryServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::info;

use crate::config::Settings;
use crate::expiry;
use crate::registry::Registry;
use crate::service::NodeRegistryService;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The settings cannot work.
    #[error("invalid settings: {0}")]
    Settings(String),
    /// Reading the listener's address failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// Building the reflection service failed.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the registry on `listener` until `shutdown` completes, then stops
/// gracefully: health turns NOT_SERVING, heartbeat streams end with
/// UNAVAILABLE, and in-flight calls finish.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    settings.check().map_err(ServerError::Settings)?;
    let local_addr = listener.local_addr()?;
    let registry = Registry::new(settings.timing());
    let stop = CancellationToken::new();
    let expiry_task = tokio::spawn(expiry::run(registry.clone(), stop.clone()));
    let metrics_task = tokio::spawn(crate::metrics::publish(registry.clone(), stop.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<NodeRegistryServer<NodeRegistryService>>()
        .await;

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

    let registry_service = NodeRegistryServer::new(NodeRegistryService::new(
        registry.clone(),
        &settings,
        stop.clone(),
    ))
    .max_decoding_message_size(settings.max_message_size);

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
        "registry listening"
    );
    let served = Server::builder()
        // Server pings find dead connections; they never count as liveness.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(settings.max_streams_per_connection))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(registry_service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), on_shutdown)
        .await;
    stop.cancel();
    let _ = expiry_task.await;
    let _ = metrics_task.await;
    served?;
    info!("registry stopped");
    Ok(())
}
