//! The deadline queue: when the expiry task must next look at each node.
//!
//! A `BTreeMap` keyed by `(when, seq)` rather than a binary heap with lazy
//! stale entries: every owner (a node) remembers the [`Key`] of its one
//! entry, so re-scheduling or cancelling deletes the old entry in O(log n).
//! The queue therefore never holds more entries than owners that have a
//! wake-up pending, and it keeps nothing alive for a removed owner.
//!
//! The schedule knows nothing about nodes or their rules; the registry
//! decides when each node must be looked at (see `registry/deadlines.rs`)
//! and [`crate::expiry`] runs the loop that sleeps until the next entry.
//!
//! Lock order: an owner's own lock is taken before the queue's, never after,
//! because the owner's key lives under the owner's lock.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Identifies one queued entry: its time and a tie-breaker that keeps keys
/// unique when two owners are due at the same instant. 16 bytes, and 16 as
/// an `Option` (the tie-breaker is never zero): every node holds one and the
/// queue holds one per node, where an `Instant` and a `u64` took 24 and 24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// When the entry is due: nanoseconds from the schedule's start,
    /// negative before it (see [`Schedule::due_at`]).
    at: i64,
    /// Order of insertion, unique per schedule, from 1.
    seq: NonZeroU64,
}

/// Earliest-first wake-ups, each carrying an owner handle `T`.
#[derive(Debug)]
pub struct Schedule<T> {
    /// The queued entries, earliest first.
    queue: Mutex<BTreeMap<Key, T>>,
    /// Wakes the expiry loop when an entry earlier than every queued one is
    /// added, so it never oversleeps a deadline.
    changed: Notify,
    /// Source of [`Key::seq`].
    seq: AtomicU64,
    /// What [`Key::at`] counts from. Times before it count backwards, so
    /// two of them keep their order (a clock read before the schedule was
    /// made, as tests and the fuzzer do, is not "due at once").
    start: Instant,
}

impl<T> Default for Schedule<T> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            seq: AtomicU64::new(1),
            start: Instant::now(),
        }
    }
}

/// What [`Schedule::pop_due`] found.
#[derive(Debug)]
pub enum Due<T> {
    /// An entry whose time has come, already taken off the queue.
    Now(Key, T),
    /// Nothing is due yet; the earliest entry is due then.
    At(Instant),
    /// The queue is empty.
    Idle,
}

