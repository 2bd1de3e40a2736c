//! One virtual node-agent: register, open a Heartbeat stream, send every
//! interval with jitter and wait for each ack; on NOT_FOUND or
//! FAILED_PRECONDITION wait a backoff with jitter and register again; on a
//! broken connection, a closed stream or a missing ack wait a backoff and
//! reconnect with the same session (a registry that kept its state after a
//! restart accepts it, and so does a new leader after a failover), as
//! node-agent does; after a replica's refusal the wait is at most
//! [`registry_proto::replica::REPLICA_RETRY_MAX`].
//! A DrainCommand (pushed unsolicited, sequence 0, or on an ack) makes the
//! named pools (all when none are named) report DRAINING and idle on a beat
//! sent at once; a ResumeCommand makes them READY again, also at once, so
//! the registry sees the command carried out as a real agent would report
//! it.
//!
//! [`Shared`] is what every node task of one fleet shares (options, counters,
//! the stop and silence signals); the fleet owns one and hands it to each
//! node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use registry_proto::backoff::Backoff;
use registry_proto::convert::from_proto_duration;
use registry_proto::endpoints::{Leader, Replicas};
use registry_proto::pb;
use registry_proto::pb::heartbeat_response::Command;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::FleetConfig;
use crate::fake::NodeShape;
use crate::stats::{Phase, Stats};

/// First retry ceiling after a failure; doubles up to [`BACKOFF_MAX`].
const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// Largest retry ceiling.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What every node task of one fleet shares.
pub(crate) struct Shared {
    /// The fleet's options.
    pub(crate) config: FleetConfig,
    /// Where every node counts what it does.
    pub(crate) stats: Arc<Stats>,
    /// Interval set while running ([`Shared::set_interval`]), in nanoseconds;
    /// 0 when unset. Overrides `config.interval` and the advertised one.
    interval_override: AtomicU64,
    /// Cancelled to stop every node.
    pub(crate) stop: CancellationToken,
    /// Cancelled when the chosen nodes go silent.
    pub(crate) silence: CancellationToken,
}

impl Shared {
    /// The state of a fleet of `config` that counts into `stats`, not
    /// stopped, not silenced, with no interval override.
    pub(crate) fn new(config: FleetConfig, stats: Arc<Stats>) -> Self {
        Self {
            config,
            stats,
            interval_override: AtomicU64::new(0),
            stop: CancellationToken::new(),
            silence: CancellationToken::new(),
        }
    }

    /// Every node waits `interval` from its next heartbeat on, whatever
    /// the configured or advertised one.
    pub(crate) fn set_interval(&self, interval: Duration) {
        let nanos = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.interval_override.store(nanos, Ordering::Relaxed);
    }

    /// The interval to wait now: the override, else the configured one,
    /// else what the registry advertised to this node.
    pub(crate) fn interval(&self, advertised: Duration) -> Duration {
        match self.interval_override.load(Ordering::Relaxed) {
            0 => self.config.interval.unwrap_or(advertised),
            nanos => Duration::from_nanos(nanos),
        }
    }
}

/// How a heartbeat session ended.
enum End {
    /// The fleet is stopping.
    Stopped,
    /// The registry lost the node or its session (NOT_FOUND,
    /// FAILED_PRECONDITION): back off, register.
    Lost,
    /// The stream failed otherwise (the registry away, a timeout): back
    /// off and reconnect with the same session, as node-agent does; a
    /// registry that kept its state accepts it without a Register.
    Failed,
    /// The registry asked for a new registration: register at once.
    Reregister,
}

/// A registration's session, which the first message of every heartbeat
/// stream presents.
struct Session {
    /// RegisterResponse.session_id.
    id: u64,
    /// RegisterResponse.session_secret.
    secret: String,
}

