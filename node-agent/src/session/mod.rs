//! The agent's life with the registry: Register, then one Heartbeat stream
//! fed by a sender task ([`stream`]), reconnecting with backoff on any
//! failure, registering again when the registry no longer knows the node or
//! its session, and Deregister at shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use registry_proto::backoff::Backoff;
use registry_proto::convert::{from_proto_duration, to_proto_timestamp};
use registry_proto::endpoints::{Leader, Replicas};
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_proto::rules;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{error, info, warn};

use crate::auth::{BearerAuth, Credentials, TokenSource};
use crate::config::{AgentConfig, DEFAULT_HEARTBEAT_INTERVAL};
use crate::gpu::GpuSource;
use crate::pools::action::Actions;
use crate::pools::{Drain, PoolConfig, PoolTracker};

mod stream;

use stream::StreamEnd;

/// Resolves when the agent should stop.
pub(crate) type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One registration: what Register answered.
#[derive(Debug, Clone)]
struct Session {
    id: u64,
    /// The session's secret: proves to the registry that heartbeats and
    /// Deregister come from the agent that registered. Never logged.
    secret: String,
    /// The interval in effect: the flag's, else the registry's.
    interval: Duration,
    /// How long the registry waits for a beat; also how long the agent
    /// waits for an ack before it gives up on the stream.
    node_timeout: Duration,
    /// Pools as registered, to notice when they change and re-register.
    specs: Vec<pb::PoolSpec>,
}

/// The registry client; every call carries the bearer token, if any.
type Client = NodeRegistryClient<InterceptedService<Channel, BearerAuth>>;

/// Everything a session needs, shared with the sender task.
pub(crate) struct Agent {
    config: AgentConfig,
    /// The registry's endpoints and the one calls go to (the leader of
    /// replicas).
    replicas: Arc<Replicas>,
    /// The endpoint calls went to last, to log when that changes.
    calling: Mutex<String>,
    /// The token the client sends; re-read after UNAUTHENTICATED.
    credentials: Arc<Credentials>,
    gpus: Arc<dyn GpuSource>,
    capabilities: pb::Capabilities,
    pools: PoolTracker,
    /// Heartbeat sequence numbers, increasing over the agent's life so
    /// acks of an old stream can never be mistaken for new ones.
    sequence: AtomicU64,
    /// Pools the registry asked to drain. In memory: it survives a
    /// reconnect; after a restart the registry sends the command again.
    drain: Mutex<Drain>,
    /// The pools' drain and resume actions, run off the heartbeat path.
    actions: Actions,
    /// Times each beat's ack for the metrics.
    ack_timer: crate::metrics::AckTimer,
}

impl Agent {
    pub(crate) fn new(
        config: AgentConfig,
        replicas: Arc<Replicas>,
        credentials: Arc<Credentials>,
        gpus: Arc<dyn GpuSource>,
        capabilities: pb::Capabilities,
        pools: PoolTracker,
    ) -> Self {
        Agent {
            replicas,
            calling: Mutex::new(String::new()),
            credentials,
            gpus,
            capabilities,
            pools,
            sequence: AtomicU64::new(0),
            drain: Mutex::new(Drain::default()),
            actions: Actions::new(config.action_timeout),
            ack_timer: crate::metrics::AckTimer::default(),
            config,
        }
    }

    /// A client on `leader`'s channel; every call carries the token.
    fn client(&self, leader: &Leader) -> Client {
        NodeRegistryClient::with_interceptor(leader.channel.clone(), self.credentials.interceptor())
    }

    /// The endpoint to call: the one in use, or the leader found again
    /// when a failure suggested it moved. No leader now is UNAVAILABLE,
    /// retried on the usual backoff.
    async fn leader(&self) -> Result<Leader, Status> {
        let leader = self.replicas.leader().await.map_err(|none| none.status())?;
        let mut calling = self.calling.lock().unwrap_or_else(|e| e.into_inner());
        if *calling != leader.label {
            info!(node_id = %self.config.node_id, registry = %leader.label, "calling the registry at this endpoint");
            calling.clone_from(&leader.label);
        }
        Ok(leader)
    }

