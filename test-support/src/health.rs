//! A registry's gRPC health, asked as a load balancer or a client finding
//! the leader would: per service, within a second.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The health entry that is SERVING on the leader replica only.
pub const LEADER_SERVICE: &str = registry_proto::replica::LEADER_HEALTH_SERVICE;

/// The health for `service` of the registry at `url` ("" is the process as
/// a whole; [`LEADER_SERVICE`] is SERVING on the leader only); `None` when
/// it does not answer within a second.
pub async fn health(url: &str, service: &str) -> Option<ServingStatus> {
    let check = async {
        let channel = tonic::transport::Channel::from_shared(url.to_owned())
            .ok()?
            .connect()
            .await
            .ok()?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(answer.into_inner().status).ok()
    };
    tokio::time::timeout(Duration::from_secs(1), check)
        .await
        .ok()
        .flatten()
}

/// Whether the registry at `url` leads now.
pub async fn leads(url: &str) -> bool {
    health(url, LEADER_SERVICE).await == Some(ServingStatus::Serving)
}
