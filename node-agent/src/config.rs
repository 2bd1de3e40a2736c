//! The agent's configuration: command-line flags, `NODE_AGENT_*` environment
//! variables and an optional TOML file, resolved into one [`AgentConfig`].
//!
//! Precedence, highest first: flag, environment variable, config file,
//! built-in default. Every duration is written the humantime way ("500ms",
//! "10s", "1m").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::auth::{self, Secret, TokenSource};
use crate::host;
use crate::pools::PoolConfig;
use crate::pools::static_pools::parse_pool_arg;
use crate::tls::TlsConfig;

/// Where the registry listens when nothing says otherwise.
pub const DEFAULT_REGISTRY: &str = "http://127.0.0.1:50051";
/// Heartbeat interval when neither the flag nor the server sets one.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file the configuration names (the config file, the token file,
    /// a TLS file) could not be read.
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        /// What the file is for ("config file", "auth token file").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("invalid config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        message: String,
    },
    /// A `--pool` value could not be parsed.
    #[error("invalid --pool {arg:?}: {why}")]
    PoolArg {
        /// The value given.
        arg: String,
        /// What is wrong with it.
        why: String,
    },
    /// A value is malformed.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: String,
        /// What is expected.
        why: String,
    },
    /// A file holds no usable content (a TLS file without the expected
    /// PEM block).
    #[error("invalid {what} {path}: {why}")]
    BadFile {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The auth token is unusable. The message never quotes the token.
    #[error("invalid auth token from {from}: {why}")]
    BadToken {
        /// Where it came from ("file PATH" or the variable).
        from: String,
        /// What is wrong with it.
        why: String,
    },
    /// Settings that exclude or need each other.
    #[error("{0}")]
    Conflict(String),
    /// The TLS settings were refused when the connection was set up.
    #[error("unusable tls settings: {0}")]
    Tls(String),
    /// No node id was given and none could be derived from the hostname.
    #[error("no --node-id given and the hostname gives no usable one")]
    NoNodeId,
}

impl ConfigError {
    pub(crate) fn invalid(what: &'static str, value: &str, why: &str) -> Self {
        ConfigError::Invalid {
            what,
            value: value.to_owned(),
            why: why.to_owned(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Never fails: clap would quote the value in its error, and this value
/// is a secret. [`AgentConfig::validate`] checks it without quoting it.
fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

/// Command-line flags; each also reads the environment variable named in
/// its help.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "node-agent",
    version,
    about = "Registers this GPU host with the node registry and reports its pools."
)]
pub struct Cli {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, env = "NODE_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// gRPC endpoint of the registry, http:// or https:// (https needs
    /// --tls-ca) [default: http://127.0.0.1:50051].
    #[arg(long, env = "NODE_AGENT_REGISTRY", value_name = "URL")]
    pub registry: Option<String>,

    /// This node's id, a DNS label [default: the hostname's first label].
    #[arg(long, env = "NODE_AGENT_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Machine identifier [default: /etc/machine-id, else the hostname].
    #[arg(long, env = "NODE_AGENT_MACHINE_ID", value_name = "ID")]
    pub machine_id: Option<String>,

    /// Endpoint URL advertised for this node [default: http://HOSTNAME].
    #[arg(long, env = "NODE_AGENT_ADDRESS", value_name = "URL")]
    pub address: Option<String>,

    /// A pool: ID[,slots=N][,model=M][,engine=E][,engine_version=V]
    /// [,state=ready|initializing|draining|failed|offline][,gpus=0:1]
    /// [,probe=http://HOST:PORT/health]. Repeatable; the environment
    /// variable separates pools with ';'.
    #[arg(
        long = "pool",
        env = "NODE_AGENT_POOL",
        value_name = "SPEC",
        value_delimiter = ';'
    )]
    pub pools: Vec<String>,

    /// A label KEY=VALUE. Repeatable; the environment variable separates
    /// labels with ','.
    #[arg(
        long = "label",
        env = "NODE_AGENT_LABEL",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,

    /// Report N fake GPUs instead of asking NVML (hosts without GPUs, tests).
    #[arg(long, env = "NODE_AGENT_FAKE_GPUS", value_name = "N")]
    pub fake_gpus: Option<u32>,