/// Everything one node keeps for its life.
struct Node {
    /// Ids, payload sizes.
    shape: NodeShape,
    /// Whether this node goes silent in fault mode.
    silenced: bool,
    /// The fleet's shared state.
    shared: Arc<Shared>,
    /// The registry's endpoints and the leader among them, shared by the
    /// nodes of one connection (one discovery after a failover, not one
    /// per node).
    replicas: Arc<Replicas>,
    /// The status that ended the last call or stream, for `replicas` to
    /// follow a leader hint or look for the leader again.
    failure: Option<tonic::Status>,
    /// The last failure was a replica's refusal (a follower, or a leader
    /// stepping down): the next try comes within
    /// [`registry_proto::replica::REPLICA_RETRY_MAX`], as node-agent's, not
    /// after a long backoff that would leave the node silent past its
    /// timeout once a leader is elected.
    replica_refused: bool,
    /// The retry time of the last Register refusal, when the registry
    /// gave one (its admission control): the next wait, instead of the
    /// backoff's.
    advised: Option<Duration>,
    /// Jitter and payload values.
    rng: fastrand::Rng,
    /// Retry delays after failures.
    backoff: Backoff,
    /// Heartbeat counter, across sessions.
    sequence: u64,
    /// Pools the registry asked to drain, as the agent reports them.
    drain: Drain,
    /// Set when a command changed what the next beat reports, so it is
    /// sent at once instead of at the next interval.
    report_now: bool,
}

/// Pools draining on this node, kept across streams and sessions as a
/// real agent keeps them while it runs.
#[derive(Debug, Default)]
struct Drain {
    /// Every pool drains (a DrainCommand naming none).
    all: bool,
    /// The pools named by DrainCommands.
    pools: std::collections::HashSet<String>,
}

impl Drain {
    fn covers(&self, pool_id: &str) -> bool {
        self.all || self.pools.contains(pool_id)
    }

    /// Reports drained pools DRAINING with every slot free (in-flight
    /// work is taken to finish at once).
    fn apply(&self, beat: &mut pb::HeartbeatRequest) {
        if !self.all && self.pools.is_empty() {
            return;
        }
        for pool in beat.pools.iter_mut().filter(|p| self.covers(&p.pool_id)) {
            pool.state = pb::PoolState::Draining as i32;
            pool.slots_free = pool.slots_total;
        }
    }
}

/// Runs node `index` until the fleet stops.
pub(crate) async fn run(index: usize, shared: Arc<Shared>, replicas: Arc<Replicas>) {
    let config = &shared.config;
    let mut node = Node {
        shape: NodeShape {
            index,
            node_id: config.node_id(index),
            gpus: config.gpus,
            pools: config.pools,
            churn: config.churn,
            all_gpu_figures: config.all_gpu_figures,
            unhealthy_gpu: config.has_unhealthy_gpu(index),
        },
        silenced: config.is_silenced(index),
        replicas,
        failure: None,
        replica_refused: false,
        advised: None,
        rng: fastrand::Rng::new(),
        backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX),
        sequence: 0,
        drain: Drain::default(),
        report_now: false,
        shared: shared.clone(),
    };
    node.live().await;
}

impl Node {
    async fn live(&mut self) {
        let stop = self.shared.stop.clone();
        let mut kept = None;
        loop {
            if self.silenced && self.shared.silence.is_cancelled() {
                // A silenced node that lost its stream stays silent.
                stop.cancelled().await;
                return;
            }
            let resumed = kept.is_some();
            let (session, advertised) = match kept.take() {
                Some(kept) => kept,
                None => {
                    // Boxed: a Register call's future (tonic's and the
                    // request, ~3.6 KiB) would otherwise size every node's
                    // task for the whole run, not only while it registers.
                    let Some(registered) = Box::pin(self.register()).await else {
                        if self.pause().await {
                            continue;
                        }
                        return;
                    };
                    registered
                }
            };
            match self.heartbeats(&session, advertised).await {
                End::Stopped => return,
                End::Reregister => {}
                // The reconnect already waited its backoff: register now.
                End::Lost if resumed => {}
                End::Lost => {
                    if !self.pause().await {
                        return;
                    }
                }
                End::Failed => {
                    if !self.pause().await {
                        return;
                    }
                    kept = Some((session, advertised));
                }
            }
        }
    }

