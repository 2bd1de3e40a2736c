//! The one error type of the registry's domain logic, and its mapping to
//! gRPC status codes (kept in one exhaustive `match` so that adding a variant
//! forces a decision about its code).

/// Why a registry operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A request field is malformed; `field` is its path in the request
    /// ("pools[2].pool_id") so the caller can fix it.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The node is not registered (never was, was deregistered, expired, or
    /// the registry restarted). Agents recover by registering again.
    #[error("node {node_id} is not registered; call Register first")]
    NodeNotFound {
        /// The node that was asked for.
        node_id: String,
    },
    /// The caller named a session that a newer registration of the node has
    /// replaced, so an old incarnation of an agent cannot keep the node alive.
    #[error(
        "session {presented} of node {node_id} has been superseded by a newer registration; call Register again"
    )]
    SessionSuperseded {
        /// The node whose session was named.
        node_id: String,
        /// The session the caller presented.
        presented: u64,
    },
    /// A newer heartbeat stream of the same session took over, so this one
    /// was ended: one live stream per session. The agent must not
    /// register again for this (the session is fine); normally the ended
    /// stream is a dead connection's and no one reads this.
    #[error(
        "a newer heartbeat stream of session {session_id} of node {node_id} took over; this stream is closed (the session stays valid: do not register again)"
    )]
    StreamReplaced {
        /// The node the stream spoke for.
        node_id: String,
        /// The session both streams named.
        session_id: u64,
    },
    /// The server is shutting down and ends open streams.
    #[error("registry is shutting down; reconnect later")]
    ShuttingDown,
    /// This replica does not lead (a follower, or a leader that stepped
    /// down), so it takes no writes; the answer names the leader when one
    /// is known (also in the `registry-leader` metadata).
    #[error("{}", not_leader_message(leader.as_deref(), why))]
    NotLeader {
        /// The leader's URL, when known.
        leader: Option<String>,
        /// Why this replica does not lead.
        why: String,
    },
    /// No valid credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Valid credentials that may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A live node of this id is registered from another machine.
    #[error(
        "node {node_id} is ONLINE and registered from another machine; deregister it first or wait until it is OFFLINE"
    )]
    NodeTaken {
        /// The contested node id.
        node_id: String,
    },
    /// The node was loaded from the store at a restart and its owner has
    /// until `until` (the restart grace) to come back; another machine may
    /// not take the id before then.
    #[error(
        "node {node_id} was registered from another machine before the registry restarted; its owner has until {until} to come back"
    )]
    NodeReserved {
        /// The contested node id.
        node_id: String,
        /// When the restart grace ends (RFC 3339).
        until: String,
    },
    /// The store could not make a change durable; the change was not made.
    #[error("the registry's store is unavailable, nothing was changed: {0}")]
    StoreUnavailable(String),
    /// A server limit was reached.
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// Too many registrations are under way: the call was neither run nor
    /// queued (see [`crate::admission`]); it carries the time to come back
    /// as a `google.rpc.RetryInfo` detail.
    #[error(
        "too many registrations at once: {why}; retry in {} ms (google.rpc.RetryInfo in the status details)",
        retry_after.as_millis()
    )]
    Busy {
        /// Which bound turned the call away, naming its flag.
        why: String,
        /// When to come back.
        retry_after: std::time::Duration,
    },
    /// The caller was too slow (a stream that never sent its first message).
    #[error("{0}")]
    TooSlow(String),
    /// FindPools found no pool (or its pinned node is unknown); the message
    /// names the filter that left none, so the caller can relax it.
    #[error("{0}")]
    NoPlacement(String),
    /// FindPools' pinned node is registered but cannot serve the request
    /// now; the message says why.
    #[error("node unavailable: {0}")]
    NodeUnavailable(String),
    /// A watch asked for changes older than the watch history keeps; the
    /// caller must relist (ListNodes) and watch from the list's revision.
    #[error(
        "compacted; relist from revision {current}: start_revision {requested} is older than the watch history (the oldest start_revision served is {oldest})"
    )]
    Compacted {
        /// The start_revision asked for.
        requested: u64,
        /// The oldest start_revision still served.
        oldest: u64,
        /// The current revision, which a relist reads at least.
        current: u64,
    },
    /// A watcher fell more than its queue behind the feed and was ended so
    /// it cannot slow anyone or hold memory; it resumes from `resume_from`.
    #[error(
        "the watcher fell more than --watch-queue events behind; resume with start_revision {resume_from}"
    )]
    WatcherBehind {
        /// The revision up to which the watcher was sent everything.
        resume_from: u64,
    },
}