    /// Tells the endpoints that a call on `leader` failed, so the next one
    /// follows a follower's leader hint or looks for the leader again.
    fn call_failed(&self, leader: &Leader, status: &Status) {
        if let Some(hint) = self.replicas.failed(leader, status) {
            info!(
                node_id = %self.config.node_id,
                replica = %leader.label,
                leader = %hint,
                "the registry replica is not the leader; moving to the leader it names"
            );
        }
    }

    fn drain(&self) -> std::sync::MutexGuard<'_, Drain> {
        self.drain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the drain action of every drained pool that has one and has
    /// not run it since its last resume; `retry_failed` also starts those
    /// whose last run failed (a DrainCommand arrived).
    fn start_drain_actions(&self, pools: &[PoolConfig], drain: &Drain, retry_failed: bool) {
        for pool in pools.iter().filter(|p| drain.covers(&p.id)) {
            let Some(action) = &pool.drain else { continue };
            if retry_failed || self.actions.drain_state(&pool.id).is_none() {
                self.actions.drain(&pool.id, action);
            }
        }
    }

    /// Applies a DrainCommand: the pools are reported DRAINING from the
    /// next beat on, and their drain actions start.
    fn drain_pools(&self, cmd: &pb::DrainCommand) {
        let pools = self.pools.current();
        let unknown: Vec<&String> = cmd
            .pool_ids
            .iter()
            .filter(|id| !pools.iter().any(|p| &p.id == *id))
            .collect();
        if !unknown.is_empty() {
            warn!(node_id = %self.config.node_id, pools = ?unknown, "drain names pools this node does not run; they are drained if they appear");
        }
        let drain = {
            let mut drain = self.drain();
            drain.add(&cmd.pool_ids);
            drain.clone()
        };
        self.start_drain_actions(&pools, &drain, true);
    }

    /// Applies a ResumeCommand: each pool it takes out of the drain runs
    /// its resume action and is reported as its engine is.
    fn resume_pools(&self, cmd: &pb::ResumeCommand) {
        let (before, after) = {
            let mut drain = self.drain();
            let before = drain.clone();
            drain.resume(&cmd.pool_ids);
            (before, drain.clone())
        };
        for pool in self.pools.current() {
            if before.covers(&pool.id) && !after.covers(&pool.id) {
                self.actions.resume(&pool.id, pool.resume.as_ref());
            }
        }
    }

