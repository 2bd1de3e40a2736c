//! The change feed's unit: one [`Event`] per change a reader can see,
//! produced by the registry core in revision order and shared (never deep
//! copied) by everything downstream: the watch history and watchers, the
//! placement index, and later the durable store and agent commands.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use prost::Message;
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
    pub backlog: Backlog,
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
    /// resume from a recent revision without a relist. Revisions in it are
    /// consecutive (one event per revision), so the event at revision `r`
    /// is at index `r - front.revision`.
    history: VecDeque<Kept>,
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
        let replaced = match kind {
            EventKind::Deleted => state.views.remove(&node.node_id),
            // A known node's entry is replaced where it is: no new key.
            EventKind::Added | EventKind::Modified => match state.views.get_mut(&node.node_id) {
                Some(view) => Some(std::mem::replace(view, node.clone())),
                None => state.views.insert(node.node_id.clone(), node.clone()),
            },
        };
        // The node's previous view now lives only in the history: keep it
        // encoded there (see `KeptNode`).
        if let Some(previous) = replaced {
            state.compact(previous.revision);
        }
        if state.history.len() == self.history_len {
            state.history.pop_front();
        }
        // A deleted node's final state is nobody's current view either.
        let kept = match kind {
            EventKind::Deleted => KeptNode::encode(&node),
            EventKind::Added | EventKind::Modified => KeptNode::Current(node.clone()),
        };
        state.history.push_back(Kept {
            revision,
            kind,
            node: kept,
        });
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
            Start::Snapshot => Backlog::Views(
                state
                    .views
                    .values()
                    .map(|node| Event {
                        revision: node.revision,
                        kind: EventKind::Added,
                        node: node.clone(),
                    })
                    .collect::<Vec<_>>()
                    .into_iter(),
            ),
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
                // Shared handles only (an Arc or a Bytes each): entries are
                // decoded one at a time as the watcher sends them, after
                // the lock is released.
                Backlog::History(
                    state
                        .history
                        .iter()
                        .skip(skip)
                        .cloned()
                        .collect::<Vec<_>>()
                        .into_iter(),
                )
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

impl FeedState {
    /// Encodes the history's event at `revision` if it still holds it as a
    /// shared view. O(1): revisions in the history are consecutive.
    fn compact(&mut self, revision: u64) {
        let Some(front) = self.history.front() else {
            return;
        };
        let Some(index) = revision
            .checked_sub(front.revision)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return; // Already dropped from the history.
        };
        if let Some(kept) = self.history.get_mut(index)
            && kept.revision == revision
            && let KeptNode::Current(view) = &kept.node
        {
            kept.node = KeptNode::encode(view);
        }
    }
}

/// One event as the history keeps it (opaque: a [`Backlog`] turns it back
/// into an [`Event`]).
#[derive(Debug, Clone)]
pub struct Kept {
    /// The event's revision.
    revision: u64,
    /// What happened.
    kind: EventKind,
    /// The node's view after the change.
    node: KeptNode,
}

/// A node view in the history. Each visible change (at 10,000 nodes with
/// changing pool status, about one per heartbeat) builds a new view of
/// ~5 KiB on the heap (a node with 8 GPUs: some 80 allocations), and the
/// history keeps up to `--watch-history` of them: ~45 KiB per node at
/// 10,000 nodes. Only the latest view of each node is read often (GetNode,
/// ListNodes, snapshots, placement); older ones are read only by a watcher
/// resuming, so they are kept as their protobuf encoding (under 2 KiB,
/// one allocation) and decoded when sent.
#[derive(Debug, Clone)]
enum KeptNode {
    /// The node's current view, shared with the node and the snapshot map.
    Current(Arc<pb::Node>),
    /// An older view, encoded.
    Encoded(Bytes),
}

impl KeptNode {
    fn encode(view: &pb::Node) -> Self {
        KeptNode::Encoded(Bytes::from(view.encode_to_vec()))
    }
}

/// A history entry that cannot be decoded; the feed wrote it itself, so
/// this is a bug, reported to the watcher as INTERNAL rather than skipped.
#[derive(Debug, thiserror::Error)]
#[error("the watch history's event at revision {revision} cannot be decoded: {source}")]
pub struct HistoryError {
    /// The event's revision.
    pub revision: u64,
    /// Why prost refused it.
    pub source: prost::DecodeError,
}

