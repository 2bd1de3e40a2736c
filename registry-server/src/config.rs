//! Command line and environment configuration of registry-server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

pub use crate::huge_pages::HugePages;

use crate::registry::{GuardConfig, Timing};

/// The authoritative registry of GPU nodes and their model-serving pools.
#[derive(Debug, Clone, Parser)]
#[command(name = "registry-server", version, about)]
pub struct Cli {
    /// Address the gRPC server listens on.
    #[arg(long, env = "REGISTRY_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Address of the Prometheus metrics endpoint (`/metrics`), or `off`
    /// [default: the --listen host, port 9464].
    #[arg(long, env = "REGISTRY_METRICS_LISTEN", value_parser = parse_optional_addr)]
    pub metrics_listen: Option<OptionalAddr>,

    /// Heartbeat interval the server asks agents for; must be shorter than
    /// the node timeout [default: a third of --node-timeout, at most 10s].
    #[arg(long, env = "REGISTRY_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,

    /// How to print logs: human-readable text or one JSON object per line.
    #[arg(long, env = "REGISTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Threads that run the server's tasks [default: one per CPU core].
    /// Each heartbeat wakes a few tasks; with several threads an idle one
    /// is woken to share them, which costs more than the work itself
    /// while the server uses less than one core (docs/PERF-NOTES.md).
    #[arg(long, env = "REGISTRY_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,

    /// Whether the kernel may back the server's memory with transparent
    /// huge pages. Off: with one connection per agent most of each
    /// connection's buffers are never written, and huge pages would make
    /// them resident all the same (~33 KiB per agent off, ~49 KiB on).
    /// On takes in registration storms 5-15 % faster (docs/PERF-NOTES.md
    /// item 10).
    #[arg(long, env = "REGISTRY_HUGE_PAGES", value_enum, default_value_t = HugePages::Off)]
    pub huge_pages: HugePages,

    #[command(flatten)]
    pub settings: Settings,
}

/// Port of the metrics endpoint when `--metrics-listen` is not given.
pub const DEFAULT_METRICS_PORT: u16 = 9464;
/// Longest heartbeat interval derived from the node timeout.
pub const MAX_DERIVED_INTERVAL: Duration = Duration::from_secs(10);

impl Cli {
    /// The settings with the heartbeat interval resolved: the flag's value,
    /// or a third of the node timeout (at most 10 s), so `--node-timeout 5s`
    /// alone works.
    pub fn settings(&self) -> Settings {
        let mut settings = self.settings.clone();
        settings.heartbeat_interval = self
            .heartbeat_interval
            .unwrap_or_else(|| derived_interval(settings.node_timeout));
        settings
    }

    /// Where `/metrics` listens: the flag's address, none for `off`, or by
    /// default port 9464 on the same host as `--listen` (so two registries
    /// on different loopback ports do not fight over 0.0.0.0:9464, and a
    /// loopback registry does not expose its metrics on every interface).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        match self.metrics_listen {
            Some(OptionalAddr(addr)) => addr,
            None => Some(SocketAddr::new(self.listen.ip(), DEFAULT_METRICS_PORT)),
        }
    }
}

/// Most `--connection-threads`: each is an OS thread with its own runtime,
/// and more than a few per core only adds wake-ups.
pub const MAX_CONNECTION_THREADS: usize = 1024;

/// A third of `node_timeout`, at most [`MAX_DERIVED_INTERVAL`], in whole
/// milliseconds: an agent then misses two beats before it is OFFLINE.
pub fn derived_interval(node_timeout: Duration) -> Duration {
    let third = Duration::from_millis((node_timeout.as_millis() / 3) as u64);
    third.min(MAX_DERIVED_INTERVAL)
}

/// A listen address that can be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

/// An address, or `off` for none.
fn parse_optional_addr(value: &str) -> Result<OptionalAddr, String> {
    match value {
        "off" | "none" | "" => Ok(OptionalAddr(None)),
        addr => addr.parse().map(|a| OptionalAddr(Some(a))).map_err(|e| {
            format!("{addr:?} is neither an address like 0.0.0.0:9464 nor `off`: {e}")
        }),
    }
}

