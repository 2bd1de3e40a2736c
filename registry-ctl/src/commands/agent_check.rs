//! `agent-check`: the node-agent image's HEALTHCHECK.

use std::io::Write;

use super::Context;
use crate::agent;
use crate::client::Registry;
use crate::endpoint;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer, node};

/// Resolves the node-agent of process `pid` as the agent does, asks its
/// registry about its node and prints "NODE is WORD at URL" (JSON:
/// `{"nodeId", "status", "registry"}`). Exit 0 when ONLINE, 1 otherwise.
/// Towards an https:// registry the agent's TLS settings are used unless
/// TLS flags are given; its token is not (a node token may not call
/// GetNode).
pub async fn run<W: Write>(
    context: &Context,
    pid: u32,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let target = agent::resolve(&agent::agent_args(pid))?;
    let list = context
        .registry
        .as_deref()
        .map_or(target.registry, endpoint::normalize_list);
    let mut options = context
        .credentials
        .towards(endpoint::parse(&list)?, context.timeout);
    if !options.tls.is_set() && options.urls.iter().any(|url| url.starts_with("https://")) {
        options.tls = target.tls;
    }
    let registry = Registry::connect(&options).await?;
    let found = registry.node(&target.node_id).await?;
    let word = node::status_word(found.as_ref());
    match printer.format() {
        Format::Table | Format::Wide => printer.text(&format!(
            "{} is {word} at {}\n",
            target.node_id,
            registry.url()
        ))?,
        Format::Json => printer.value(&serde_json::json!({
            "nodeId": target.node_id,
            "status": word,
            "registry": registry.url(),
        }))?,
    }
    Ok(Exit::from_answer(word == "online"))
}