    async fn register(&self) -> Result<Session, Status> {
        let pools = self.pools.current();
        let request =
            crate::registration::register_request(&self.config, &pools, self.capabilities.clone());
        let specs = request.pools.clone();
        // The same rules the registry applies. Configuration and handoff
        // files were checked already, so this only catches a gap between
        // those checks and the request; it is answered like the registry's
        // own refusal, without a round trip.
        if let Err(rule) = rules::register_request(&request) {
            return Err(Status::invalid_argument(format!(
                "the agent's own check refused the registration: {rule}"
            )));
        }
        let leader = self.leader().await?;
        let mut client = self.client(&leader);
        let response = tokio::time::timeout(self.config.registry_timeout, client.register(request))
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("register timed out")))
            .inspect_err(|status| self.call_failed(&leader, status))?
            .into_inner();
        let server_interval = positive(response.heartbeat_interval.as_ref());
        let interval = self
            .config
            .heartbeat_interval
            .or(server_interval)
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
        let node_timeout = positive(response.node_timeout.as_ref()).unwrap_or(interval * 3);
        if interval >= node_timeout {
            warn!(
                node_id = %self.config.node_id,
                interval = %humantime::format_duration(interval),
                node_timeout = %humantime::format_duration(node_timeout),
                "heartbeat interval is not below the registry's node timeout; the node will flap offline"
            );
        }
        info!(
            node_id = %self.config.node_id,
            session_id = %response.session_id,
            created = response.created,
            interval = %humantime::format_duration(interval),
            pools = specs.len(),
            gpus = self.capabilities.gpus.len(),
            "registered"
        );
        Ok(Session {
            id: response.session_id,
            secret: response.session_secret,
            interval,
            node_timeout,
            specs,
        })
    }

    async fn deregister(&self, session: &Session) {
        let request = pb::DeregisterRequest {
            node_id: self.config.node_id.clone(),
            session_id: session.id,
            session_secret: session.secret.clone(),
        };
        let mut leader = self.replicas.current();
        let node_id = &self.config.node_id;
        let deadline = Instant::now() + self.config.deregister_timeout;
        // A token rotated since the last call: re-read it and try once more.
        let mut retried = false;
        // A follower naming the leader: try there once.
        let mut redirected = false;
        loop {
            let mut client = self.client(&leader);
            match tokio::time::timeout_at(deadline, client.deregister(request.clone())).await {
                Ok(Ok(_)) => info!(%node_id, session_id = %session.id, "deregistered"),
                Ok(Err(status))
                    if status.code() == Code::Unauthenticated
                        && !retried
                        && self.credentials.reload() =>
                {
                    retried = true;
                    continue;
                }
                Ok(Err(status))
                    if !redirected && self.replicas.failed(&leader, &status).is_some() =>
                {
                    redirected = true;
                    if let Ok(Ok(found)) =
                        tokio::time::timeout_at(deadline, self.replicas.leader()).await
                    {
                        leader = found;
                        continue;
                    }
                    warn!(%node_id, "deregister refused by a follower and the leader it names does not answer; the registry will mark the node offline");
                }
                Ok(Err(status)) => warn!(
                    %node_id,
                    code = ?status.code(),
                    error = status.message(),
                    "deregister refused"
                ),
                Err(_) => warn!(
                    %node_id,
                    "deregister timed out; the registry will mark the node offline"
                ),
            }
            return;
        }
    }

    /// Logs a failed call and, when the registry refused the token, reads
    /// the token file again so a rotated token is used from the next try.
    fn failed(&self, what: &str, status: &Status, retry_in: Duration) {
        let node_id = &self.config.node_id;
        let retry_in =
            humantime::format_duration(registry_proto::retry::whole_millis(retry_in)).to_string();
        let error = registry_proto::status::status_chain(status);
        let code = status.code();
        match code {
            Code::Unauthenticated => {
                let token = self.credentials.fingerprint();
                let hint = match &self.config.auth_token {
                    Some(TokenSource::File(_)) => {
                        "the registry does not accept this token; check --auth-token-file \
                         (re-read before the next try)"
                    }
                    Some(TokenSource::Value(_)) => {
                        "the registry does not accept this token; check NODE_AGENT_AUTH_TOKEN"
                    }
                    None => "the registry requires a bearer token; set --auth-token-file",
                };
                error!(
                    %node_id,
                    ?code,
                    %error,
                    token = token.as_deref().unwrap_or("none"),
                    hint,
                    %retry_in,
                    "{what} rejected by the registry: unauthenticated"
                );
                self.credentials.reload();
            }
            Code::PermissionDenied => error!(
                %node_id,
                ?code,
                %error,
                hint = "the token must have the node role, under mtls the client \
                        certificate must name this node id (dns san or cn), and the \
                        session must be this agent's",
                %retry_in,
                "{what} rejected by the registry: permission denied"
            ),
            // A refused argument will not fix itself; say so louder.
            Code::InvalidArgument => error!(
                %node_id,
                ?code,
                %error,
                hint = "fix the value the message names; a refused registration is retried \
                        only every --register-refused-retry",
                %retry_in,
                "{what} rejected by the registry: invalid argument"
            ),
            _ => warn!(%node_id, ?code, %error, %retry_in, "{what} failed"),
        }
    }

    async fn gpu_stats(&self) -> Vec<pb::GpuStats> {
        let gpus = self.gpus.clone();
        match tokio::task::spawn_blocking(move || gpus.stats()).await {
            Ok(Ok(stats)) => crate::gpu::fit_stats(stats),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read gpu stats");
                Vec::new()
            }
            Err(e) => {
                warn!(error = %e, "gpu stats task failed");
                Vec::new()
            }
        }
    }

    /// The next heartbeat, or `None` when the pools' specs no longer match
    /// the registration.
    async fn beat(&self, session: &Session) -> Option<pb::HeartbeatRequest> {
        let pools = self.pools.current();
        if !pools
            .iter()
            .map(PoolConfig::spec)
            .eq(session.specs.iter().cloned())
        {
            return None;
        }
        let gpus = self.gpu_stats().await;
        let drain = self.drain().clone();
        // A pool that appeared since the drain began (a new handoff file
        // under "drain every pool") gets its drain action now; a failed
        // one waits for the next DrainCommand.
        self.start_drain_actions(&pools, &drain, false);
        let statuses = self.pools.status(&pools, &gpus, &drain).await;
        crate::metrics::pool_states(&statuses);
        crate::metrics::gpu_stats(&gpus);
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        self.ack_timer.sent(sequence);
        // node_id, session_id and the secret in every message, not only the
        // first: the contract allows it, and the stream's first message is
        // whichever beat happens to go first.
        Some(pb::HeartbeatRequest {
            node_id: self.config.node_id.clone(),
            session_id: session.id,
            session_secret: session.secret.clone(),
            sent_at: Some(to_proto_timestamp(chrono::Utc::now())),
            pools: statuses,
            gpus,
            sequence,
        })
    }
}

