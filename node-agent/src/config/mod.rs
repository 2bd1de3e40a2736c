//! The agent's configuration: command-line flags, `NODE_AGENT_*` environment
//! variables and an optional TOML file, resolved into one [`AgentConfig`].
//!
//! Precedence, highest first: flag, environment variable, config file,
//! built-in default. Every duration is written the humantime way ("500ms",
//! "10s", "1m"). Each setting is declared once, in [`Settings`], for both
//! the flags ([`Cli`]) and the file ([`FileConfig`]).
//!
//! [`AgentConfig::validate`] applies the registry's own rules
//! ([`registry_proto::rules`]) to everything the agent will send, so a value
//! the registry would refuse stops the agent at start-up (exit status 2)
//! with a message naming the setting, instead of an endless
//! INVALID_ARGUMENT retry loop.

mod cli;
mod file;
mod settings;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use registry_proto::rules::{self, Field, MAX_GPUS, MAX_POOLS};

pub use self::cli::Cli;
pub use self::file::FileConfig;
pub use self::settings::{LogFormat, Settings};
pub use crate::error::ConfigError;

use crate::auth::{self, TokenSource};
use crate::host;
use crate::pools::PoolConfig;
use crate::pools::static_pools::parse_pool_arg;
use crate::tls::TlsConfig;

/// Where the registry listens when nothing says otherwise.
pub const DEFAULT_REGISTRY: &str = "http://127.0.0.1:50051";
/// Heartbeat interval when neither the flag nor the server sets one.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Bound on one pool drain or resume action: long enough for an engine's
/// admin endpoint or a `systemctl reload`, short enough that a hung one is
/// noticed during the drain.
pub const DEFAULT_ACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Wait before registering again after an INVALID_ARGUMENT refusal.
pub const DEFAULT_REGISTER_REFUSED_RETRY: Duration = Duration::from_secs(5 * 60);

// How errors name each setting a person can fix: flag, variable, file key.
const REGISTRY: &str = "registry (--registry, NODE_AGENT_REGISTRY, registry)";
const NODE_ID: &str = "node id (--node-id, NODE_AGENT_NODE_ID, node_id)";
const MACHINE_ID: &str = "machine id (--machine-id, NODE_AGENT_MACHINE_ID, machine_id)";
const ADDRESS: &str = "address (--address, NODE_AGENT_ADDRESS, address)";
const LABELS: &str = "labels (--label, NODE_AGENT_LABEL, [labels])";
const POOLS: &str = "pools (--pool, NODE_AGENT_POOL, [[pools]])";
const MODELS_AVAILABLE: &str =
    "models available (--model-available, NODE_AGENT_MODEL_AVAILABLE, models_available)";
const METRICS_ADDRESS: &str =
    "metrics address (--metrics-address, NODE_AGENT_METRICS_ADDRESS, metrics_address)";
const FAKE_GPUS: &str = "fake gpus (--fake-gpus, NODE_AGENT_FAKE_GPUS, fake_gpus)";
const FAKE_GPU_FAULTS: &str =
    "fake gpu faults (--fake-gpu-faults, NODE_AGENT_FAKE_GPU_FAULTS, fake_gpu_faults)";

/// Where GPU information comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    /// Report this many fake GPUs instead of asking NVML.
    pub fake: Option<u32>,
    /// Refuse to run without GPUs (NVML missing or no device).
    pub require: bool,
    /// Faults the fake GPUs show, on a schedule (tests, fleet-sim).
    pub fake_faults: Vec<crate::gpu::faults::ScheduledFault>,
    /// MIG slices every fake GPU has ("1g.10gb"); empty: MIG off.
    pub fake_mig: Vec<String>,
    /// How long a critical XID counts in a GPU's health.
    pub xid_window: Duration,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            fake: None,
            require: false,
            fake_faults: Vec::new(),
            fake_mig: Vec::new(),
            xid_window: crate::gpu::DEFAULT_XID_WINDOW,
        }
    }
}

/// Reconnect backoff bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Ceiling of the first delay; doubles per failed attempt.
    pub initial: Duration,
    /// Largest ceiling, so a long outage is retried at least this often.
    pub max: Duration,
}

