//! The thin tonic adapter: decodes requests, validates them, calls the
//! registry and maps [`RegistryError`] to gRPC status codes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use registry_proto::convert::{to_proto_duration, to_proto_timestamp};
use registry_proto::pb;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::{Authenticator, Role, Rpc};
use crate::config::Settings;
use crate::error::RegistryError;
use crate::identity;
use crate::placement::{self, PlacementIndex, PlacementQuery};
use crate::registry::{Liveness, NodeFilter, NodeSlot, Now, Registry, secrets_equal};
use crate::validate;
use crate::watch::{WatchStream, Watchers};

/// Implements `registry.v1.NodeRegistry` on top of a [`Registry`].
#[derive(Clone)]
pub struct NodeRegistryService {
    /// The state every call reads or changes.
    registry: Registry,
    /// Clock-skew allowance for heartbeat timestamps.
    max_clock_skew: Duration,
    /// Cancelled when the server shuts down, so heartbeat streams (which
    /// never end by themselves) end and graceful shutdown can finish.
    shutdown: CancellationToken,
    /// Checks tokens and roles.
    auth: Authenticator,
    /// Cap on open heartbeat streams, so no client exhausts the server.
    max_heartbeat_streams: usize,
    /// Largest ListNodes page.
    max_page_size: u32,
    /// How long a new stream may stay silent before its first message:
    /// an open, never-written stream would otherwise hold resources forever.
    first_message_timeout: Duration,
    /// Answers FindPools and ListModels; fed by the registry's change feed,
    /// not read from the registry, so a query never scans the fleet.
    placement: PlacementIndex,
    /// The cap and timing of WatchNodes streams.
    watchers: Watchers,
}

impl NodeRegistryService {
    /// A service over `registry`; `shutdown` ends its open streams;
    /// `placement` answers the placement RPCs.
    pub fn new(
        registry: Registry,
        settings: &Settings,
        auth: Authenticator,
        shutdown: CancellationToken,
        placement: PlacementIndex,
    ) -> Self {
        Self {
            registry,
            max_clock_skew: settings.max_clock_skew,
            shutdown,
            auth,
            max_heartbeat_streams: settings.max_heartbeat_streams,
            max_page_size: settings.max_page_size,
            first_message_timeout: settings.node_timeout,
            placement,
            watchers: Watchers::new(settings.max_watchers, settings.watch_progress_interval),
        }
    }

    /// Whether the caller may make `rpc`; true when it holds an admin
    /// token (which may act for any node).
    fn authorize<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<bool, RegistryError> {
        let role = self.auth.authorize(request.metadata(), rpc)?;
        Ok(role == Role::Admin && !self.auth.is_open())
    }
}

/// Under mTLS, a node may act only for the node its certificate names;
/// only a caller holding an admin token may act for any.
fn check_identity(
    identities: &Option<Vec<String>>,
    token_admin: bool,
    node_id: &str,
) -> Result<(), RegistryError> {
    match identities {
        Some(names) if !token_admin && !names.iter().any(|n| n == node_id) => {
            Err(RegistryError::PermissionDenied(format!(
                "the client certificate names {names:?}, not node {node_id}"
            )))
        }
        _ => Ok(()),
    }
}