/// What a watcher is sent before the live events, in revision order.
#[derive(Debug)]
pub enum Backlog {
    /// A snapshot: every listed node's current view.
    Views(std::vec::IntoIter<Event>),
    /// Events from the history; older views are decoded one at a time as
    /// they are taken, so a resume never holds the whole backlog decoded.
    History(std::vec::IntoIter<Kept>),
}

impl Backlog {
    /// Events not yet taken.
    pub fn len(&self) -> usize {
        match self {
            Backlog::Views(events) => events.len(),
            Backlog::History(kept) => kept.len(),
        }
    }

    /// Whether every event has been taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Iterator for Backlog {
    type Item = Result<Event, HistoryError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Backlog::Views(events) => events.next().map(Ok),
            Backlog::History(kept) => {
                let kept = kept.next()?;
                let node = match kept.node {
                    KeptNode::Current(view) => view,
                    KeptNode::Encoded(bytes) => match pb::Node::decode(bytes) {
                        Ok(node) => Arc::new(node),
                        Err(source) => {
                            return Some(Err(HistoryError {
                                revision: kept.revision,
                                source,
                            }));
                        }
                    },
                };
                Some(Ok(Event {
                    revision: kept.revision,
                    kind: kept.kind,
                    node,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(history: usize) -> Feed {
        Feed::new(history, 16, 1, Vec::new())
    }

    /// A view with enough content that a wrong decode would show.
    fn node(id: &str, slots_free: u32) -> pb::Node {
        pb::Node {
            node_id: id.to_string(),
            address: format!("http://{id}:9000"),
            labels: [("zone".to_string(), "a".to_string())].into(),
            pool_status: vec![pb::PoolStatus {
                pool_id: "p0".into(),
                model: "llama".into(),
                slots_total: 8,
                slots_free,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn held(feed: &Feed) -> Vec<(u64, bool)> {
        feed.lock()
            .history
            .iter()
            .map(|k| (k.revision, matches!(k.node, KeptNode::Current(_))))
            .collect()
    }

    #[test]
    fn only_each_nodes_latest_view_stays_shared_in_the_history() {
        let feed = feed(10);
        feed.publish(EventKind::Added, node("a", 1)); // 2
        feed.publish(EventKind::Added, node("b", 1)); // 3
        feed.publish(EventKind::Modified, node("a", 2)); // 4
        let latest_b = feed.publish(EventKind::Modified, node("b", 2)); // 5
        feed.publish(EventKind::Deleted, node("a", 3)); // 6
        assert_eq!(
            held(&feed),
            vec![(2, false), (3, false), (4, false), (5, true), (6, false)]
        );
        // The shared entry is the node's view itself, not a copy.
        let state = feed.lock();
        let KeptNode::Current(kept) = &state.history[3].node else {
            unreachable!("checked above");
        };
        assert!(Arc::ptr_eq(kept, &latest_b));
    }

    #[test]
    fn a_resume_gets_every_event_as_published_encoded_or_not() {
        let feed = feed(10);
        let mut published = Vec::new();
        for (kind, id, slots) in [
            (EventKind::Added, "a", 1),
            (EventKind::Added, "b", 1),
            (EventKind::Modified, "a", 2),
            (EventKind::Deleted, "b", 5),
        ] {
            let view = feed.publish(kind, node(id, slots));
            published.push((view.revision, kind, pb::Node::clone(&view)));
        }
        let sub = feed.subscribe(Start::After(1)).unwrap();
        assert_eq!(sub.backlog.len(), 4);
        let resumed: Vec<_> = sub
            .backlog
            .map(|e| {
                let e = e.unwrap();
                (e.revision, e.kind, pb::Node::clone(&e.node))
            })
            .collect();
        assert_eq!(resumed, published);
        // A later start gets only what follows it.
        let sub = feed.subscribe(Start::After(4)).unwrap();
        assert_eq!(
            sub.backlog.map(|e| e.unwrap().revision).collect::<Vec<_>>(),
            vec![5]
        );
    }

    #[test]
    fn a_view_already_dropped_from_the_history_is_left_alone() {
        let feed = feed(2);
        feed.publish(EventKind::Added, node("a", 1)); // 2, dropped later
        feed.publish(EventKind::Added, node("b", 1)); // 3
        feed.publish(EventKind::Added, node("c", 1)); // 4
        // a's view at 2 is no longer in the history; replacing it must not
        // touch another entry.
        feed.publish(EventKind::Modified, node("a", 2)); // 5
        assert_eq!(held(&feed), vec![(4, true), (5, true)]);
    }
}