/// The resolved configuration the agent runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// gRPC endpoint of the registry, or the comma-separated endpoints of
    /// its replicas ([`AgentConfig::registries`]).
    pub registry: String,
    /// This node's id (a DNS label), the registry's key for it.
    pub node_id: String,
    /// Tells two hosts claiming one node id apart.
    pub machine_id: String,
    /// The endpoint URL advertised for the node.
    pub address: String,
    /// Free-form labels for filtering in ListNodes.
    pub labels: BTreeMap<String, String>,
    /// Statically configured pools (handoff pools come at run time).
    pub pools: Vec<PoolConfig>,
    /// Models staged on disk but not loaded (RegisterRequest
    /// .models_available), so schedulers know where a model could start.
    /// From configuration only: handoff files describe running engines.
    pub models_available: Vec<String>,
    /// GPU discovery.
    pub gpus: GpuConfig,
    /// Handoff directory, where provisioners announce engines.
    pub handoff_dir: Option<PathBuf>,
    /// Poll period of the handoff directory.
    pub handoff_poll_interval: Duration,
    /// Fixed heartbeat interval; `None` follows the registry's.
    pub heartbeat_interval: Option<Duration>,
    /// Bounds connecting and Register, so a hung registry is retried.
    pub registry_timeout: Duration,
    /// Bounds Deregister at shutdown, so a dead registry cannot delay exit.
    pub deregister_timeout: Duration,
    /// Bounds one health probe, so a hung engine cannot delay heartbeats.
    pub probe_timeout: Duration,
    /// Bounds one pool drain or resume action, so a hung engine or script
    /// is given up on (and a failed drain action retried on the next
    /// DrainCommand).
    pub action_timeout: Duration,
    /// HTTP/2 ping period, so a dead connection is noticed while idle.
    pub keepalive_interval: Duration,
    /// Unanswered-ping limit before the connection counts as dead.
    pub keepalive_timeout: Duration,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Wait before registering again after the registry refused the
    /// registration with INVALID_ARGUMENT: minutes, not the reconnect
    /// backoff, since such a refusal does not fix itself.
    pub register_refused_retry: Duration,
    /// Log format (used by the binary).
    pub log_format: LogFormat,
    /// Where the registry's bearer token comes from; `None` sends none.
    pub auth_token: Option<TokenSource>,
    /// TLS towards an `https://` registry.
    pub tls: TlsConfig,
    /// Where `/metrics` is served; `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
    /// The metrics URL registered as given; `None` derives it from
    /// `address` and the metrics port ([`AgentConfig::advertised_metrics_url`]).
    pub metrics_address: Option<String>,
}

impl AgentConfig {
    /// Built-in defaults for `node_id` against `registry`: no pools, NVML
    /// GPUs, machine id and address from the host. For embedding and tests.
    pub fn new(registry: impl Into<String>, node_id: impl Into<String>) -> Self {
        let node_id = node_id.into();
        AgentConfig {
            registry: registry.into(),
            machine_id: host::machine_id().unwrap_or_else(|| node_id.clone()),
            address: format!("http://{node_id}"),
            node_id,
            labels: BTreeMap::new(),
            pools: Vec::new(),
            models_available: Vec::new(),
            gpus: GpuConfig::default(),
            handoff_dir: None,
            handoff_poll_interval: Duration::from_secs(1),
            heartbeat_interval: None,
            registry_timeout: Duration::from_secs(5),
            deregister_timeout: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(2),
            action_timeout: DEFAULT_ACTION_TIMEOUT,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            backoff: BackoffConfig {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            register_refused_retry: DEFAULT_REGISTER_REFUSED_RETRY,
            log_format: LogFormat::Text,
            auth_token: None,
            tls: TlsConfig::default(),
            metrics_listen: None,
            metrics_address: None,
        }
    }

    /// The metrics URL to register when `/metrics` is served on `port`
    /// (`None`: not served): `metrics_address` when set, else
    /// `http://<host of address>:<port>/metrics`; empty when neither.
    pub fn advertised_metrics_url(&self, port: Option<u16>) -> String {
        if let Some(url) = &self.metrics_address {
            return url.clone();
        }
        let Some(port) = port else {
            return String::new();
        };
        let host = self
            .address
            .parse::<http::Uri>()
            .ok()
            .and_then(|uri| uri.host().map(str::to_owned))
            .unwrap_or_else(|| self.node_id.clone());
        format!("http://{host}:{port}/metrics")
    }

    /// Resolves flags, environment (already folded into `cli` by clap) and
    /// the config file `cli.config` names.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(cli, file)
    }

