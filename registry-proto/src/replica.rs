//! What registry replicas tell their clients, in response metadata: where
//! the leader is (a follower refusing a write), which role answered a
//! read, and how stale a follower's answer may be. Servers set these keys
//! and clients read them through the helpers here, so both sides spell
//! them the same way.

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::rules::{self, Field};

/// Metadata key of a follower's UNAVAILABLE answer to a write: the URL of
/// the leader (`http://10.0.0.2:50051`), absent while no leader is
/// elected.
pub const LEADER_METADATA: &str = "registry-leader";

/// Metadata key of a read's answer: which role answered it. Followers
/// send [`ROLE_FOLLOWER`]; a leader and a single-process registry send
/// none (their answers are current). [`ROLE_LEADER`] is the value a client
/// may compare against for completeness.
pub const ROLE_METADATA: &str = "registry-role";

/// Metadata key of a follower's read answer: text saying how stale its
/// mirror may be. Clients show it to people as it is.
pub const STALE_METADATA: &str = "registry-stale";

/// [`ROLE_METADATA`] value of the leader's answers.
pub const ROLE_LEADER: &str = "leader";

/// [`ROLE_METADATA`] value of a follower's answers.
pub const ROLE_FOLLOWER: &str = "follower";

/// The health service name that is SERVING on the leader only: clients
/// find the leader by asking each replica's health for it.
pub const LEADER_HEALTH_SERVICE: &str = "registry.v1.NodeRegistry";

/// The leader URL a refused call points to: the [`LEADER_METADATA`] of an
/// UNAVAILABLE status, when it is a usable registry URL. Anything else
/// (another code, no key, a value that is not an `http(s)://` URL) is
/// `None`: the client finds the leader by asking health instead.
pub fn leader_hint(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let value = status
        .metadata()
        .get(LEADER_METADATA)?
        .to_str()
        .ok()?
        .trim();
    rules::address(Field::Name(LEADER_METADATA), value).ok()?;
    Some(value.to_owned())
}

/// A follower's refusal of a write: UNAVAILABLE pointing at `leader`, or
/// saying that no leader is elected when there is none. For servers and
/// the test stubs that stand in for followers.
pub fn not_leader(leader: Option<&str>) -> Status {
    let mut status =
        match leader.and_then(|url| MetadataValue::try_from(url).ok().map(|v| (url, v))) {
            Some((url, value)) => {
                let mut status = Status::unavailable(format!(
                    "this registry replica is a follower; writes go to the leader at {url}"
                ));
                status.metadata_mut().insert(LEADER_METADATA, value);
                status
            }
            None => Status::unavailable(
                "this registry replica is a follower and no leader elected; retry later",
            ),
        };
    status
        .metadata_mut()
        .insert(ROLE_METADATA, MetadataValue::from_static(ROLE_FOLLOWER));
    status
}

/// The longest a client waits before asking again after
/// [`refused_by_replica`]: the registry answered, and an election takes
/// at most a lease's TTL, so a long backoff would only leave the node
/// silent past its timeout once a leader is back.
pub const REPLICA_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `status` is a replica's refusal because it does not lead (a
/// follower, or a leader that stepped down): UNAVAILABLE with the
/// follower role or a leader hint.
pub fn refused_by_replica(status: &Status) -> bool {
    status.code() == Code::Unavailable
        && (role(status.metadata()) == Some(ROLE_FOLLOWER)
            || status.metadata().get(LEADER_METADATA).is_some())
}

/// The [`STALE_METADATA`] text of an answer, when a follower sent one.
pub fn staleness(metadata: &MetadataMap) -> Option<String> {
    let text = metadata.get(STALE_METADATA)?.to_str().ok()?.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// The [`ROLE_METADATA`] of an answer, when there is one.
pub fn role(metadata: &MetadataMap) -> Option<&str> {
    metadata.get(ROLE_METADATA)?.to_str().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_by_a_replica_are_told_from_other_unavailable_answers() {
        assert!(refused_by_replica(&not_leader(None)));
        assert!(refused_by_replica(&not_leader(Some(
            "http://10.0.0.2:50051"
        ))));
        assert!(!refused_by_replica(&Status::unavailable("shutting down")));
        assert!(!refused_by_replica(&Status::not_found("gpu-1")));
    }

    #[test]
    fn a_follower_refusal_carries_the_leader() {
        let status = not_leader(Some("http://10.0.0.2:50051"));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            leader_hint(&status).as_deref(),
            Some("http://10.0.0.2:50051")
        );
        assert!(status.message().contains("http://10.0.0.2:50051"));
    }

    #[test]
    fn no_leader_elected_has_no_hint() {
        let status = not_leader(None);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("no leader elected"));
        assert_eq!(leader_hint(&status), None);
    }

    #[test]
    fn hints_only_count_on_unavailable_and_as_urls() {
        let mut other = Status::not_found("gone");
        other
            .metadata_mut()
            .insert(LEADER_METADATA, "http://a:1".parse().unwrap());
        assert_eq!(leader_hint(&other), None);
        let mut garbage = Status::unavailable("down");
        garbage
            .metadata_mut()
            .insert(LEADER_METADATA, "not a url".parse().unwrap());
        assert_eq!(leader_hint(&garbage), None);
        let mut ftp = Status::unavailable("down");
        ftp.metadata_mut()
            .insert(LEADER_METADATA, "ftp://a:1".parse().unwrap());
        assert_eq!(leader_hint(&ftp), None);
    }

    #[test]
    fn staleness_and_role_are_read_from_metadata() {
        let mut metadata = MetadataMap::new();
        assert_eq!(staleness(&metadata), None);
        assert_eq!(role(&metadata), None);
        metadata.insert(ROLE_METADATA, ROLE_FOLLOWER.parse().unwrap());
        metadata.insert(
            STALE_METADATA,
            " up to 2s behind the leader ".parse().unwrap(),
        );
        assert_eq!(role(&metadata), Some(ROLE_FOLLOWER));
        assert_eq!(
            staleness(&metadata).as_deref(),
            Some("up to 2s behind the leader")
        );
        metadata.insert(STALE_METADATA, "".parse().unwrap());
        assert_eq!(staleness(&metadata), None);
    }
}
