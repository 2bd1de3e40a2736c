//! registry-ctl: a small gRPC client of the node registry. It is the
//! HEALTHCHECK of both container images (`health` for registry-server,
//! `agent-check` for node-agent) and gives scripts the registry's view of a
//! node (`list`, `status`).
//!
//! Module map: [`cli`] flags; [`endpoint`] which registry to ask;
//! [`client`] the calls; [`agent`] a node-agent's own configuration;
//! [`output`] printing.

mod agent;
mod cli;
mod client;
mod endpoint;
mod error;
mod output;

use std::process::ExitCode;

use clap::Parser;
use registry_proto::pb;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::cli::{Cli, Command, StatusFilter};
use crate::client::Registry;
use crate::error::CtlError;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("registry-ctl: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("registry-ctl: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; `Ok(false)` is an unhealthy answer.
async fn run(cli: Cli) -> Result<bool, CtlError> {
    let flag = cli.registry.as_deref();
    let token = cli.token.as_deref();
    match cli.command {
        Command::Health { service } => {
            let listen = std::env::var("REGISTRY_LISTEN").ok();
            let url = endpoint::for_health(flag, listen.as_deref());
            let status = Registry::connect(&url, cli.timeout, token)
                .await?
                .health(&service)
                .await?;
            println!("{}", status.as_str_name().to_lowercase());
            Ok(status == ServingStatus::Serving)
        }
        Command::List { status, pool } => {
            let status = match status {
                None => pb::NodeStatus::Unspecified,
                Some(StatusFilter::Online) => pb::NodeStatus::Online,
                Some(StatusFilter::Offline) => pb::NodeStatus::Offline,
            };
            let registry =
                Registry::connect(&endpoint::for_queries(flag), cli.timeout, token).await?;
            let nodes = registry
                .list_nodes(status, pool.as_deref().unwrap_or_default())
                .await?;
            print!("{}", output::node_table(&nodes));
            Ok(true)
        }
        Command::Status { node_id } => {
            let registry =
                Registry::connect(&endpoint::for_queries(flag), cli.timeout, token).await?;
            let node = registry.node(&node_id).await?;
            println!("{}", output::status_word(node.as_ref()));
            Ok(true)
        }
        Command::AgentCheck { pid } => {
            let target = agent::resolve(&agent::agent_args(pid))?;
            let url = flag.map_or(target.registry, endpoint::normalize);
            let registry = Registry::connect(&url, cli.timeout, token).await?;
            let node = registry.node(&target.node_id).await?;
            let word = output::status_word(node.as_ref());
            println!("{} is {word} at {url}", target.node_id);
            Ok(word == "online")
        }
    }
}