    /// Merges `cli` over `file` over the defaults, and validates the result.
    pub fn resolve(cli: Cli, file: FileConfig) -> Result<Self, ConfigError> {
        if file.settings.auth_token.is_some() {
            return Err(ConfigError::Conflict(
                "the config file may not hold auth_token (config files are often world-readable); \
                 put the token in a file of its own, mode 0600, and set auth_token_file"
                    .into(),
            ));
        }
        let set = cli.settings.or(file.settings);
        let hostname = host::hostname();
        let node_id = match set.node_id {
            Some(id) => id,
            None => hostname
                .as_deref()
                .and_then(host::node_id_from_hostname)
                .ok_or(ConfigError::NoNodeId)?,
        };
        let registry = set.registry.unwrap_or_else(|| DEFAULT_REGISTRY.to_owned());
        let mut config = AgentConfig::new(registry, node_id);
        if let Some(machine_id) = set.machine_id {
            config.machine_id = machine_id;
        }
        config.address = match set.address {
            Some(address) => address,
            // The hostname is the better default for humans and DNS, where
            // it is a valid URL host at all.
            None => match hostname.filter(|h| valid_hostname(h)) {
                Some(h) => format!("http://{h}"),
                None => format!("http://{}", config.node_id),
            },
        };
        config.labels = merge_labels(file.labels, &cli.labels)?;
        config.pools = merge_pools(file.pools, &cli.pools)?;
        config.models_available = merge_models(file.models_available, cli.models_available);
        config.gpus = GpuConfig {
            fake: set.fake_gpus,
            require: set.require_gpus.unwrap_or(false),
            fake_faults: match &set.fake_gpu_faults {
                Some(text) => crate::gpu::faults::parse_schedule(text)
                    .map_err(|e| ConfigError::invalid(FAKE_GPU_FAULTS, text, &e))?,
                None => Vec::new(),
            },
            fake_mig: set
                .fake_mig
                .iter()
                .flat_map(|s| s.split(','))
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            xid_window: set.xid_window.unwrap_or(crate::gpu::DEFAULT_XID_WINDOW),
        };
        config.handoff_dir = set.handoff_dir;
        let or = |value: Option<Duration>, default: Duration| value.unwrap_or(default);
        config.handoff_poll_interval = or(set.handoff_poll_interval, config.handoff_poll_interval);
        config.heartbeat_interval = set.heartbeat_interval;
        config.registry_timeout = or(set.registry_timeout, config.registry_timeout);
        config.deregister_timeout = or(set.deregister_timeout, config.deregister_timeout);
        config.probe_timeout = or(set.probe_timeout, config.probe_timeout);
        config.action_timeout = or(set.action_timeout, config.action_timeout);
        config.keepalive_interval = or(set.keepalive_interval, config.keepalive_interval);
        config.keepalive_timeout = or(set.keepalive_timeout, config.keepalive_timeout);
        config.backoff.initial = or(set.backoff_initial, config.backoff.initial);
        config.backoff.max = or(set.backoff_max, config.backoff.max);
        config.register_refused_retry =
            or(set.register_refused_retry, config.register_refused_retry);
        config.log_format = set.log_format.unwrap_or_default();
        // One source only: with two, which token the registry sees would
        // depend on precedence rules nobody remembers during an incident.
        config.auth_token = match (set.auth_token_file, set.auth_token) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "both an auth token file (--auth-token-file, NODE_AGENT_AUTH_TOKEN_FILE or \
                     auth_token_file) and a token (--auth-token or NODE_AGENT_AUTH_TOKEN) are set; \
                     give only one"
                        .into(),
                ));
            }
            (Some(path), None) => Some(TokenSource::File(path)),
            (None, Some(token)) => Some(TokenSource::Value(token)),
            (None, None) => None,
        };
        config.tls = TlsConfig {
            ca: set.tls_ca,
            cert: set.tls_cert,
            key: set.tls_key,
            domain: set.tls_domain,
        };
        config.metrics_listen = set.metrics_listen;
        config.metrics_address = set.metrics_address;

        config.validate()?;
        Ok(config)
    }

    /// The registry endpoints: `registry` is one URL or a comma-separated
    /// list of the replicas' URLs, each an `http://` or `https://` URL
    /// (all the same scheme).
    pub fn registries(&self) -> Result<Vec<String>, ConfigError> {
        registry_proto::endpoints::parse_list("registry", &self.registry)
            .map_err(ConfigError::rule(REGISTRY))
    }

    /// Checks every value the registry would refuse, with the registry's
    /// own rules, and every setting that cannot work, so mistakes stop the
    /// agent at start-up with a clear message instead of looping on
    /// INVALID_ARGUMENT.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let registries = self.registries()?;
        let https = registries[0].starts_with("https://");
        self.tls.validate(https)?;
        if let Some(TokenSource::Value(token)) = &self.auth_token {
            auth::check_token(token.expose()).map_err(|why| ConfigError::BadToken {
                from: "--auth-token/NODE_AGENT_AUTH_TOKEN".into(),
                why: why.to_owned(),
            })?;
        }
        rules::node_id(Field::Name("node_id"), &self.node_id)
            .map_err(ConfigError::rule(NODE_ID))?;
        rules::machine_id(Field::Name("machine_id"), &self.machine_id)
            .map_err(ConfigError::rule(MACHINE_ID))?;
        rules::address(Field::Name("address"), &self.address)
            .map_err(ConfigError::rule(ADDRESS))?;
        rules::labels("labels", &self.labels).map_err(ConfigError::rule(LABELS))?;
        rules::models_available("models_available", &self.models_available)
            .map_err(ConfigError::rule(MODELS_AVAILABLE))?;
        if let Some(url) = &self.metrics_address {
            rules::address(Field::Name("metrics_address"), url)
                .map_err(ConfigError::rule(METRICS_ADDRESS))?;
        }
        rules::at_most(Field::Name("pools"), self.pools.len(), MAX_POOLS)
            .map_err(ConfigError::rule(POOLS))?;
        for pool in &self.pools {
            pool.validate()?;
        }
        if let Some(n) = self.gpus.fake {
            rules::at_most(Field::Name("fake_gpus"), n as usize, MAX_GPUS)
                .map_err(ConfigError::rule(FAKE_GPUS))?;
        }
        for (what, value) in [
            ("heartbeat interval", self.heartbeat_interval),
            ("handoff poll interval", Some(self.handoff_poll_interval)),
            ("registry timeout", Some(self.registry_timeout)),
            ("deregister timeout", Some(self.deregister_timeout)),
            ("probe timeout", Some(self.probe_timeout)),
            ("action timeout", Some(self.action_timeout)),
            ("keepalive interval", Some(self.keepalive_interval)),
            ("keepalive timeout", Some(self.keepalive_timeout)),
            ("backoff initial", Some(self.backoff.initial)),
            ("backoff max", Some(self.backoff.max)),
            ("register refused retry", Some(self.register_refused_retry)),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(ConfigError::invalid(what, "0s", "must be more than zero"));
            }
        }
        if self.backoff.initial > self.backoff.max {
            return Err(ConfigError::invalid(
                "backoff initial",
                &humantime::format_duration(self.backoff.initial).to_string(),
                "must not exceed backoff max",
            ));
        }
        Ok(())
    }
}