/// Where the registry's revisions start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RevisionBase {
    /// At the wall clock's microseconds since the Unix epoch when the
    /// server starts: revisions then keep increasing across restarts as
    /// long as fewer than a million changes a second were made on average,
    /// and the clock is not set back by more than the run's changes.
    #[default]
    Clock,
    /// At 0.
    Zero,
}

impl RevisionBase {
    /// The revision before the first change, read now.
    pub fn first_revision(self) -> u64 {
        match self {
            RevisionBase::Clock => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            RevisionBase::Zero => 0,
        }
    }
}

/// A share between 0 and 1 (`0.5` or `50%`), for
/// `--mass-offline-threshold`; compared by value, so settings stay `Eq`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share(pub f64);

impl Eq for Share {}

/// `0.5`, `50%`; refused outside 0..=1.
pub fn parse_share(value: &str) -> Result<Share, String> {
    let (number, scale) = match value.trim().strip_suffix('%') {
        Some(percent) => (percent, 100.0),
        None => (value.trim(), 1.0),
    };
    let share = number
        .trim()
        .parse::<f64>()
        .map_err(|e| format!("{value:?} is not a share like 0.5 or 50%: {e}"))?
        / scale;
    if !(0.0..=1.0).contains(&share) {
        return Err(format!("{value:?} is outside 0..1 (0%..100%)"));
    }
    Ok(Share(share))
}

/// Where the registry keeps what survives a restart (`--store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Nothing survives a restart (tests, throwaway registries).
    Memory,
    /// A redb file in `--data-dir`.
    Embedded,
    /// etcd (`--etcd-endpoints`), shared by several replicas of which one
    /// leads (see docs/ha.md).
    Etcd,
}

