//! The role the service asks about before every write: single, leader
//! for a term, or follower (see the module above for why).

use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;

use crate::error::RegistryError;
use crate::signal::Signal;

/// The metadata keys of the replica contract, shared with the clients.
pub use registry_proto::replica::{LEADER_METADATA, ROLE_METADATA, STALE_METADATA};

/// What a follower's reads lack, said on each of them.
pub const FOLLOWER_STALENESS: &str = "answered by a follower from the durable records: registrations, admin state and ONLINE/OFFLINE as the leader last wrote them; pool status and heartbeat times are as of registration";

/// Whether a leadership term still holds, asked synchronously.
pub type Holds = Arc<dyn Fn() -> bool + Send + Sync>;

/// One leadership term as the service sees it. Cloning shares it: every
/// open heartbeat stream holds the term it was opened under, 8 bytes of
/// its state rather than the 24 of the two parts.
#[derive(Clone)]
pub struct Term(Arc<TermParts>);

/// What a [`Term`] is.
struct TermParts {
    /// True while the lease is surely still this replica's.
    holds: Holds,
    /// Cancelled when the term ends (lease lost, step-down, shutdown).
    lost: CancellationToken,
}

impl std::fmt::Debug for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Term")
            .field("holds", &self.holds())
            .field("lost", &self.0.lost.is_cancelled())
            .finish()
    }
}

impl Term {
    /// A term that holds while `holds` says so and ends with `lost`.
    pub fn new(holds: Holds, lost: CancellationToken) -> Self {
        Self(Arc::new(TermParts { holds, lost }))
    }

    /// Whether the lease is surely still this replica's.
    pub fn holds(&self) -> bool {
        (self.0.holds)()
    }

    /// Cancelled when the term ends. Open streams are not waiting on it:
    /// they look at it when [`ReplicaRole::term_ends`] is raised, so a
    /// term ends through the role ([`ReplicaRole::follow`]), which the
    /// supervisor calls as soon as this is cancelled.
    pub fn lost(&self) -> &CancellationToken {
        &self.0.lost
    }
}

/// What this process is among the replicas.
#[derive(Clone)]
enum State {
    /// The only registry (embedded or memory store): always leads, under
    /// one term made once and shared by every stream (a term per stream
    /// cost two allocations, ~130 bytes held per open stream).
    Single(Term),
    /// Leads for this term.
    Leader(Term),
    /// Follows: refuses writes, answers reads from its copy.
    Follower {
        /// The leader's URL, when one is known.
        leader: Option<String>,
        /// Why this replica does not lead, for refusals.
        why: String,
        /// What the copy lacks, for reads.
        stale: String,
    },
}

/// The replica's role, shared by the service and the replica task.
#[derive(Clone)]
pub struct ReplicaRole {
    /// The role now; read on every write, changed on term changes only.
    state: Arc<RwLock<State>>,
    /// Raised when a term ends, once its writes are refused, so open
    /// streams of the term end at once (their term is lost by then).
    term_ends: Arc<Signal>,
}

impl std::fmt::Debug for ReplicaRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match &*self.read() {
            State::Single(_) => "single",
            State::Leader(_) => "leader",
            State::Follower { .. } => "follower",
        };
        f.debug_struct("ReplicaRole").field("state", &name).finish()
    }
}

/// A term that never ends: a single registry's.
fn forever() -> Term {
    Term::new(Arc::new(|| true), CancellationToken::new())
}

impl ReplicaRole {
    /// The role of a single registry: it always leads.
    pub fn single() -> Self {
        Self {
            state: Arc::new(RwLock::new(State::Single(forever()))),
            term_ends: Arc::default(),
        }
    }

    /// A replica that starts as a follower, before it knows any leader.
    pub fn starting_follower() -> Self {
        let role = Self::single();
        role.follow(None, "not elected yet");
        role
    }

    /// This replica leads for `term`. A term it replaces ends (which
    /// the supervisor never does: it follows between two terms).
    pub fn lead(&self, term: Term) {
        let previous = std::mem::replace(&mut *self.write(), State::Leader(term));
        self.left(previous);
    }

    /// This replica follows `leader` (when known) because of `why`; the
    /// current term, if any, ends.
    pub fn follow(&self, leader: Option<String>, why: &str) {
        let follower = State::Follower {
            leader,
            why: why.to_owned(),
            stale: FOLLOWER_STALENESS.to_owned(),
        };
        let previous = std::mem::replace(&mut *self.write(), follower);
        self.left(previous);
    }

    /// Ends the term of `previous`, the state just left, if it led: its
    /// streams wake and find it lost.
    fn left(&self, previous: State) {
        if let State::Leader(term) = previous {
            term.lost().cancel();
            self.term_ends.raise();
        }
    }

    /// Raised when a term ends (see [`ReplicaRole::follow`]).
    pub fn term_ends(&self) -> &Signal {
        &self.term_ends
    }

    /// A follower learns who leads now (from the leader key's watch).
    pub fn leader_is(&self, leader: Option<String>) {
        if let State::Follower { leader: known, .. } = &mut *self.write() {
            *known = leader;
        }
    }

