//! The change feed's unit: one [`Event`] per change a reader can see,
//! produced by the registry core in revision order and shared (never deep
//! copied) by everything downstream: the watch history and watchers, the
//! placement index, and later the durable store and agent commands.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes};
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
    views: BTreeMap<String, Latest>,
}

/// A listed node's latest view, and which registration it shows.
struct Latest {
    /// The view.
    view: Arc<pb::Node>,
    /// The registration's number (see [`Feed::publish`]).
    registration: u64,
    /// The revision of the node's previous entry in the history when it
    /// was encoded and shows the same registration: when this view's entry
    /// is encoded in turn, it borrows that entry's encoded registration
    /// fields, or (that entry being encoded whole) makes its own, so a run
    /// of the node's entries shares one.
    donor: Option<u64>,
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
    ///
    /// `registration` numbers the registration `node` shows: the caller
    /// gives each registration it takes a number unique in the process and
    /// passes it with every view of it, so the history's encoded entries of
    /// one registration share its encoded fields (see `KeptNode`).
    pub fn publish(&self, kind: EventKind, mut node: pb::Node, registration: u64) -> Arc<pb::Node> {
        let mut state = self.lock();
        let revision = self.revision.load(Ordering::Relaxed) + 1;
        node.revision = revision;
        let node = Arc::new(node);
        let event = Event {
            revision,
            kind,
            node: node.clone(),
        };
        let FeedState { history, views } = &mut *state;
        // The node's previous view now lives only in the history: it is
        // encoded there (see `KeptNode`), borrowing the encoded
        // registration fields of the node's entry before it.
        let kept = match kind {
            // A deleted node's final state is nobody's current view either.
            EventKind::Deleted => {
                let donor = views
                    .remove(&node.node_id)
                    .and_then(|previous| encode_replaced(history, previous, registration));
                match donor.and_then(|d| encoded_fixed(history, d)) {
                    Some(fixed) => KeptNode::encode(&node, fixed),
                    None => KeptNode::whole(&node),
                }
            }
            EventKind::Added | EventKind::Modified => {
                let latest = Latest {
                    view: node.clone(),
                    registration,
                    donor: None,
                };
                // A known node's entry is replaced where it is: no new key.
                match views.get_mut(&node.node_id) {
                    Some(entry) => {
                        let previous = std::mem::replace(entry, latest);
                        entry.donor = encode_replaced(history, previous, registration);
                    }
                    None => {
                        views.insert(node.node_id.clone(), latest);
                    }
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
    /// taken under one lock, so they join without gap or duplicate.
    pub fn subscribe(&self, start: Start) -> Result<Subscription, StartError> {
        let state = self.lock();
        let current = self.revision.load(Ordering::Relaxed);
        let backlog = match start {
            Start::Snapshot => Backlog::Views(
                state
                    .views
                    .values()
                    .map(|latest| Event {
                        revision: latest.view.revision,
                        kind: EventKind::Added,
                        node: latest.view.clone(),
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

/// The position of the event at `revision` in `history`, if it still
/// holds it. O(1): revisions in the history are consecutive.
fn position(history: &VecDeque<Kept>, revision: u64) -> Option<usize> {
    let front = history.front()?;
    let index = usize::try_from(revision.checked_sub(front.revision)?).ok()?;
    (history.get(index)?.revision == revision).then_some(index)
}

/// The encoded registration fields of the history's entry at `revision`,
/// if it still holds it encoded in two parts.
fn encoded_fixed(history: &VecDeque<Kept>, revision: u64) -> Option<Bytes> {
    history[position(history, revision)?].node.fixed().cloned()
}

/// Encodes the history's entry of `replaced`, a node's view that a newer
/// one showing `registration` replaces, if the history still holds it.
/// The first of a run of the node's entries (no earlier one of the same
/// registration still held: at 100,000 nodes, most) is encoded whole, one
/// encode as cheap as any; the second is encoded in two parts, and each
/// later one borrows the registration fields of the one before it (its
/// donor). Returns the entry's revision as the donor of the newer view's
/// entry when both show the same registration. Encoded registration fields
/// thus live only in encoded entries, never beside a node's current view.
fn encode_replaced(
    history: &mut VecDeque<Kept>,
    replaced: Latest,
    registration: u64,
) -> Option<u64> {
    let revision = replaced.view.revision;
    let index = position(history, revision)?;
    // None: no donor held; Some(None): one held, without parts to lend.
    let borrowed = replaced
        .donor
        .and_then(|d| position(history, d))
        .map(|d| history[d].node.fixed().cloned());
    let kept = &mut history[index];
    let KeptNode::Current(view) = &kept.node else {
        return None;
    };
    kept.node = match borrowed {
        None => KeptNode::whole(view),
        Some(fixed) => KeptNode::encode(view, fixed.unwrap_or_else(|| encode_fixed(view))),
    };
    (replaced.registration == registration).then_some(revision)
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
/// resuming, so they are kept as their protobuf encoding and decoded when
/// sent. The encoding is in two parts (see [`encode_fixed`]): the fields
/// the registration sets (~1.5 KiB for 8 GPUs and 2 pools), encoded once
/// and shared by the entries that follow one another in the history with
/// the same registration, and the rest (~0.4 KiB), encoded per change.
/// The shared part lives only in encoded entries, and a run of a node's
/// entries starts with one encoded whole: where the history is short
/// against the heartbeat interval (100,000 nodes), a node's entries rarely
/// meet, and then its views are encoded as cheaply as without sharing.
#[derive(Debug, Clone)]
enum KeptNode {
    /// The node's current view, shared with the node and the snapshot map.
    Current(Arc<pb::Node>),
    /// An older view, encoded: protobuf allows a message's fields to come
    /// in any order and split over concatenated pieces, so `fixed` followed
    /// by `live` decodes to the whole view.
    Encoded {
        /// [`encode_fixed`] of the view, shared with the node's other
        /// entries of the same registration.
        fixed: Bytes,
        /// The view's other fields, encoded.
        live: Bytes,
    },
    /// An older view encoded in one piece, with nothing to share.
    Whole(Bytes),
}

impl KeptNode {
    /// The encoded registration fields, when the view is held in two parts.
    fn fixed(&self) -> Option<&Bytes> {
        match self {
            KeptNode::Encoded { fixed, .. } => Some(fixed),
            KeptNode::Current(_) | KeptNode::Whole(_) => None,
        }
    }

    fn whole(view: &pb::Node) -> Self {
        KeptNode::Whole(Bytes::from(view.encode_to_vec()))
    }

    fn encode(view: &pb::Node, fixed: Bytes) -> Self {
        KeptNode::Encoded {
            fixed,
            live: Bytes::from(live_part(view).encode_to_vec()),
        }
    }
}

/// The encoding of the fields of `view` that only a registration sets
/// (node_id, machine_id, address, pools, capabilities, agent_version,
/// labels, metrics_address, models_available). The history keeps older
/// views as this part, shared, followed by the rest of the view encoded
/// per change, so a change does not re-encode (and the history does not
/// hold again) a registration that did not change: at 8 GPUs and 2 pools,
/// ~1.5 KiB of a ~1.9 KiB view.
fn encode_fixed(view: &pb::Node) -> Bytes {
    // Every field is named, in this function and in `live_part`, so a field
    // added to the contract does not compile until it is given to one side:
    // a field on neither would be lost from resumed watches, a field on
    // both doubled in its repeated form.
    let pb::Node {
        node_id,
        machine_id,
        address,
        pools,
        capabilities,
        agent_version,
        labels,
        status: _,
        registered_at: _,
        last_heartbeat_at: _,
        pool_status: _,
        gpu_stats: _,
        session_id: _,
        status_changed_at: _,
        agent_time: _,
        metrics_address,
        revision: _,
        models_available,
        admin: _,
        suspect: _,
        suspect_reason: _,
    } = view;
    let fixed = pb::Node {
        node_id: node_id.clone(),
        machine_id: machine_id.clone(),
        address: address.clone(),
        pools: pools.clone(),
        capabilities: capabilities.clone(),
        agent_version: agent_version.clone(),
        labels: labels.clone(),
        metrics_address: metrics_address.clone(),
        models_available: models_available.clone(),
        ..pb::Node::default()
    };
    Bytes::from(fixed.encode_to_vec())
}

/// The fields of `view` that [`encode_fixed`] leaves out: what moves
/// between changes of one registration (liveness, pool status, GPU
/// figures, admin state, timestamps, revision).
fn live_part(view: &pb::Node) -> pb::Node {
    let pb::Node {
        node_id: _,
        machine_id: _,
        address: _,
        pools: _,
        capabilities: _,
        agent_version: _,
        labels: _,
        status,
        registered_at,
        last_heartbeat_at,
        pool_status,
        gpu_stats,
        session_id,
        status_changed_at,
        agent_time,
        metrics_address: _,
        revision,
        models_available: _,
        admin,
        suspect,
        suspect_reason,
    } = view;
    pb::Node {
        status: *status,
        registered_at: *registered_at,
        last_heartbeat_at: *last_heartbeat_at,
        pool_status: pool_status.clone(),
        gpu_stats: gpu_stats.clone(),
        session_id: *session_id,
        status_changed_at: *status_changed_at,
        agent_time: *agent_time,
        revision: *revision,
        admin: admin.clone(),
        suspect: *suspect,
        suspect_reason: suspect_reason.clone(),
        ..pb::Node::default()
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
                    KeptNode::Encoded { fixed, live } => {
                        pb::Node::decode(fixed.chain(live)).map(Arc::new)
                    }
                    KeptNode::Whole(bytes) => pb::Node::decode(bytes).map(Arc::new),
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
            (e.revision, e.kind, pb::Node::clone(&e.node))
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

    /// Publishes `node` as the first registration of its id.
    fn publish(feed: &Feed, kind: EventKind, node: pb::Node) -> Arc<pb::Node> {
        feed.publish(kind, node, 1)
    }

    /// A view with every field set, none to its default.
    fn full_node() -> pb::Node {
        let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 7 });
        pb::Node {
            node_id: "n1".into(),
            machine_id: "m1".into(),
            address: "http://n1:9000".into(),
            pools: vec![pb::PoolSpec {
                pool_id: "p0".into(),
                model: "llama".into(),
                gpu_indices: vec![0, 1],
                ..Default::default()
            }],
            capabilities: Some(pb::Capabilities {
                gpus: vec![pb::GpuInfo {
                    uuid: "GPU-1".into(),
                    name: "H100".into(),
                    ..Default::default()
                }],
                cpu_cores: 96,
                ..Default::default()
            }),
            agent_version: "0.1".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            status: pb::NodeStatus::Offline as i32,
            registered_at: at(1),
            last_heartbeat_at: at(2),
            pool_status: node("n1", 3).pool_status,
            gpu_stats: vec![pb::GpuStats {
                index: 1,
                health_reasons: vec!["xid 79".into()],
                ..Default::default()
            }],
            session_id: 42,
            status_changed_at: at(3),
            agent_time: at(4),
            metrics_address: "http://n1:9101/metrics".into(),
            revision: 9,
            models_available: vec!["mistral".into()],
            admin: Some(pb::AdminState {
                schedulable: false,
                ..Default::default()
            }),
            suspect: true,
            suspect_reason: "registry stalled".into(),
        }
    }

    #[test]
    fn the_fixed_and_live_parts_together_decode_to_the_whole_view() {
        let view = full_node();
        let fixed = encode_fixed(&view);
        let KeptNode::Encoded { fixed, live } = KeptNode::encode(&view, fixed) else {
            unreachable!("encode encodes");
        };
        // Each field in exactly one part: the parts add up to the whole.
        assert_eq!(fixed.len() + live.len(), view.encoded_len());
        assert!(!live.is_empty());
        assert_eq!(pb::Node::decode(fixed.chain(live)).unwrap(), view);
        // The fixed part alone is the registration's fields and nothing else.
        let registration = pb::Node::decode(encode_fixed(&view)).unwrap();
        assert_eq!(registration.pools, view.pools);
        assert_eq!(registration.revision, 0);
        assert!(registration.pool_status.is_empty() && registration.admin.is_none());
    }

    /// The encoded registration fields of each history entry, as
    /// addresses: equal where the entries share one allocation.
    fn fixed_parts(feed: &Feed) -> Vec<Option<usize>> {
        feed.lock()
            .history
            .iter()
            .map(|k| k.node.fixed().map(|f| f.as_ptr() as usize))
            .collect()
    }

    #[test]
    fn entries_of_one_registration_share_its_encoded_fields() {
        let feed = feed(10);
        feed.publish(EventKind::Added, node("a", 1), 7); // 2
        feed.publish(EventKind::Modified, node("a", 2), 7); // 3
        feed.publish(EventKind::Modified, node("a", 3), 7); // 4
        feed.publish(EventKind::Modified, node("a", 4), 7); // 5
        let whole =
            |feed: &Feed, i: usize| matches!(feed.lock().history[i].node, KeptNode::Whole(_));
        assert!(whole(&feed, 0), "the first of a run is encoded whole");
        let parts = fixed_parts(&feed);
        assert!(parts[1].is_some(), "the second in two parts");
        assert_eq!(parts[1], parts[2], "the third borrows them: one allocation");
        assert_eq!(parts[3], None, "the current view holds none");
        // Another registration starts a run of its own.
        let mut moved = node("a", 5);
        moved.address = "http://a-new:9000".into();
        feed.publish(EventKind::Modified, moved.clone(), 8); // 6
        assert_eq!(fixed_parts(&feed)[3], parts[1], "5, of 7, borrows 7's");
        moved.pool_status[0].slots_free = 6;
        feed.publish(EventKind::Modified, moved.clone(), 8); // 7
        assert!(whole(&feed, 4), "6 starts 8's run");
        moved.pool_status[0].slots_free = 7;
        feed.publish(EventKind::Deleted, moved, 8); // 8
        let parts = fixed_parts(&feed);
        assert!(
            parts[5].is_some() && parts[5] != parts[1],
            "7 made 8's parts"
        );
        assert_eq!(parts[6], parts[5], "the final state borrows them");
        let resumed: Vec<_> = feed
            .subscribe(Start::After(1))
            .unwrap()
            .backlog
            .map(|e| {
                let e = e.unwrap();
                (e.node.address.clone(), e.node.pool_status[0].slots_free)
            })
            .collect();
        let old = "http://a:9000".to_string();
        let new = "http://a-new:9000".to_string();
        assert_eq!(
            resumed,
            [
                (old.clone(), 1),
                (old.clone(), 2),
                (old.clone(), 3),
                (old, 4),
                (new.clone(), 5),
                (new.clone(), 6),
                (new, 7)
            ]
        );
    }

    #[test]
    fn a_view_whose_entry_left_the_history_hands_nothing_on() {
        let one = feed(1);
        one.publish(EventKind::Added, node("a", 1), 7); // 2
        one.publish(EventKind::Added, node("b", 1), 7); // 3, drops 2
        one.publish(EventKind::Modified, node("a", 2), 7); // 4, drops 3
        assert_eq!(fixed_parts(&one), vec![None]);
        let feed = feed(3);
        feed.publish(EventKind::Added, node("a", 1), 7); // 2
        feed.publish(EventKind::Added, node("b", 1), 7); // 3
        feed.publish(EventKind::Modified, node("a", 2), 7); // 4: 2 whole
        feed.publish(EventKind::Added, node("c", 1), 7); // 5, drops 2
        let a4 = pb::Node::clone(&feed.lock().views["a"].view);
        feed.publish(EventKind::Modified, node("a", 3), 7); // 6, drops 3
        // 4's donor (2) is gone: 4 starts a new run, encoded whole.
        assert!(matches!(feed.lock().history[0].node, KeptNode::Whole(_)));
        let resumed = feed.subscribe(Start::After(3)).unwrap().backlog.next();
        assert_eq!(pb::Node::clone(&resumed.unwrap().unwrap().node), a4);
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
            published.push((view.revision, kind, pb::Node::clone(&view)));
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
}
