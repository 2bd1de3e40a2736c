//! The gRPC calls registry-ctl makes.

use std::future::Future;
use std::time::Duration;

use node_agent::auth::BearerAuth;
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::connect::ConnectOptions;
use crate::error::{ConnectFailure, CtlError, error_chain};

/// A channel whose every call carries the bearer token, if any.
type AuthChannel = InterceptedService<Channel, BearerAuth>;

/// A connection to one registry, every step bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct Registry {
    /// The registry's URL.
    url: String,
    /// The connection, with the token interceptor.
    channel: AuthChannel,
    /// Bound on each call.
    timeout: Duration,
}

impl Registry {
    /// Reads the token and TLS files, then connects within the timeout.
    pub async fn connect(options: &ConnectOptions) -> Result<Self, CtlError> {
        let prepared = options.prepare()?;
        let url = options.url.as_str();
        let timeout = options.timeout;
        let mut endpoint =
            Endpoint::from_shared(url.to_owned()).map_err(|source| CtlError::Endpoint {
                url: url.to_owned(),
                source,
            })?;
        // No connect_timeout or timeout on the endpoint: `bounded` alone
        // bounds each step, so running out of time is always reported as
        // a deadline, never as tonic's CANCELLED "Timeout expired".
        if let Some(tls) = prepared.tls {
            endpoint = endpoint.tls_config(tls).map_err(|err| {
                CtlError::Settings(node_agent::ConfigError::Tls(error_chain(&err)))
            })?;
        }
        let channel = bounded(timeout, format!("connecting to {url}"), async {
            endpoint
                .connect()
                .await
                .map_err(|source| CtlError::Connect {
                    url: url.to_owned(),
                    failure: ConnectFailure::of(url, &source),
                    detail: error_chain(&source),
                })
        })
        .await?;
        Ok(Self {
            url: url.to_owned(),
            channel: InterceptedService::new(channel, prepared.credentials.interceptor()),
            timeout,
        })
    }

    /// The registry's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The health service's answer for `service` ("" is the whole server).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, CtlError> {
        let mut client = HealthClient::new(self.channel.clone());
        let request = tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        };
        let response = bounded(self.timeout, self.what("Check"), async {
            client
                .check(request)
                .await
                .map_err(|status| CtlError::rpc("grpc.health.v1.Health/Check", &self.url, &status))
        })
        .await?;
        Ok(response.into_inner().status())
    }

    /// Every node matching `filter` (its page fields are ignored), all
    /// pages.
    pub async fn list_nodes(
        &self,
        filter: pb::ListNodesRequest,
    ) -> Result<Vec<pb::Node>, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        let mut nodes = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListNodesRequest {
                page_token: page_token.clone(),
                page_size: 0,
                ..filter.clone()
            };
            let page = bounded(self.timeout, self.what("ListNodes"), async {
                client
                    .list_nodes(request)
                    .await
                    .map_err(|status| CtlError::rpc("ListNodes", &self.url, &status))
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
        let request = pb::GetNodeRequest {
            node_id: node_id.to_owned(),
        };
        let answer = bounded(self.timeout, self.what("GetNode"), async {
            Ok(client.get_node(request).await)
        })
        .await?;
        match answer {
            Ok(node) => Ok(Some(node.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(CtlError::rpc("GetNode", &self.url, &status)),
        }
    }

    /// FindPools' answer; its refusals (NOT_FOUND with the filter that
    /// left no pool, FAILED_PRECONDITION for an unavailable pinned node)
    /// come back as [`CtlError::Rpc`] with the server's message.
    pub async fn find_pools(
        &self,
        request: pb::FindPoolsRequest,
    ) -> Result<pb::FindPoolsResponse, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        let answer = bounded(self.timeout, self.what("FindPools"), async {
            client
                .find_pools(request)
                .await
                .map_err(|status| CtlError::rpc("FindPools", &self.url, &status))
        })
        .await?;
        Ok(answer.into_inner())
    }

    /// ListModels' answer.
    pub async fn list_models(
        &self,
        request: pb::ListModelsRequest,
    ) -> Result<pb::ListModelsResponse, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        let answer = bounded(self.timeout, self.what("ListModels"), async {
            client
                .list_models(request)
                .await
                .map_err(|status| CtlError::rpc("ListModels", &self.url, &status))
        })
        .await?;
        Ok(answer.into_inner())
    }

    /// Opens a WatchNodes stream (the opening is bounded by the timeout,
    /// the stream itself is not).
    pub async fn watch(
        &self,
        request: pb::WatchNodesRequest,
    ) -> Result<tonic::Streaming<pb::WatchNodesResponse>, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        let stream = bounded(self.timeout, self.what("WatchNodes"), async {
            client
                .watch_nodes(request)
                .await
                .map_err(|status| CtlError::rpc("WatchNodes", &self.url, &status))
        })
        .await?;
        Ok(stream.into_inner())
    }

    /// CordonNode's answer: the node as it now is.
    pub async fn cordon_node(&self, request: pb::CordonNodeRequest) -> Result<pb::Node, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        self.admin("CordonNode", client.cordon_node(request)).await
    }

    /// UncordonNode's answer.
    pub async fn uncordon_node(
        &self,
        request: pb::UncordonNodeRequest,
    ) -> Result<pb::Node, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        self.admin("UncordonNode", client.uncordon_node(request))
            .await
    }

    /// DrainNode's answer.
    pub async fn drain_node(&self, request: pb::DrainNodeRequest) -> Result<pb::Node, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        self.admin("DrainNode", client.drain_node(request)).await
    }

    /// CancelDrain's answer.
    pub async fn cancel_drain(
        &self,
        request: pb::CancelDrainRequest,
    ) -> Result<pb::Node, CtlError> {
        let mut client = NodeRegistryClient::new(self.channel.clone());
        self.admin("CancelDrain", client.cancel_drain(request))
            .await
    }

    /// One admin call, bounded by the timeout; its refusals (NOT_FOUND for
    /// an unknown node, INVALID_ARGUMENT naming the field,
    /// PERMISSION_DENIED without an admin token) come back as
    /// [`CtlError::Rpc`].
    async fn admin(
        &self,
        call: &'static str,
        answer: impl Future<Output = Result<tonic::Response<pb::Node>, tonic::Status>>,
    ) -> Result<pb::Node, CtlError> {
        let node = bounded(self.timeout, self.what(call), async {
            answer
                .await
                .map_err(|status| CtlError::rpc(call, &self.url, &status))
        })
        .await?;
        Ok(node.into_inner())
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
