//! Command line of registry-ctl.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::exit::EXIT_STATUS_HELP;
use crate::output::Format;

/// A small gRPC client of the node registry, for people, scripts and
/// container HEALTHCHECKs.
#[derive(Debug, Clone, Parser)]
#[command(name = "registry-ctl", version, about, after_help = EXIT_STATUS_HELP)]
pub struct Cli {
    /// The registry's gRPC endpoint ("http://HOST:PORT", "https://HOST:PORT",
    /// or "HOST:PORT" for http), or its replicas' endpoints separated by
    /// commas: reads go to the first that answers, writes to the leader
    /// [default: per command, see its help].
    #[arg(long, global = true, env = "REGISTRY_CTL_REGISTRY", value_name = "URL")]
    pub registry: Option<String>,

    /// Bearer token for the registry's calls (a reader token for `list`,
    /// `get`, `status`, `watch` and `agent-check`; an admin token for
    /// `cordon`, `uncordon`, `drain` and `undrain`); `health` needs none. An empty
    /// value sends none. Prefer --token-file or the variable: flags show in
    /// `ps`.
    #[arg(
        long,
        global = true,
        env = "REGISTRY_CTL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// File holding the bearer token alone (surrounding whitespace is
    /// ignored).
    #[arg(
        long,
        global = true,
        env = "REGISTRY_CTL_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,