impl<T> Schedule<T> {
    /// An empty schedule.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes sure the owner whose entry is `key` is woken at `at` at the
    /// latest: an entry due no later stays; otherwise the old entry (if
    /// any) is replaced by one at `at` and `key` is updated. Call it under
    /// the owner's lock, which guards `key`.
    pub fn wake_by(&self, key: &mut Option<Key>, at: Instant, owner: impl FnOnce() -> T) {
        let at = self.since_start(at);
        if key.is_some_and(|queued| queued.at <= at) {
            // The queued wake-up comes first and will re-check then.
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let new = Key {
            at,
            // From 1, and 2^64 insertions are out of reach.
            seq: NonZeroU64::new(seq).unwrap_or(NonZeroU64::MAX),
        };
        let mut queue = self.lock();
        if let Some(old) = key.take() {
            // Absent when the expiry loop has just popped it; the loop then
            // sees the owner's key changed and drops its copy.
            queue.remove(&old);
        }
        let earliest = queue.first_key_value().is_none_or(|(head, _)| new < *head);
        queue.insert(new, owner());
        drop(queue);
        *key = Some(new);
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Removes the owner's entry, if any. Call it under the owner's lock.
    pub fn cancel(&self, key: &mut Option<Key>) {
        if let Some(old) = key.take() {
            self.lock().remove(&old);
        }
    }

    /// Takes the earliest entry off the queue if it is due at `now`.
    pub fn pop_due(&self, now: Instant) -> Due<T> {
        let now = self.since_start(now);
        let mut queue = self.lock();
        match queue.first_key_value() {
            Some((head, _)) if head.at <= now => {
                let (key, owner) = queue.pop_first().expect("the queue has a first entry");
                Due::Now(key, owner)
            }
            Some((head, _)) => Due::At(self.due_at(head)),
            None => Due::Idle,
        }
    }

    /// When the entry `key` names is due (exactly: within 292 years of the
    /// schedule's start either way).
    pub fn due_at(&self, key: &Key) -> Instant {
        let offset = Duration::from_nanos(key.at.unsigned_abs());
        if key.at >= 0 {
            self.start + offset
        } else {
            self.start - offset
        }
    }

    /// `at` as nanoseconds from the schedule's start, negative before it.
    fn since_start(&self, at: Instant) -> i64 {
        match at.checked_duration_since(self.start) {
            Some(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
            None => {
                let before = self.start.duration_since(at).as_nanos();
                i64::try_from(before).map_or(i64::MIN, |n| -n)
            }
        }
    }

    /// Waits until an entry earlier than every queued one is added.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Entries queued now; bounded by the owners with a pending wake-up.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Key, T>> {
        // The queue is only ever changed by single insert/remove calls, which
        // cannot leave it torn, so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_16_bytes_and_so_is_an_optional_one() {
        assert_eq!(std::mem::size_of::<Key>(), 16);
        assert_eq!(std::mem::size_of::<Option<Key>>(), 16);
    }

    #[tokio::test(start_paused = true)]
    async fn due_times_read_back_exactly_on_either_side_of_the_start() {
        let before = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        let schedule = Schedule::new();
        let at = Instant::now() + Duration::from_nanos(1_234_567_891);
        let (mut key, mut early) = (None, None);
        schedule.wake_by(&mut key, at, || "later");
        assert_eq!(schedule.due_at(&key.unwrap()), at);
        schedule.wake_by(&mut early, before, || "early");
        assert_eq!(schedule.due_at(&early.unwrap()), before);
        assert!(
            matches!(schedule.pop_due(Instant::now()), Due::Now(k, "early") if Some(k) == early)
        );
        assert!(matches!(schedule.pop_due(Instant::now()), Due::At(due) if due == at));
    }

    #[tokio::test(start_paused = true)]
    async fn times_before_the_start_keep_their_order() {
        // A clock read before the schedule was made: an entry due after
        // `now` but before the start is not due at `now` (found by the
        // fuzzer: the expiry loop re-queued such an entry forever when
        // both counted as the start).
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_secs(60)).await;
        let schedule = Schedule::new();
        let mut key = None;
        let at = t0 + Duration::from_secs(30);
        schedule.wake_by(&mut key, at, || ());
        assert!(matches!(schedule.pop_due(t0), Due::At(due) if due == at));
        assert!(matches!(schedule.pop_due(at), Due::Now(..)));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_come_out_earliest_first_and_only_when_due() {
        let schedule = Schedule::new();
        let t0 = Instant::now();
        let (mut a, mut b) = (None, None);
        schedule.wake_by(&mut a, t0 + Duration::from_secs(2), || "a");
        schedule.wake_by(&mut b, t0 + Duration::from_secs(1), || "b");
        assert!(matches!(schedule.pop_due(t0), Due::At(at) if at == t0 + Duration::from_secs(1)));
        let later = t0 + Duration::from_secs(5);
        assert!(matches!(schedule.pop_due(later), Due::Now(k, "b") if Some(k) == b));
        assert!(matches!(schedule.pop_due(later), Due::Now(k, "a") if Some(k) == a));
        assert!(matches!(schedule.pop_due(later), Due::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_time_keeps_the_entry_and_an_earlier_one_replaces_it() {
        let schedule = Schedule::new();
        let t0 = Instant::now();
        let mut key = None;
        schedule.wake_by(&mut key, t0 + Duration::from_secs(10), || 1);
        let first = key;
        schedule.wake_by(&mut key, t0 + Duration::from_secs(20), || 2);
        assert_eq!(key, first, "a later wake-up leaves the earlier entry");
        schedule.wake_by(&mut key, t0 + Duration::from_secs(5), || 3);
        assert_ne!(key, first);
        assert_eq!(schedule.len(), 1, "the replaced entry is gone");
        schedule.cancel(&mut key);
        assert_eq!(key, None);
        assert!(schedule.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_earliest_entry_wakes_the_waiter() {
        let schedule = Schedule::new();
        let t0 = Instant::now();
        let mut key = None;
        schedule.wake_by(&mut key, t0 + Duration::from_secs(10), || ());
        // The permit left by the first insert is consumed here.
        schedule.changed().await;
        let mut other = None;
        schedule.wake_by(&mut other, t0 + Duration::from_secs(20), || ());
        let quiet = tokio::time::timeout(Duration::from_millis(1), schedule.changed()).await;
        assert!(quiet.is_err(), "a later entry does not wake the loop");
        schedule.wake_by(&mut other, t0 + Duration::from_secs(1), || ());
        tokio::time::timeout(Duration::from_millis(1), schedule.changed())
            .await
            .expect("an earlier entry wakes the loop");
    }
}