type HeartbeatStream =
    Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::node_registry_server::NodeRegistry for NodeRegistryService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let token_admin = self.authorize(&request, Rpc::Register)?;
        let identities = identity::peer_identities(&request);
        let registration = validate::registration(request.into_inner())?;
        check_identity(&identities, token_admin, &registration.node_id)?;
        let registered = self.registry.register(registration, Now::read())?;
        let timing = self.registry.timing();
        Ok(Response::new(pb::RegisterResponse {
            session_id: registered.session_id,
            created: registered.created,
            heartbeat_interval: Some(to_proto_duration(timing.heartbeat_interval)),
            node_timeout: Some(to_proto_duration(timing.node_timeout)),
            registered_at: Some(to_proto_timestamp(registered.registered_at)),
            session_secret: registered.session_secret,
        }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let token_admin = self.authorize(&request, Rpc::Deregister)?;
        let identities = identity::peer_identities(&request);
        let request = request.into_inner();
        validate::node_id("node_id", &request.node_id)?;
        check_identity(&identities, token_admin, &request.node_id)?;
        let secret =
            (!request.session_secret.is_empty()).then_some(request.session_secret.as_str());
        // Only an admin token, or a server that checks no tokens at all, may
        // remove a node without its session's secret.
        if secret.is_none() && !token_admin && !self.auth.is_open() {
            return Err(RegistryError::PermissionDenied(format!(
                "removing node {} needs its session_secret (or an admin token)",
                request.node_id
            ))
            .into());
        }
        self.registry
            .deregister(&request.node_id, request.session_id, secret)?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.authorize(&request, Rpc::ListNodes)?;
        let request = request.into_inner();
        let filter = list_filter(&request)?;
        if !request.page_token.is_empty() {
            validate::node_id("page_token", &request.page_token)?;
        }
        let page_size = match request.page_size {
            0 => self.max_page_size,
            asked => asked.min(self.max_page_size),
        };
        let page = self
            .registry
            .list_page(&filter, page_size as usize, &request.page_token);
        Ok(Response::new(pb::ListNodesResponse {
            nodes: page.nodes,
            next_page_token: page.next_page_token.unwrap_or_default(),
            revision: page.revision,
        }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.authorize(&request, Rpc::GetNode)?;
        let request = request.into_inner();
        validate::node_id("node_id", &request.node_id)?;
        Ok(Response::new(self.registry.get(&request.node_id)?))
    }

    async fn find_pools(
        &self,
        request: Request<pb::FindPoolsRequest>,
    ) -> Result<Response<pb::FindPoolsResponse>, Status> {
        self.authorize(&request, Rpc::FindPools)?;
        let query =
            PlacementQuery::from_request(request.into_inner()).map_err(RegistryError::from)?;
        let placement = self.placement.find(&query).map_err(RegistryError::from)?;
        Ok(Response::new(pb::FindPoolsResponse {
            candidates: placement
                .candidates
                .into_iter()
                .map(candidate_to_proto)
                .collect(),
            revision: placement.revision,
        }))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.authorize(&request, Rpc::ListModels)?;
        let request = request.into_inner();
        registry_proto::rules::text("model".into(), &request.model).map_err(RegistryError::from)?;
        let only = (!request.model.is_empty()).then_some(request.model.as_str());
        let list = self.placement.list_models(only);
        Ok(Response::new(pb::ListModelsResponse {
            models: list.models.into_iter().map(model_to_proto).collect(),
            revision: list.revision,
        }))
    }

    type WatchNodesStream = WatchStream;

    async fn watch_nodes(
        &self,
        request: Request<pb::WatchNodesRequest>,
    ) -> Result<Response<Self::WatchNodesStream>, Status> {
        self.authorize(&request, Rpc::WatchNodes)?;
        let request = request.into_inner();
        let mut filter = node_filter(request.status, &request.pool_id, &request.labels)?;
        // A model is free text in the contract: the same bound.
        if request.model.len() > registry_proto::rules::MAX_TEXT_LEN {
            return Err(RegistryError::invalid(
                "model",
                format!(
                    "is longer than {} bytes",
                    registry_proto::rules::MAX_TEXT_LEN
                ),
            )
            .into());
        }
        filter.model = (!request.model.is_empty()).then_some(request.model);
        let stream = self.watchers.watch(
            &self.registry,
            filter,
            request.start_revision,
            self.shutdown.clone(),
        )?;
        Ok(Response::new(stream))
    }

    type HeartbeatStream = HeartbeatStream;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let token_admin = self.authorize(&request, Rpc::Heartbeat)?;
        let identities = identity::peer_identities(&request);
        let open = self
            .registry
            .stats()
            .open_streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Counted first so that concurrent opens cannot all slip under the
        // cap; a refused stream takes its count back.
        let guard = OpenStream(self.registry.clone());
        if usize::try_from(open).unwrap_or(0) >= self.max_heartbeat_streams {
            drop(guard);
            return Err(RegistryError::LimitReached(format!(
                "the registry holds its maximum of {} heartbeat streams",
                self.max_heartbeat_streams
            ))
            .into());
        }
        let session = HeartbeatSession {
            _open: guard,
            token_admin,
            identities,
            first_message_timeout: self.first_message_timeout,
            latency: metrics::histogram!(crate::metrics::HEARTBEAT_SECONDS),
            registry: self.registry.clone(),
            inbound: request.into_inner(),
            shutdown: self.shutdown.clone(),
            max_clock_skew: self.max_clock_skew,
            node: None,
            session_id: 0,
            session_secret: String::new(),
            done: false,
        };
        // No task and no channel per stream: the response stream pulls the
        // next request and answers it, which keeps 100k idle streams cheap.
        let replies = futures_util::stream::unfold(session, |mut session| async move {
            let reply = session.next_reply().await?;
            Some((reply, session))
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

fn candidate_to_proto(c: placement::Candidate) -> pb::PoolCandidate {
    pb::PoolCandidate {
        node_id: c.node_id,
        pool_id: c.pool_id,
        endpoint: c.endpoint,
        model: c.model,
        engine: c.engine,
        slots_free: c.slots_free,
        vram_free_bytes: c.vram_free_bytes,
        node_address: c.node_address,
        labels: c.labels,
        slots_total: c.slots_total,
    }
}

fn model_to_proto(m: placement::ModelAvailability) -> pb::ModelAvailability {
    pb::ModelAvailability {
        model: m.model,
        pools: m
            .pools
            .into_iter()
            .map(|p| pb::ModelPool {
                node_id: p.node_id,
                pool_id: p.pool_id,
                engine: p.engine,
                state: p.state.unwrap_or(pb::PoolState::Unspecified) as i32,
                node_status: p.node_status as i32,
                slots_total: p.slots_total,
                slots_free: p.slots_free,
                ready: p.ready,
            })
            .collect(),
        nodes_serving: m.nodes_serving,
        pools_ready: m.pools_ready,
        slots_total: m.slots_total,
        slots_free: m.slots_free,
        staged_on: m.staged_on,
    }
}

/// Turns ListNodes' request fields into a [`NodeFilter`].
fn list_filter(request: &pb::ListNodesRequest) -> Result<NodeFilter, RegistryError> {
    node_filter(request.status, &request.pool_id, &request.labels)
}

/// The filters ListNodes and WatchNodes share, checked.
fn node_filter(
    status: i32,
    pool_id: &str,
    labels: &std::collections::HashMap<String, String>,
) -> Result<NodeFilter, RegistryError> {
    let status = match pb::NodeStatus::try_from(status) {
        Ok(pb::NodeStatus::Unspecified) => None,
        Ok(pb::NodeStatus::Online) => Some(Liveness::Online),
        Ok(pb::NodeStatus::Offline) => Some(Liveness::Offline),
        Err(_) => {
            return Err(RegistryError::invalid(
                "status",
                format!("{status} is not a known NodeStatus"),
            ));
        }
    };
    if pool_id.len() > validate::MAX_ID_LEN {
        return Err(RegistryError::invalid(
            "pool_id",
            format!("is longer than {} bytes", validate::MAX_ID_LEN),
        ));
    }
    if labels.len() > validate::MAX_LABELS {
        return Err(RegistryError::invalid(
            "labels",
            format!("has more than {} entries", validate::MAX_LABELS),
        ));
    }
    Ok(NodeFilter {
        status,
        pool_id: (!pool_id.is_empty()).then(|| pool_id.to_string()),
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        model: None,
    })
}

/// The server side of one Heartbeat stream.
struct HeartbeatSession {
    /// Where heartbeats are recorded.
    registry: Registry,
    /// The agent's messages.
    inbound: Streaming<pb::HeartbeatRequest>,
    /// Ends the stream when the server shuts down.
    shutdown: CancellationToken,
    /// Clock-skew allowance for sent_at.
    max_clock_skew: Duration,
    /// The node this stream speaks for, fixed by the first message; kept so
    /// later messages cost one node lock and no map lookup.
    node: Option<Arc<NodeSlot>>,
    /// The session the first message named.
    session_id: u64,
    /// That session's secret, checked by the registry at the first
    /// message; later messages may repeat it (compared in constant time)
    /// but not change it.
    session_secret: String,
    /// Set once the stream has ended (an error was sent, or input ended).
    done: bool,
    /// Handling-time histogram, looked up once per stream, not per beat.
    latency: metrics::Histogram,
    /// Keeps the stream counted as open while it lives.
    _open: OpenStream,
    /// Whether the caller holds an admin token (which may speak for any
    /// node under mTLS).
    token_admin: bool,
    /// Names in the client certificate, under mTLS.
    identities: Option<Vec<String>>,
    /// Deadline for the first message.
    first_message_timeout: Duration,
}

/// One open heartbeat stream in the registry's count, until dropped.
struct OpenStream(Registry);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0
            .stats()
            .open_streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl HeartbeatSession {
    fn node_id(&self) -> &str {
        self.node.as_deref().map_or("", NodeSlot::id)
    }

    /// The answer to the agent's next message; `None` ends the stream.
    async fn next_reply(&mut self) -> Option<Result<pb::HeartbeatResponse, Status>> {
        if self.done {
            return None;
        }
        // Until the stream has named its node, it may stay silent only so
        // long; afterwards silence is the node's deadline's business.
        let awaiting_first = self.node.is_none();
        let first_message_timeout = self.first_message_timeout;
        let first_deadline = async move {
            if awaiting_first {
                tokio::time::sleep(first_message_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let message = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => {
                self.done = true;
                return Some(Err(RegistryError::ShuttingDown.into()));
            }
            () = first_deadline => {
                self.done = true;
                let err = RegistryError::TooSlow(format!(
                    "no first heartbeat message within {}; the stream is closed",
                    humantime::format_duration(self.first_message_timeout)
                ));
                info!(error = %err, "idle heartbeat stream closed");
                return Some(Err(err.into()));
            }
            message = self.inbound.message() => message,
        };
        match message {
            Ok(Some(mut request)) => match self.timed_handle(&mut request) {
                Ok(ack) => Some(Ok(ack)),
                Err(err) => {
                    self.done = true;
                    warn!(node_id = %self.node_id(), error = %err, "heartbeat refused; closing stream");
                    Some(Err(err.into()))
                }
            },
            Ok(None) => {
                self.done = true;
                debug!(node_id = %self.node_id(), "heartbeat stream closed by agent");
                None
            }
            Err(status) => {
                self.done = true;
                info!(node_id = %self.node_id(), code = ?status.code(), message = status.message(), "heartbeat stream broken");
                Some(Err(status))
            }
        }
    }

    fn timed_handle(
        &mut self,
        request: &mut pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, RegistryError> {
        let started = std::time::Instant::now();
        let result = self.handle(request);
        self.latency.record(started.elapsed().as_secs_f64());
        result
    }

    fn handle(
        &mut self,
        request: &mut pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, RegistryError> {
        let node = match &self.node {
            None => {
                validate::node_id("node_id", &request.node_id)?;
                if request.session_id == 0 {
                    return Err(RegistryError::invalid(
                        "session_id",
                        "is required in the first message of a stream (use RegisterResponse.session_id)",
                    ));
                }
                check_identity(&self.identities, self.token_admin, &request.node_id)?;
                let slot = self.registry.attach(
                    &request.node_id,
                    request.session_id,
                    &request.session_secret,
                )?;
                debug!(node_id = %slot.id(), "heartbeat stream opened");
                self.session_id = request.session_id;
                self.session_secret = std::mem::take(&mut request.session_secret);
                self.node.insert(slot)
            }
            Some(slot) => {
                if !request.node_id.is_empty() && request.node_id != slot.id() {
                    return Err(RegistryError::invalid(
                        "node_id",
                        format!(
                            "this stream speaks for node {}; a stream cannot switch nodes",
                            slot.id()
                        ),
                    ));
                }
                if (request.session_id != 0 && request.session_id != self.session_id)
                    || (!request.session_secret.is_empty()
                        && !secrets_equal(&request.session_secret, &self.session_secret))
                {
                    return Err(RegistryError::invalid(
                        "session_id",
                        format!(
                            "this stream speaks for session {}; a stream cannot switch sessions",
                            self.session_id
                        ),
                    ));
                }
                slot
            }
        };
        let now = Now::read();
        let beat = validate::beat(request, now.wall, self.max_clock_skew)?;
        self.registry
            .heartbeat(node, self.session_id, beat, now.at)?;
        Ok(pb::HeartbeatResponse {
            sequence: request.sequence,
            server_time: Some(to_proto_timestamp(now.wall)),
            heartbeat_interval: Some(to_proto_duration(self.registry.timing().heartbeat_interval)),
            command: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pb::node_registry_server::NodeRegistry as _;

    use super::*;
    use crate::events::EventKind;
    use crate::placement::testing::{event, view};

    /// A service whose placement index holds one ONLINE node, `gpu-1`,
    /// built from a RegisterRequest and a heartbeat (the registry core
    /// feeds the index once merged; these tests feed it directly).
    fn service() -> NodeRegistryService {
        let settings = Settings::default();
        let index = PlacementIndex::new();
        let request = pb::RegisterRequest {
            node_id: "gpu-1".into(),
            machine_id: "machine-gpu-1".into(),
            address: "http://gpu-1.example:9200".into(),
            pools: vec![pb::PoolSpec {
                pool_id: "pool-0".into(),
                engine: "llamacpp".into(),
                model: "llama-3.1-8b".into(),
                slots_total: 4,
                endpoint: "http://gpu-1.example:8000".into(),
                ..Default::default()
            }],
            labels: [("zone".to_owned(), "eu-1".to_owned())].into(),
            models_available: vec!["qwen2.5-7b".into()],
            ..Default::default()
        };
        let beat = [pb::PoolStatus {
            pool_id: "pool-0".into(),
            state: pb::PoolState::Ready as i32,
            slots_total: 4,
            slots_free: 3,
            vram_free_bytes: 10 << 30,
            model: "llama-3.1-8b".into(),
            engine: "llamacpp".into(),
            endpoint: String::new(),
        }];
        let node = view(&request, Some(&beat), pb::NodeStatus::Online);
        index.apply(&event(3, EventKind::Added, Arc::clone(&node)));
        NodeRegistryService::new(
            Registry::new(settings.timing()),
            &settings,
            Authenticator::open(),
            CancellationToken::new(),
            index,
        )
    }

    #[tokio::test]
    async fn find_pools_answers_from_the_index() {
        let service = service();
        let answer = service
            .find_pools(Request::new(pb::FindPoolsRequest {
                model: "llama-3.1-8b".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.revision, 3);
        assert_eq!(answer.candidates.len(), 1);
        let best = &answer.candidates[0];
        assert_eq!(
            (best.node_id.as_str(), best.pool_id.as_str()),
            ("gpu-1", "pool-0")
        );
        assert_eq!(best.endpoint, "http://gpu-1.example:8000");
        assert_eq!(best.node_address, "http://gpu-1.example:9200");
        assert_eq!(best.labels.get("zone").map(String::as_str), Some("eu-1"));
        assert_eq!((best.slots_free, best.slots_total), (3, 4));
    }

    #[tokio::test]
    async fn find_pools_maps_refusals_to_their_codes() {
        let service = service();
        let find = |req: pb::FindPoolsRequest| {
            let service = service.clone();
            async move { service.find_pools(Request::new(req)).await.unwrap_err() }
        };
        let base = || pb::FindPoolsRequest {
            model: "llama-3.1-8b".into(),
            ..Default::default()
        };
        let status = find(pb::FindPoolsRequest {
            model: "absent".into(),
            ..base()
        })
        .await;
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "model absent is served by no pool");
        let status = find(pb::FindPoolsRequest {
            engine: "vllm".into(),
            ..base()
        })
        .await;
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(
            status.message().contains("none runs engine vllm"),
            "{}",
            status.message()
        );
        let status = find(pb::FindPoolsRequest {
            node_id: "ghost".into(),
            ..base()
        })
        .await;
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().contains("ghost is not registered"));
        let status = find(pb::FindPoolsRequest {
            node_id: "gpu-1".into(),
            min_slots_free: Some(4),
            ..base()
        })
        .await;
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().starts_with("node unavailable: node gpu-1"),
            "{}",
            status.message()
        );
        let status = find(pb::FindPoolsRequest {
            limit: 101,
            ..base()
        })
        .await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("limit"));
    }

    #[tokio::test]
    async fn list_models_reports_served_and_staged_models() {
        let service = service();
        let answer = service
            .list_models(Request::new(pb::ListModelsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.revision, 3);
        let names: Vec<&str> = answer.models.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(names, ["llama-3.1-8b", "qwen2.5-7b"]);
        let llama = &answer.models[0];
        assert_eq!(
            (llama.nodes_serving, llama.pools_ready, llama.slots_free),
            (1, 1, 3)
        );
        assert_eq!(llama.pools[0].state, pb::PoolState::Ready as i32);
        assert_eq!(llama.pools[0].node_status, pb::NodeStatus::Online as i32);
        assert_eq!(answer.models[1].staged_on, ["gpu-1"]);
        let one = service
            .list_models(Request::new(pb::ListModelsRequest {
                model: "qwen2.5-7b".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.models.len(), 1);
    }
}