    /// Exit with an error when NVML is unavailable or finds no GPU.
    #[arg(long, env = "NODE_AGENT_REQUIRE_GPUS")]
    pub require_gpus: bool,

    /// Directory of engine handoff files (*.json) to report pools from.
    #[arg(long, env = "NODE_AGENT_HANDOFF_DIR", value_name = "DIR")]
    pub handoff_dir: Option<PathBuf>,

    /// How often the handoff directory is re-read [default: 1s].
    #[arg(long, env = "NODE_AGENT_HANDOFF_POLL_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub handoff_poll_interval: Option<Duration>,

    /// Heartbeat interval, overriding the one the registry asks for
    /// [default: the registry's, else 10s].
    #[arg(long, env = "NODE_AGENT_HEARTBEAT_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,

    /// Timeout of connecting to the registry and of Register [default: 5s].
    #[arg(long, env = "NODE_AGENT_REGISTRY_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub registry_timeout: Option<Duration>,

    /// Timeout of the Deregister call at shutdown [default: 2s].
    #[arg(long, env = "NODE_AGENT_DEREGISTER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub deregister_timeout: Option<Duration>,

    /// Timeout of one pool health probe [default: 2s].
    #[arg(long, env = "NODE_AGENT_PROBE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub probe_timeout: Option<Duration>,

    /// HTTP/2 keepalive ping interval on the registry connection [default: 10s].
    #[arg(long, env = "NODE_AGENT_KEEPALIVE_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub keepalive_interval: Option<Duration>,

    /// How long a keepalive ping may go unanswered before the connection
    /// is dropped [default: 5s].
    #[arg(long, env = "NODE_AGENT_KEEPALIVE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub keepalive_timeout: Option<Duration>,

    /// First reconnect delay ceiling [default: 500ms].
    #[arg(long, env = "NODE_AGENT_BACKOFF_INITIAL", value_name = "DURATION", value_parser = parse_duration)]
    pub backoff_initial: Option<Duration>,

    /// Largest reconnect delay [default: 30s].
    #[arg(long, env = "NODE_AGENT_BACKOFF_MAX", value_name = "DURATION", value_parser = parse_duration)]
    pub backoff_max: Option<Duration>,

    /// Log format [default: text].
    #[arg(long, env = "NODE_AGENT_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// File holding the registry's bearer token (a node token) alone;
    /// read again when the registry answers UNAUTHENTICATED.
    #[arg(long, env = "NODE_AGENT_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// The bearer token itself. Prefer --auth-token-file, or at least the
    /// environment variable: flags show in `ps`.
    #[arg(
        long,
        env = "NODE_AGENT_AUTH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        value_parser = parse_secret
    )]
    pub auth_token: Option<Secret>,

    /// PEM CA bundle that signs the registry's certificate; required for
    /// an https:// registry.
    #[arg(long, env = "NODE_AGENT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate for mTLS; it must name this node id (DNS SAN
    /// or CN) when the registry checks client certificates.
    #[arg(long, env = "NODE_AGENT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "NODE_AGENT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Name to verify the registry's certificate against
    /// [default: the registry URL's host].
    #[arg(long, env = "NODE_AGENT_TLS_DOMAIN", value_name = "NAME")]
    pub tls_domain: Option<String>,
}

