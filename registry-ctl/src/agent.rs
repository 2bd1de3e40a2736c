//! Which node a node-agent speaks for, resolved the way the agent does it.

use clap::Parser;

use crate::error::CtlError;

/// The registry, node id and TLS settings of a node-agent.
#[derive(Debug, Clone)]
pub struct AgentTarget {
    /// The registry the agent registers with.
    pub registry: String,
    /// The node the agent speaks for.
    pub node_id: String,
    /// The agent's TLS settings towards the registry.
    pub tls: node_agent::TlsConfig,
}

/// The node-agent arguments of process `pid`: its command line when that
/// process runs `node-agent`, otherwise none (the environment alone).
pub fn agent_args(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|cmdline| node_agent_cmdline(&cmdline))
        .unwrap_or_else(|| vec!["node-agent".to_owned()])
}

/// The arguments in a `/proc/PID/cmdline` (NUL-separated) when its program
/// is `node-agent`.
fn node_agent_cmdline(cmdline: &[u8]) -> Option<Vec<String>> {
    let args: Vec<String> = cmdline
        .split(|byte| *byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    let program = args.first()?;
    let name = program.rsplit('/').next().unwrap_or(program);
    (name == "node-agent").then_some(args)
}

/// Resolves `args` plus the `NODE_AGENT_*` environment plus the config file
/// with node-agent's own configuration code, so the check can never
/// disagree with the agent about its node.
pub fn resolve(args: &[String]) -> Result<AgentTarget, CtlError> {
    let cli = node_agent::Cli::try_parse_from(args)
        .map_err(|err| CtlError::AgentConfig(err.to_string()))?;
    let config = node_agent::AgentConfig::from_cli(cli)
        .map_err(|err| CtlError::AgentConfig(err.to_string()))?;
    Ok(AgentTarget {
        registry: config.registry,
        node_id: config.node_id,
        tls: config.tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_node_agent_command_line_is_taken() {
        assert_eq!(
            node_agent_cmdline(b"/usr/local/bin/node-agent\0--node-id\0n1\0"),
            Some(vec![
                "/usr/local/bin/node-agent".to_owned(),
                "--node-id".to_owned(),
                "n1".to_owned()
            ])
        );
        assert_eq!(
            node_agent_cmdline(b"/sbin/docker-init\0--\0node-agent\0"),
            None
        );
        assert_eq!(node_agent_cmdline(b""), None);
    }

    #[test]
    fn flags_resolve_like_the_agent() {
        let args = [
            "node-agent",
            "--registry",
            "http://registry:50051",
            "--node-id",
            "node-a",
            "--machine-id",
            "m",
            "--address",
            "http://node-a:9200",
        ]
        .map(str::to_owned);
        let target = resolve(&args).unwrap();
        assert_eq!(target.registry, "http://registry:50051");
        assert_eq!(target.node_id, "node-a");
        assert!(!target.tls.is_set());
    }
}
