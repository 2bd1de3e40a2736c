//! WatchNodes, the service side of the change feed: starts a watcher at a
//! snapshot or a revision ([`crate::events::Feed::subscribe`]), turns the
//! shared events into the watcher's view of its filter (a node entering the
//! filter is ADDED, one leaving it DELETED), sends progress when nothing
//! happens, and ends a watcher that falls behind or outlives the server.
//!
//! Costs: an event is built once and shared (`Arc`) by every watcher; each
//! watcher still copies the node into its own response message and encodes
//! it, which prost's owned message types make unavoidable. A filtered
//! watcher remembers which nodes it holds (one entry per node in its view;
//! after a resume also per node seen out of it), so it can tell entering
//! from leaving; an unfiltered one keeps nothing per node. The live queue
//! is tokio's broadcast ring, whose capacity is `--watch-queue` rounded up
//! to a power of two.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::Stream;
use registry_proto::pb;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info};

use crate::error::RegistryError;
use crate::events::{Backlog, Event, EventKind, Start, StartError};
use crate::registry::{NodeFilter, Registry};

/// The stream of one watcher.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchNodesResponse, Status>> + Send + 'static>>;

/// What every watcher shares: the cap on their number and their timing.
#[derive(Clone)]
pub struct Watchers {
    /// Watchers open now, shared so each stream's guard can count itself
    /// out when it ends.
    open: Arc<AtomicUsize>,
    /// Most concurrent watchers (`--max-watchers`).
    max: usize,
    /// Silence after which a watcher gets a PROGRESS event
    /// (`--watch-progress-interval`).
    progress_interval: Duration,
}

impl Watchers {
    /// At most `max` watchers, each told its progress after
    /// `progress_interval` of silence.
    pub fn new(max: usize, progress_interval: Duration) -> Self {
        Self {
            open: Arc::new(AtomicUsize::new(0)),
            max,
            progress_interval,
        }
    }

    /// Watchers open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Starts one watcher for `request` (already authorized) on `registry`;
    /// it ends when `shutdown` is cancelled.
    pub fn watch(
        &self,
        registry: &Registry,
        filter: NodeFilter,
        start_revision: u64,
        shutdown: CancellationToken,
    ) -> Result<WatchStream, RegistryError> {
        // Counted first so that concurrent opens cannot all slip under the
        // cap; a refused watcher takes its count back when the guard drops.
        let guard = OpenWatcher(self.open.clone());
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            return Err(RegistryError::LimitReached(format!(
                "the registry serves at most {} watchers",
                self.max
            )));
        }
        let start = match start_revision {
            0 => Start::Snapshot,
            r => Start::After(r),
        };
        let subscription = registry.feed().subscribe(start).map_err(|err| match err {
            StartError::Compacted {
                requested,
                oldest,
                current,
            } => RegistryError::Compacted {
                requested,
                oldest,
                current,
            },
            StartError::Future { requested, current } => RegistryError::invalid(
                "start_revision",
                format!("{requested} is above the current revision {current}"),
            ),
        })?;
        let (seen, marker) = match start {
            Start::Snapshot => (0, Some(subscription.revision)),
            Start::After(r) => (r, None),
        };
        let filtered = filter.status.is_some()
            || filter.pool_id.is_some()
            || filter.model.is_some()
            || !filter.labels.is_empty();
        debug!(
            start_revision,
            revision = subscription.revision,
            "watcher started"
        );
        let watcher = Watcher {
            filter: filtered.then_some(filter),
            held: HashMap::new(),
            complete: matches!(start, Start::Snapshot),
            backlog: subscription.backlog,
            marker,
            live: subscription.live,
            seen,
            progress_interval: self.progress_interval,
            quiet_since: Instant::now(),
            shutdown,
            done: false,
            _open: guard,
            instance: registry.instance().clone(),
        };
        let stream = futures_util::stream::unfold(watcher, |mut watcher| async move {
            let reply = watcher.next_reply().await?;
            Some((reply, watcher))
        });
        Ok(Box::pin(stream))
    }
}

/// One open watcher in the count, until dropped.
struct OpenWatcher(Arc<AtomicUsize>);

