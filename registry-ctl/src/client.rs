//! The gRPC calls registry-ctl makes.

use std::future::Future;
use std::time::Duration;

use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::error::CtlError;

/// A connection to one registry, every step bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct Registry {
    /// The registry's URL.
    url: String,
    /// The connection.
    channel: Channel,
    /// Bound on each call.
    timeout: Duration,
    /// `authorization` metadata sent with every call, if a token was given.
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Registry {
    /// Connects to `url` within `timeout`; every call carries `token` as a
    /// bearer token, if given.
    pub async fn connect(
        url: &str,
        timeout: Duration,
        token: Option<&str>,
    ) -> Result<Self, CtlError> {
        let authorization = token
            .map(|token| MetadataValue::try_from(format!("Bearer {}", token.trim())))
            .transpose()
            .map_err(|_| CtlError::Token)?;
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|source| CtlError::Endpoint {
                url: url.to_owned(),
                source,
            })?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = bounded(timeout, format!("connecting to {url}"), async {
            endpoint
                .connect()
                .await
                .map_err(|source| CtlError::Connect {
                    url: url.to_owned(),
                    source,
                })
        })
        .await?;
        Ok(Self {
            url: url.to_owned(),
            channel,
            timeout,
            authorization,
        })
    }

    /// `message` as a request with the token attached.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    /// The health service's answer for `service` ("" is the whole server).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, CtlError> {
        let mut client = HealthClient::new(self.channel.clone());
        let request = self.request(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        });
        let response = bounded(self.timeout, self.what("Check"), async {
            client
                .check(request)
                .await
                .map_err(|status| CtlError::rpc("grpc.health.v1.Health/Check", status))
        })
        .await?;
        Ok(response.into_inner().status())
    }

    /// Every node matching `status` and `pool_id` (empty: any), all pages.
    pub async fn list_nodes(
        &self,
        status: pb::NodeStatus,
        pool_id: &str,
    ) -> Result<Vec<pb::Node>, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        let mut nodes = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = self.request(pb::ListNodesRequest {
                status: status as i32,
                pool_id: pool_id.to_owned(),
                page_token: page_token.clone(),
                ..Default::default()
            });
            let page = bounded(self.timeout, self.what("ListNodes"), async {
                client
                    .list_nodes(request)
                    .await
                    .map_err(|status| CtlError::rpc("ListNodes", status))
            })
            .await?
            .into_inner();
            nodes.extend(page.nodes);
            if page.next_page_token.is_empty() {
                return Ok(nodes);
            }
            page_token = page.next_page_token;
        }
    }

    /// The node `node_id`, or `None` when the registry does not know it.
    pub async fn node(&self, node_id: &str) -> Result<Option<pb::Node>, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        let request = self.request(pb::GetNodeRequest {
            node_id: node_id.to_owned(),
        });
        let answer = bounded(self.timeout, self.what("GetNode"), async {
            Ok(client.get_node(request).await)
        })
        .await?;
        match answer {
            Ok(node) => Ok(Some(node.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(CtlError::rpc("GetNode", status)),
        }
    }

    fn what(&self, call: &str) -> String {
        format!("{call} on {}", self.url)
    }
}

/// Runs `step` within `timeout`.
async fn bounded<T>(
    timeout: Duration,
    what: String,
    step: impl Future<Output = Result<T, CtlError>>,
) -> Result<T, CtlError> {
    tokio::time::timeout(timeout, step)
        .await
        .map_err(|_| CtlError::Timeout {
            what,
            timeout: humantime::format_duration(timeout).to_string(),
        })?
}
