//! Sessions: their ids and secrets, and the checks that only the current
//! session of a node may speak for it.

use std::sync::atomic::{AtomicU64, Ordering};

use subtle::ConstantTimeEq;

use super::node::{NodeSlot, NodeState};
use crate::error::RegistryError;

/// Session ids: unique within a server run and, by a random base, unlikely
/// to repeat a previous run's, so an agent from before a restart cannot
/// accidentally present a valid session.
pub(super) struct SessionIds {
    /// Random offset chosen at start-up.
    pub(super) base: u64,
    /// Counter added to `base`; never repeats within a run.
    pub(super) next: AtomicU64,
}

impl SessionIds {
    pub(super) fn new() -> Self {
        use std::hash::BuildHasher;
        let seed = (std::time::SystemTime::now(), std::process::id());
        Self {
            base: std::collections::hash_map::RandomState::new().hash_one(seed),
            next: AtomicU64::new(1),
        }
    }

    pub(super) fn next(&self) -> u64 {
        loop {
            let id = self
                .base
                .wrapping_add(self.next.fetch_add(1, Ordering::Relaxed));
            // 0 means "no session" in the contract.
            if id != 0 {
                return id;
            }
        }
    }
}

/// 128 random bits from the OS, as 32 hex digits.
pub(super) fn new_secret() -> String {
    let mut bytes = [0u8; 16];
    // The OS random source failing is not recoverable for a server that
    // hands out credentials.
    getrandom::fill(&mut bytes).expect("the OS random number generator failed");
    registry_proto::rules::lower_hex(&bytes)
}

/// Whether two secrets are equal, compared in constant time so the time
/// taken tells an attacker nothing about how much of a guess was right.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub(super) fn not_found(node_id: &str) -> RegistryError {
    RegistryError::NodeNotFound {
        node_id: node_id.to_string(),
    }
}

/// The node is still listed and `session_id` is its current session.
pub(super) fn check_session(
    slot: &NodeSlot,
    st: &NodeState,
    session_id: u64,
) -> Result<(), RegistryError> {
    if st.removed {
        return Err(not_found(&slot.id));
    }
    if st.session_id != session_id {
        return Err(RegistryError::SessionSuperseded {
            node_id: slot.id.to_string(),
            presented: session_id,
        });
    }
    Ok(())
}

/// [`check_session`], and the stream numbered `stream` is still the
/// session's live one (0: a caller bound to no stream, never replaced).
pub(super) fn check_stream(
    slot: &NodeSlot,
    st: &NodeState,
    session_id: u64,
    stream: u64,
) -> Result<(), RegistryError> {
    check_session(slot, st, session_id)?;
    if stream != 0 && st.stream_gen != stream {
        return Err(RegistryError::StreamReplaced {
            node_id: slot.id.to_string(),
            session_id,
        });
    }
    Ok(())
}

/// The presented secret is the current session's.
pub(super) fn check_secret(
    slot: &NodeSlot,
    st: &NodeState,
    presented: &str,
) -> Result<(), RegistryError> {
    if presented.is_empty() {
        return Err(RegistryError::PermissionDenied(format!(
            "node {} requires its session_secret (from RegisterResponse)",
            slot.id
        )));
    }
    let presented = crate::store::secret_sha256(presented);
    if !bool::from(presented.ct_eq(&st.secret_sha256)) {
        return Err(RegistryError::PermissionDenied(format!(
            "the session_secret does not match node {}'s session",
            slot.id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_32_lowercase_hex_digits_and_differ() {
        let (a, b) = (new_secret(), new_secret());
        for secret in [&a, &b] {
            assert_eq!(secret.len(), 32, "{secret}");
            assert!(
                secret
                    .bytes()
                    .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "{secret}"
            );
        }
        assert_ne!(a, b);
    }
}
