//! The thin tonic adapter: decodes requests, validates them, calls the
//! registry and maps [`RegistryError`] to gRPC status codes.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use registry_proto::convert::{to_proto_duration, to_proto_timestamp};
use registry_proto::pb;
use registry_proto::rules;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::admission::Admission;
use crate::auth::{Authenticator, Role, Rpc};
use crate::config::Settings;
use crate::error::RegistryError;
use crate::identity;
use crate::placement::{self, PlacementIndex, PlacementQuery};
use crate::registry::{NodeFilter, Now, Registry};
use crate::replica::ReplicaRole;
use crate::validate;
use crate::watch::{WatchStream, Watchers};

mod heartbeat;
mod heartbeat_wire;
mod route;
#[cfg(test)]
mod tests;

use heartbeat::{Caller, HeartbeatSession, OpenStream, StreamShared};
use heartbeat_wire::Messages;
pub use route::RegistryRoute;

/// Implements `registry.v1.NodeRegistry` on top of a [`Registry`].
#[derive(Clone)]
pub struct NodeRegistryService {
    /// The state every call reads or changes.
    registry: Registry,
    /// Cancelled when the server shuts down, so heartbeat streams (which
    /// never end by themselves) end and graceful shutdown can finish.
    shutdown: CancellationToken,
    /// Checks tokens and roles.
    auth: Authenticator,
    /// Register's gate: how many run at once, how many wait, and the retry
    /// time of the rest.
    admission: Admission,
    /// Cap on open heartbeat streams, so no client exhausts the server.
    max_heartbeat_streams: usize,
    /// Largest ListNodes page.
    max_page_size: u32,
    /// Largest message of a unary call (`--max-message-size`): what a
    /// Register body read before its turn may hold (see `route`).
    max_message: usize,
    /// Answers FindPools and ListModels; fed by the registry's change feed,
    /// not read from the registry, so a query never scans the fleet.
    placement: PlacementIndex,
    /// The cap and timing of WatchNodes streams.
    watchers: Watchers,
    /// Whether this process leads (always, without replicas): writes and
    /// heartbeats are refused on a follower, reads marked stale.
    role: ReplicaRole,
    /// What every heartbeat stream shares: the registry, the signal that
    /// wakes each to check whether it may go on (shutdown, the end of a
    /// term, a token reload), and the streams' settings.
    streams: Arc<StreamShared>,
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
            streams: Arc::new(StreamShared::new(
                registry.clone(),
                shutdown.clone(),
                settings.max_clock_skew,
                settings.node_timeout,
                settings.max_heartbeat_message_size,
            )),
            registry,
            shutdown: shutdown.clone(),
            auth,
            admission: Admission::new(
                settings.max_concurrent_registrations,
                settings.max_queued_registrations,
                settings.max_registration_wait,
            ),
            max_heartbeat_streams: settings.max_heartbeat_streams,
            max_page_size: settings.max_page_size,
            max_message: settings.max_message_size,
            placement,
            watchers: Watchers::new(settings.max_watchers, settings.watch_progress_interval),
            role: ReplicaRole::single(),
        }
    }

    /// This service, refusing Register calls that arrive while `lag`
    /// reads more than `max` (`--max-registration-lag`; 0: never).
    pub fn with_lag(mut self, lag: crate::lag::RuntimeLag, max: std::time::Duration) -> Self {
        self.admission = self.admission.with_lag(lag, max);
        self
    }

    /// The service of a replica whose role is `role` (see
    /// [`crate::replica`]); without it the service always leads.
    pub fn with_role(mut self, role: ReplicaRole) -> Self {
        self.role = role;
        self
    }

    /// Whether the caller may make `rpc`; true when it holds an admin
    /// token (which may act for any node).
    fn authorize<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<bool, RegistryError> {
        let role = self.auth.authorize(request.metadata(), rpc)?;
        Ok(role == Role::Admin && !self.auth.is_open())
    }

    /// Opens a heartbeat stream whose requests come from `request`: checks
    /// its token, role and the stream cap, and returns the stream's session
    /// (see [`heartbeat`]).
    fn open_heartbeat<M: Messages>(
        &self,
        request: Request<M>,
    ) -> Result<HeartbeatSession<M>, Status> {
        // Watching before the token is checked: a reload from here on
        // raises the recheck, so none between the check and the stream's
        // first wait goes unseen.
        self.streams.watch(&self.role, &self.auth);
        let (role, grant) = self
            .auth
            .authorize_stream(request.metadata(), Rpc::Heartbeat)
            .map_err(RegistryError::from)?;
        let token_admin = role == Role::Admin && !self.auth.is_open();
        // A stream lives within one leadership term: it ends when the
        // term does (see `replica`).
        let term = self.role.writable()?;
        let identities = identity::peer_identities(&request);
        // Counted first so that concurrent opens cannot all slip under the
        // cap; a refused stream takes its count back.
        let (guard, open) = OpenStream::open(&self.streams);
        if usize::try_from(open).unwrap_or(0) >= self.max_heartbeat_streams {
            drop(guard);
            return Err(RegistryError::LimitReached(format!(
                "the registry holds its maximum of {} heartbeat streams",
                self.max_heartbeat_streams
            ))
            .into());
        }
        let session = HeartbeatSession {
            shared: guard,
            caller: Caller::kept(token_admin, identities, grant),
            inbound: request.into_inner(),
            node: None,
            session_id: 0,
            session_secret: Box::default(),
            done: false,
            signal_seen: 0,
            recheck_seen: 0,
            sent_command: 0,
            stream: 0,
            term,
        };
        Ok(session)
    }
}

