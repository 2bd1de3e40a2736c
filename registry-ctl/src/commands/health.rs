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

/// The line printed under `serving` while the registry doubts itself.
pub const DEGRADED: &str = "degraded: the registry doubts its own view of the fleet (mass-failure guard or stall); nodes it doubts are ONLINE with suspect set and never offered for placement; the reason is on the metrics port's /health\n";

/// Asks the health service about `service` and prints the answer
/// ("serving"; JSON: the HealthCheckResponse). Exit 0 when SERVING, 1
/// otherwise. For the whole server (`service` empty) in text form it also
/// asks the registry's liveness entry and, while that is NOT_SERVING (the
/// registry doubts its own view of the fleet), prints a `degraded:` line;
/// the exit status does not change, since the registry works meanwhile.
pub async fn run<W: Write>(
    context: &Context,
    service: &str,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let listen = std::env::var("REGISTRY_LISTEN").ok();
    let url = endpoint::for_health(context.registry.as_deref(), listen.as_deref());
    let urls = endpoint::parse(&url)?;
    let registry = Registry::connect(&context.credentials.towards(urls, context.timeout)).await?;
    let status = registry.health(service).await?;
    match printer.format() {
        Format::Table | Format::Wide => {
            printer.text(&format!("{}\n", status.as_str_name().to_lowercase()))?;
            if service.is_empty() && status == ServingStatus::Serving {
                // An older registry has no such entry (NOT_FOUND): nothing
                // to add then.
                let liveness = registry
                    .health(registry_proto::LIVENESS_HEALTH_SERVICE)
                    .await;
                if matches!(liveness, Ok(s) if s != ServingStatus::Serving) {
                    printer.text(DEGRADED)?;
                }
            }
        }
        Format::Json => printer.message(&HealthCheckResponse {
            status: status as i32,
        })?,
    }
    Ok(Exit::from_answer(status == ServingStatus::Serving))
}