/// A placement refusal keeps its reason; only the code is decided here.
impl From<crate::placement::PlacementError> for RegistryError {
    fn from(err: crate::placement::PlacementError) -> Self {
        use crate::placement::PlacementError;
        match err {
            PlacementError::InvalidArgument { field, reason } => {
                Self::InvalidArgument { field, reason }
            }
            e @ PlacementError::UnknownNode { .. } => Self::NoPlacement(e.to_string()),
            PlacementError::NodeUnavailable { reason, .. } => Self::NodeUnavailable(reason),
            PlacementError::NoCandidate { reason, .. } => Self::NoPlacement(reason),
        }
    }
}

/// A broken contract rule (see [`registry_proto::rules`]) is an invalid
/// argument naming the same field.
impl From<registry_proto::rules::RuleError> for RegistryError {
    fn from(e: registry_proto::rules::RuleError) -> Self {
        RegistryError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

impl From<crate::auth::AuthError> for RegistryError {
    fn from(err: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError;
        match err {
            AuthError::Unauthenticated(m) => Self::Unauthenticated(m),
            AuthError::PermissionDenied(m) => Self::PermissionDenied(m),
            // A token file problem is the server's, never the caller's.
            AuthError::TokenFile { .. } => {
                Self::Unauthenticated("authentication is misconfigured".into())
            }
        }
    }
}

/// The message of [`RegistryError::NotLeader`].
fn not_leader_message(leader: Option<&str>, why: &str) -> String {
    match leader {
        Some(leader) => {
            format!("this registry replica does not lead ({why}); the leader is {leader}")
        }
        None => format!(
            "this registry replica does not lead ({why}) and no leader is elected; retry later"
        ),
    }
}

impl RegistryError {
    /// Shorthand for [`RegistryError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<RegistryError> for tonic::Status {
    fn from(err: RegistryError) -> Self {
        let code = match &err {
            RegistryError::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            RegistryError::NodeNotFound { .. } => tonic::Code::NotFound,
            RegistryError::SessionSuperseded { .. } => tonic::Code::FailedPrecondition,
            RegistryError::StreamReplaced { .. } => tonic::Code::FailedPrecondition,
            RegistryError::ShuttingDown => tonic::Code::Unavailable,
            RegistryError::NotLeader { .. } => tonic::Code::Unavailable,
            RegistryError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            RegistryError::PermissionDenied(_) => tonic::Code::PermissionDenied,
            RegistryError::NodeTaken { .. } => tonic::Code::AlreadyExists,
            RegistryError::NodeReserved { .. } => tonic::Code::AlreadyExists,
            RegistryError::StoreUnavailable(_) => tonic::Code::Unavailable,
            RegistryError::LimitReached(_) => tonic::Code::ResourceExhausted,
            RegistryError::Busy { .. } => tonic::Code::ResourceExhausted,
            RegistryError::TooSlow(_) => tonic::Code::DeadlineExceeded,
            RegistryError::NoPlacement(_) => tonic::Code::NotFound,
            RegistryError::NodeUnavailable(_) => tonic::Code::FailedPrecondition,
            RegistryError::Compacted { .. } => tonic::Code::OutOfRange,
            RegistryError::WatcherBehind { .. } => tonic::Code::ResourceExhausted,
        };
        let mut status = match &err {
            RegistryError::Busy { retry_after, .. } => {
                registry_proto::retry::refusal(code, err.to_string(), *retry_after)
            }
            _ => tonic::Status::new(code, err.to_string()),
        };
        if let RegistryError::NotLeader { leader, .. } = &err {
            // Clients retry soon (see `replica::refused_by_replica`) and
            // go straight to the leader when it is named.
            status.metadata_mut().insert(
                crate::replica::ROLE_METADATA,
                tonic::metadata::MetadataValue::from_static(registry_proto::replica::ROLE_FOLLOWER),
            );
            if let Some(value) = leader.as_ref().and_then(|l| l.parse().ok()) {
                status
                    .metadata_mut()
                    .insert(crate::replica::LEADER_METADATA, value);
            }
        }
        if let RegistryError::StreamReplaced { .. } = err {
            // FAILED_PRECONDITION alone means "register again"; this says
            // "do not": the agent reads it with `rules::stream_replaced`.
            status.metadata_mut().insert(
                registry_proto::rules::REASON_KEY,
                tonic::metadata::MetadataValue::from_static(registry_proto::rules::STREAM_REPLACED),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_code_with_a_telling_message() {
        let cases = [
            (
                RegistryError::invalid("node_id", "must not be empty"),
                tonic::Code::InvalidArgument,
                "invalid node_id: must not be empty",
            ),
            (
                RegistryError::NodeNotFound {
                    node_id: "gpu-1".into(),
                },
                tonic::Code::NotFound,
                "node gpu-1 is not registered; call Register first",
            ),
            (
                RegistryError::SessionSuperseded {
                    node_id: "gpu-1".into(),
                    presented: 7,
                },
                tonic::Code::FailedPrecondition,
                "session 7 of node gpu-1 has been superseded",
            ),
            (
                RegistryError::StreamReplaced {
                    node_id: "gpu-1".into(),
                    session_id: 7,
                },
                tonic::Code::FailedPrecondition,
                "a newer heartbeat stream of session 7 of node gpu-1 took over",
            ),
            (
                RegistryError::ShuttingDown,
                tonic::Code::Unavailable,
                "shutting down",
            ),
            (
                RegistryError::Unauthenticated("unknown token".into()),
                tonic::Code::Unauthenticated,
                "unknown token",
            ),
            (
                RegistryError::PermissionDenied("a reader token may not call Register".into()),
                tonic::Code::PermissionDenied,
                "may not call Register",
            ),
            (
                RegistryError::NodeTaken {
                    node_id: "gpu-1".into(),
                },
                tonic::Code::AlreadyExists,
                "gpu-1 is ONLINE and registered from another machine",
            ),
            (
                RegistryError::NodeReserved {
                    node_id: "gpu-1".into(),
                    until: "2026-01-01T00:00:30Z".into(),
                },
                tonic::Code::AlreadyExists,
                "its owner has until 2026-01-01T00:00:30Z to come back",
            ),
            (
                RegistryError::StoreUnavailable("disk full".into()),
                tonic::Code::Unavailable,
                "store is unavailable, nothing was changed: disk full",
            ),
            (
                RegistryError::LimitReached("at most 10 nodes".into()),
                tonic::Code::ResourceExhausted,
                "at most 10 nodes",
            ),
            (
                RegistryError::TooSlow("no first message within 30s".into()),
                tonic::Code::DeadlineExceeded,
                "no first message",
            ),
            (
                RegistryError::NoPlacement("model m is served by no pool".into()),
                tonic::Code::NotFound,
                "model m is served by no pool",
            ),
            (
                RegistryError::NodeUnavailable("node n1 runs no pool of model m".into()),
                tonic::Code::FailedPrecondition,
                "node unavailable: node n1 runs no pool of model m",
            ),
            (
                RegistryError::Compacted {
                    requested: 3,
                    oldest: 10,
                    current: 20,
                },
                tonic::Code::OutOfRange,
                "compacted; relist from revision 20",
            ),
            (
                RegistryError::WatcherBehind { resume_from: 42 },
                tonic::Code::ResourceExhausted,
                "resume with start_revision 42",
            ),
        ];
        for (err, code, text) in cases {
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code);
            assert!(
                status.message().contains(text),
                "{:?} lacks {text:?}",
                status.message()
            );
        }
    }
}