/// Default `--data-dir`: the conventional place for a service's state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/registry";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Everything that shapes the server's behaviour, shared by `main` and the
/// tests (which use short timeouts).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Settings {
    /// A node that sends no heartbeat message for this long is marked
    /// OFFLINE ("30s", "500ms").
    #[arg(long, env = "REGISTRY_NODE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub node_timeout: Duration,

    /// Heartbeat interval the server asks agents for; must be shorter than
    /// the node timeout. On the command line it is `Cli::heartbeat_interval`,
    /// which [`Cli::settings`] derives from the timeout when not given.
    #[arg(skip)]
    pub heartbeat_interval: Duration,

    /// How long OFFLINE nodes stay listed before they are removed.
    #[arg(long, env = "REGISTRY_OFFLINE_RETENTION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub offline_retention: Duration,

    /// Largest clock difference accepted between a heartbeat's sent_at and
    /// the server's clock.
    #[arg(long, env = "REGISTRY_MAX_CLOCK_SKEW", default_value = "1h", value_parser = humantime::parse_duration)]
    pub max_clock_skew: Duration,

    /// Largest gRPC message accepted, in bytes (Register, admin and read
    /// calls); larger ones are refused as soon as their length prefix
    /// arrives, with OUT_OF_RANGE.
    #[arg(long, env = "REGISTRY_MAX_MESSAGE_SIZE", default_value_t = 1024 * 1024)]
    pub max_message_size: usize,

    /// Largest Heartbeat message accepted, in bytes (a heartbeat with 64
    /// pools is a few KiB); a larger one ends the stream with OUT_OF_RANGE
    /// as soon as its length prefix arrives.
    #[arg(long, env = "REGISTRY_MAX_HEARTBEAT_MESSAGE_SIZE", default_value_t = 64 * 1024)]
    pub max_heartbeat_message_size: usize,

    /// Most bytes of unfinished messages one connection may hold; a request
    /// that would hold more ends with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "REGISTRY_MAX_BUFFERED_BYTES_PER_CONNECTION",
        default_value_t = 4 * 1024 * 1024
    )]
    pub max_buffered_bytes_per_connection: usize,

    /// Most bytes of unfinished messages all connections together may
    /// hold; a request that would hold more ends with RESOURCE_EXHAUSTED.
    #[arg(long, env = "REGISTRY_MAX_BUFFERED_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub max_buffered_bytes: usize,

    /// Most concurrent HTTP/2 streams on one connection (a simulator or a
    /// proxy may carry many nodes' heartbeat streams on one connection).
    #[arg(
        long,
        env = "REGISTRY_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1024
    )]
    pub max_streams_per_connection: u32,

    /// Most open client connections; further connections are closed at
    /// accept.
    #[arg(long, env = "REGISTRY_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,

    /// Most open connections from one source address, so one host cannot
    /// take every slot (agents behind one NAT address count together).
    #[arg(
        long,
        env = "REGISTRY_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 4096
    )]
    pub max_connections_per_address: usize,

    /// Threads that serve client connections, each running a
    /// single-threaded runtime of its own [default: one per CPU core]; 0
    /// serves them on the main runtime's `--worker-threads`. A connection
    /// stays on the thread that took it, so a heartbeat's tasks wake no
    /// other thread: less CPU per heartbeat and a higher peak rate
    /// (docs/PERF-NOTES.md item 11). `Settings::default()` (tests) has 0.
    #[arg(long, env = "REGISTRY_CONNECTION_THREADS")]
    pub connection_threads: Option<usize>,

    /// Largest ListNodes page; a request for more (or for 0, "all") gets
    /// this many and a next_page_token, so no single call holds a worker
    /// for long at fleet scale.
    #[arg(long, env = "REGISTRY_MAX_PAGE_SIZE", default_value_t = 1000)]
    pub max_page_size: u32,

    /// Most registered nodes; Register of a new node beyond it gets
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "REGISTRY_MAX_NODES", default_value_t = 200_000)]
    pub max_nodes: usize,

    /// Most open heartbeat streams in all; further ones get
    /// RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "REGISTRY_MAX_HEARTBEAT_STREAMS",
        default_value_t = 250_000
    )]
    pub max_heartbeat_streams: usize,

    /// Register calls that run at once; more wait their turn (up to
    /// --max-queued-registrations). The store commits the running ones'
    /// records in groups, so this also bounds a commit's size. Fewer
    /// running keep the registered nodes' heartbeats from waiting behind
    /// a storm's replies (docs/BENCHMARKS.md, "Retry advice that keeps the
    /// registry busy").
    #[arg(
        long,
        env = "REGISTRY_MAX_CONCURRENT_REGISTRATIONS",
        default_value_t = 128
    )]
    pub max_concurrent_registrations: usize,

    /// Register calls that may wait for their turn; past them a call gets
    /// RESOURCE_EXHAUSTED with a retry time (google.rpc.RetryInfo), spread
    /// so the refused agents come back at the pace registrations complete.
    #[arg(
        long,
        env = "REGISTRY_MAX_QUEUED_REGISTRATIONS",
        default_value_t = 16384
    )]
    pub max_queued_registrations: usize,

    /// Longest a Register call waits for its turn; then it gets
    /// RESOURCE_EXHAUSTED with a retry time instead of running into its
    /// caller's deadline (node-agent's --registry-timeout is 5s). A call
    /// that would wait longer, at the pace registrations are completing,
    /// behind the calls already waiting is refused when it arrives.
    #[arg(long, env = "REGISTRY_MAX_REGISTRATION_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub max_registration_wait: Duration,

    /// Register calls arriving while the runtimes that serve calls run
    /// further behind than this (a ready task waits longer to run: the
    /// delay every heartbeat's ack takes) get RESOURCE_EXHAUSTED with a
    /// retry time, before their body is read; 0 switches the check off. A
    /// storm on a fast store runs out of CPU before it fills the turns
    /// above (docs/PERF-NOTES.md item 12). `Settings::default()` (tests)
    /// has 0.
    #[arg(long, env = "REGISTRY_MAX_REGISTRATION_LAG", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub max_registration_lag: Duration,

    /// Changes kept for WatchNodes to resume from; a start_revision older
    /// than these gets OUT_OF_RANGE ("compacted; relist").
    #[arg(long, env = "REGISTRY_WATCH_HISTORY", default_value_t = 100_000)]
    pub watch_history: usize,

    /// Changes a watcher may fall behind before it is ended with
    /// RESOURCE_EXHAUSTED (it resumes from the revision in the message).
    #[arg(long, env = "REGISTRY_WATCH_QUEUE", default_value_t = 10_000)]
    pub watch_queue: usize,

    /// Silence after which a watcher gets a PROGRESS event with the
    /// revision it has seen everything up to.
    #[arg(long, env = "REGISTRY_WATCH_PROGRESS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub watch_progress_interval: Duration,

    /// Most concurrent WatchNodes streams; further ones get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "REGISTRY_MAX_WATCHERS", default_value_t = 10_000)]
    pub max_watchers: usize,

    /// Share of the ONLINE nodes that may go OFFLINE within one node
    /// timeout before the registry suspects itself and holds the rest
    /// ONLINE as suspect ("0.5" or "50%"); 0 or 1 switch the guard off.
    #[arg(long, env = "REGISTRY_MASS_OFFLINE_THRESHOLD", default_value = "0.5", value_parser = parse_share)]
    pub mass_offline_threshold: Share,

    /// Fewest ONLINE nodes for the mass-failure guard to trip at all (in a
    /// fleet of two, one death is already half).
    #[arg(long, env = "REGISTRY_MASS_OFFLINE_MIN_NODES", default_value_t = 10)]
    pub mass_offline_min_nodes: usize,

    /// Longest time the mass-failure guard holds silent nodes ONLINE; a
    /// real mass failure is reported this late at most.
    #[arg(long, env = "REGISTRY_MASS_OFFLINE_PROTECTION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub mass_offline_protection: Duration,

    /// Where revisions start: at the start time in microseconds (the
    /// server), or at 0 (tests that name exact revisions).
    #[arg(skip)]
    pub revision_base: RevisionBase,

    /// Deadline of unary calls (Register, ListNodes ...), and of a new
    /// connection's first bytes.
    #[arg(long, env = "REGISTRY_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// On shutdown, how long open connections may take to finish before
    /// they are closed regardless.
    #[arg(long, env = "REGISTRY_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// File of `ROLE TOKEN` lines (roles: node, reader, admin); re-read on
    /// SIGHUP and on change.
    #[arg(long, env = "REGISTRY_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// One admin token (prefer the environment variable: flags show in `ps`).
    #[arg(
        long,
        env = "REGISTRY_AUTH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub auth_token: Option<String>,

    /// Allow listening on a non-loopback address without any token.
    #[arg(long, env = "REGISTRY_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Switch gRPC server reflection off.
    #[arg(long, env = "REGISTRY_DISABLE_REFLECTION")]
    pub disable_reflection: bool,

    /// PEM certificate chain of the server; turns TLS on (with --tls-key).
    #[arg(
        long,
        env = "REGISTRY_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the server.
    #[arg(
        long,
        env = "REGISTRY_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Where nodes, sessions and admin states are kept: `embedded` (a file
    /// in --data-dir; survives restarts) or `memory` (lost on restart).
    /// The binary defaults to `embedded`; `Settings::default()` (tests) to
    /// `memory`.
    #[arg(long, env = "REGISTRY_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    pub store: StoreKind,

    /// Directory of the embedded store's file (`registry.redb`); created if
    /// missing; must be writable.
    #[arg(long, env = "REGISTRY_DATA_DIR", value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Delete the embedded store's file before starting (every stored
    /// node, session and admin state is lost): the explicit way out of a
    /// corrupt store.
    #[arg(long, env = "REGISTRY_RESET_STORE")]
    pub reset_store: bool,

    /// etcd client URLs for `--store etcd`, comma-separated
    /// (`http://10.0.0.1:2379,http://10.0.0.2:2379`).
    #[arg(
        long,
        env = "REGISTRY_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URL,..."
    )]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of this registry's records in etcd (several registries
    /// may share one etcd under different prefixes).
    #[arg(long, env = "REGISTRY_ETCD_PREFIX", default_value = "/gpu-registry")]
    pub etcd_prefix: String,

    /// Lease of the leadership: a leader cut off from etcd this long steps
    /// down, and a new one is elected about this long after a leader dies
    /// (rounded up to whole seconds, at least 2 s).
    #[arg(long, env = "REGISTRY_ETCD_LEASE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub etcd_lease_ttl: Duration,

    /// PEM CA bundle that signed etcd's server certificates (TLS to etcd).
    #[arg(long, env = "REGISTRY_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,

    /// PEM client certificate for etcd (mTLS to etcd); needs --etcd-key.
    #[arg(
        long,
        env = "REGISTRY_ETCD_CERT",
        value_name = "FILE",
        requires = "etcd_key"
    )]
    pub etcd_cert: Option<PathBuf>,

    /// PEM private key of --etcd-cert.
    #[arg(
        long,
        env = "REGISTRY_ETCD_KEY",
        value_name = "FILE",
        requires = "etcd_cert"
    )]
    pub etcd_key: Option<PathBuf>,

    /// etcd user (etcd's own authentication); the password comes from
    /// --etcd-password-file or REGISTRY_ETCD_PASSWORD.
    #[arg(long, env = "REGISTRY_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// File holding the etcd user's password (first line).
    #[arg(long, env = "REGISTRY_ETCD_PASSWORD_FILE", value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,

    /// The etcd user's password (prefer --etcd-password-file: the
    /// environment of a process is readable by its user).
    #[arg(long = "etcd-password", env = "REGISTRY_ETCD_PASSWORD", hide = true)]
    pub etcd_password: Option<String>,

    /// The URL clients reach this replica at, handed to them by the other
    /// replicas as the leader's address (`registry-leader`). Default:
    /// `http://` and the listen address, which must then not be a
    /// wildcard (0.0.0.0 or ::).
    #[arg(long, env = "REGISTRY_ADVERTISE_URL", value_name = "URL")]
    pub advertise_url: Option<String>,

    /// PEM CA bundle; when set, every client must present a certificate it
    /// signed (mTLS), and a node's certificate must name its node_id.
    #[arg(
        long,
        env = "REGISTRY_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        let timing = Timing::default();
        Self {
            node_timeout: timing.node_timeout,
            heartbeat_interval: timing.heartbeat_interval,
            offline_retention: timing.offline_retention,
            max_clock_skew: Duration::from_secs(3600),
            max_message_size: 1024 * 1024,
            max_heartbeat_message_size: 64 * 1024,
            max_buffered_bytes_per_connection: 4 * 1024 * 1024,
            max_buffered_bytes: 128 * 1024 * 1024,
            max_streams_per_connection: 1024,
            max_connections: 16_384,
            max_connections_per_address: 4096,
            connection_threads: Some(0),
            max_nodes: 200_000,
            max_page_size: 1000,
            max_heartbeat_streams: 250_000,
            max_concurrent_registrations: 128,
            max_queued_registrations: 16384,
            max_registration_wait: Duration::from_secs(3),
            max_registration_lag: Duration::ZERO,
            watch_history: 100_000,
            watch_queue: 10_000,
            watch_progress_interval: Duration::from_secs(10),
            max_watchers: 10_000,
            mass_offline_threshold: Share(GuardConfig::default().threshold),
            mass_offline_min_nodes: GuardConfig::default().min_nodes,
            mass_offline_protection: GuardConfig::default().protection,
            revision_base: RevisionBase::Clock,
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            auth_token_file: None,
            auth_token: None,
            insecure_no_auth: false,
            disable_reflection: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            store: StoreKind::Memory,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            reset_store: false,
            etcd_endpoints: Vec::new(),
            etcd_prefix: "/gpu-registry".into(),
            etcd_lease_ttl: Duration::from_secs(10),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_user: None,
            etcd_password_file: None,
            etcd_password: None,
            advertise_url: None,
        }
    }
}

