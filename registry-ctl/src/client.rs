//! The gRPC calls registry-ctl makes.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use node_agent::auth::BearerAuth;
use registry_proto::endpoints::{self, Replicas, Target};
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_proto::replica;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::connect::{ConnectOptions, PreparedConnection};
use crate::error::{ConnectFailure, CtlError, error_chain};

/// A channel whose every call carries the bearer token, if any.
type AuthChannel = InterceptedService<Channel, BearerAuth>;

/// A connection to one registry (one replica), every step bounded by
/// `timeout`.
#[derive(Debug, Clone)]
pub struct Registry {
    /// The registry's URL (with the name it stands for, when a name
    /// resolved to several replicas).
    url: String,
    /// The connection, with the token interceptor.
    channel: AuthChannel,
    /// Bound on each call.
    timeout: Duration,
    /// The token and TLS files read, to dial the leader a follower names.
    prepared: PreparedConnection,
    /// Whether the "answer may be stale" warning was printed (once per
    /// command, however many pages).
    warned: Arc<AtomicBool>,
}

impl Registry {
    /// Reads the token and TLS files, then connects to the first of
    /// `options.urls` (a name resolving to several addresses counts as
    /// several) that answers, each within the timeout. Reads go there: any
    /// replica answers them.
    pub async fn connect(options: &ConnectOptions) -> Result<Self, CtlError> {
        let prepared = options.prepare()?;
        let targets = endpoints::resolve(&options.urls).await;
        let mut first_error = None;
        for target in &targets {
            match Self::dial(target, &prepared, options.timeout).await {
                Ok(registry) => return Ok(registry),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        Err(first_error.unwrap_or(CtlError::Dial(endpoints::DialError::Empty)))
    }

    /// [`Registry::connect`] for writes: with several endpoints, the one
    /// whose health says it leads (a follower only refuses writes).
    pub async fn connect_leader(options: &ConnectOptions) -> Result<Self, CtlError> {
        let prepared = options.prepare()?;
        if endpoints::resolve(&options.urls).await.len() < 2 {
            return Self::connect(options).await;
        }
        let replicas = Replicas::new(options.urls.clone(), prepared.dialer())?
            .with_probe_timeout(options.timeout.min(endpoints::PROBE_TIMEOUT));
        let leader = replicas.leader().await?;
        Self::dial(&leader.target, &prepared, options.timeout).await
    }

    /// Connects to `target` within `timeout`.
    async fn dial(
        target: &Target,
        prepared: &PreparedConnection,
        timeout: Duration,
    ) -> Result<Self, CtlError> {
        let url = target.label();
        // No connect_timeout or timeout on the endpoint: `bounded` alone
        // bounds each step, so running out of time is always reported as
        // a deadline, never as tonic's CANCELLED "Timeout expired".
        let endpoint = prepared
            .dialer()
            .endpoint(target)
            .map_err(|source| CtlError::Endpoint {
                url: url.clone(),
                source,
            })?;
        let channel = bounded(timeout, format!("connecting to {url}"), async {
            endpoint
                .connect()
                .await
                .map_err(|source| CtlError::Connect {
                    url: url.clone(),
                    failure: ConnectFailure::of(&target.url, &source),
                    detail: error_chain(&source),
                })
        })
        .await?;
        Ok(Self {
            channel: InterceptedService::new(channel, prepared.credentials.interceptor()),
            url,
            timeout,
            prepared: prepared.clone(),
            warned: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A registry client on this connection.
    fn client(&self) -> NodeRegistryClient<AuthChannel> {
        NodeRegistryClient::new(self.channel.clone())
    }

    /// Prints a one-line warning to stderr (once) when a follower replica
    /// answered and said how stale its answer may be.
    fn warn_if_stale(&self, metadata: &tonic::metadata::MetadataMap) {
        if let Some(stale) = replica::staleness(metadata)
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            eprintln!(
                "registry-ctl: warning: answered by a follower replica ({}); it may be stale: {stale}",
                self.url
            );
        }
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
        let mut client = self.client();
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
            .await?;
            self.warn_if_stale(page.metadata());
            let page = page.into_inner();
            nodes.extend(page.nodes);
            if page.next_page_token.is_empty() {
                return Ok(nodes);
            }
            page_token = page.next_page_token;
        }
    }

    /// The node `node_id`, or `None` when the registry does not know it.
    pub async fn node(&self, node_id: &str) -> Result<Option<pb::Node>, CtlError> {
        let mut client = self.client();
        let request = pb::GetNodeRequest {
            node_id: node_id.to_owned(),
        };
        let answer = bounded(self.timeout, self.what("GetNode"), async {
            Ok(client.get_node(request).await)
        })
        .await?;
        match answer {
            Ok(node) => {
                self.warn_if_stale(node.metadata());
                Ok(Some(node.into_inner()))
            }
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
        let mut client = self.client();
        let answer = bounded(self.timeout, self.what("FindPools"), async {
            client
                .find_pools(request)
                .await
                .map_err(|status| CtlError::rpc("FindPools", &self.url, &status))
        })
        .await?;
        self.warn_if_stale(answer.metadata());
        Ok(answer.into_inner())
    }

    /// ListModels' answer.
    pub async fn list_models(
        &self,
        request: pb::ListModelsRequest,
    ) -> Result<pb::ListModelsResponse, CtlError> {
        let mut client = self.client();
        let answer = bounded(self.timeout, self.what("ListModels"), async {
            client
                .list_models(request)
                .await
                .map_err(|status| CtlError::rpc("ListModels", &self.url, &status))
        })
        .await?;
        self.warn_if_stale(answer.metadata());
        Ok(answer.into_inner())
    }

    /// Opens a WatchNodes stream (the opening is bounded by the timeout,
    /// the stream itself is not).
    pub async fn watch(
        &self,
        request: pb::WatchNodesRequest,
    ) -> Result<tonic::Streaming<pb::WatchNodesResponse>, CtlError> {
        let mut client = self.client();
        let stream = bounded(self.timeout, self.what("WatchNodes"), async {
            client
                .watch_nodes(request)
                .await
                .map_err(|status| CtlError::rpc("WatchNodes", &self.url, &status))
        })
        .await?;
        self.warn_if_stale(stream.metadata());
        Ok(stream.into_inner())
    }

    /// CordonNode's answer: the node as it now is.
    pub async fn cordon_node(&self, request: pb::CordonNodeRequest) -> Result<pb::Node, CtlError> {
        self.admin("CordonNode", request, |mut client, request| async move {
            client.cordon_node(request).await
        })
        .await
    }

    /// UncordonNode's answer.
    pub async fn uncordon_node(
        &self,
        request: pb::UncordonNodeRequest,
    ) -> Result<pb::Node, CtlError> {
        self.admin("UncordonNode", request, |mut client, request| async move {
            client.uncordon_node(request).await
        })
        .await
    }

    /// DrainNode's answer.
    pub async fn drain_node(&self, request: pb::DrainNodeRequest) -> Result<pb::Node, CtlError> {
        self.admin("DrainNode", request, |mut client, request| async move {
            client.drain_node(request).await
        })
        .await
    }

    /// CancelDrain's answer.
    pub async fn cancel_drain(
        &self,
        request: pb::CancelDrainRequest,
    ) -> Result<pb::Node, CtlError> {
        self.admin("CancelDrain", request, |mut client, request| async move {
            client.cancel_drain(request).await
        })
        .await
    }

    /// One admin call, bounded by the timeout; its refusals (NOT_FOUND for
    /// an unknown node, INVALID_ARGUMENT naming the field,
    /// PERMISSION_DENIED without an admin token) come back as
    /// [`CtlError::Rpc`]. A follower's refusal naming the leader is
    /// followed once: the call is made again there.
    async fn admin<R, F, Fut>(
        &self,
        call: &'static str,
        request: R,
        send: F,
    ) -> Result<pb::Node, CtlError>
    where
        R: Clone,
        F: Fn(NodeRegistryClient<AuthChannel>, R) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::Node>, tonic::Status>>,
    {
        let answer = bounded(self.timeout, self.what(call), async {
            Ok(send(self.client(), request.clone()).await)
        })
        .await?;
        let status = match answer {
            Ok(node) => return Ok(node.into_inner()),
            Err(status) => status,
        };
        let Some(leader) = replica::leader_hint(&status) else {
            return Err(CtlError::rpc(call, &self.url, &status));
        };
        let target =
            Target::direct(&leader).ok_or_else(|| CtlError::rpc(call, &self.url, &status))?;
        let there = Self::dial(&target, &self.prepared, self.timeout).await?;
        let node = bounded(self.timeout, there.what(call), async {
            send(there.client(), request)
                .await
                .map_err(|status| CtlError::rpc(call, &there.url, &status))
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
