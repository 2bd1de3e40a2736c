//! `get NODE`: one node in full.

use std::io::Write;

use super::Context;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer, node};

/// Prints the node (table: a description with its pools and GPUs; JSON:
/// the Node object). Exit 1, with a line on stderr, when the registry does
/// not know it.
pub async fn run<W: Write>(
    context: &Context,
    node_id: &str,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let registry = context.query_registry().await?;
    let Some(found) = registry.node(node_id).await? else {
        eprintln!(
            "registry-ctl: node {node_id:?} is not registered at {}",
            registry.url()
        );
        return Ok(Exit::No);
    };
    match printer.format() {
        Format::Table => printer.text(&node::describe(&found, context.now, false))?,
        Format::Wide => printer.text(&node::describe(&found, context.now, true))?,
        Format::Json => printer.message(&found)?,
    }
    Ok(Exit::Ok)
}