    /// PEM CA bundle that signs the registry's certificate; required for
    /// an https:// registry (this build trusts no CA by itself).
    #[arg(long, global = true, env = "REGISTRY_CTL_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate, for a registry that requires mTLS.
    #[arg(
        long,
        global = true,
        env = "REGISTRY_CTL_TLS_CERT",
        value_name = "FILE"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "REGISTRY_CTL_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Name to verify the registry's certificate against
    /// [default: the registry URL's host].
    #[arg(
        long,
        global = true,
        env = "REGISTRY_CTL_TLS_DOMAIN",
        value_name = "NAME"
    )]
    pub tls_domain: Option<String>,

    /// Bound on connecting and on each call ("3s", "500ms").
    #[arg(long, global = true, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Output format: `table` (aligned columns for people), `wide` (more
    /// columns), or `json` (proto3 canonical JSON, one object per line).
    #[arg(
        long,
        short = 'o',
        global = true,
        value_enum,
        default_value_t = Format::Table,
        value_name = "FORMAT"
    )]
    pub output: Format,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Asks the gRPC health service (grpc.health.v1) whether the server is
    /// SERVING; exits 0 if so, 1 if not, 3 when it cannot ask. Without
    /// --registry it asks the registry of this container: REGISTRY_LISTEN
    /// with a wildcard address turned into 127.0.0.1, else
    /// http://127.0.0.1:50051.
    Health {
        /// The service to ask about; empty means the whole server.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Lists the registry's nodes, one line each; exits 1 when no node
    /// matches [default registry: http://127.0.0.1:50051].
    List {
        /// Only nodes with this status.
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// Only nodes that run this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Only nodes carrying this label (KEY=VALUE); repeatable, all must
        /// match.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Finds the best pools for a model (FindPools): READY pools on ONLINE
    /// nodes, most free VRAM first, then most free slots; exits 1 with the
    /// registry's reason on stderr when none qualifies
    /// [default registry: http://127.0.0.1:50051].
    Find(FindArgs),
    /// Lists the models the fleet serves or has staged (ListModels): nodes,
    /// pools, READY pools, free/total slots and the nodes that only have a
    /// model staged; exits 1 when none is listed
    /// [default registry: http://127.0.0.1:50051].
    Models {
        /// Only this model.
        model: Option<String>,
    },
    /// Follows the registry's changes, one line per event (table: REVISION
    /// TYPE NODE STATUS POOLS; json: one WatchNodesResponse per line),
    /// until interrupted. Starts with a snapshot (every matching node as
    /// ADDED, then SNAPSHOT_COMPLETE) unless --from-revision is given. When
    /// the registry ends the watch as too slow (RESOURCE_EXHAUSTED) or
    /// restarts (UNAVAILABLE), it reconnects from the last revision seen;
    /// when that revision is compacted (OUT_OF_RANGE) it says so and exits
    /// 4 [default registry: http://127.0.0.1:50051].
    Watch {
        /// Only nodes with this status (one that leaves it shows as
        /// DELETED, one that enters it as ADDED).
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// Only nodes that run this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Only nodes carrying this label (KEY=VALUE); repeatable, all must
        /// match.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Only nodes with a pool serving this model.
        #[arg(long)]
        model: Option<String>,
        /// Every change after this revision (the last one a previous watch
        /// printed, or a ListNodes revision) instead of a snapshot.
        #[arg(long, value_name = "R", default_value_t = 0)]
        from_revision: u64,
    },
    /// Shows one node: its status, pools and GPUs; exits 1 when the
    /// registry does not know it [default registry: http://127.0.0.1:50051].
    Get {
        /// The node.
        node_id: String,
    },
    /// Prints the status of one node: "online", "offline", or "absent" when
    /// the registry does not know it; exits 0 for all three
    /// [default registry: http://127.0.0.1:50051].
    Status {
        /// The node.
        node_id: String,
    },
    /// Exits 0 when the registry lists this container's node-agent ONLINE,
    /// 1 when it is OFFLINE or absent, 3 when the registry cannot be asked:
    /// the node-agent image's HEALTHCHECK. The registry, the node id and
    /// (unless TLS flags are given) the TLS settings are resolved exactly
    /// as the agent resolves them, from its command line (read from
    /// /proc/PID/cmdline), its NODE_AGENT_* environment and its config file.
    AgentCheck {
        /// Process id of the node-agent whose command line to read; when
        /// that process is not a node-agent, only the environment counts.
        #[arg(long, default_value_t = 1)]
        pid: u32,
    },
    /// Takes a node out of placement (CordonNode): FindPools stops offering
    /// its pools; it stays ONLINE and keeps serving what it has. Idempotent.
    /// Needs an admin token; exits 1 when the registry does not know the
    /// node [default registry: http://127.0.0.1:50051].
    Cordon {
        /// The node.
        node_id: String,
        /// Why, shown on the node (at most 256 bytes).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Puts a cordoned node back into placement (UncordonNode). A drain in
    /// progress is left alone (`undrain` cancels it). Idempotent; needs an
    /// admin token [default registry: http://127.0.0.1:50051].
    Uncordon {
        /// The node.
        node_id: String,
    },
    /// Asks the node's agent to drain pools (DrainNode): they finish their
    /// requests and take no new ones, and placement stops offering the
    /// node. With --wait, follows the node and prints its progress until it
    /// is drained (exit 0), the drain is cancelled (exit 1) or
    /// --wait-timeout passes (exit 5; the drain goes on). Needs an admin
    /// token [default registry: http://127.0.0.1:50051].
    Drain(DrainArgs),
    /// Cancels the node's drain (CancelDrain): the agent resumes the pools.
    /// Needs an admin token [default registry: http://127.0.0.1:50051].
    Undrain {
        /// The node.
        node_id: String,
    },
    /// Prints a shell completion script. Bash: `registry-ctl completions
    /// bash > /etc/bash_completion.d/registry-ctl`; zsh: into a directory
    /// of $fpath as `_registry-ctl`; fish: into
    /// ~/.config/fish/completions/registry-ctl.fish.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// The arguments of `drain`.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs {
    /// The node.
    pub node_id: String,
    /// Only this pool; repeatable [default: every pool of the node].
    #[arg(long = "pool", value_name = "POOL")]
    pub pools: Vec<String>,
    /// Why, shown on the node and sent to the agent (at most 256 bytes).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Count the drain done this long from now even if pools are still
    /// busy ("10m", "1h") [default: no deadline].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub deadline: Option<Duration>,
    /// Follow the node until it is drained, one line per change in its
    /// progress (acknowledged, drained, each drained pool's state and busy
    /// slots).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit 5) after this long. Not --timeout, which
    /// bounds each call [default: wait as long as it takes].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "wait")]
    pub wait_timeout: Option<Duration>,
}

/// The filters of `find`.
#[derive(Debug, Clone, clap::Args)]
pub struct FindArgs {
    /// The model to serve.
    #[arg(long)]
    pub model: String,
    /// Only pools of this engine ("vllm").
    #[arg(long)]
    pub engine: Option<String>,
    /// Only pools with at least this many free slots [registry default: 1;
    /// 0 also offers full pools].
    #[arg(long, value_name = "N")]
    pub min_slots: Option<u32>,
    /// Only pools with at least this much free GPU memory: bytes, or a
    /// size like 10GiB, 512MiB, 8GB.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub min_vram: Option<u64>,
    /// Only pools on nodes carrying this label (KEY=VALUE); repeatable,
    /// all must match.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Only pools whose every GPU's name contains this text, ignoring case
    /// ("h100").
    #[arg(long, value_name = "NAME")]
    pub gpu: Option<String>,
    /// Only pools whose every GPU has at least this compute capability
    /// ("8.0"; major then minor, compared as numbers).
    #[arg(long, value_name = "MAJOR.MINOR")]
    pub min_compute_capability: Option<String>,
    /// Only pools running on MIG slices, all of this profile ("1g.10gb");
    /// pools on whole GPUs never match.
    #[arg(long, value_name = "PROFILE")]
    pub mig_profile: Option<String>,
    /// Only pools of this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Never pools of this node; repeatable.
    #[arg(long, value_name = "NODE")]
    pub exclude: Vec<String>,
    /// How many pools to print, best first (1-100) [registry default: 1].
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
}

impl FindArgs {
    /// The query of these flags.
    pub fn query(&self) -> crate::commands::find::Query {
        crate::commands::find::Query {
            model: self.model.clone(),
            engine: self.engine.clone(),
            min_slots: self.min_slots,
            min_vram: self.min_vram,
            labels: self.labels.clone(),
            gpu: self.gpu.clone(),
            min_compute_capability: self.min_compute_capability.clone(),
            mig_profile: self.mig_profile.clone(),
            node: self.node.clone(),
            exclude: self.exclude.clone(),
            limit: self.limit,
        }
    }
}

/// A size in bytes: a plain number, or a number with a unit (B, KB, MB,
/// GB, TB in powers of 1000; KiB, MiB, GiB, TiB in powers of 1024), unit
/// case ignored.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let bad = || format!("expected bytes or a size like 10GiB, got {text:?}");
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(factor).ok_or_else(bad);
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = (value * factor as f64).round();
    if !(0.0..=u64::MAX as f64).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Node status filter of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    /// ONLINE nodes.
    Online,
    /// OFFLINE nodes.
    Offline,
}

/// A `KEY=VALUE` label filter.
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from([
            "registry-ctl",
            "status",
            "node-a",
            "--registry",
            "127.0.0.1:1",
            "--timeout",
            "500ms",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.registry.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(cli.timeout, Duration::from_millis(500));
        assert_eq!(cli.output, Format::Json);
        assert!(matches!(cli.command, Command::Status { node_id } if node_id == "node-a"));
    }

    #[test]
    fn the_healthchecks_command_lines_still_parse() {
        for command in ["health", "agent-check"] {
            let cli = Cli::try_parse_from(["registry-ctl", "--timeout", "3s", command]).unwrap();
            assert_eq!(cli.timeout, Duration::from_secs(3));
            assert_eq!(cli.output, Format::Table);
        }
    }

    #[test]
    fn list_filters_parse() {
        let cli = Cli::try_parse_from([
            "registry-ctl",
            "list",
            "--status",
            "offline",
            "--pool",
            "p",
            "--label",
            "zone=eu-1",
            "--label",
            "rack=",
        ])
        .unwrap();
        match cli.command {
            Command::List {
                status,
                pool,
                labels,
            } => {
                assert_eq!(status, Some(StatusFilter::Offline));
                assert_eq!(pool.as_deref(), Some("p"));
                assert_eq!(
                    labels,
                    vec![
                        ("zone".to_owned(), "eu-1".to_owned()),
                        ("rack".to_owned(), String::new())
                    ]
                );
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["registry-ctl", "list", "--label", "novalue"]).is_err());
        assert!(Cli::try_parse_from(["registry-ctl", "list", "--label", "=v"]).is_err());
    }

    #[test]
    fn watch_flags_parse() {
        let cli = Cli::try_parse_from([
            "registry-ctl",
            "watch",
            "--status",
            "online",
            "--model",
            "llama",
            "--label",
            "zone=eu-1",
            "--from-revision",
            "42",
        ])
        .unwrap();
        match cli.command {
            Command::Watch {
                status,
                pool,
                labels,
                model,
                from_revision,
            } => {
                assert_eq!(status, Some(StatusFilter::Online));
                assert_eq!(pool, None);
                assert_eq!(labels, vec![("zone".to_owned(), "eu-1".to_owned())]);
                assert_eq!(model.as_deref(), Some("llama"));
                assert_eq!(from_revision, 42);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn output_formats_and_shells_parse() {
        for (word, format) in [
            ("table", Format::Table),
            ("wide", Format::Wide),
            ("json", Format::Json),
        ] {
            let cli = Cli::try_parse_from(["registry-ctl", "--output", word, "get", "n"]).unwrap();
            assert_eq!(cli.output, format);
        }
        for shell in ["bash", "zsh", "fish"] {
            let cli = Cli::try_parse_from(["registry-ctl", "completions", shell]).unwrap();
            assert!(matches!(cli.command, Command::Completions { .. }));
        }
        assert!(Cli::try_parse_from(["registry-ctl", "get"]).is_err());
    }

    #[test]
    fn tls_and_token_flags_parse() {
        let cli = Cli::try_parse_from([
            "registry-ctl",
            "--registry",
            "https://registry:50051",
            "--token-file",
            "/run/secrets/token",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-domain",
            "registry.internal",
            "list",
        ])
        .unwrap();
        assert_eq!(cli.token_file, Some(PathBuf::from("/run/secrets/token")));
        assert_eq!(cli.tls_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(cli.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(cli.tls_key, Some(PathBuf::from("k.pem")));
        assert_eq!(cli.tls_domain.as_deref(), Some("registry.internal"));
    }

    #[test]
    fn find_flags_parse() {
        let cli = Cli::try_parse_from([
            "registry-ctl",
            "find",
            "--model",
            "llama-3.1-8b",
            "--engine",
            "vllm",
            "--min-slots",
            "0",
            "--min-vram",
            "10GiB",
            "--label",
            "zone=a",
            "--gpu",
            "H100",
            "--min-compute-capability",
            "8.0",
            "--mig-profile",
            "1g.10gb",
            "--node",
            "n1",
            "--exclude",
            "n2",
            "--exclude",
            "n3",
            "--limit",
            "3",
        ])
        .unwrap();
        let Command::Find(args) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        let query = args.query();
        assert_eq!(query.model, "llama-3.1-8b");
        assert_eq!(query.min_slots, Some(0));
        assert_eq!(query.min_vram, Some(10 << 30));
        assert_eq!(query.labels, [("zone".to_owned(), "a".to_owned())]);
        assert_eq!(query.exclude, ["n2", "n3"]);
        assert_eq!(query.limit, Some(3));
        assert_eq!(query.mig_profile.as_deref(), Some("1g.10gb"));
        assert!(
            Cli::try_parse_from(["registry-ctl", "find"]).is_err(),
            "--model is required"
        );
        let cli = Cli::try_parse_from(["registry-ctl", "models", "qwen"]).unwrap();
        assert!(matches!(cli.command, Command::Models { model: Some(m) } if m == "qwen"));
    }

    #[test]
    fn admin_commands_parse() {
        let cli = Cli::try_parse_from([
            "registry-ctl",
            "cordon",
            "gpu-node-1",
            "--reason",
            "bad fan",
        ])
        .unwrap();
        assert!(matches!(cli.command,
            Command::Cordon { node_id, reason } if node_id == "gpu-node-1" && reason == "bad fan"));
        let cli = Cli::try_parse_from(["registry-ctl", "cordon", "n"]).unwrap();
        assert!(matches!(cli.command, Command::Cordon { reason, .. } if reason.is_empty()));
        let cli = Cli::try_parse_from(["registry-ctl", "uncordon", "n"]).unwrap();
        assert!(matches!(cli.command, Command::Uncordon { node_id } if node_id == "n"));
        let cli = Cli::try_parse_from(["registry-ctl", "undrain", "n"]).unwrap();
        assert!(matches!(cli.command, Command::Undrain { node_id } if node_id == "n"));
        for args in [
            &["registry-ctl", "cordon"][..],
            &["registry-ctl", "uncordon"],
            &["registry-ctl", "undrain"],
            &["registry-ctl", "drain"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn drain_flags_parse() {
        let cli = Cli::try_parse_from([
            "registry-ctl",
            "drain",
            "gpu-node-1",
            "--pool",
            "pool-0",
            "--pool",
            "pool-1",
            "--reason",
            "kernel update",
            "--deadline",
            "10m",
            "--wait",
            "--wait-timeout",
            "15m",
            "--timeout",
            "5s",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Duration::from_secs(5));
        let Command::Drain(args) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(args.node_id, "gpu-node-1");
        assert_eq!(args.pools, ["pool-0", "pool-1"]);
        assert_eq!(args.reason, "kernel update");
        assert_eq!(args.deadline, Some(Duration::from_secs(600)));
        assert!(args.wait);
        assert_eq!(args.wait_timeout, Some(Duration::from_secs(900)));
        let cli = Cli::try_parse_from(["registry-ctl", "drain", "n"]).unwrap();
        let Command::Drain(args) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert!(args.pools.is_empty() && args.deadline.is_none() && !args.wait);
        // --wait-timeout means nothing without --wait; a bad duration is a
        // usage error.
        assert!(
            Cli::try_parse_from(["registry-ctl", "drain", "n", "--wait-timeout", "1m"]).is_err()
        );
        assert!(Cli::try_parse_from(["registry-ctl", "drain", "n", "--deadline", "soon"]).is_err());
    }

    #[test]
    fn sizes_parse_in_bytes_and_units() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_bytes("1.5gib"), Ok(3 << 29));
        assert_eq!(parse_bytes("8GB"), Ok(8_000_000_000));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert!(parse_bytes("10 parsecs").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }

    #[test]
    fn help_documents_the_exit_statuses() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit status:"), "{help}");
        assert!(help.contains("3  cannot reach the registry"), "{help}");
    }
}