/// The TOML config file. Keys are the flags' names with `_` for `-`;
/// unknown keys are refused so a typo does not go unnoticed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Cli::registry`].
    pub registry: Option<String>,
    /// See [`Cli::node_id`].
    pub node_id: Option<String>,
    /// See [`Cli::machine_id`].
    pub machine_id: Option<String>,
    /// See [`Cli::address`].
    pub address: Option<String>,
    /// `[labels]` table.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `[[pools]]` tables.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// See [`Cli::fake_gpus`].
    pub fake_gpus: Option<u32>,
    /// See [`Cli::require_gpus`].
    pub require_gpus: Option<bool>,
    /// See [`Cli::handoff_dir`].
    pub handoff_dir: Option<PathBuf>,
    /// See [`Cli::handoff_poll_interval`].
    #[serde(default, deserialize_with = "de_duration")]
    pub handoff_poll_interval: Option<Duration>,
    /// See [`Cli::heartbeat_interval`].
    #[serde(default, deserialize_with = "de_duration")]
    pub heartbeat_interval: Option<Duration>,
    /// See [`Cli::registry_timeout`].
    #[serde(default, deserialize_with = "de_duration")]
    pub registry_timeout: Option<Duration>,
    /// See [`Cli::deregister_timeout`].
    #[serde(default, deserialize_with = "de_duration")]
    pub deregister_timeout: Option<Duration>,
    /// See [`Cli::probe_timeout`].
    #[serde(default, deserialize_with = "de_duration")]
    pub probe_timeout: Option<Duration>,
    /// See [`Cli::keepalive_interval`].
    #[serde(default, deserialize_with = "de_duration")]
    pub keepalive_interval: Option<Duration>,
    /// See [`Cli::keepalive_timeout`].
    #[serde(default, deserialize_with = "de_duration")]
    pub keepalive_timeout: Option<Duration>,
    /// See [`Cli::backoff_initial`].
    #[serde(default, deserialize_with = "de_duration")]
    pub backoff_initial: Option<Duration>,
    /// See [`Cli::backoff_max`].
    #[serde(default, deserialize_with = "de_duration")]
    pub backoff_max: Option<Duration>,
    /// See [`Cli::log_format`].
    pub log_format: Option<LogFormat>,
    /// See [`Cli::auth_token_file`].
    pub auth_token_file: Option<PathBuf>,
    /// Refused when present: a config file is often world-readable, so the
    /// token belongs in `auth_token_file`. Kept as a key only to say so.
    #[serde(default)]
    pub auth_token: Option<serde::de::IgnoredAny>,
    /// See [`Cli::tls_ca`].
    pub tls_ca: Option<PathBuf>,
    /// See [`Cli::tls_cert`].
    pub tls_cert: Option<PathBuf>,
    /// See [`Cli::tls_key`].
    pub tls_key: Option<PathBuf>,
    /// See [`Cli::tls_domain`].
    pub tls_domain: Option<String>,
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map(Some).map_err(|e| {
        serde::de::Error::custom(format!("{text:?}: {e} (write e.g. \"500ms\", \"10s\")"))
    })
}

impl FileConfig {
    /// Parses TOML text; `path` is only for the error message.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::ParseFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            what: "config file",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

/// Where GPU information comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuConfig {
    /// Report this many fake GPUs instead of asking NVML.
    pub fake: Option<u32>,
    /// Refuse to run without GPUs (NVML missing or no device).
    pub require: bool,
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
    /// gRPC endpoint of the registry.
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
    /// HTTP/2 ping period, so a dead connection is noticed while idle.
    pub keepalive_interval: Duration,
    /// Unanswered-ping limit before the connection counts as dead.
    pub keepalive_timeout: Duration,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Log format (used by the binary).
    pub log_format: LogFormat,
    /// Where the registry's bearer token comes from; `None` sends none.
    pub auth_token: Option<TokenSource>,
    /// TLS towards an `https://` registry.
    pub tls: TlsConfig,
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
            gpus: GpuConfig::default(),
            handoff_dir: None,
            handoff_poll_interval: Duration::from_secs(1),
            heartbeat_interval: None,
            registry_timeout: Duration::from_secs(5),
            deregister_timeout: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            backoff: BackoffConfig {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            log_format: LogFormat::Text,
            auth_token: None,
            tls: TlsConfig::default(),
        }
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
        let hostname = host::hostname();
        let node_id = match cli.node_id.or(file.node_id) {
            Some(id) => id,
            None => hostname
                .as_deref()
                .and_then(host::node_id_from_hostname)
                .ok_or(ConfigError::NoNodeId)?,
        };
        let registry = cli
            .registry
            .or(file.registry)
            .unwrap_or_else(|| DEFAULT_REGISTRY.to_owned());
        let mut config = AgentConfig::new(registry, node_id);
        if let Some(machine_id) = cli.machine_id.or(file.machine_id) {
            config.machine_id = machine_id;
        }
        config.address = match cli.address.or(file.address) {
            Some(address) => address,
            // The hostname is the better default for humans and DNS, where
            // it is a valid URL host at all.
            None => match hostname.filter(|h| valid_hostname(h)) {
                Some(h) => format!("http://{h}"),
                None => format!("http://{}", config.node_id),
            },
        };

