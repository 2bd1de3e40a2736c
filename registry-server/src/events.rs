//! The change feed's unit: one [`Event`] per change a reader can see,
//! produced by the registry core in revision order and shared (never deep
//! copied) by everything downstream: the watch history and watchers, the
//! placement index, and later the durable store and agent commands.

use std::borrow::Borrow;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use registry_proto::pb;
use tokio::sync::broadcast;

use crate::view::{NodeView, Registered};

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
    pub node: Arc<NodeView>,
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
    /// Every listed node's latest view, found by node_id, so a snapshot
    /// is exact at one revision without locking the nodes (which would
    /// invert the lock order).
    views: HashSet<Latest>,
}

/// A node's latest view in the feed's set, found by its node id: the view
/// is its own key, 8 bytes a node where a map keyed by a copy of the id
/// took 32 and an allocation for the copy.
struct Latest(Arc<NodeView>);

impl PartialEq for Latest {
    fn eq(&self, other: &Self) -> bool {
        self.0.node_id() == other.0.node_id()
    }
}

impl Eq for Latest {}

impl Hash for Latest {
    // As the node id hashes, so the set is searched by `&str` (`Borrow`).
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.node_id().hash(state);
    }
}

impl Borrow<str> for Latest {
    fn borrow(&self) -> &str {
        self.0.node_id()
    }
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
                views: HashSet::new(),
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
    pub fn publish(&self, kind: EventKind, mut node: NodeView) -> Arc<NodeView> {
        let mut state = self.lock();
        let revision = self.revision.load(Ordering::Relaxed) + 1;
        node.set_revision(revision);
        let node = Arc::new(node);
        let event = Event {
            revision,
            kind,
            node: node.clone(),
        };
        let FeedState { history, views } = &mut *state;
        // The node's previous view now lives only in the history: it is
        // encoded there (see `KeptNode`).
        let kept = match kind {
            // A deleted node's final state is nobody's current view either.
            EventKind::Deleted => {
                if let Some(Latest(previous)) = views.take(node.node_id()) {
                    encode_replaced(history, self.history_len, &previous);
                }
                KeptNode::encode(&node)
            }
            EventKind::Added | EventKind::Modified => {
                // A known node's entry is replaced where it is (one search).
                if let Some(Latest(previous)) = views.replace(Latest(node.clone())) {
                    encode_replaced(history, self.history_len, &previous);
                }
                KeptNode::Current(node.clone())
            }
        };
        if state.history.len() == self.history_len {
            state.history.pop_front();
        }
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
    /// taken under one lock, so they join without gap or duplicate (a
    /// snapshot is then put in order outside it).
    pub fn subscribe(&self, start: Start) -> Result<Subscription, StartError> {
        let state = self.lock();
        let current = self.revision.load(Ordering::Relaxed);
        let live = self.live.subscribe();
        let backlog = match start {
            Start::Snapshot => {
                let mut views: Vec<Event> = state
                    .views
                    .iter()
                    .map(|Latest(view)| Event {
                        revision: view.revision(),
                        kind: EventKind::Added,
                        node: view.clone(),
                    })
                    .collect();
                drop(state);
                // The map has no order (a hash map: a publish finds the
                // node's entry without comparing ids); the snapshot lists
                // nodes by id, sorted with the lock released.
                views.sort_unstable_by(|a, b| a.node.node_id().cmp(b.node.node_id()));
                Backlog::Views(views.into_iter())
            }
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
            live,
        })
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        // Every change under this lock is a single push, pop or insert; a
        // poisoned lock still holds a usable history.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A replaced view within the oldest `1 / ENCODE_HORIZON` of a full history
/// is not encoded (see [`encode_replaced`]).
const ENCODE_HORIZON: usize = 8;

/// The position of the event at `revision` in `history`, if it still
/// holds it. O(1): revisions in the history are consecutive.
fn position(history: &VecDeque<Kept>, revision: u64) -> Option<usize> {
    let front = history.front()?;
    let index = usize::try_from(revision.checked_sub(front.revision)?).ok()?;
    (history.get(index)?.revision == revision).then_some(index)
}

/// Encodes the history's entry of `replaced`, a node's view that a newer
/// one replaces, if the history (of `history_len` events at most) still
/// holds it and will go on holding it for a while: an entry that leaves
/// within the next [`ENCODE_HORIZON`]th of the history's events stays the
/// shared view until then. Where each node's previous change is about as
/// old as the history is long (100,000 nodes beating every 10 s against
/// the default 100,000 events), nearly every replaced view is such an
/// entry, and encoding it only to drop it a second later was ~4 % of the
/// server's CPU. The memory this keeps is bounded: at most that share of
/// the history holds replaced views unencoded (12,500 entries, ~15 MiB at
/// the default length and 8 GPUs).
fn encode_replaced(history: &mut VecDeque<Kept>, history_len: usize, replaced: &NodeView) {
    let Some(index) = position(history, replaced.revision()) else {
        return;
    };
    // Events published before this entry is pushed out of a full history.
    let leaves_after = history_len.saturating_sub(history.len()) + index + 1;
    if leaves_after <= history_len / ENCODE_HORIZON {
        return;
    }
    let kept = &mut history[index];
    if matches!(kept.node, KeptNode::Current(_)) {
        kept.node = KeptNode::encode(replaced);
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
/// changing pool status, about one per heartbeat) publishes a new view,
/// and the history keeps up to `--watch-history` of them. Only the latest
/// view of each node is read often (GetNode, ListNodes, snapshots,
/// placement); older ones are read only by a watcher resuming, so they are
/// kept as their registration, the one the node holds anyway (shared, not
/// copied), and their own fields' protobuf encoding (~0.4 KiB at 8 GPUs and
/// 2 pools), decoded when sent.
#[derive(Debug, Clone)]
enum KeptNode {
    /// The node's current view, shared with the node and the snapshot map;
    /// or a replaced one about to leave the history (see
    /// [`encode_replaced`]), held until it does.
    Current(Arc<NodeView>),
    /// An older view: its registration and its own fields, encoded.
    Encoded {
        /// The registration the view showed, shared with the node (while
        /// it keeps it) and the registration's other entries.
        registered: Arc<Registered>,
        /// [`NodeView::encode_live`] of the view.
        live: Bytes,
    },
}

impl KeptNode {
    fn encode(view: &NodeView) -> Self {
        KeptNode::Encoded {
            registered: view.registered().clone(),
            live: view.encode_live(),
        }
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
                let decoded = match kept.node {
                    KeptNode::Current(view) => Ok(view),
                    KeptNode::Encoded { registered, live } => {
                        NodeView::decode(registered, live).map(Arc::new)
                    }
                };
                let node = match decoded {
                    Ok(node) => node,
                    Err(source) => {
                        return Some(Err(HistoryError {
                            revision: kept.revision,
                            source,
                        }));
                    }
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
impl Backlog {
    /// Every event left, decoded into owned values, to compare with what
    /// was published.
    pub(crate) fn decoded(self) -> Vec<(u64, EventKind, pb::Node)> {
        self.map(|e| {
            let e = e.expect("the history decodes");
            (e.revision, e.kind, e.node.to_proto())
        })
        .collect()
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
            capabilities: Some(pb::Capabilities::default()),
            pool_status: live(slots_free).pool_status,
            ..Default::default()
        }
    }

    /// The fields of a view that no registration sets: one pool's status.
    fn live(slots_free: u32) -> pb::Node {
        pb::Node {
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

    /// Publishes `node` with a registration of its own.
    fn publish(feed: &Feed, kind: EventKind, node: pb::Node) -> Arc<NodeView> {
        feed.publish(kind, NodeView::from_proto(node))
    }

    /// Publishes a view of `registered` with `slots_free`.
    fn publish_of(feed: &Feed, kind: EventKind, registered: &Arc<Registered>, slots_free: u32) {
        feed.publish(
            kind,
            NodeView::with_fields(registered.clone(), live(slots_free)),
        );
    }

    /// A registration of `id` at `address`.
    fn registration(id: &str, address: &str) -> Arc<Registered> {
        let mut node = node(id, 0);
        node.address = address.into();
        NodeView::from_proto(node).registered().clone()
    }

    /// The registration of each encoded history entry, as an address:
    /// equal where the entries share one; `None` for a current view, not
    /// encoded.
    fn fixed_parts(feed: &Feed) -> Vec<Option<usize>> {
        feed.lock()
            .history
            .iter()
            .map(|k| match &k.node {
                KeptNode::Encoded { registered, .. } => Some(Arc::as_ptr(registered) as usize),
                KeptNode::Current(_) => None,
            })
            .collect()
    }

    #[test]
    fn the_latest_views_are_found_by_node_id() {
        use std::hash::BuildHasher as _;
        let view = Arc::new(NodeView::from_proto(node("n1", 3)));
        // `Borrow<str>` holds only if the view hashes as its id does.
        let hasher = std::collections::hash_map::RandomState::new();
        assert_eq!(hasher.hash_one(Latest(view.clone())), hasher.hash_one("n1"));
        let mut views = HashSet::new();
        assert!(views.replace(Latest(view.clone())).is_none());
        let newer = Arc::new(NodeView::from_proto(node("n1", 2)));
        let Some(Latest(previous)) = views.replace(Latest(newer.clone())) else {
            panic!("the older view is replaced");
        };
        assert!(Arc::ptr_eq(&previous, &view));
        assert!(Arc::ptr_eq(&views.get("n1").unwrap().0, &newer));
        assert!(views.take("n1").is_some() && views.is_empty());
    }

    #[test]
    fn entries_of_one_registration_share_it() {
        let feed = feed(10);
        let old = registration("a", "http://a:9000");
        publish_of(&feed, EventKind::Added, &old, 1); // 2
        publish_of(&feed, EventKind::Modified, &old, 2); // 3
        publish_of(&feed, EventKind::Modified, &old, 3); // 4
        let parts = fixed_parts(&feed);
        assert!(parts[0].is_some(), "an older view is encoded");
        assert_eq!(parts[0], parts[1], "its registration: one, shared");
        assert_eq!(parts[0], Some(Arc::as_ptr(&old) as usize), "the node's own");
        assert_eq!(parts[2], None, "the current view is not encoded");
        // Another registration has its own.
        let new = registration("a", "http://a-new:9000");
        publish_of(&feed, EventKind::Modified, &new, 4); // 5
        publish_of(&feed, EventKind::Modified, &new, 5); // 6
        publish_of(&feed, EventKind::Deleted, &new, 6); // 7
        let parts = fixed_parts(&feed);
        assert_eq!(parts[2], parts[0], "4 showed the old registration");
        assert!(parts[3].is_some() && parts[3] != parts[0]);
        assert_eq!(parts[4], parts[3]);
        assert_eq!(parts[5], parts[3], "the final state shares them too");
        let resumed: Vec<_> = feed
            .subscribe(Start::After(1))
            .unwrap()
            .backlog
            .decoded()
            .into_iter()
            .map(|(_, _, node)| (node.address, node.pool_status[0].slots_free))
            .collect();
        let old = "http://a:9000".to_string();
        let new = "http://a-new:9000".to_string();
        assert_eq!(
            resumed,
            [
                (old.clone(), 1),
                (old.clone(), 2),
                (old, 3),
                (new.clone(), 4),
                (new.clone(), 5),
                (new, 6)
            ]
        );
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
        publish(&feed, EventKind::Added, node("a", 1)); // 2
        publish(&feed, EventKind::Added, node("b", 1)); // 3
        publish(&feed, EventKind::Modified, node("a", 2)); // 4
        let latest_b = publish(&feed, EventKind::Modified, node("b", 2)); // 5
        publish(&feed, EventKind::Deleted, node("a", 3)); // 6
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
            let view = publish(&feed, kind, node(id, slots));
            published.push((view.revision(), kind, view.to_proto()));
        }
        let sub = feed.subscribe(Start::After(1)).unwrap();
        assert_eq!(sub.backlog.len(), 4);
        assert_eq!(sub.backlog.decoded(), published);
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
        publish(&feed, EventKind::Added, node("a", 1)); // 2, dropped later
        publish(&feed, EventKind::Added, node("b", 1)); // 3
        publish(&feed, EventKind::Added, node("c", 1)); // 4
        // a's view at 2 is no longer in the history; replacing it must not
        // touch another entry.
        publish(&feed, EventKind::Modified, node("a", 2)); // 5
        assert_eq!(held(&feed), vec![(4, true), (5, true)]);
    }

    #[test]
    fn a_replaced_view_about_to_leave_the_history_is_not_encoded() {
        // 16 events: the oldest eighth (2 entries) of a full history is not
        // encoded when replaced.
        let feed = feed(16);
        let mut published = Vec::new();
        let mut push = |kind, id: &str, slots| {
            let view = publish(&feed, kind, node(id, slots));
            published.push((view.revision(), kind, view.to_proto()));
        };
        push(EventKind::Added, "a", 1); // 2
        push(EventKind::Added, "b", 1); // 3
        push(EventKind::Added, "c", 1); // 4
        for i in 0..13 {
            push(EventKind::Added, &format!("n{i}"), 1); // 5..=17
        }
        // Full: a's entry leaves with the next event, b's with the one after
        // it; c's stays for three more.
        push(EventKind::Modified, "b", 2); // 18: b's 3 is second oldest
        push(EventKind::Modified, "c", 2); // 19: c's 4 is now second oldest
        let kept = held(&feed);
        assert_eq!(kept.len(), 16);
        assert_eq!(kept[0], (4, true), "c's replaced view, about to leave");
        // A view replaced farther from the end is encoded as before.
        push(EventKind::Modified, "n5", 2); // 20: n5's 10 is at index 6
        let kept = held(&feed);
        assert_eq!(kept[0].0, 5);
        assert_eq!(kept[5], (10, false));
        // Encoded or not, a resume gets every event as it was published.
        let sub = feed.subscribe(Start::After(4)).unwrap();
        let tail: Vec<_> = published.into_iter().filter(|(r, _, _)| *r > 4).collect();
        assert_eq!(sub.backlog.decoded(), tail);
    }
}