fn positive(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(from_proto_duration).filter(|d| !d.is_zero())
}

/// The handoff files' changes from now on: taken before a Register reads
/// the pools, so a change that lands while the call is in flight still
/// counts afterwards.
fn handoff_changes_from_now(agent: &Agent) -> Option<watch::Receiver<Vec<PoolConfig>>> {
    let mut handoff = agent.pools.handoff_changes();
    if let Some(rx) = &mut handoff {
        rx.borrow_and_update();
    }
    handoff
}

/// Sleeps for `delay` or until the handoff files change after `handoff`
/// was taken (before the refused Register); true when shutdown came first.
async fn wait_for_fix(
    agent: &Agent,
    delay: Duration,
    handoff: &mut Option<watch::Receiver<Vec<PoolConfig>>>,
    shutdown: &mut Shutdown,
) -> bool {
    tokio::select! {
        _ = &mut *shutdown => true,
        _ = tokio::time::sleep(delay) => false,
        Ok(()) = stream::changed(handoff) => {
            info!(node_id = %agent.config.node_id, "handoff files changed; registering again");
            false
        }
    }
}

/// Sleeps for `delay` (the refused-retry after the registry refused a
/// token that re-reading the file did not change), cut short when the
/// token file holds a new token: it is re-read every `--backoff-max`, a
/// file read and no call to the registry. True when shutdown came first.
async fn wait_for_token(agent: &Agent, delay: Duration, shutdown: &mut Shutdown) -> bool {
    let every = agent.config.backoff.max.max(Duration::from_millis(10));
    let deadline = Instant::now() + delay;
    let mut check = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = &mut *shutdown => return true,
            _ = tokio::time::sleep_until(deadline) => return false,
            _ = check.tick() => {
                if agent.credentials.reload() {
                    return false;
                }
            }
        }
    }
}

/// Whether `status` refuses the token itself and the token file holds no
/// other token to try: retrying on the reconnect backoff would only
/// hammer the registry with a token it has revoked.
fn token_refused(agent: &Agent, status: &Status) -> bool {
    status.code() == Code::Unauthenticated && !agent.credentials.reload()
}