        config.labels = file.labels;
        for label in &cli.labels {
            let (key, value) = label
                .split_once('=')
                .ok_or_else(|| ConfigError::invalid("label", label, "expected KEY=VALUE"))?;
            config
                .labels
                .insert(key.trim().to_owned(), value.to_owned());
        }

        // Flag pools replace file pools of the same id; two flags naming
        // one pool are a mistake.
        let mut pools: BTreeMap<String, PoolConfig> = BTreeMap::new();
        for pool in file.pools {
            if pools.insert(pool.id.clone(), pool).is_some() {
                return Err(ConfigError::invalid(
                    "pools",
                    "config file",
                    "two [[pools]] have one id",
                ));
            }
        }
        let mut from_flags = std::collections::BTreeSet::new();
        for arg in &cli.pools {
            let pool = parse_pool_arg(arg)?;
            if !from_flags.insert(pool.id.clone()) {
                return Err(ConfigError::PoolArg {
                    arg: arg.clone(),
                    why: "another --pool has this id".into(),
                });
            }
            pools.insert(pool.id.clone(), pool);
        }
        config.pools = pools.into_values().collect();

        config.gpus = GpuConfig {
            fake: cli.fake_gpus.or(file.fake_gpus),
            require: cli.require_gpus || file.require_gpus.unwrap_or(false),
        };
        config.handoff_dir = cli.handoff_dir.or(file.handoff_dir);
        let pick = |flag: Option<Duration>, file: Option<Duration>, default: Duration| {
            flag.or(file).unwrap_or(default)
        };
        config.handoff_poll_interval = pick(
            cli.handoff_poll_interval,
            file.handoff_poll_interval,
            config.handoff_poll_interval,
        );
        config.heartbeat_interval = cli.heartbeat_interval.or(file.heartbeat_interval);
        config.registry_timeout = pick(
            cli.registry_timeout,
            file.registry_timeout,
            config.registry_timeout,
        );
        config.deregister_timeout = pick(
            cli.deregister_timeout,
            file.deregister_timeout,
            config.deregister_timeout,
        );
        config.probe_timeout = pick(cli.probe_timeout, file.probe_timeout, config.probe_timeout);
        config.keepalive_interval = pick(
            cli.keepalive_interval,
            file.keepalive_interval,
            config.keepalive_interval,
        );
        config.keepalive_timeout = pick(
            cli.keepalive_timeout,
            file.keepalive_timeout,
            config.keepalive_timeout,
        );
        config.backoff.initial = pick(
            cli.backoff_initial,
            file.backoff_initial,
            config.backoff.initial,
        );
        config.backoff.max = pick(cli.backoff_max, file.backoff_max, config.backoff.max);
        config.log_format = cli.log_format.or(file.log_format).unwrap_or_default();

        if file.auth_token.is_some() {
            return Err(ConfigError::Conflict(
                "the config file may not hold auth_token (config files are often world-readable); \
                 put the token in a file of its own, mode 0600, and set auth_token_file"
                    .into(),
            ));
        }
        // One source only: with two, which token the registry sees would
        // depend on precedence rules nobody remembers during an incident.
        config.auth_token = match (cli.auth_token_file.or(file.auth_token_file), cli.auth_token) {
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
            ca: cli.tls_ca.or(file.tls_ca),
            cert: cli.tls_cert.or(file.tls_cert),
            key: cli.tls_key.or(file.tls_key),
            domain: cli.tls_domain.or(file.tls_domain),
        };