    /// A follower's copy cannot follow etcd (`why`), or can again
    /// (`None`): the staleness its reads carry says so.
    pub fn mirror_lost(&self, why: Option<&str>) {
        if let State::Follower { stale, .. } = &mut *self.write() {
            *stale = match why {
                Some(why) => format!("{FOLLOWER_STALENESS}; not following etcd since: {why}"),
                None => FOLLOWER_STALENESS.to_owned(),
            };
        }
    }

    /// The term a write is made under, or why this replica takes none
    /// (UNAVAILABLE naming the leader).
    pub fn writable(&self) -> Result<Term, RegistryError> {
        match &*self.read() {
            State::Single(term) => Ok(term.clone()),
            State::Leader(term) if term.holds() => Ok(term.clone()),
            State::Leader(_) => Err(RegistryError::NotLeader {
                leader: None,
                why: "its etcd lease may have expired; stepping down".into(),
            }),
            State::Follower { leader, why, .. } => Err(RegistryError::NotLeader {
                leader: leader.clone(),
                why: why.clone(),
            }),
        }
    }

    /// Whether this replica leads now (a single registry always does).
    pub fn leads(&self) -> bool {
        self.writable().is_ok()
    }

    /// What a read's answer must say about its staleness: `None` on the
    /// leader (or a single registry), the text on a follower.
    pub fn staleness(&self) -> Option<String> {
        match &*self.read() {
            State::Follower { stale, .. } => Some(stale.clone()),
            State::Single(_) | State::Leader(_) => None,
        }
    }

    /// Adds the follower's metadata to a read's response (nothing on the
    /// leader).
    pub fn mark_read<T>(&self, mut response: tonic::Response<T>) -> tonic::Response<T> {
        if let Some(stale) = self.staleness() {
            let metadata = response.metadata_mut();
            metadata.insert(
                ROLE_METADATA,
                tonic::metadata::MetadataValue::from_static(registry_proto::replica::ROLE_FOLLOWER),
            );
            if let Ok(value) = stale.parse() {
                metadata.insert(STALE_METADATA, value);
            }
            if let State::Follower {
                leader: Some(leader),
                ..
            } = &*self.read()
                && let Ok(value) = leader.parse()
            {
                metadata.insert(LEADER_METADATA, value);
            }
        }
        response
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn a_single_registry_always_takes_writes_and_marks_no_read() {
        let role = ReplicaRole::single();
        let term = role.writable().unwrap();
        assert!(term.holds() && !term.lost().is_cancelled());
        let response = role.mark_read(tonic::Response::new(()));
        assert!(response.metadata().get(ROLE_METADATA).is_none());
    }

    #[test]
    fn a_follower_refuses_writes_naming_the_leader_and_marks_reads() {
        let role = ReplicaRole::starting_follower();
        let err = role.writable().unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("no leader is elected"),
            "{}",
            status.message()
        );
        assert!(status.metadata().get(LEADER_METADATA).is_none());

        role.leader_is(Some("http://10.0.0.2:50051".into()));
        let status = tonic::Status::from(role.writable().unwrap_err());
        assert_eq!(
            status.metadata().get(LEADER_METADATA).unwrap(),
            "http://10.0.0.2:50051"
        );
        assert!(
            status
                .message()
                .contains("the leader is http://10.0.0.2:50051")
        );

        role.mirror_lost(Some("etcd unreachable"));
        let response = role.mark_read(tonic::Response::new(()));
        assert_eq!(response.metadata().get(ROLE_METADATA).unwrap(), "follower");
        let stale = response
            .metadata()
            .get(STALE_METADATA)
            .unwrap()
            .to_str()
            .unwrap();
        assert!(stale.contains("etcd unreachable"), "{stale}");
        assert_eq!(
            response.metadata().get(LEADER_METADATA).unwrap(),
            "http://10.0.0.2:50051"
        );
    }

    #[test]
    fn a_leader_takes_writes_only_while_its_lease_holds_and_its_term_ends_on_step_down() {
        let role = ReplicaRole::starting_follower();
        let holds = Arc::new(AtomicBool::new(true));
        let lost = CancellationToken::new();
        let flag = holds.clone();
        role.lead(Term::new(
            Arc::new(move || flag.load(Ordering::SeqCst)),
            lost.clone(),
        ));
        let term = role.writable().unwrap();
        assert!(role.staleness().is_none());

        // The lease may have run out before the replica noticed.
        holds.store(false, Ordering::SeqCst);
        let status = tonic::Status::from(role.writable().unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(!role.leads());

        let seen = role.term_ends().seen();
        role.follow(None, "lease lost");
        assert!(term.lost().is_cancelled(), "streams of the term end");
        assert!(role.term_ends().raised_since(seen), "and are woken to");
        let seen = role.term_ends().seen();
        role.follow(None, "still following");
        assert!(!role.term_ends().raised_since(seen), "no term ended");

        // A term led over without following in between ends all the same.
        let first = CancellationToken::new();
        role.lead(Term::new(Arc::new(|| true), first.clone()));
        let seen = role.term_ends().seen();
        role.lead(Term::new(Arc::new(|| true), CancellationToken::new()));
        assert!(first.is_cancelled());
        assert!(role.term_ends().raised_since(seen));
    }
}
