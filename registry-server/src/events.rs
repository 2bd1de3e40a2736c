//! The change feed's unit: one [`Event`] per change a reader can see,
//! produced by the registry core in revision order and shared (never deep
//! copied) by everything downstream: the watch history and watchers, the
//! placement index, and later the durable store and agent commands.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use registry_proto::pb;
use tokio::sync::broadcast;

/// What happened to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The node was registered for the first time (or after it was removed).
    Added,
    /// Something a reader can see changed: a re-registration with other
    /// fields, ONLINE↔OFFLINE, a material pool status change.
    Modified,
    /// The node was deregistered or removed after its retention; `node` is
    /// its final state.
    Deleted,
}

/// One change of one node, at one registry-wide revision.
#[derive(Debug, Clone)]
pub struct Event {
    /// The registry-wide revision this change created; strictly increasing.
    pub revision: u64,
    /// What happened.
    pub kind: EventKind,
    /// The node's read view after the change (its final state for
    /// `Deleted`), built once and shared by every consumer.
    pub node: Arc<pb::Node>,
}

impl EventKind {
    /// The event's type on the wire.
    pub fn to_proto(self) -> pb::WatchEventType {
        match self {
            EventKind::Added => pb::WatchEventType::Added,
            EventKind::Modified => pb::WatchEventType::Modified,
            EventKind::Deleted => pb::WatchEventType::Deleted,
        }
    }
}

/// Something that must see every [`Event`], in revision order, as it is
/// published (the placement index, later the store and gauges). Called
/// under the feed's lock, so it must not block, must not call back into
/// the registry, and must be quick: every visible change waits for it.
pub trait ChangeSubscriber: Send + Sync {
    /// Takes one event into account.
    fn apply(&self, event: &Event);
}

/// Why a watch cannot start where it asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartError {
    /// The events after `requested` are no longer in the history.
    Compacted {
        /// The start_revision asked for.
        requested: u64,
        /// The oldest start_revision still served.
        oldest: u64,
        /// The current revision, which a relist will be at least at.
        current: u64,
    },
    /// `requested` is above the current revision.
    Future {
        /// The start_revision asked for.
        requested: u64,
        /// The current revision.
        current: u64,
    },
}

/// Where a new watcher starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With a snapshot of every node at the current revision.
    Snapshot,
    /// With every event after this revision.
    After(u64),
}

/// A watcher's start: what to send first, and the live feed after it.
pub struct Subscription {
    /// For [`Start::Snapshot`]: every listed node's view at `revision`, in
    /// node_id order; for [`Start::After`]: the events after the asked
    /// revision up to `revision`, from the history.
    pub backlog: Vec<Event>,
    /// The revision `backlog` brings the watcher to; `live` carries every
    /// event after it and none before.
    pub revision: u64,
    /// Every later event, in order. Bounded (`--watch-queue`): a watcher
    /// more than that many events behind gets `Lagged` and must resume.
    pub live: broadcast::Receiver<Event>,
}

/// The change log: the revision counter, the bounded history of recent
/// events, the latest view of every listed node (for snapshots), the live
/// channel of watchers and the subscribers. Lock order: map → node → feed;
/// [`Feed::publish`] is called under the changed node's lock, which keeps
/// each node's events in order, and the feed's own lock keeps all events in
/// revision order.
pub struct Feed {
    /// The latest revision, readable without the lock (ListNodes reads it
    /// before its page, so the page reflects every change up to it).
    revision: AtomicU64,
    /// Everything that changes together with the revision.
    state: Mutex<FeedState>,
    /// Live events to watchers: one shared ring of `--watch-queue` events,
    /// so a send is O(1) whatever the number of watchers, memory is bounded,
    /// and a watcher that falls behind by more than the ring is told so
    /// (`Lagged`) instead of slowing anyone.
    live: broadcast::Sender<Event>,
    /// Consumers that see every event as it is published.
    subscribers: Vec<Arc<dyn ChangeSubscriber>>,
    /// Most events kept in the history (`--watch-history`).
    history_len: usize,
}

/// The part of the feed under its lock.
struct FeedState {
    /// The latest `history_len` events, oldest first, so a watcher can
    /// resume from a recent revision without a relist.
    history: VecDeque<Event>,
    /// Every listed node's latest view by node_id, so a snapshot is exact
    /// at one revision without locking the nodes (which would invert the
    /// lock order).
    views: BTreeMap<String, Arc<pb::Node>>,
}

impl Feed {
    /// An empty feed at revision `first_revision` keeping `history_len`
    /// events and queueing `queue_len` events per watcher.
    pub fn new(
        history_len: usize,
        queue_len: usize,
        first_revision: u64,
        subscribers: Vec<Arc<dyn ChangeSubscriber>>,
    ) -> Self {
        let (live, _) = broadcast::channel(queue_len.max(1));
        Self {
            revision: AtomicU64::new(first_revision),
            state: Mutex::new(FeedState {
                history: VecDeque::with_capacity(history_len.min(1 << 16)),
                views: BTreeMap::new(),
            }),
            live,
            subscribers,
            history_len: history_len.max(1),
        }
    }

    /// The latest revision.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Publishes one change: bumps the revision, stamps it on `node`, keeps
    /// the view, appends the event to the history and hands it to the
    /// watchers and subscribers. Returns the shared view. Call it under the
    /// node's lock.
    pub fn publish(&self, kind: EventKind, mut node: pb::Node) -> Arc<pb::Node> {
        let mut state = self.lock();
        let revision = self.revision.load(Ordering::Relaxed) + 1;
        node.revision = revision;
        let node = Arc::new(node);
        let event = Event {
            revision,
            kind,
            node: node.clone(),
        };
        match kind {
            EventKind::Deleted => {
                state.views.remove(&node.node_id);
            }
            EventKind::Added | EventKind::Modified => {
                state.views.insert(node.node_id.clone(), node.clone());
            }
        }
        if state.history.len() == self.history_len {
            state.history.pop_front();
        }
        state.history.push_back(event.clone());
        self.revision.store(revision, Ordering::Release);
        for subscriber in &self.subscribers {
            subscriber.apply(&event);
        }
        // No receiver is not an error: nobody watches right now.
        let _ = self.live.send(event);
        drop(state);
        node
    }

    /// Starts a watcher at `start`: the backlog and the live receiver are
    /// taken under one lock, so they join without gap or duplicate.
    pub fn subscribe(&self, start: Start) -> Result<Subscription, StartError> {
        let state = self.lock();
        let current = self.revision.load(Ordering::Relaxed);
        let backlog = match start {
            Start::Snapshot => state
                .views
                .values()
                .map(|node| Event {
                    revision: node.revision,
                    kind: EventKind::Added,
                    node: node.clone(),
                })
                .collect(),
            Start::After(requested) => {
                if requested > current {
                    return Err(StartError::Future { requested, current });
                }
                // Events after `oldest` are all in the history.
                let oldest = state.history.front().map_or(current, |e| e.revision - 1);
                if requested < oldest {
                    return Err(StartError::Compacted {
                        requested,
                        oldest,
                        current,
                    });
                }
                let skip = usize::try_from(requested - oldest).unwrap_or(usize::MAX);
                state.history.iter().skip(skip).cloned().collect()
            }
        };
        Ok(Subscription {
            backlog,
            revision: current,
            live: self.live.subscribe(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        // Every change under this lock is a single push, pop or insert; a
        // poisoned lock still holds a usable history.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}
