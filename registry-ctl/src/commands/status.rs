//! `status NODE`: one word for scripts.

use std::io::Write;

use super::Context;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer, node};

/// Prints "online", "offline" or "absent" (JSON: `{"nodeId":…,
/// "status":…}` with the same word). Exit 0 for all three: the registry
/// answered.
pub async fn run<W: Write>(
    context: &Context,
    node_id: &str,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let found = context.query_registry().await?.node(node_id).await?;
    let word = node::status_word(found.as_ref());
    match printer.format() {
        Format::Table | Format::Wide => printer.text(&format!("{word}\n"))?,
        Format::Json => printer.value(&serde_json::json!({
            "nodeId": node_id,
            "status": word,
        }))?,
    }
    Ok(Exit::Ok)
}