    /// Waits the next backoff delay; false when the fleet stopped meanwhile.
    async fn pause(&mut self) -> bool {
        let mut delay = match self.advised.take() {
            // The registry said when: come back then, not on the backoff.
            Some(advised) => registry_proto::retry::wait_for(advised, &mut self.rng),
            None => self.backoff.next_delay(),
        };
        if std::mem::take(&mut self.replica_refused) {
            delay = delay.min(registry_proto::replica::REPLICA_RETRY_MAX);
        }
        tokio::select! {
            () = self.shared.stop.cancelled() => false,
            () = sleep(delay) => true,
        }
    }

    /// One Register call: the session and the advertised interval, or None
    /// after counting the error.
    async fn register(&mut self) -> Option<(Session, Duration)> {
        let stats = &self.shared.stats;
        let request = self.shape.registration();
        let started = Instant::now();
        let leader = tokio::select! {
            () = self.shared.stop.cancelled() => return None,
            leader = self.replicas.leader() => leader,
        };
        let Ok(leader) = leader else {
            stats.error(Phase::Register, tonic::Code::Unavailable);
            return None;
        };
        let mut client = client(&leader);
        let call = timeout(self.shared.config.ack_timeout, client.register(request));
        let result = tokio::select! {
            () = self.shared.stop.cancelled() => return None,
            result = call => result,
        };
        match result {
            Ok(Ok(response)) => {
                stats.registered(started.elapsed());
                let response = response.into_inner();
                let advertised = response
                    .heartbeat_interval
                    .as_ref()
                    .and_then(from_proto_duration)
                    .filter(|d| !d.is_zero())
                    .unwrap_or(Duration::from_secs(10));
                let session = Session {
                    id: response.session_id,
                    secret: response.session_secret,
                };
                Some((session, advertised))
            }
            Ok(Err(status)) => {
                self.advised = registry_proto::retry::advice(&status);
                if !self.shared.stop.is_cancelled() {
                    match self.advised {
                        Some(_) => stats.deferred(),
                        None => stats.error(Phase::Register, status.code()),
                    }
                }
                self.replica_refused = registry_proto::replica::refused_by_replica(&status);
                self.replicas.failed(&leader, &status);
                None
            }
            Err(_elapsed) => {
                stats.error(Phase::Register, tonic::Code::DeadlineExceeded);
                self.replicas.failed(
                    &leader,
                    &tonic::Status::deadline_exceeded("register timed out"),
                );
                None
            }
        }
    }

    /// One heartbeat stream of `session`, until it ends.
    /// On the leader (found again first when the last failure suggested
    /// it moved: after a failover the session resumes on the new leader).
    async fn heartbeats(&mut self, session: &Session, advertised: Duration) -> End {
        let leader = tokio::select! {
            () = self.shared.stop.cancelled() => return End::Stopped,
            leader = self.replicas.leader() => leader,
        };
        let Ok(leader) = leader else {
            self.shared
                .stats
                .error(Phase::Heartbeat, tonic::Code::Unavailable);
            return End::Failed;
        };
        let mut attached = false;
        self.failure = None;
        let end = self
            .stream(&leader, session, advertised, &mut attached)
            .await;
        if attached {
            self.shared.stats.attach(-1);
        }
        if matches!(end, End::Failed) {
            let failure = self
                .failure
                .take()
                .unwrap_or_else(|| tonic::Status::unavailable("heartbeat stream lost"));
            self.replica_refused = registry_proto::replica::refused_by_replica(&failure);
            self.replicas.failed(&leader, &failure);
        }
        end
    }

