//! The replica task: follow the leader's records, campaign, lead for a
//! term, step down, and again, until shutdown.
//!
//! Why it looks like this:
//! - One loop owns the role changes, in one order: a follower keeps its
//!   copy current (`Registry::mirror_*`) while it campaigns; elected, it
//!   applies what the watch still holds, takes over (one node timeout of
//!   grace for every ONLINE node), and only then takes writes and runs the
//!   expiry task; when the term ends it stops taking writes first (the
//!   service's heartbeat streams end with the term), then stops the expiry
//!   task. Only the leader ever decides liveness (Nomad: heartbeat timers
//!   on the leader only).
//! - What talks to etcd is behind [`Coordinator`], so the loop is tested
//!   on tokio's paused clock against an in-memory coordinator, and the
//!   etcd one (`store::etcd`) is tested against real etcd members.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use registry_proto::backoff::Backoff;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use super::{ReplicaRole, Term};
use crate::registry::{Now, Registry};
use crate::store::{LivenessRecord, Loaded, NodeRecord, StoreError};

/// The health entry that is SERVING on the leader only.
pub use registry_proto::replica::LEADER_HEALTH_SERVICE;

/// One change of the durable records, as a follower's watch sees it.
#[derive(Debug, Clone)]
pub enum MirrorEvent {
    /// A node's record was written (register, re-register).
    PutNode(NodeRecord),
    /// A node's record was deleted (deregister, removal after retention).
    DeleteNode(String),
    /// A node's admin state was written (`None`: deleted).
    Admin(String, Option<registry_proto::pb::AdminState>),
    /// A node's ONLINE↔OFFLINE transition was written.
    Liveness(String, LivenessRecord),
    /// The watch lost its history: the full state, read anew.
    Reset(Loaded),
    /// The watch cannot follow etcd (why); changes may be missed until
    /// `Restored` or `Reset`.
    Lost(String),
    /// The watch follows etcd again.
    Restored,
}

/// A term won: the service's view of it, and how to give it up.
pub struct Lead {
    /// Holds while the lease surely does; cancelled when it ends.
    pub term: Term,
    /// Gives the term up (graceful shutdown: the next replica takes over
    /// at once instead of after the lease's TTL).
    pub resign: BoxFuture<'static, ()>,
}

/// What the replica loop needs from the coordination service (etcd).
pub trait Coordinator: Send + Sync + 'static {
    /// Every durable record, read at once, with the revision it was read
    /// at.
    fn load(&self) -> BoxFuture<'static, Result<(Loaded, i64), StoreError>>;
    /// The changes after `after` (exclusive), until `stop`.
    fn mirror(&self, after: i64, stop: CancellationToken) -> mpsc::Receiver<MirrorEvent>;
    /// The leader's URL, kept current until `stop` (`None`: none known).
    fn observe_leader(&self, stop: CancellationToken) -> watch::Receiver<Option<String>>;
    /// Waits until this replica leads; from then on until the term ends,
    /// the store's writes are fenced by it.
    fn campaign(&self, stop: CancellationToken) -> BoxFuture<'static, Result<Lead, StoreError>>;
}

/// Everything the replica loop drives.
pub struct Replica {
    /// The registry: a follower's copy, then the leader's.
    pub registry: Registry,
    /// What the service asks before every write.
    pub role: ReplicaRole,
    /// etcd (or a test's stand-in).
    pub coordinator: Arc<dyn Coordinator>,
    /// Health: `registry.v1.NodeRegistry` SERVING on the leader only.
    pub health: tonic_health::server::HealthReporter,
}

/// Why the replica loop ended before shutdown: its expiry task stopped.
#[derive(Debug)]
pub struct ExpiryStopped(pub String);

/// How long to wait before retrying an etcd read or campaign that failed.
fn retry_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5))
}