        config.validate()?;
        Ok(config)
    }

    /// Checks every value the registry would refuse and every setting that
    /// cannot work, so mistakes stop the agent at start-up with a clear
    /// message instead of looping on INVALID_ARGUMENT.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let registry: http::Uri = self
            .registry
            .parse()
            .map_err(|_| ConfigError::invalid("registry", &self.registry, "not a URL"))?;
        let https = registry.scheme() == Some(&http::uri::Scheme::HTTPS);
        if !(https || registry.scheme() == Some(&http::uri::Scheme::HTTP))
            || registry.host().is_none()
        {
            return Err(ConfigError::invalid(
                "registry",
                &self.registry,
                "expected http://HOST:PORT or https://HOST:PORT",
            ));
        }
        self.tls.validate(https)?;
        if let Some(TokenSource::Value(token)) = &self.auth_token {
            auth::check_token(token.expose()).map_err(|why| ConfigError::BadToken {
                from: "--auth-token/NODE_AGENT_AUTH_TOKEN".into(),
                why: why.to_owned(),
            })?;
        }
        if !valid_node_id(&self.node_id) {
            return Err(ConfigError::invalid(
                "node id",
                &self.node_id,
                "1-63 characters of [a-z0-9-], starting and ending with a letter or digit",
            ));
        }
        let printable = |s: &str| s.chars().all(|c| !c.is_control());
        if self.machine_id.is_empty()
            || self.machine_id.chars().count() > 128
            || !printable(&self.machine_id)
        {
            return Err(ConfigError::invalid(
                "machine id",
                &self.machine_id,
                "1-128 printable characters",
            ));
        }
        if !valid_address(&self.address) {
            return Err(ConfigError::invalid(
                "address",
                &self.address,
                "an http:// or https:// URL with a host, at most 2048 characters",
            ));
        }
        if self.labels.len() > 64 {
            return Err(ConfigError::invalid("labels", "", "at most 64"));
        }
        for (key, value) in &self.labels {
            if !valid_label_key(key) {
                return Err(ConfigError::invalid(
                    "label key",
                    key,
                    "1-63 characters of [A-Za-z0-9._/-]",
                ));
            }
            if value.chars().count() > 256 {
                return Err(ConfigError::invalid(
                    "label value",
                    value,
                    "at most 256 characters",
                ));
            }
        }
        if self.pools.len() > 64 {
            return Err(ConfigError::invalid("pools", "", "at most 64"));
        }
        for pool in &self.pools {
            pool.validate()?;
        }
        if let Some(n) = self.gpus.fake
            && n > 64
        {
            return Err(ConfigError::invalid(
                "fake gpus",
                &n.to_string(),
                "at most 64",
            ));
        }
        for (what, value) in [
            ("heartbeat interval", self.heartbeat_interval),
            ("handoff poll interval", Some(self.handoff_poll_interval)),
            ("registry timeout", Some(self.registry_timeout)),
            ("deregister timeout", Some(self.deregister_timeout)),
            ("probe timeout", Some(self.probe_timeout)),
            ("keepalive interval", Some(self.keepalive_interval)),
            ("keepalive timeout", Some(self.keepalive_timeout)),
            ("backoff initial", Some(self.backoff.initial)),
            ("backoff max", Some(self.backoff.max)),
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

/// A DNS label: 1-63 characters of `[a-z0-9-]`, letter or digit at both ends.
pub fn valid_node_id(id: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&id.len())
        && id.chars().all(|c| alnum(c) || c == '-')
        && id.starts_with(alnum)
        && id.ends_with(alnum)
}

/// 1-63 characters of `[A-Za-z0-9._-]`.
pub fn valid_pool_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// 1-63 characters of `[A-Za-z0-9._/-]`.
pub fn valid_label_key(key: &str) -> bool {
    (1..=63).contains(&key.len())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'))
}

