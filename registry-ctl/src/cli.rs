//! Command line of registry-ctl.

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// A small gRPC client of the node registry, for container HEALTHCHECKs
/// and scripts.
///
/// Exit status: 0 when the command succeeded (for `health` and
/// `agent-check`: when the answer was healthy), 1 when the answer was
/// unhealthy or the registry could not be asked, 2 for a usage error.
#[derive(Debug, Clone, Parser)]
#[command(name = "registry-ctl", version, about)]
pub struct Cli {
    /// The registry's gRPC endpoint ("http://HOST:PORT", or "HOST:PORT")
    /// [default: per command, see its help].
    #[arg(long, global = true, env = "REGISTRY_CTL_REGISTRY", value_name = "URL")]
    pub registry: Option<String>,

    /// Bearer token for the registry's calls (a reader token for `list`,
    /// `status` and `agent-check`); `health` needs none.
    #[arg(
        long,
        global = true,
        env = "REGISTRY_CTL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Bound on connecting and on each call ("3s", "500ms").
    #[arg(long, global = true, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Asks the gRPC health service (grpc.health.v1) whether the server is
    /// SERVING; exits 0 if so, 1 otherwise. Without --registry it asks the
    /// registry of this container: REGISTRY_LISTEN with a wildcard address
    /// turned into 127.0.0.1, else http://127.0.0.1:50051.
    Health {
        /// The service to ask about; empty means the whole server.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Lists the registry's nodes, one line each [default registry:
    /// http://127.0.0.1:50051].
    List {
        /// Only nodes with this status.
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// Only nodes that run this pool.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Prints the status of one node: "online", "offline", or "absent" when
    /// the registry does not know it [default registry:
    /// http://127.0.0.1:50051].
    Status {
        /// The node.
        node_id: String,
    },
    /// Exits 0 when the registry lists this container's node-agent ONLINE,
    /// 1 otherwise: the node-agent image's HEALTHCHECK. The registry and the
    /// node id are resolved exactly as the agent resolves them, from its
    /// command line (read from /proc/PID/cmdline), its NODE_AGENT_*
    /// environment and its config file.
    AgentCheck {
        /// Process id of the node-agent whose command line to read; when
        /// that process is not a node-agent, only the environment counts.
        #[arg(long, default_value_t = 1)]
        pid: u32,
    },
}

/// Node status filter of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    /// ONLINE nodes.
    Online,
    /// OFFLINE nodes.
    Offline,
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
        ])
        .unwrap();
        assert_eq!(cli.registry.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(cli.timeout, Duration::from_millis(500));
        assert!(matches!(cli.command, Command::Status { node_id } if node_id == "node-a"));
    }

    #[test]
    fn list_filters_parse() {
        let cli =
            Cli::try_parse_from(["registry-ctl", "list", "--status", "offline", "--pool", "p"])
                .unwrap();
        match cli.command {
            Command::List { status, pool } => {
                assert_eq!(status, Some(StatusFilter::Offline));
                assert_eq!(pool.as_deref(), Some("p"));
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