/// The file's `models_available` followed by the `--model-available`
/// flags, each name once (a model named in both is not a mistake).
fn merge_models(mut models: Vec<String>, flags: Vec<String>) -> Vec<String> {
    for model in flags {
        let model = model.trim().to_owned();
        if !models.contains(&model) {
            models.push(model);
        }
    }
    models
}

/// The file's `[labels]` with each `--label KEY=VALUE` over them.
fn merge_labels(
    mut labels: BTreeMap<String, String>,
    flags: &[String],
) -> Result<BTreeMap<String, String>, ConfigError> {
    for label in flags {
        let (key, value) = label
            .split_once('=')
            .ok_or_else(|| ConfigError::invalid("label", label, "expected KEY=VALUE"))?;
        labels.insert(key.trim().to_owned(), value.to_owned());
    }
    Ok(labels)
}

/// The file's `[[pools]]` with the `--pool` flags: a flag pool replaces
/// the file pool of its id; two flags or two tables naming one pool are a
/// mistake.
fn merge_pools(file: Vec<PoolConfig>, flags: &[String]) -> Result<Vec<PoolConfig>, ConfigError> {
    let mut pools: BTreeMap<String, PoolConfig> = BTreeMap::new();
    for pool in file {
        if pools.insert(pool.id.clone(), pool).is_some() {
            return Err(ConfigError::invalid(
                "pools",
                "config file",
                "two [[pools]] have one id",
            ));
        }
    }
    let mut from_flags = std::collections::BTreeSet::new();
    for arg in flags {
        let pool = parse_pool_arg(arg)?;
        if !from_flags.insert(pool.id.clone()) {
            return Err(ConfigError::PoolArg {
                arg: arg.clone(),
                why: "another --pool has this id".into(),
            });
        }
        pools.insert(pool.id.clone(), pool);
    }
    Ok(pools.into_values().collect())
}

/// Whether the hostname can be the default address's host.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !h.starts_with(['-', '.'])
}

#[cfg(test)]
mod tests;
