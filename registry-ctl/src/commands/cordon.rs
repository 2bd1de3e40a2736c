//! `cordon NODE` and `uncordon NODE`: take a node out of placement and put
//! it back (CordonNode, UncordonNode; admin token).

use std::io::Write;

use registry_proto::pb;

use super::Context;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer, admin};

/// Cordons the node and prints what the registry now holds (JSON: the
/// Node). Exit 1 when the registry does not know the node.
pub async fn cordon<W: Write>(
    context: &Context,
    node_id: &str,
    reason: &str,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let request = pb::CordonNodeRequest {
        node_id: node_id.to_owned(),
        reason: reason.to_owned(),
    };
    let node = context.admin_registry().await?.cordon_node(request).await?;
    print(printer, &node, admin::cordoned)
}

/// Uncordons the node (a drain in progress stays).
pub async fn uncordon<W: Write>(
    context: &Context,
    node_id: &str,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let request = pb::UncordonNodeRequest {
        node_id: node_id.to_owned(),
    };
    let node = context
        .admin_registry()
        .await?
        .uncordon_node(request)
        .await?;
    print(printer, &node, admin::uncordoned)
}

/// The node an admin call answered with: `line` for people, the Node
/// message for JSON.
pub(super) fn print<W: Write>(
    printer: &mut Printer<W>,
    node: &pb::Node,
    line: fn(&pb::Node) -> String,
) -> Result<Exit, CtlError> {
    match printer.format() {
        Format::Table | Format::Wide => printer.text(&line(node))?,
        Format::Json => printer.message(node)?,
    }
    Ok(Exit::Ok)
}