/// Under mTLS, a node may act only for the node its certificate names;
/// only a caller holding an admin token may act for any.
fn check_identity(
    identities: Option<&[String]>,
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
        self.role.writable()?;
        // Held until the answer: the call's turn (see crate::admission),
        // which `RegistryRoute` takes before the body is decoded; a server
        // built without the route takes it here.
        let _turn = match request.extensions().get::<route::TurnTaken>() {
            Some(route::TurnTaken) => None,
            None => Some(self.admission.admit().await?),
        };
        let identities = identity::peer_identities(&request);
        let registration = validate::registration(request.into_inner())?;
        check_identity(identities.as_deref(), token_admin, registration.node_id())?;
        let registered = self
            .registry
            .register_durably(registration, Now::read())
            .await?;
        let timing = self.registry.timing();
        Ok(Response::new(pb::RegisterResponse {
            session_id: registered.session_id,
            created: registered.created,
            heartbeat_interval: Some(to_proto_duration(timing.heartbeat_interval)),
            node_timeout: Some(to_proto_duration(timing.node_timeout)),
            registered_at: Some(to_proto_timestamp(registered.registered_at)),
            session_secret: registered.session_secret,
            registry: Some(self.registry.instance().clone()),
        }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let token_admin = self.authorize(&request, Rpc::Deregister)?;
        self.role.writable()?;
        let identities = identity::peer_identities(&request);
        let request = request.into_inner();
        validate::node_id("node_id", &request.node_id)?;
        check_identity(identities.as_deref(), token_admin, &request.node_id)?;
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
            .deregister_durably(&request.node_id, request.session_id, secret)
            .await?;
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
        Ok(self.role.mark_read(Response::new(pb::ListNodesResponse {
            nodes: page.nodes,
            next_page_token: page.next_page_token.unwrap_or_default(),
            revision: page.revision,
            registry: Some(self.registry.instance().clone()),
        })))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.authorize(&request, Rpc::GetNode)?;
        let request = request.into_inner();
        validate::node_id("node_id", &request.node_id)?;
        Ok(self
            .role
            .mark_read(Response::new(self.registry.get(&request.node_id)?)))
    }

    async fn find_pools(
        &self,
        request: Request<pb::FindPoolsRequest>,
    ) -> Result<Response<pb::FindPoolsResponse>, Status> {
        self.authorize(&request, Rpc::FindPools)?;
        let query =
            PlacementQuery::from_request(request.into_inner()).map_err(RegistryError::from)?;
        let placement = self.placement.find(&query).map_err(RegistryError::from)?;
        Ok(self.role.mark_read(Response::new(pb::FindPoolsResponse {
            candidates: placement
                .candidates
                .into_iter()
                .map(candidate_to_proto)
                .collect(),
            revision: placement.revision,
        })))
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
        Ok(self.role.mark_read(Response::new(pb::ListModelsResponse {
            models: list.models.into_iter().map(model_to_proto).collect(),
            revision: list.revision,
        })))
    }

    // Admin RPCs (cordon and drain): validated here, applied by the
    // registry core (see `registry::admin`).
    async fn cordon_node(
        &self,
        request: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.authorize(&request, Rpc::CordonNode)?;
        self.role.writable()?;
        let request = request.into_inner();
        validate::node_id("node_id", &request.node_id)?;
        rules::text("reason".into(), &request.reason).map_err(RegistryError::from)?;
        let node = self
            .registry
            .cordon_durably(&request.node_id, &request.reason, Now::read())
            .await?;
        Ok(Response::new(node))
    }

    async fn uncordon_node(
        &self,
        request: Request<pb::UncordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.authorize(&request, Rpc::UncordonNode)?;
        self.role.writable()?;
        let request = request.into_inner();
        validate::node_id("node_id", &request.node_id)?;
        Ok(Response::new(
            self.registry.uncordon_durably(&request.node_id).await?,
        ))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.authorize(&request, Rpc::DrainNode)?;
        self.role.writable()?;
        let request = request.into_inner();
        let node_id = request.node_id.clone();
        let drain = validate::drain(request)?;
        Ok(Response::new(
            self.registry
                .drain_durably(&node_id, drain, Now::read())
                .await?,
        ))
    }

    async fn cancel_drain(
        &self,
        request: Request<pb::CancelDrainRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.authorize(&request, Rpc::CancelDrain)?;
        self.role.writable()?;
        let request = request.into_inner();
        validate::node_id("node_id", &request.node_id)?;
        Ok(Response::new(
            self.registry.cancel_drain_durably(&request.node_id).await?,
        ))
    }

    type WatchNodesStream = WatchStream;

    async fn watch_nodes(
        &self,
        request: Request<pb::WatchNodesRequest>,
    ) -> Result<Response<Self::WatchNodesStream>, Status> {
        self.authorize(&request, Rpc::WatchNodes)?;
        let request = request.into_inner();
        let mut filter = validate::node_filter(request.status, &request.pool_id, &request.labels)?;
        // A model is free text in the contract: the same rule as ListModels.
        registry_proto::rules::text("model".into(), &request.model).map_err(RegistryError::from)?;
        filter.model = (!request.model.is_empty()).then_some(request.model);
        let stream = self.watchers.watch(
            &self.registry,
            filter,
            request.start_revision,
            self.shutdown.clone(),
        )?;
        Ok(self.role.mark_read(Response::new(stream)))
    }

    type HeartbeatStream = HeartbeatStream;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        // Servers built with `RegistryRoute` (the registry's) never get
        // here: the route serves the method over its own framing.
        let session = self.open_heartbeat(request)?;
        Ok(Response::new(Box::pin(heartbeat::replies(session))))
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
        mig_uuids: c.mig_uuids,
        mig_profile: c.mig_profile,
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
    validate::node_filter(request.status, &request.pool_id, &request.labels)
}
