//! node-agent: runs on every GPU host, discovers its GPUs, registers the
//! node with the registry, and reports pool status on a heartbeat stream
//! until it is told to stop.
//!
//! [`run`] is the whole agent, so tests and embedders run it in-process;
//! the `node-agent` binary only adds flags, logging and signal handling.

pub mod auth;
pub mod config;
pub mod error;
pub mod gpu;
pub mod host;
pub mod metrics;
pub mod pools;
pub mod registration;
mod session;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use registry_proto::endpoints::{Dialer, Replicas};
use registry_proto::pb;

pub use auth::{Secret, TokenSource};
pub use config::{AgentConfig, Cli, LogFormat, Settings};
pub use error::ConfigError;
pub use gpu::{FakeGpuSource, GpuError, GpuInventory, GpuSource, NvmlGpuSource};
pub use tls::TlsConfig;

/// How errors name the metrics listen setting.
const METRICS_LISTEN: &str =
    "metrics listen address (--metrics-listen, NODE_AGENT_METRICS_LISTEN, metrics_listen)";

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// GPUs are required and could not be found.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A registry URL is not a usable gRPC endpoint (tonic refused it or
    /// its TLS settings).
    #[error("invalid registry endpoint: {0}")]
    Endpoint(#[from] registry_proto::endpoints::DialError),
    /// A background task panicked.
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs the agent until `shutdown` resolves, then deregisters and returns.
/// It does not return early because the registry is unreachable: it keeps
/// retrying. Errors are only configuration and required-GPU problems found
/// at start-up.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    // Token and TLS files before the GPUs: a configuration problem is
    // reported as one even on a host whose GPUs are missing too.
    let registry = RegistryConnection::prepare(&config)?;
    let gpus = gpu::open(&config.gpus)?;
    run_prepared(config, registry, gpus, shutdown).await
}

/// [`run`] with a given GPU source instead of the one `config.gpus` names.
pub async fn run_with_gpu_source(
    config: AgentConfig,
    gpus: Arc<dyn GpuSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let registry = RegistryConnection::prepare(&config)?;
    run_prepared(config, registry, gpus, shutdown).await
}

/// The way to the registry: the token and the (lazy) endpoints.
struct RegistryConnection {
    credentials: Arc<auth::Credentials>,
    replicas: Replicas,
}

impl RegistryConnection {
    /// Validates `config`, reads the token and TLS files, and sets up the
    /// channel without connecting.
    fn prepare(config: &AgentConfig) -> Result<Self, AgentError> {
        config.validate()?;
        let credentials = Arc::new(auth::Credentials::load(config.auth_token.clone())?);
        let replicas = connect_lazy(config)?;
        match &config.auth_token {
            Some(source) => tracing::info!(
                from = %source.describe(),
                token = credentials.fingerprint().as_deref().unwrap_or(""),
                "sending a bearer token"
            ),
            None => tracing::info!("no auth token configured; calls carry no authorization"),
        }
        if config.tls.is_set() {
            let show = |path: &Option<std::path::PathBuf>| {
                path.as_deref()
                    .map_or("none".to_owned(), |p| p.display().to_string())
            };
            tracing::info!(
                ca = %show(&config.tls.ca),
                client_cert = %show(&config.tls.cert),
                domain = config.tls.domain.as_deref().unwrap_or("the registry url's host"),
                "tls on"
            );
        }
        Ok(RegistryConnection {
            credentials,
            replicas,
        })
    }
}

async fn run_prepared(
    mut config: AgentConfig,
    registry: RegistryConnection,
    gpus: Arc<dyn GpuSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    // Bound before anything registers, so the URL advertised is served.
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let server = metrics::MetricsServer::bind(addr).await.map_err(|e| {
                ConfigError::invalid(METRICS_LISTEN, &addr.to_string(), &e.to_string())
            })?;
            config.metrics_address = Some(config.advertised_metrics_url(server.port()));
            tracing::info!(
                addr = %addr,
                advertised = config.metrics_address.as_deref().unwrap_or(""),
                "serving metrics"
            );
            Some(tokio::spawn(async move {
                if let Err(e) = server.serve().await {
                    tracing::error!(error = %e, "the metrics endpoint stopped");
                }
            }))
        }
        None => None,
    };
    let inventory = {
        let gpus = Arc::clone(&gpus);
        match tokio::task::spawn_blocking(move || gpus.inventory()).await? {
            Ok(inventory) => inventory.fit_contract(),
            Err(e) if config.gpus.require => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list gpus; registering with none");
                GpuInventory::default()
            }
        }
    };
    if config.gpus.require && inventory.gpus.is_empty() {
        return Err(GpuError::NoGpus.into());
    }
    tracing::info!(
        node_id = %config.node_id,
        gpus = inventory.gpus.len(),
        driver = %inventory.driver_version,
        cuda = %inventory.cuda_version,
        "gpus discovered"
    );
    let capabilities = pb::Capabilities {
        gpus: inventory.gpus,
        cpu_cores: host::cpu_cores(),
        ram_total_bytes: host::ram_total_bytes(),
        driver_version: inventory.driver_version,
        cuda_version: inventory.cuda_version,
    };
    pools::check_mig_uuids(&config.pools, &capabilities)?;

    // Scanned once before registering, so Register already names the
    // pools the provisioners announced.
    let (handoff, handoff_task) = match &config.handoff_dir {
        Some(dir) => {
            let (rx, task) =
                pools::handoff::watch_dir(dir.clone(), config.handoff_poll_interval).await;
            (Some(rx), Some(task))
        }
        None => (None, None),
    };
    let tracker = pools::PoolTracker::new(
        config.pools.clone(),
        handoff,
        pools::probe::Prober::new(config.probe_timeout),
    )
    .with_capabilities(capabilities.clone());

    let agent = Arc::new(session::Agent::new(
        config,
        Arc::new(registry.replicas),
        registry.credentials,
        gpus,
        capabilities,
        tracker,
    ));
    session::run(agent, Box::pin(shutdown)).await;
    if let Some(task) = handoff_task {
        task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    Ok(())
}

/// The registry endpoints, dialled with TLS for an `https://` registry.
/// Lazy: the first RPC connects, and a lost connection is re-dialled on
/// the next one, so a registry that is down at start is simply retried.
/// With several endpoints the session finds the leader before it calls.
fn connect_lazy(config: &AgentConfig) -> Result<Replicas, AgentError> {
    let (timeout, interval, keepalive) = (
        config.registry_timeout,
        config.keepalive_interval,
        config.keepalive_timeout,
    );
    let mut dialer = Dialer::new(move |endpoint| {
        endpoint
            .connect_timeout(timeout)
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(keepalive)
            // Pings also while no RPC is in flight: a heartbeat stream
            // waiting for its next beat must notice a dead peer too.
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
    });
    if config.tls.is_set() {
        // The TLS handshake is part of connecting.
        let tls = config.tls.client_config()?.timeout(timeout);
        dialer = dialer.with_tls(tls, config.tls.domain.clone());
    }
    let replicas = Replicas::new(config.registries()?, dialer)?
        // A replica slower than this to say whether it leads is no
        // leader to move to.
        .with_probe_timeout(timeout.min(registry_proto::endpoints::PROBE_TIMEOUT));
    Ok(replicas)
}
