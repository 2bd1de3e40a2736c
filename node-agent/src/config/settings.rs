//! Every scalar agent setting, declared once: the same [`Settings`] struct
//! is a set of clap flags (each with its `NODE_AGENT_*` variable) and the
//! keys of the TOML config file. The flag's name with `_` for `-` is the
//! file key; its doc comment is the `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::Secret;

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

/// The settings given as a flag, an environment variable or a file key.
/// `None` where the source does not set it; [`Settings::or`] merges two
/// sources and [`super::AgentConfig::resolve`] applies the defaults.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
pub struct Settings {
    /// gRPC endpoint of the registry, http:// or https:// (https needs
    /// --tls-ca); for registry replicas a comma-separated list of their
    /// URLs (a name resolving to several addresses counts as several), the
    /// agent finds the leader [default: http://127.0.0.1:50051].
    #[arg(long, env = "NODE_AGENT_REGISTRY", value_name = "URL")]
    pub registry: Option<String>,

    /// This node's id, a DNS label [default: the hostname's first label].
    #[arg(long, env = "NODE_AGENT_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Machine identifier, printable ASCII without spaces
    /// [default: /etc/machine-id, else the hostname].
    #[arg(long, env = "NODE_AGENT_MACHINE_ID", value_name = "ID")]
    pub machine_id: Option<String>,

    /// Endpoint URL advertised for this node [default: http://HOSTNAME].
    #[arg(long, env = "NODE_AGENT_ADDRESS", value_name = "URL")]
    pub address: Option<String>,

    /// Report N fake GPUs instead of asking NVML (hosts without GPUs, tests).
    #[arg(long, env = "NODE_AGENT_FAKE_GPUS", value_name = "N")]
    pub fake_gpus: Option<u32>,

    /// Faults the fake GPUs show, as GPU:FAULT[@FROM[-UNTIL]],... (e.g.
    /// "1:xid79@30s-90s,0:thermal"); see docs/node-agent.md.
    #[arg(long, env = "NODE_AGENT_FAKE_GPU_FAULTS", value_name = "SCHEDULE")]
    pub fake_gpu_faults: Option<String>,

    /// MIG slices every fake GPU has, comma-separated profile names (e.g.
    /// "3g.40gb,3g.40gb"); unset: MIG off.
    #[arg(long, env = "NODE_AGENT_FAKE_MIG", value_name = "PROFILES")]
    pub fake_mig: Option<String>,

    /// How long a critical XID error keeps counting in a GPU's health
    /// [default: 10m].
    #[arg(long, env = "NODE_AGENT_XID_WINDOW", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub xid_window: Option<Duration>,

    /// Exit with an error when NVML is unavailable or finds no GPU.
    // A flag that also takes an explicit value, so the file's
    // `require_gpus = false` and an unset flag can be told apart.
    #[arg(
        long,
        env = "NODE_AGENT_REQUIRE_GPUS",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub require_gpus: Option<bool>,

    /// Directory of engine handoff files (*.json) to report pools from.
    #[arg(long, env = "NODE_AGENT_HANDOFF_DIR", value_name = "DIR")]
    pub handoff_dir: Option<PathBuf>,

    /// How often the handoff directory is re-read [default: 1s].
    #[arg(long, env = "NODE_AGENT_HANDOFF_POLL_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub handoff_poll_interval: Option<Duration>,

    /// Heartbeat interval, overriding the one the registry asks for
    /// [default: the registry's, else 10s].
    #[arg(long, env = "NODE_AGENT_HEARTBEAT_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub heartbeat_interval: Option<Duration>,

    /// Timeout of connecting to the registry and of Register [default: 5s].
    #[arg(long, env = "NODE_AGENT_REGISTRY_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub registry_timeout: Option<Duration>,

    /// Timeout of the Deregister call at shutdown [default: 2s].
    #[arg(long, env = "NODE_AGENT_DEREGISTER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub deregister_timeout: Option<Duration>,

    /// Timeout of one pool health probe [default: 2s].
    #[arg(long, env = "NODE_AGENT_PROBE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub probe_timeout: Option<Duration>,

    /// Timeout of one pool drain or resume action (an HTTP POST or a
    /// command, which is killed when it runs longer) [default: 30s].
    #[arg(long, env = "NODE_AGENT_ACTION_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub action_timeout: Option<Duration>,

    /// HTTP/2 keepalive ping interval on the registry connection [default: 10s].
    #[arg(long, env = "NODE_AGENT_KEEPALIVE_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub keepalive_interval: Option<Duration>,