/// Sleeps for `delay`; true when shutdown came first.
async fn wait(delay: Duration, shutdown: &mut Shutdown) -> bool {
    tokio::select! {
        _ = &mut *shutdown => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// The wait before trying again after `status`: the time the registry
/// advised when it gave one (its admission control refused a Register
/// during a storm and spread the retries; the backoff is left as it was),
/// else the backoff's, but at most
/// [`registry_proto::replica::REPLICA_RETRY_MAX`] when a replica
/// answered that it does not lead (an election is under way; a long wait
/// would leave the node silent past its timeout once a leader is back).
fn retry_delay(backoff: &mut Backoff, status: &Status) -> Duration {
    if let Some(advised) = registry_proto::retry::advice(status) {
        return registry_proto::retry::wait_for(advised, &mut fastrand::Rng::new());
    }
    let delay = backoff.next_delay();
    if registry_proto::replica::refused_by_replica(status) {
        delay.min(registry_proto::replica::REPLICA_RETRY_MAX)
    } else {
        delay
    }
}

/// Registers and keeps heartbeating until `shutdown`; never gives up
/// because the registry is unreachable.
pub(crate) async fn run(agent: Arc<Agent>, mut shutdown: Shutdown) {
    let node_id = agent.config.node_id.clone();
    let mut backoff = Backoff::new(agent.config.backoff.initial, agent.config.backoff.max);
    let mut session: Option<Session> = None;
    // Jitter before the first beat of a registration, not of a reconnect
    // (backoff already spread those).
    let mut jitter = true;
    loop {
        let (current, fresh) = match session.take() {
            Some(s) => (s, false),
            None => {
                let mut handoff = handoff_changes_from_now(&agent);
                let registered = tokio::select! {
                    _ = &mut shutdown => return,
                    r = agent.register() => r,
                };
                crate::metrics::registration(registered.as_ref().map(|_| ()).map_err(Status::code));
                match registered {
                    Ok(s) => (s, true),
                    // Refused as invalid: retrying soon cannot help, and
                    // the error is logged with the registry's words. A
                    // handoff file that changes meanwhile may be the fix,
                    // so that ends the wait early.
                    Err(status) if status.code() == Code::InvalidArgument => {
                        let delay = agent.config.register_refused_retry;
                        agent.failed("register", &status, delay);
                        if wait_for_fix(&agent, delay, &mut handoff, &mut shutdown).await {
                            return;
                        }
                        continue;
                    }
                    // A token the registry does not know, and no new one in
                    // the file: wait long (or for the file to change).
                    Err(status) if token_refused(&agent, &status) => {
                        let delay = agent.config.register_refused_retry;
                        agent.failed("register", &status, delay);
                        if wait_for_token(&agent, delay, &mut shutdown).await {
                            return;
                        }
                        continue;
                    }
                    Err(status) => {
                        let delay = retry_delay(&mut backoff, &status);
                        agent.failed("register", &status, delay);
                        if wait(delay, &mut shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let (end, acked) = agent
            .heartbeat_stream(&current, jitter && fresh, &mut shutdown)
            .await;
        if acked {
            backoff.reset();
        }
        match end {
            StreamEnd::Shutdown => {
                crate::metrics::unregistered();
                return;
            }
            StreamEnd::Reregister(reason) => {
                crate::metrics::unregistered();
                info!(%node_id, session_id = %current.id, %reason, "registry does not know this session; registering again");
                jitter = true;
                // A registration refused before any ack would loop hot.
                if fresh && !acked && wait(backoff.next_delay(), &mut shutdown).await {
                    return;
                }
            }
            StreamEnd::PoolsChanged => {
                info!(%node_id, "pools changed; updating the registration");
                jitter = false;
            }
            StreamEnd::Replaced(reason) => {
                let delay = agent.config.register_refused_retry;
                error!(
                    %node_id,
                    session_id = %current.id,
                    %reason,
                    retry_in = %humantime::format_duration(delay),
                    hint = "is a second agent running with this node id and session? \
                            registering again would end its stream in turn, so this agent \
                            does not; it tries its session again after --register-refused-retry",
                    "heartbeat stream replaced by a newer stream of the same session"
                );
                jitter = false;
                if wait(delay, &mut shutdown).await {
                    // No Deregister: the session is in use by the other
                    // stream, which would lose its node.
                    crate::metrics::unregistered();
                    return;
                }
                crate::metrics::reconnect();
                session = Some(current);
            }
            StreamEnd::Failed(status) => {
                // A revoked token (the registry ended the stream at its
                // token reload) waits long unless the file has a new one.
                let revoked = token_refused(&agent, &status);
                let delay = if revoked {
                    agent.config.register_refused_retry
                } else {
                    retry_delay(&mut backoff, &status)
                };
                agent.failed("heartbeat stream", &status, delay);
                jitter = false;
                let stopped = if revoked {
                    wait_for_token(&agent, delay, &mut shutdown).await
                } else {
                    wait(delay, &mut shutdown).await
                };
                if stopped {
                    // The registry may be back by now; try to leave cleanly.
                    agent.deregister(&current).await;
                    crate::metrics::unregistered();
                    return;
                }
                crate::metrics::reconnect();
                session = Some(current);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_with_a_retry_time_waits_that_long_and_leaves_the_backoff_alone() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let status = registry_proto::retry::refusal(
            Code::ResourceExhausted,
            "too many registrations at once",
            Duration::from_secs(3),
        );
        for _ in 0..100 {
            let delay = retry_delay(&mut backoff, &status);
            assert!(
                delay >= Duration::from_secs(3) && delay <= Duration::from_millis(3300),
                "{delay:?}"
            );
        }
        assert_eq!(backoff.attempts(), 0);
        // Without advice the backoff applies and counts the failure.
        let delay = retry_delay(&mut backoff, &Status::resource_exhausted("node limit"));
        assert!(delay <= Duration::from_millis(100), "{delay:?}");
        assert_eq!(backoff.attempts(), 1);
    }
}
