//! The one task that enforces deadlines: it sleeps until the earliest queued
//! wake-up (or until an earlier one is queued), reads the clocks, then lets
//! the registry mark overdue nodes OFFLINE and remove expired ones. There is
//! no periodic scan, so a node goes OFFLINE at its own deadline, not at the
//! next tick. The queue is [`crate::schedule::Schedule`]; the rules are the
//! registry's (`registry/deadlines.rs`).
//!
//! If this task ever ends before shutdown, nodes silently stop going
//! OFFLINE; [`crate::server`] therefore watches it and stops the server.

use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::registry::{Now, Registry};

/// Runs until `shutdown` is cancelled.
pub async fn run(registry: Registry, shutdown: CancellationToken) {
    loop {
        let next = registry.process_due(Now::read());
        let sleep = async {
            match next {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = registry.schedule_changed() => {}
            () = sleep => {}
        }
    }
}