/// An http:// or https:// URL with a host, at most 2048 characters.
pub fn valid_address(address: &str) -> bool {
    if address.len() > 2048 {
        return false;
    }
    let Ok(uri) = address.parse::<http::Uri>() else {
        return false;
    };
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    scheme_ok && uri.host().is_some_and(|h| !h.is_empty())
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !h.starts_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pools::ConfiguredState;
    use clap::CommandFactory;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("node-agent").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn flags_resolve_with_defaults() {
        let config = AgentConfig::resolve(
            cli(&[
                "--node-id",
                "n1",
                "--fake-gpus",
                "2",
                "--pool",
                "pool-0",
                "--heartbeat-interval",
                "300ms",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(config.registry, DEFAULT_REGISTRY);
        assert_eq!(config.node_id, "n1");
        assert_eq!(config.gpus.fake, Some(2));
        assert_eq!(config.pools, vec![PoolConfig::new("pool-0")]);
        assert_eq!(config.heartbeat_interval, Some(Duration::from_millis(300)));
        assert_eq!(config.backoff.max, Duration::from_secs(30));
        assert!(valid_address(&config.address), "{}", config.address);
        assert!(!config.machine_id.is_empty());
    }

    #[test]
    fn file_values_apply_and_flags_override_them() {
        let file = FileConfig::parse(
            r#"
            registry = "http://registry.internal:50051"
            node_id = "from-file"
            address = "http://10.0.0.5:9200"
            heartbeat_interval = "5s"
            backoff_max = "1m"
            handoff_dir = "/run/engines"
            require_gpus = true
            log_format = "json"

            [labels]
            zone = "eu-1"
            rack = "r7"

            [[pools]]
            id = "pool-0"
            engine = "llamacpp"
            slots = 4
            gpus = [0, 1]
            probe = "http://127.0.0.1:8081/health"

            [[pools]]
            pool_id = "pool-1"
            state = "initializing"
            "#,
            Path::new("test.toml"),
        )
        .unwrap();
        let config = AgentConfig::resolve(
            cli(&[
                "--node-id",
                "from-flag",
                "--label",
                "zone=eu-2",
                "--pool",
                "pool-1,slots=2",
            ]),
            file,
        )
        .unwrap();
        assert_eq!(config.registry, "http://registry.internal:50051");
        assert_eq!(config.node_id, "from-flag");
        assert_eq!(config.address, "http://10.0.0.5:9200");
        assert_eq!(config.heartbeat_interval, Some(Duration::from_secs(5)));
        assert_eq!(config.backoff.max, Duration::from_secs(60));
        assert_eq!(
            config.handoff_dir.as_deref(),
            Some(Path::new("/run/engines"))
        );
        assert!(config.gpus.require);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.labels["zone"], "eu-2");
        assert_eq!(config.labels["rack"], "r7");
        assert_eq!(config.pools.len(), 2);
        assert_eq!(config.pools[0].gpus, Some(vec![0, 1]));
        assert_eq!(config.pools[0].slots, Some(4));
        // The flag replaced the file's pool-1 entirely.
        assert_eq!(config.pools[1].slots, Some(2));
        assert_eq!(config.pools[1].state, None);
    }

    #[test]
    fn example_config_file_is_valid() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/node-agent.example.toml");
        let file = FileConfig::load(&path).unwrap();
        let flags = Cli {
            node_id: Some("n1".into()),
            ..Cli::default()
        };
        let config = AgentConfig::resolve(flags, file).unwrap();
        assert_eq!(config.registry, "http://registry.internal:50051");
        assert_eq!(config.pools.len(), 2);
        assert_eq!(config.pools[1].state, Some(ConfiguredState::Initializing));
        assert_eq!(config.labels.len(), 2);
        assert!(config.gpus.require);
    }

    #[test]
    fn example_security_settings_are_valid_when_uncommented() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/node-agent.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let text: String = text
            .lines()
            .map(|line| {
                let key = line.strip_prefix("# ").unwrap_or(line);
                if key.starts_with("auth_token_file =") || key.starts_with("tls_") {
                    key.to_owned()
                } else {
                    line.replace("http://registry.internal", "https://registry.internal")
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let file = FileConfig::parse(&text, &path).unwrap();
        let flags = Cli {
            node_id: Some("n1".into()),
            ..Cli::default()
        };
        let config = AgentConfig::resolve(flags, file).unwrap();
        assert_eq!(config.registry, "https://registry.internal:50051");
        assert_eq!(
            config.auth_token,
            Some(TokenSource::File("/etc/node-agent/token".into()))
        );
        assert_eq!(config.tls.domain.as_deref(), Some("registry.internal"));
        assert!(config.tls.ca.is_some() && config.tls.cert.is_some() && config.tls.key.is_some());
    }

    #[test]
    fn file_pool_state_parses() {
        let file = FileConfig::parse(
            "[[pools]]\nid = \"p\"\nstate = \"draining\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(file.pools[0].state, Some(ConfiguredState::Draining));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for text in [
            "registy = \"typo\"",
            "heartbeat_interval = \"soon\"",
            "heartbeat_interval = 10",
            "[[pools]]\nid = \"p\"\ncolour = \"red\"",
            "not toml at all",
        ] {
            let err = FileConfig::parse(text, Path::new("bad.toml")).unwrap_err();
            assert!(err.to_string().contains("bad.toml"), "{err}");
        }
    }

    #[test]
    fn invalid_values_are_refused() {
        let bad_cases: &[&[&str]] = &[
            &["--node-id", "Bad_Node"],
            &["--node-id=-n1"],
            &["--node-id", "n1", "--registry", "https://r:1"],
            &["--node-id", "n1", "--registry", "nonsense"],
            &["--node-id", "n1", "--address", "10.0.0.5:9200"],
            &["--node-id", "n1", "--address", "ftp://x"],
            &["--node-id", "n1", "--label", "novalue"],
            &["--node-id", "n1", "--label", "bad key=v"],
            &["--node-id", "n1", "--pool", "p", "--pool", "p,slots=2"],
            &["--node-id", "n1", "--pool", "bad/pool"],
            &["--node-id", "n1", "--heartbeat-interval", "0s"],
            &["--node-id", "n1", "--fake-gpus", "65"],
            &[
                "--node-id",
                "n1",
                "--backoff-initial",
                "1m",
                "--backoff-max",
                "1s",
            ],
            &["--node-id", "n1", "--machine-id", ""],
            &[
                "--node-id",
                "n1",
                "--registry",
                "http://r:1",
                "--tls-ca",
                "/ca.pem",
            ],
            &[
                "--node-id",
                "n1",
                "--registry",
                "https://r:1",
                "--tls-ca",
                "/ca.pem",
                "--tls-cert",
                "/node.pem",
            ],
            &[
                "--node-id",
                "n1",
                "--registry",
                "https://r:1",
                "--tls-ca",
                "/ca.pem",
                "--tls-domain",
                "not a name",
            ],
        ];
        for args in bad_cases {
            assert!(
                AgentConfig::resolve(cli(args), FileConfig::default()).is_err(),
                "{args:?} was accepted"
            );
        }
        assert!(Cli::try_parse_from(["node-agent", "--heartbeat-interval", "soon"]).is_err());
        assert!(Cli::try_parse_from(["node-agent", "--log-format", "xml"]).is_err());
    }

    const TOKEN: &str = "node-token-aaaaaaaaaaaaaaaa";

    #[test]
    fn token_file_and_tls_come_from_the_file_and_flags_override_them() {
        let file = FileConfig::parse(
            r#"
            registry = "https://registry.internal:50051"
            auth_token_file = "/etc/node-agent/token"
            tls_ca = "/etc/node-agent/ca.pem"
            tls_cert = "/etc/node-agent/node.pem"
            tls_key = "/etc/node-agent/node.key"
            tls_domain = "registry.internal"
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        let config = AgentConfig::resolve(cli(&["--node-id", "n1"]), file.clone()).unwrap();
        assert_eq!(
            config.auth_token,
            Some(TokenSource::File("/etc/node-agent/token".into()))
        );
        assert_eq!(
            config.tls,
            TlsConfig {
                ca: Some("/etc/node-agent/ca.pem".into()),
                cert: Some("/etc/node-agent/node.pem".into()),
                key: Some("/etc/node-agent/node.key".into()),
                domain: Some("registry.internal".into()),
            }
        );

        let config = AgentConfig::resolve(
            cli(&[
                "--node-id",
                "n1",
                "--auth-token-file",
                "/run/secrets/token",
                "--tls-domain",
                "10.0.0.9",
                "--tls-ca",
                "/ca.pem",
            ]),
            file,
        )
        .unwrap();
        assert_eq!(
            config.auth_token,
            Some(TokenSource::File("/run/secrets/token".into()))
        );
        assert_eq!(config.tls.domain.as_deref(), Some("10.0.0.9"));
        assert_eq!(config.tls.ca.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(
            config.tls.cert.as_deref(),
            Some(Path::new("/etc/node-agent/node.pem"))
        );
    }

    #[test]
    fn a_token_and_a_token_file_together_are_refused() {
        let both_flags = cli(&[
            "--node-id",
            "n1",
            "--auth-token-file",
            "/etc/node-agent/token",
            "--auth-token",
            TOKEN,
        ]);
        let from_file = FileConfig::parse(
            "auth_token_file = \"/etc/node-agent/token\"\n",
            Path::new("t"),
        )
        .unwrap();
        let flag_token = cli(&["--node-id", "n1", "--auth-token", TOKEN]);
        for (flags, file) in [
            (both_flags, FileConfig::default()),
            (flag_token.clone(), from_file),
        ] {
            let err = AgentConfig::resolve(flags, file).unwrap_err().to_string();
            assert!(
                err.contains("NODE_AGENT_AUTH_TOKEN_FILE")
                    && err.contains("NODE_AGENT_AUTH_TOKEN)"),
                "{err}"
            );
            assert!(!err.contains(TOKEN), "{err}");
        }

        // Alone, the token is taken as is.
        let config = AgentConfig::resolve(flag_token, FileConfig::default()).unwrap();
        assert_eq!(
            config.auth_token,
            Some(TokenSource::Value(Secret::new(TOKEN)))
        );
    }

    #[test]
    fn the_config_file_may_not_hold_the_token_itself() {
        let file =
            FileConfig::parse(&format!("auth_token = \"{TOKEN}\"\n"), Path::new("t")).unwrap();
        let err = AgentConfig::resolve(cli(&["--node-id", "n1"]), file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth_token_file"), "{err}");
        assert!(!err.contains(TOKEN), "{err}");
    }

    #[test]
    fn a_bad_token_is_refused_without_being_quoted() {
        for bad in ["short-secret", "two words-aaaaaaaaaaaaaaaaaa"] {
            let err = AgentConfig::resolve(
                cli(&["--node-id", "n1", "--auth-token", bad]),
                FileConfig::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("invalid auth token"), "{err}");
            assert!(!err.contains(bad), "{err}");
        }
        // Nor does a printed configuration show it.
        let config = AgentConfig::resolve(
            cli(&["--node-id", "n1", "--auth-token", TOKEN]),
            FileConfig::default(),
        )
        .unwrap();
        let debug = format!("{config:?} {:?}", cli(&["--auth-token", TOKEN]));
        assert!(!debug.contains(TOKEN), "{debug}");
    }

    #[test]
    fn https_registries_need_a_ca_and_take_tls_settings() {
        let err = AgentConfig::resolve(
            cli(&["--node-id", "n1", "--registry", "https://registry:50051"]),
            FileConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--tls-ca"), "{err}");
        let config = AgentConfig::resolve(
            cli(&[
                "--node-id",
                "n1",
                "--registry",
                "https://10.0.0.9:50051",
                "--tls-ca",
                "/ca.pem",
                "--tls-cert",
                "/node.pem",
                "--tls-key",
                "/node.key",
                "--tls-domain",
                "registry.internal",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(config.registry, "https://10.0.0.9:50051");
        assert!(config.tls.is_set());
        assert_eq!(config.tls.key.as_deref(), Some(Path::new("/node.key")));
    }

    #[test]
    fn the_token_variable_is_hidden_in_help() {
        let command = Cli::command();
        let token = command
            .get_arguments()
            .find(|a| a.get_id() == "auth_token")
            .unwrap();
        assert!(token.is_hide_env_values_set());
        assert_eq!(
            token.get_env().and_then(|e| e.to_str()),
            Some("NODE_AGENT_AUTH_TOKEN")
        );
    }

    #[test]
    fn labels_and_pools_split_on_their_delimiters() {
        let c = cli(&["--label", "a=1,b=2", "--pool", "p1;p2,slots=3"]);
        assert_eq!(c.labels, ["a=1", "b=2"]);
        assert_eq!(c.pools, ["p1", "p2,slots=3"]);
    }

    #[test]
    fn every_flag_reads_a_node_agent_environment_variable() {
        let command = Cli::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{id} has no env var"));
            let long = arg.get_long().unwrap();
            let want = format!("NODE_AGENT_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(env.to_str(), Some(want.as_str()), "--{long}");
        }
    }

    #[test]
    fn identifier_rules_match_the_contract() {
        assert!(valid_node_id("gpu-01"));
        assert!(valid_node_id(&"a".repeat(63)));
        assert!(!valid_node_id(&"a".repeat(64)));
        assert!(!valid_node_id("gpu-"));
        assert!(!valid_node_id(""));
        assert!(valid_pool_id("Pool_0.a-b"));
        assert!(!valid_pool_id("pool 0"));
        assert!(valid_label_key("team/owner"));
        assert!(!valid_label_key("a=b"));
        assert!(valid_address("https://gpu-01.example.com"));
        assert!(!valid_address("http://"));
    }
}