impl Replica {
    /// Runs the replica until `stop`: follows, campaigns, leads with
    /// `expiry` as the deadline loop of each term. Ends early only if a
    /// term's expiry task stops by itself (never: a fault).
    pub async fn run<E, F>(self, stop: CancellationToken, expiry: E) -> Result<(), ExpiryStopped>
    where
        E: Fn(Registry, CancellationToken) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let mut leader = self.coordinator.observe_leader(stop.child_token());
        let mut after_term = false;
        loop {
            let Some(lead) = self
                .follow_until_elected(&stop, &mut leader, after_term)
                .await
            else {
                return Ok(());
            };
            let ended = self.lead(lead, &stop, &expiry).await?;
            if ended == TermEnd::Shutdown {
                return Ok(());
            }
            after_term = true;
        }
    }

    /// The follower's part: a current copy of the records while
    /// campaigning. `None` when `stop` came first.
    async fn follow_until_elected(
        &self,
        stop: &CancellationToken,
        leader: &mut watch::Receiver<Option<String>>,
        after_term: bool,
    ) -> Option<Lead> {
        // Right after this replica's own term the leader key still names
        // it (until the watch reports the change): naming itself as the
        // leader would send clients back here.
        let known = if after_term {
            leader.borrow_and_update();
            None
        } else {
            leader.borrow().clone()
        };
        self.role.follow(known, "it is a follower");
        self.health
            .set_service_status(LEADER_HEALTH_SERVICE, ServingStatus::NotServing)
            .await;
        let mut backoff = retry_backoff();
        // The copy first: a full read, then the changes after it.
        let revision = loop {
            match self.coordinator.load().await {
                Ok((loaded, revision)) => {
                    self.registry.mirror_reset(loaded, Now::read());
                    self.role.mirror_lost(None);
                    break revision;
                }
                Err(err) => {
                    warn!(error = %err, "cannot read the records from etcd; retrying");
                    self.role.mirror_lost(Some(&err.to_string()));
                    tokio::select! {
                        () = stop.cancelled() => return None,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        };
        let mirror_stop = stop.child_token();
        let mut events = self.coordinator.mirror(revision, mirror_stop.clone());
        let mut missed = false;
        loop {
            let campaign = self.coordinator.campaign(stop.child_token());
            tokio::pin!(campaign);
            let won = loop {
                tokio::select! {
                    () = stop.cancelled() => {
                        mirror_stop.cancel();
                        return None;
                    }
                    won = &mut campaign => break won,
                    Some(event) = events.recv() => self.apply(event, &mut missed),
                    Ok(()) = leader.changed() => self.role.leader_is(leader.borrow_and_update().clone()),
                }
            };
            match won {
                Ok(lead) => {
                    mirror_stop.cancel();
                    // What the watch delivered before the election counts;
                    // a copy that missed changes is read anew.
                    while let Ok(event) = events.try_recv() {
                        self.apply(event, &mut missed);
                    }
                    if missed && !self.reload(&lead.term).await {
                        continue;
                    }
                    return Some(lead);
                }
                Err(err) => {
                    warn!(error = %err, "campaign for leadership failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => {
                            mirror_stop.cancel();
                            return None;
                        }
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Reads every record anew after the copy missed changes; false (and
    /// the term given up) when etcd cannot be read.
    async fn reload(&self, term: &Term) -> bool {
        match self.coordinator.load().await {
            Ok((loaded, _)) => {
                self.registry.mirror_reset(loaded, Now::read());
                true
            }
            Err(err) => {
                warn!(error = %err, "elected, but the records cannot be read; not taking over");
                term.lost().cancel();
                false
            }
        }
    }

    /// Applies one change of the leader's records to the copy.
    fn apply(&self, event: MirrorEvent, missed: &mut bool) {
        let now = Now::read();
        match event {
            MirrorEvent::PutNode(record) => self.registry.mirror_put_node(record, now),
            MirrorEvent::DeleteNode(node_id) => self.registry.mirror_delete_node(&node_id),
            MirrorEvent::Admin(node_id, admin) => self.registry.mirror_admin(&node_id, admin, now),
            MirrorEvent::Liveness(node_id, liveness) => {
                self.registry
                    .mirror_liveness(&node_id, liveness.online, liveness.since, now);
            }
            MirrorEvent::Reset(loaded) => {
                self.registry.mirror_reset(loaded, now);
                *missed = false;
                self.role.mirror_lost(None);
            }
            MirrorEvent::Lost(why) => {
                *missed = true;
                self.role.mirror_lost(Some(&why));
            }
            MirrorEvent::Restored => self.role.mirror_lost(None),
        }
    }

    /// One term: take over, lead until the term ends or shutdown.
    async fn lead<E, F>(
        &self,
        lead: Lead,
        stop: &CancellationToken,
        expiry: &E,
    ) -> Result<TermEnd, ExpiryStopped>
    where
        E: Fn(Registry, CancellationToken) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let graced = self.registry.take_over(Now::read());
        info!(
            nodes = graced,
            "leading: every ONLINE node has one node timeout from now to be heard from"
        );
        let term = lead.term.clone();
        self.role.lead(term.clone());
        self.health
            .set_service_status(LEADER_HEALTH_SERVICE, ServingStatus::Serving)
            .await;
        let expiry_stop = CancellationToken::new();
        let mut expiry_task = tokio::spawn(expiry(self.registry.clone(), expiry_stop.clone()));
        let ended = tokio::select! {
            () = term.lost().cancelled() => TermEnd::Lost,
            () = stop.cancelled() => TermEnd::Shutdown,
            joined = &mut expiry_task => {
                let why = match joined {
                    Ok(()) => "it returned".to_string(),
                    Err(err) => err.to_string(),
                };
                self.role.follow(None, "its expiry task stopped");
                return Err(ExpiryStopped(why));
            }
        };
        // Writes stop first (the role), then the deadline loop.
        self.role.follow(None, "it stepped down");
        self.health
            .set_service_status(LEADER_HEALTH_SERVICE, ServingStatus::NotServing)
            .await;
        expiry_stop.cancel();
        let _ = expiry_task.await;
        match ended {
            TermEnd::Lost => warn!("stepped down: the etcd lease ended; following again"),
            TermEnd::Shutdown => {
                lead.resign.await;
                info!("resigned the leadership at shutdown");
            }
        }
        Ok(ended)
    }
}

/// How a term ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TermEnd {
    /// The lease ended (etcd unreachable, a freeze past the TTL).
    Lost,
    /// The server shuts down; the term was resigned.
    Shutdown,
}
