//! The one task that enforces deadlines: it sleeps until the earliest queued
//! wake-up (or until an earlier one is queued), reads the clocks, then lets
//! the registry mark overdue nodes OFFLINE and remove expired ones. There is
//! no periodic scan, so a node goes OFFLINE at its own deadline, not at the
//! next tick. The queue is [`crate::schedule::Schedule`]; the rules are the
//! registry's (`registry/deadlines.rs`).
//!
//! The task also notices when it was stalled: it remembers when it asked to
//! wake, and a wake-up far later than that (see
//! [`crate::registry::stall_threshold`]) means the process was paused or
//! starved, so the silence it would judge is its own. The registry then
//! gives every node a fresh grace ([`Registry::woke`]) before looking at
//! any deadline. The lateness is measured with tokio's clock, the one the
//! tests pause and advance.
//!
//! If this task ever ends before shutdown, nodes silently stop going
//! OFFLINE; [`crate::server`] therefore watches it and stops the server.

use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::registry::{Now, Registry};

/// Runs until `shutdown` is cancelled.
pub async fn run(registry: Registry, shutdown: CancellationToken) {
    // When the loop asked to wake; `None` while it waits without a deadline.
    // Kept when something else wakes it: woken early, it is not late; woken
    // late (a stall ends with both ready), it is.
    let mut asked = None;
    loop {
        let now = Now::read();
        registry.woke(asked, now);
        let next = registry.process_due(now);
        asked = next;
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
