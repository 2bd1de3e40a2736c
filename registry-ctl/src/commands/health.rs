//! `health`: the registry-server image's HEALTHCHECK.

use std::io::Write;

use tonic_health::pb::HealthCheckResponse;
use tonic_health::pb::health_check_response::ServingStatus;

use super::Context;
use crate::client::Registry;
use crate::endpoint;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer};

/// Asks the health service about `service` and prints the answer
/// ("serving"; JSON: the HealthCheckResponse). Exit 0 when SERVING, 1
/// otherwise.
pub async fn run<W: Write>(
    context: &Context,
    service: &str,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let listen = std::env::var("REGISTRY_LISTEN").ok();
    let url = endpoint::for_health(context.registry.as_deref(), listen.as_deref());
    let status = Registry::connect(&context.credentials.towards(url, context.timeout))
        .await?
        .health(service)
        .await?;
    match printer.format() {
        Format::Table | Format::Wide => {
            printer.text(&format!("{}\n", status.as_str_name().to_lowercase()))?;
        }
        Format::Json => printer.message(&HealthCheckResponse {
            status: status as i32,
        })?,
    }
    Ok(Exit::from_answer(status == ServingStatus::Serving))
}