    /// How long a keepalive ping may go unanswered before the connection
    /// is dropped [default: 5s].
    #[arg(long, env = "NODE_AGENT_KEEPALIVE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub keepalive_timeout: Option<Duration>,

    /// First reconnect delay ceiling [default: 500ms].
    #[arg(long, env = "NODE_AGENT_BACKOFF_INITIAL", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub backoff_initial: Option<Duration>,

    /// Largest reconnect delay [default: 30s].
    #[arg(long, env = "NODE_AGENT_BACKOFF_MAX", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub backoff_max: Option<Duration>,

    /// Wait before registering again after the registry refused the
    /// registration as invalid (INVALID_ARGUMENT): such a refusal does not
    /// fix itself, so it is retried rarely, not on the reconnect backoff
    /// [default: 5m].
    #[arg(long, env = "NODE_AGENT_REGISTER_REFUSED_RETRY", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub register_refused_retry: Option<Duration>,

    /// Log format [default: text].
    #[arg(long, env = "NODE_AGENT_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// File holding the registry's bearer token (a node token) alone;
    /// read again when the registry answers UNAUTHENTICATED.
    #[arg(long, env = "NODE_AGENT_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// The bearer token itself. Prefer --auth-token-file, or at least the
    /// environment variable: flags show in `ps`.
    // Read from a config file only to refuse it there: config files are
    // often world-readable.
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

    /// Address to serve Prometheus metrics on (`/metrics`), such as
    /// 0.0.0.0:9101 [default: none, no metrics endpoint].
    #[arg(long, env = "NODE_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Metrics URL registered for this node (RegisterRequest.metrics_address),
    /// which the registry hands to Prometheus service discovery
    /// [default: http://<host of --address>:<port of --metrics-listen>/metrics].
    #[arg(long, env = "NODE_AGENT_METRICS_ADDRESS", value_name = "URL")]
    pub metrics_address: Option<String>,
}

impl Settings {
    /// Each setting from `self` where it is set, else from `lower` (flags
    /// and environment over the config file).
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            registry: self.registry.or(lower.registry),
            node_id: self.node_id.or(lower.node_id),
            machine_id: self.machine_id.or(lower.machine_id),
            address: self.address.or(lower.address),
            fake_gpus: self.fake_gpus.or(lower.fake_gpus),
            fake_gpu_faults: self.fake_gpu_faults.or(lower.fake_gpu_faults),
            fake_mig: self.fake_mig.or(lower.fake_mig),
            xid_window: self.xid_window.or(lower.xid_window),
            require_gpus: self.require_gpus.or(lower.require_gpus),
            handoff_dir: self.handoff_dir.or(lower.handoff_dir),
            handoff_poll_interval: self.handoff_poll_interval.or(lower.handoff_poll_interval),
            heartbeat_interval: self.heartbeat_interval.or(lower.heartbeat_interval),
            registry_timeout: self.registry_timeout.or(lower.registry_timeout),
            deregister_timeout: self.deregister_timeout.or(lower.deregister_timeout),
            probe_timeout: self.probe_timeout.or(lower.probe_timeout),
            action_timeout: self.action_timeout.or(lower.action_timeout),
            keepalive_interval: self.keepalive_interval.or(lower.keepalive_interval),
            keepalive_timeout: self.keepalive_timeout.or(lower.keepalive_timeout),
            backoff_initial: self.backoff_initial.or(lower.backoff_initial),
            backoff_max: self.backoff_max.or(lower.backoff_max),
            register_refused_retry: self.register_refused_retry.or(lower.register_refused_retry),
            log_format: self.log_format.or(lower.log_format),
            auth_token_file: self.auth_token_file.or(lower.auth_token_file),
            auth_token: self.auth_token.or(lower.auth_token),
            tls_ca: self.tls_ca.or(lower.tls_ca),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            tls_domain: self.tls_domain.or(lower.tls_domain),
            metrics_listen: self.metrics_listen.or(lower.metrics_listen),
            metrics_address: self.metrics_address.or(lower.metrics_address),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Never fails: clap would quote the value in its error, and this value
/// is a secret. [`super::AgentConfig::validate`] checks it without quoting
/// it.
fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

/// A humantime duration in the config file ("500ms", "10s").
fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map(Some).map_err(|e| {
        serde::de::Error::custom(format!("{text:?}: {e} (write e.g. \"500ms\", \"10s\")"))
    })
}