    async fn stream(
        &mut self,
        leader: &Leader,
        session: &Session,
        mut advertised: Duration,
        attached: &mut bool,
    ) -> End {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let stop = &shared.stop;
        let ack_timeout = shared.config.ack_timeout;

        // Boxed messages: a tokio channel allocates slots for 32 messages
        // at once whatever its capacity, ~4.7 KiB per node for heartbeats
        // held inline, 256 bytes of slots for boxes.
        let (tx, rx) = mpsc::channel::<Box<pb::HeartbeatRequest>>(1);
        self.sequence += 1;
        let mut first = self.shape.heartbeat(
            session.id,
            &session.secret,
            self.sequence,
            true,
            &mut self.rng,
        );
        self.drain.apply(&mut first);
        if tx.try_send(Box::new(first)).is_err() {
            unreachable!("a new channel of capacity 1 has room");
        }
        let mut sent_at = Instant::now();
        stats.sent();
        let mut client = client(leader);
        let opened = tokio::select! {
            () = stop.cancelled() => return End::Stopped,
            // Boxed, as the Register call is: only the open stream is kept.
            opened = timeout(
                ack_timeout,
                Box::pin(client.heartbeat(ReceiverStream::new(rx).map(|beat| *beat))),
            ) => opened,
        };
        let mut inbound = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                stats.error(Phase::Heartbeat, status.code());
                return self.ended_by(status);
            }
            Err(_elapsed) => {
                stats.ack_timeout();
                return End::Failed;
            }
        };

        loop {
            // The ack of the message just sent.
            let message = tokio::select! {
                () = stop.cancelled() => return End::Stopped,
                message = timeout_at(sent_at + ack_timeout, inbound.message()) => message,
            };
            let ack = match message {
                Ok(Ok(Some(ack))) => ack,
                Ok(Ok(None)) => {
                    stats.stream_closed();
                    return End::Failed;
                }
                Ok(Err(status)) => {
                    if !stop.is_cancelled() {
                        stats.error(Phase::Heartbeat, status.code());
                    }
                    return self.ended_by(status);
                }
                Err(_elapsed) => {
                    stats.ack_timeout();
                    return End::Failed;
                }
            };
            if ack.sequence == 0 {
                // Pushed between acks: carry it out, keep waiting for the ack.
                if let Some(end) = self.obey(&ack, &mut advertised) {
                    return end;
                }
                continue;
            }
            stats.acked(sent_at.elapsed());
            if !*attached {
                *attached = true;
                stats.attach(1);
                self.backoff.reset();
            }
            if let Some(end) = self.obey(&ack, &mut advertised) {
                return end;
            }

            // Wait for the next send time, noticing at once if the registry
            // ends the stream meanwhile (a restart, say).
            let next = sent_at + self.jittered(shared.interval(advertised));
            while !std::mem::take(&mut self.report_now) {
                tokio::select! {
                    () = stop.cancelled() => return End::Stopped,
                    () = shared.silence.cancelled(), if self.silenced => {
                        // Fault mode: keep the stream open, send nothing.
                        stop.cancelled().await;
                        return End::Stopped;
                    }
                    () = sleep_until(next) => {
                        stats.woke_late(Instant::now().saturating_duration_since(next));
                        break;
                    }
                    message = inbound.message() => match message {
                        Ok(Some(unsolicited)) => {
                            if let Some(end) = self.obey(&unsolicited, &mut advertised) {
                                return end;
                            }
                            if std::mem::take(&mut self.report_now) {
                                break;
                            }
                        }
                        Ok(None) => {
                            stats.stream_closed();
                            return End::Failed;
                        }
                        Err(status) => {
                            if !stop.is_cancelled() {
                                stats.error(Phase::Heartbeat, status.code());
                            }
                            return self.ended_by(status);
                        }
                    },
                }
            }
            self.sequence += 1;
            let mut beat =
                self.shape
                    .heartbeat(session.id, "", self.sequence, false, &mut self.rng);
            self.drain.apply(&mut beat);
            // A failed send means the stream is gone; reading the next
            // message then yields its status.
            if tx.send(Box::new(beat)).await.is_ok() {
                stats.sent();
            }
            sent_at = Instant::now();
        }
    }

    /// Follows what an ack asks: a new interval, a new registration, or a
    /// drain or resume (reported on a beat sent at once).
    fn obey(&mut self, ack: &pb::HeartbeatResponse, advertised: &mut Duration) -> Option<End> {
        if let Some(interval) = ack
            .heartbeat_interval
            .as_ref()
            .and_then(from_proto_duration)
            .filter(|d| !d.is_zero())
        {
            *advertised = interval;
        }
        match &ack.command {
            Some(Command::Reregister(_)) => Some(End::Reregister),
            Some(Command::Drain(cmd)) => {
                if cmd.pool_ids.is_empty() {
                    self.drain.all = true;
                } else {
                    self.drain.pools.extend(cmd.pool_ids.iter().cloned());
                }
                self.report_now = true;
                None
            }
            Some(Command::Resume(cmd)) => {
                if cmd.pool_ids.is_empty() {
                    self.drain = Drain::default();
                } else {
                    for id in &cmd.pool_ids {
                        self.drain.pools.remove(id);
                    }
                }
                self.report_now = true;
                None
            }
            None => None,
        }
    }

    /// `interval` times a random factor in [1 - jitter, 1 + jitter].
    fn jittered(&mut self, interval: Duration) -> Duration {
        let jitter = self.shared.config.jitter;
        interval.mul_f64(1.0 + jitter * (2.0 * self.rng.f64() - 1.0))
    }
}