impl Settings {
    /// How many connection threads to start (0: none): the flag's count,
    /// or by default one per CPU core the process may use.
    pub fn connection_threads(&self) -> usize {
        self.connection_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// The timing rules of the registry.
    pub fn timing(&self) -> Timing {
        Timing {
            node_timeout: self.node_timeout,
            heartbeat_interval: self.heartbeat_interval,
            offline_retention: self.offline_retention,
        }
    }

    /// The mass-failure guard's settings.
    pub fn guard(&self) -> GuardConfig {
        GuardConfig {
            threshold: self.mass_offline_threshold.0,
            min_nodes: self.mass_offline_min_nodes,
            protection: self.mass_offline_protection,
        }
    }

    /// Refuses to serve on a non-loopback `addr` when no token source is
    /// configured, unless `--insecure-no-auth` says so. `main` asks before
    /// binding anything; [`crate::run`] asks again once the token files are
    /// read (a file may hold no token).
    pub fn check_exposure(&self, addr: SocketAddr, open: bool) -> Result<(), String> {
        if open && !addr.ip().is_loopback() && !self.insecure_no_auth {
            return Err(format!(
                "refusing to listen on {addr} without authentication: configure --auth-token-file or REGISTRY_AUTH_TOKEN, listen on a loopback address, or pass --insecure-no-auth"
            ));
        }
        Ok(())
    }

    /// Whether no token source is configured at all.
    pub fn has_no_token_source(&self) -> bool {
        self.auth_token_file.is_none() && self.auth_token.is_none()
    }

    /// Refuses settings that cannot work, with the reason.
    pub fn check(&self) -> Result<(), String> {
        if self.node_timeout.is_zero() || self.heartbeat_interval.is_zero() {
            return Err("--node-timeout and --heartbeat-interval must be above zero".into());
        }
        if self.heartbeat_interval >= self.node_timeout {
            return Err(format!(
                "--heartbeat-interval ({}) must be shorter than --node-timeout ({}), or every node would flap OFFLINE",
                humantime::format_duration(self.heartbeat_interval),
                humantime::format_duration(self.node_timeout)
            ));
        }
        if self.max_message_size < 4096 {
            return Err("--max-message-size must be at least 4096 bytes".into());
        }
        if self.max_heartbeat_message_size < 1024
            || self.max_heartbeat_message_size > self.max_message_size
        {
            return Err(
                "--max-heartbeat-message-size must be at least 1024 bytes and at most --max-message-size"
                    .into(),
            );
        }
        if self.max_buffered_bytes_per_connection < self.max_message_size
            || self.max_buffered_bytes < self.max_buffered_bytes_per_connection
        {
            return Err("--max-buffered-bytes-per-connection must be at least --max-message-size (or no message of the largest size could arrive), and --max-buffered-bytes at least --max-buffered-bytes-per-connection".into());
        }
        if self.connection_threads() > MAX_CONNECTION_THREADS {
            return Err(format!(
                "--connection-threads must be at most {MAX_CONNECTION_THREADS} (a thread each)"
            ));
        }
        if self.max_streams_per_connection == 0
            || self.max_connections == 0
            || self.max_connections_per_address == 0
            || self.max_nodes == 0
            || self.max_heartbeat_streams == 0
            || self.max_concurrent_registrations == 0
            || self.max_page_size == 0
            || self.watch_history == 0
            || self.watch_queue == 0
            || self.max_watchers == 0
        {
            return Err(
                "--max-streams-per-connection, --max-connections, --max-connections-per-address, --max-nodes, --max-page-size, --max-heartbeat-streams, --max-concurrent-registrations, --watch-history, --watch-queue and --max-watchers must be at least 1"
                    .into(),
            );
        }
        if self.max_registration_wait.is_zero() {
            return Err("--max-registration-wait must be above zero".into());
        }
        if self.watch_progress_interval.is_zero() {
            return Err("--watch-progress-interval must be above zero".into());
        }
        if self.request_timeout.is_zero() {
            return Err("--request-timeout must be above zero".into());
        }
        if self.guard().enabled() && self.mass_offline_protection.is_zero() {
            return Err(
                "--mass-offline-protection must be above zero (switch the guard off with --mass-offline-threshold 0)"
                    .into(),
            );
        }
        if self.store == StoreKind::Etcd {
            if self.etcd_endpoints.is_empty() {
                return Err(
                    "--store etcd needs --etcd-endpoints (etcd client URLs, comma-separated)"
                        .into(),
                );
            }
            if let Some(bad) = self
                .etcd_endpoints
                .iter()
                .find(|url| !(url.starts_with("http://") || url.starts_with("https://")))
            {
                return Err(format!(
                    "--etcd-endpoints: {bad:?} is not an http:// or https:// URL"
                ));
            }
            // etcd's certificates are checked against --etcd-ca only (no
            // system roots): without it an https:// member could not be
            // verified, and would fail later with a less clear error.
            if let Some(tls) = self
                .etcd_endpoints
                .iter()
                .find(|url| url.starts_with("https://"))
                .filter(|_| self.etcd_ca.is_none())
            {
                return Err(format!(
                    "--etcd-endpoints: {tls:?} is https:// but no --etcd-ca is given: \
                     the registry verifies etcd's certificate against that CA only"
                ));
            }
            if self.etcd_lease_ttl < Duration::from_secs(2) {
                return Err("--etcd-lease-ttl must be at least 2s".into());
            }
            if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.ends_with('/') {
                return Err(
                    "--etcd-prefix must start with '/' and not end with one (e.g. /gpu-registry)"
                        .into(),
                );
            }
            if self.etcd_user.is_some()
                && self.etcd_password.is_none()
                && self.etcd_password_file.is_none()
            {
                return Err(
                    "--etcd-user needs --etcd-password-file (or REGISTRY_ETCD_PASSWORD)".into(),
                );
            }
        }
        if self.store == StoreKind::Embedded && self.data_dir.as_os_str().is_empty() {
            return Err("--data-dir must name a directory for --store embedded".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let cli = Cli::try_parse_from(["registry-server"]).unwrap();
        assert_eq!(cli.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(cli.metrics_addr(), Some("0.0.0.0:9464".parse().unwrap()));
        assert_eq!(cli.worker_threads, None, "tokio's default: one per core");
        assert_eq!(cli.huge_pages, HugePages::Off);
        let settings = cli.settings();
        // The binary keeps its state in a file; tests (Settings::default)
        // keep it in memory.
        assert_eq!(settings.store, StoreKind::Embedded);
        assert_eq!(settings.data_dir, PathBuf::from("/var/lib/registry"));
        assert!(!settings.reset_store);
        // The binary serves connections on one thread per core and checks
        // its runtimes' lag; tests serve on the runtime they run in, whose
        // clock they may pause, and check no lag.
        assert_eq!(settings.connection_threads, None);
        assert_eq!(settings.max_registration_lag, Duration::from_millis(10));
        assert_eq!(
            Settings {
                store: StoreKind::Memory,
                connection_threads: Some(0),
                max_registration_lag: Duration::ZERO,
                ..settings.clone()
            },
            Settings::default()
        );
        assert_eq!(settings.node_timeout, Duration::from_secs(30));
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(settings.offline_retention, Duration::from_secs(3600));
        settings.check().unwrap();
    }

    #[test]
    fn https_etcd_endpoints_need_the_ca_that_signs_them() {
        let tls = Settings {
            store: StoreKind::Etcd,
            etcd_endpoints: vec!["https://etcd-a:2379".into()],
            ..Settings::default()
        };
        let err = tls.check().unwrap_err();
        assert!(err.contains("--etcd-ca"), "{err}");
        Settings {
            etcd_ca: Some(PathBuf::from("/etc/registry/etcd-ca.pem")),
            ..tls
        }
        .check()
        .unwrap();
    }

    #[test]
    fn the_embedded_store_needs_a_data_dir() {
        // On the command line clap refuses an empty path itself.
        let err = Cli::try_parse_from(["registry-server", "--data-dir", ""]).unwrap_err();
        assert!(err.to_string().contains("--data-dir"), "{err}");
        let embedded = Settings {
            store: StoreKind::Embedded,
            data_dir: PathBuf::new(),
            ..Settings::default()
        };
        let err = embedded.check().unwrap_err();
        assert!(err.contains("--data-dir"), "{err}");
        let memory = Settings {
            data_dir: PathBuf::new(),
            ..Settings::default()
        };
        memory.check().unwrap();
    }

    #[test]
    fn durations_take_humantime_form() {
        let cli = Cli::try_parse_from([
            "registry-server",
            "--node-timeout",
            "2s",
            "--heartbeat-interval",
            "500ms",
            "--offline-retention",
            "10m",
            "--log-format",
            "json",
        ])
        .unwrap();
        let settings = cli.settings();
        assert_eq!(settings.node_timeout, Duration::from_secs(2));
        assert_eq!(settings.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(settings.offline_retention, Duration::from_secs(600));
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["registry-server", "--node-timeout", "soon"]).is_err());
        let one = Cli::try_parse_from(["registry-server", "--worker-threads", "1"]).unwrap();
        assert_eq!(one.worker_threads.map(|n| n.get()), Some(1));
        let zero = Cli::try_parse_from(["registry-server", "--worker-threads", "0"]).unwrap_err();
        assert!(zero.to_string().contains("--worker-threads"), "{zero}");
        let threads = |n: &str| {
            Cli::try_parse_from(["registry-server", "--connection-threads", n])
                .unwrap()
                .settings()
        };
        assert_eq!(threads("0").connection_threads(), 0, "0: on the workers");
        assert_eq!(threads("3").connection_threads(), 3);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(
            Cli::try_parse_from(["registry-server"])
                .unwrap()
                .settings()
                .connection_threads(),
            cores
        );
        let too_many = threads("1025").check().unwrap_err();
        assert!(too_many.contains("--connection-threads"), "{too_many}");
        threads("1024").check().unwrap();
        let off = Cli::try_parse_from(["registry-server", "--metrics-listen", "off"]).unwrap();
        assert_eq!(off.metrics_addr(), None);
        assert!(Cli::try_parse_from(["registry-server", "--metrics-listen", "nine"]).is_err());
        let on = Cli::try_parse_from(["registry-server", "--huge-pages", "on"]).unwrap();
        assert_eq!(on.huge_pages, HugePages::On);
        let bad = Cli::try_parse_from(["registry-server", "--huge-pages", "2m"]).unwrap_err();
        assert!(bad.to_string().contains("--huge-pages"), "{bad}");
    }

    #[test]
    fn a_short_timeout_alone_works_and_metrics_follow_the_listen_host() {
        let cli = Cli::try_parse_from([
            "registry-server",
            "--listen",
            "127.0.0.1:50061",
            "--node-timeout",
            "5s",
        ])
        .unwrap();
        let settings = cli.settings();
        assert_eq!(settings.heartbeat_interval, Duration::from_millis(1666));
        settings.check().unwrap();
        assert_eq!(cli.metrics_addr(), Some("127.0.0.1:9464".parse().unwrap()));
        let long = Cli::try_parse_from(["registry-server", "--node-timeout", "2m"]).unwrap();
        assert_eq!(long.settings().heartbeat_interval, Duration::from_secs(10));
        let given = Cli::try_parse_from([
            "registry-server",
            "--node-timeout",
            "5s",
            "--heartbeat-interval",
            "4s",
            "--metrics-listen",
            "127.0.0.2:9999",
        ])
        .unwrap();
        assert_eq!(given.settings().heartbeat_interval, Duration::from_secs(4));
        assert_eq!(
            given.metrics_addr(),
            Some("127.0.0.2:9999".parse().unwrap())
        );
    }

    #[test]
    fn an_open_registry_stays_on_loopback() {
        let settings = Settings::default();
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert!(settings.check_exposure(public, true).is_err());
        settings.check_exposure(public, false).unwrap();
        settings
            .check_exposure("127.0.0.1:50051".parse().unwrap(), true)
            .unwrap();
        let insecure = Settings {
            insecure_no_auth: true,
            ..Settings::default()
        };
        insecure.check_exposure(public, true).unwrap();
    }

    #[test]
    fn the_guard_takes_a_share_a_floor_and_a_protection_time() {
        let cli = Cli::try_parse_from(["registry-server"]).unwrap();
        assert_eq!(cli.settings().guard(), GuardConfig::default());
        let cli = Cli::try_parse_from([
            "registry-server",
            "--mass-offline-threshold",
            "30%",
            "--mass-offline-min-nodes",
            "3",
            "--mass-offline-protection",
            "90s",
        ])
        .unwrap();
        let guard = cli.settings().guard();
        assert!((guard.threshold - 0.3).abs() < 1e-9);
        assert_eq!(guard.min_nodes, 3);
        assert_eq!(guard.protection, Duration::from_secs(90));
        assert!(guard.enabled());
        for off in ["0", "1", "100%"] {
            let cli =
                Cli::try_parse_from(["registry-server", "--mass-offline-threshold", off]).unwrap();
            assert!(!cli.settings().guard().enabled(), "{off}");
        }
        for bad in ["1.5", "-0.1", "half", "120%"] {
            assert!(
                Cli::try_parse_from(["registry-server", "--mass-offline-threshold", bad]).is_err(),
                "{bad}"
            );
        }
        let no_time = Settings {
            mass_offline_protection: Duration::ZERO,
            ..Settings::default()
        };
        assert!(
            no_time
                .check()
                .unwrap_err()
                .contains("--mass-offline-protection")
        );
    }

    #[test]
    fn an_interval_not_below_the_timeout_is_refused() {
        let settings = Settings {
            heartbeat_interval: Duration::from_secs(30),
            ..Settings::default()
        };
        assert!(
            settings
                .check()
                .unwrap_err()
                .contains("shorter than --node-timeout")
        );
    }
}