impl Drop for OpenWatcher {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The server side of one WatchNodes stream.
struct Watcher {
    /// The request's filters; None when it set none (every event passes
    /// unchanged and nothing is remembered per node).
    filter: Option<NodeFilter>,
    /// For a filtered watch: whether each node the watcher was told about
    /// is in its view (true) or out of it (false), so a node entering the
    /// filter is ADDED and one leaving it DELETED.
    held: HashMap<String, bool>,
    /// Whether `held` knows every node the client holds (a snapshot start);
    /// after a resume, a node not in `held` may be held by the client, so
    /// one that does not match is sent as DELETED to be safe.
    complete: bool,
    /// What to send before the live events: the snapshot or the history
    /// since the asked revision.
    backlog: Backlog,
    /// For a snapshot start: the revision of the SNAPSHOT_COMPLETE marker,
    /// sent after the backlog.
    marker: Option<u64>,
    /// Every event after the backlog.
    live: broadcast::Receiver<Event>,
    /// The watcher has been sent (or skipped as not matching) every event
    /// up to this revision: PROGRESS and the resume hint name it.
    seen: u64,
    /// Silence after which a PROGRESS event is sent.
    progress_interval: Duration,
    /// When the latest message was sent.
    quiet_since: Instant,
    /// Ends the stream when the server shuts down.
    shutdown: CancellationToken,
    /// Set once the stream has ended with an error.
    done: bool,
    /// Keeps the watcher counted while it lives.
    _open: OpenWatcher,
    /// Which registry answers; sent with every message, so a watcher can
    /// tell a restarted registry.
    instance: pb::RegistryInstance,
}

impl Watcher {
    /// The next message; None ends the stream.
    async fn next_reply(&mut self) -> Option<Result<pb::WatchNodesResponse, Status>> {
        if self.done {
            return None;
        }
        while let Some(event) = self.backlog.next() {
            let event = match event {
                Ok(event) => event,
                Err(err) => {
                    self.done = true;
                    return Some(Err(Status::internal(err.to_string())));
                }
            };
            if let Some(reply) = self.translate(&event) {
                return Some(Ok(self.sent(reply)));
            }
        }
        if let Some(revision) = self.marker.take() {
            self.seen = revision;
            return Some(Ok(self.sent(pb::WatchNodesResponse {
                r#type: pb::WatchEventType::SnapshotComplete as i32,
                revision,
                node: None,
                registry: None,
            })));
        }
        loop {
            let progress_at = self.quiet_since + self.progress_interval;
            let received = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    return self.fail(RegistryError::ShuttingDown);
                }
                received = self.live.recv() => received,
                () = tokio::time::sleep_until(progress_at) => {
                    return Some(Ok(self.progress()));
                }
            };
            match received {
                Ok(event) => {
                    if let Some(reply) = self.translate(&event) {
                        return Some(Ok(self.sent(reply)));
                    }
                    // Events this watcher's filter skips must not starve
                    // its progress.
                    if Instant::now() >= progress_at {
                        return Some(Ok(self.progress()));
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    info!(
                        missed,
                        resume_from = self.seen,
                        "watcher fell behind; ending it"
                    );
                    return self.fail(RegistryError::WatcherBehind {
                        resume_from: self.seen,
                    });
                }
                Err(RecvError::Closed) => return self.fail(RegistryError::ShuttingDown),
            }
        }
    }

    fn fail(&mut self, err: RegistryError) -> Option<Result<pb::WatchNodesResponse, Status>> {
        self.done = true;
        Some(Err(err.into()))
    }

    /// A PROGRESS event at the revision the watcher is complete up to.
    fn progress(&mut self) -> pb::WatchNodesResponse {
        let revision = self.seen;
        self.sent(pb::WatchNodesResponse {
            r#type: pb::WatchEventType::Progress as i32,
            revision,
            node: None,
            registry: None,
        })
    }

    fn sent(&mut self, mut reply: pb::WatchNodesResponse) -> pb::WatchNodesResponse {
        self.quiet_since = Instant::now();
        reply.registry = Some(self.instance.clone());
        reply
    }

    /// What the watcher is told about `event`, if anything.
    fn translate(&mut self, event: &Event) -> Option<pb::WatchNodesResponse> {
        let snapshot = self.marker.is_some();
        if !snapshot {
            if event.revision <= self.seen {
                return None;
            }
            self.seen = event.revision;
        }
        let kind = match &self.filter {
            None => event.kind,
            Some(filter) => {
                let node = &event.node;
                let now_in = event.kind != EventKind::Deleted && filter.matches(node);
                let was_in = self.held.get(node.node_id()).copied();
                let kind = match (was_in, now_in) {
                    (Some(true), true) => event.kind,
                    (Some(false), true) => EventKind::Added,
                    (None, true) if self.complete => EventKind::Added,
                    (None, true) => event.kind,
                    (Some(true), false) => EventKind::Deleted,
                    (None, false) if !self.complete => EventKind::Deleted,
                    (Some(false) | None, false) => {
                        self.remember(node.node_id(), false, event.kind);
                        return None;
                    }
                };
                self.remember(node.node_id(), now_in, event.kind);
                kind
            }
        };
        Some(pb::WatchNodesResponse {
            r#type: kind.to_proto() as i32,
            revision: event.revision,
            node: Some(event.node.to_proto()),
            registry: None,
        })
    }

    /// Notes whether `node_id` is in the watcher's view. A removed node is
    /// forgotten, and after a snapshot so is one out of view (absent means
    /// out then), so `held` holds only the watcher's own nodes; after a
    /// resume, "out" is remembered so it is told only once.
    fn remember(&mut self, node_id: &str, held: bool, kind: EventKind) {
        if kind == EventKind::Deleted || (!held && self.complete) {
            self.held.remove(node_id);
        } else if let Some(entry) = self.held.get_mut(node_id) {
            *entry = held;
        } else {
            self.held.insert(node_id.to_string(), held);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use registry_proto::pb;

    use super::*;
    use crate::registry::tests::registration;
    use crate::registry::{Now, Timing};

    #[tokio::test(start_paused = true)]
    async fn events_a_filter_skips_do_not_starve_progress() {
        let registry = Registry::new(Timing::default());
        let watchers = Watchers::new(1, Duration::from_secs(1));
        let filter = NodeFilter {
            pool_id: Some("no-such-pool".into()),
            ..NodeFilter::default()
        };
        let mut watch = watchers
            .watch(&registry, filter, 0, CancellationToken::new())
            .unwrap();
        let marker = watch.next().await.unwrap().unwrap();
        assert_eq!(marker.r#type(), pb::WatchEventType::SnapshotComplete);
        // A skipped event every 100 ms: the watch is never idle for 1 s.
        let feeder = {
            let registry = registry.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    registry
                        .register(registration("busy"), Now::read())
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let progress = watch.next().await.unwrap().unwrap();
        assert_eq!(progress.r#type(), pb::WatchEventType::Progress);
        // Around 1 s in, not after the feeder stops at revision 50.
        assert!((10..=15).contains(&progress.revision), "{progress:?}");
        assert!(progress.revision <= registry.revision());
        feeder.abort();
        assert_eq!(watchers.open(), 1);
        drop(watch);
        assert_eq!(watchers.open(), 0, "a dropped watch leaves the count");
    }
}