/// A client on `leader`'s channel.
fn client(leader: &Leader) -> NodeRegistryClient<Channel> {
    NodeRegistryClient::new(leader.channel.clone())
}

impl Node {
    /// How a stream ended by `status` goes on: register again where the
    /// contract says the session is gone, else reconnect with the same one
    /// (also when a newer stream of the session replaced this one: the
    /// session is still valid). The status is kept for the endpoints.
    fn ended_by(&mut self, status: tonic::Status) -> End {
        let end = if registry_proto::rules::must_register_again(status.code())
            && !registry_proto::rules::stream_replaced(&status)
        {
            End::Lost
        } else {
            End::Failed
        };
        self.failure = Some(status);
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(pools: &[&str]) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            pools: pools
                .iter()
                .map(|id| pb::PoolStatus {
                    pool_id: (*id).into(),
                    state: pb::PoolState::Ready as i32,
                    slots_total: 4,
                    slots_free: 1,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn states(beat: &pb::HeartbeatRequest) -> Vec<(pb::PoolState, u32)> {
        beat.pools
            .iter()
            .map(|p| (p.state(), p.slots_free))
            .collect()
    }

    #[test]
    fn drained_pools_report_draining_and_idle_the_rest_as_they_are() {
        let mut b = beat(&["pool-0", "pool-1"]);
        Drain::default().apply(&mut b);
        assert_eq!(
            states(&b),
            [(pb::PoolState::Ready, 1), (pb::PoolState::Ready, 1)]
        );

        let named = Drain {
            all: false,
            pools: ["pool-1".to_string()].into(),
        };
        let mut b = beat(&["pool-0", "pool-1"]);
        named.apply(&mut b);
        assert_eq!(
            states(&b),
            [(pb::PoolState::Ready, 1), (pb::PoolState::Draining, 4)]
        );

        let all = Drain {
            all: true,
            pools: Default::default(),
        };
        let mut b = beat(&["pool-0", "pool-1"]);
        all.apply(&mut b);
        assert_eq!(
            states(&b),
            [(pb::PoolState::Draining, 4), (pb::PoolState::Draining, 4)]
        );
    }
}
