//! How far behind the runtimes that serve calls are running: the delay a
//! task waits between being ready and being run, which is the delay every
//! heartbeat's ack takes on top of its own work.
//!
//! Register's admission control (`crate::admission`) bounds the calls
//! running and waiting for a turn, but a storm can saturate the CPU before
//! either bound is reached: on the memory store a Register completes in
//! microseconds, so no call ever waits for a turn, while tens of thousands
//! of them wait unseen in the runtimes' queues, in front of the registered
//! nodes' heartbeats and past their callers' deadlines. With
//! `--max-registration-lag`, a Register that arrives while the runtimes
//! run further behind than that is refused at once (RESOURCE_EXHAUSTED
//! with a retry time, before its body is read): the storm is taken in at
//! the pace the CPU allows and the refused agents come back later.
//!
//! Measured by a probe task on each runtime (the main one and every
//! connection thread's) that sleeps [`TICK`] and records how late it woke:
//! a timer that fires late is a runtime that had other work to run first.
//! A probe that has not woken since its due time counts as late by the time
//! since then, so a runtime stalled for a second reads a second at once.
//! The probes run only while Register calls arrive (for [`ACTIVE`] after
//! the latest): a timer wake-up per runtime every [`TICK`] costs ~2 % of a
//! core on an idle registry here, which a registry serving only heartbeats
//! should not pay. The first call of a storm wakes them and marks each due
//! a tick later, so a runtime too busy to run its probe reads overdue from
//! then on rather than idle. None run when the flag is 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How often each probe wakes while it runs.
pub const TICK: Duration = Duration::from_millis(10);
/// How long the probes run after the latest Register arrived.
pub const ACTIVE: Duration = Duration::from_secs(2);

/// The probes' readings, shared by the probes and their readers.
#[derive(Clone)]
pub struct RuntimeLag {
    shared: Arc<Shared>,
}

struct Shared {
    /// The origin of the probes' instants, kept as nanoseconds since it.
    base: Instant,
    /// One per runtime.
    probes: Box<[Probe]>,
    /// Until when the probes run (nanoseconds since `base`): [`ACTIVE`]
    /// after the latest arrival.
    active_until: AtomicU64,
    /// Set by a probe that rests, so the next arrival wakes them.
    resting: AtomicBool,
}

/// One runtime's probe.
struct Probe {
    /// When the probe is next due to wake, in nanoseconds since `base`;
    /// `NOT_STARTED` before its first sleep.
    due: AtomicU64,
    /// How late it woke last time, in nanoseconds.
    late: AtomicU64,
    /// Wakes it from its rest.
    wake: Notify,
}

/// A probe's `due` while it rests (and before it first runs): never
/// overdue; the next arrival marks it due a tick later.
const NOT_STARTED: u64 = u64::MAX;
/// A probe's `due` once it stopped with its runtime: never overdue, and no
/// arrival marks it due again.
const STOPPED: u64 = u64::MAX - 1;

impl RuntimeLag {
    /// Readings for `runtimes` probes (at least one), numbered from 0.
    pub fn new(runtimes: usize) -> Self {
        let probes = (0..runtimes.max(1))
            .map(|_| Probe {
                due: AtomicU64::new(NOT_STARTED),
                late: AtomicU64::new(0),
                wake: Notify::new(),
            })
            .collect();
        RuntimeLag {
            shared: Arc::new(Shared {
                base: Instant::now(),
                probes,
                active_until: AtomicU64::new(0),
                resting: AtomicBool::new(false),
            }),
        }
    }

    /// A Register call arrived: the probes run (again) for [`ACTIVE`].
    pub fn arrived(&self) {
        let shared = &*self.shared;
        let now = Instant::now();
        let until = shared.since_base(now + ACTIVE);
        // Written at most once a tick, not by every call of a storm.
        if until > shared.active_until.load(Ordering::Relaxed) + nanos(TICK) {
            shared.active_until.fetch_max(until, Ordering::SeqCst);
        }
        if shared.resting.load(Ordering::SeqCst) && shared.resting.swap(false, Ordering::SeqCst) {
            let due = shared.since_base(now + TICK);
            for probe in &shared.probes {
                // Due from now: a probe its busy runtime does not get to
                // reads overdue, rather than nothing, until it runs.
                let _ = probe.due.compare_exchange(
                    NOT_STARTED,
                    due,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                // Kept as a permit by a probe not yet waiting.
                probe.wake.notify_one();
            }
        }
    }

    /// The probe numbered `index`, to spawn on the runtime it measures: it
    /// runs until it is dropped (with its runtime, or aborted), and sets
    /// the `registry_runtime_lag_seconds` gauge labelled `runtime` as it
    /// reads.
    pub fn probe(
        &self,
        index: usize,
        runtime: String,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            let gauge = metrics::gauge!(crate::metrics::RUNTIME_LAG, "runtime" => runtime);
            let probe = &shared.probes[index];
            // A probe dropped with its runtime no longer counts.
            let _stopped = Stopped(probe, gauge.clone());
            loop {
                if !shared.active(Instant::now()) {
                    probe.due.store(NOT_STARTED, Ordering::Relaxed);
                    probe.late.store(0, Ordering::Relaxed);
                    gauge.set(0.0);
                    shared.resting.store(true, Ordering::SeqCst);
                    // An arrival between the check above and the flag
                    // would not wake it: look again after setting it.
                    if !shared.active(Instant::now()) {
                        probe.wake.notified().await;
                    }
                    continue;
                }
                let due = Instant::now() + TICK;
                probe.due.store(shared.since_base(due), Ordering::Relaxed);
                tokio::time::sleep_until(due).await;
                let late = Instant::now().saturating_duration_since(due);
                probe.late.store(nanos(late), Ordering::Relaxed);
                gauge.set(late.as_secs_f64());
            }
        }
    }

    /// How far behind the runtimes are: the largest lag of any of them.
    /// On shared cores a call on any thread takes CPU from all of them, and
    /// in a storm every runtime serves its share. Reading only the call's
    /// own thread, its own and the main runtime's, or the lag most of them
    /// are behind by each protected the registered fleet's beats less
    /// (docs/PERF-NOTES.md item 12). Each probe's last reading, or how long
    /// it is overdue when it has not woken since.
    pub fn here(&self) -> Duration {
        let now = self.shared.since_base(Instant::now());
        let worst = self
            .shared
            .probes
            .iter()
            .map(|probe| {
                let overdue = now.saturating_sub(probe.due.load(Ordering::Relaxed));
                probe.late.load(Ordering::Relaxed).max(overdue)
            })
            .max()
            .unwrap_or(0);
        Duration::from_nanos(worst)
    }

    /// Sets probe `index`'s last reading, for tests of what reads it.
    #[cfg(test)]
    pub fn record(&self, index: usize, late: Duration) {
        self.shared.probes[index]
            .late
            .store(nanos(late), Ordering::Relaxed);
    }
}

/// Marks its probe stopped, and its gauge 0, when dropped.
struct Stopped<'a>(&'a Probe, metrics::Gauge);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.due.store(STOPPED, Ordering::Relaxed);
        self.0.late.store(0, Ordering::Relaxed);
        self.1.set(0.0);
    }
}

impl Shared {
    fn since_base(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.base))
    }

    /// Whether the probes run at `now`.
    fn active(&self, now: Instant) -> bool {
        self.since_base(now) < self.active_until.load(Ordering::SeqCst)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_probe_reads_how_late_its_runtime_let_it_wake() {
        let lag = RuntimeLag::new(1);
        assert_eq!(lag.here(), Duration::ZERO, "no probe has started");
        lag.arrived();
        let probe = tokio::spawn(lag.probe(0, "main".into()));
        // The probe's first sleep starts.
        tokio::task::yield_now().await;
        assert_eq!(lag.here(), Duration::ZERO, "not due yet");
        // The clock moves 50 ms past the probe's due time before the
        // runtime gets to it: overdue by 50 ms before it runs, and a
        // reading of 50 ms once it has.
        tokio::time::advance(TICK + Duration::from_millis(50)).await;
        tokio::task::yield_now().await;
        assert_eq!(lag.here(), Duration::from_millis(50));
        // A runtime that runs its timers on time reads 0 again.
        tokio::time::sleep(TICK * 3).await;
        assert_eq!(lag.here(), Duration::ZERO);
        probe.abort();
    }

    #[tokio::test]
    async fn a_runtime_blocked_by_a_task_reads_late() {
        let lag = RuntimeLag::new(2);
        lag.arrived();
        let probe = tokio::spawn(lag.probe(1, "conn-0".into()));
        tokio::time::sleep(TICK * 2).await;
        // Blocks the runtime's only thread past the probe's due time.
        std::thread::sleep(Duration::from_millis(60));
        let during = lag.here();
        assert!(
            during >= Duration::from_millis(40),
            "a blocked runtime read {during:?} behind"
        );
        tokio::time::sleep(TICK * 2).await;
        probe.abort();
        let _ = probe.await;
        // Neither the stopped probe nor the one never started counts.
        assert_eq!(lag.here(), Duration::ZERO);
    }

    #[test]
    fn the_lag_read_is_the_largest_of_any_runtime() {
        let lag = RuntimeLag::new(3);
        assert_eq!(lag.here(), Duration::ZERO);
        lag.record(2, Duration::from_millis(50));
        lag.record(0, Duration::from_millis(20));
        assert_eq!(lag.here(), Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_probe_its_runtime_does_not_get_to_reads_overdue_once_woken() {
        let lag = RuntimeLag::new(1);
        let probe = tokio::spawn(lag.probe(0, "main".into()));
        // The probe rests: nothing arrived.
        tokio::task::yield_now().await;
        // A call arrives and the runtime (this test's only thread) does not
        // get to the woken probe for 60 ms: it reads overdue, not nothing.
        lag.arrived();
        std::thread::sleep(Duration::from_millis(60));
        let read = lag.here();
        assert!(read >= Duration::from_millis(40), "read {read:?}");
        probe.abort();
    }

    #[tokio::test]
    async fn a_stopped_probe_is_never_marked_due_again() {
        let lag = RuntimeLag::new(2);
        let running = tokio::spawn(lag.probe(0, "main".into()));
        let stopped = tokio::spawn(lag.probe(1, "conn-0".into()));
        // Both rest; then one stops, as with its runtime.
        tokio::task::yield_now().await;
        stopped.abort();
        let _ = stopped.await;
        // A call wakes the resting one; the stopped one is not marked due,
        // so it never reads overdue (it would refuse every call after).
        lag.arrived();
        std::thread::sleep(TICK * 3);
        let read = lag.here();
        assert!(read >= TICK, "the resting probe woke due: {read:?}");
        running.abort();
        let _ = running.await;
        std::thread::sleep(TICK * 2);
        assert_eq!(lag.here(), Duration::ZERO, "neither counts once stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn probes_rest_while_no_register_arrives_and_wake_with_the_next() {
        let lag = RuntimeLag::new(1);
        let probe = tokio::spawn(lag.probe(0, "main".into()));
        // Nothing arrived: the probe rests, so a runtime behind by a
        // second reads nothing (it would read a second overdue, ticking).
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(lag.here(), Duration::ZERO);
        // A call arrives: the probe runs and reads how late it wakes.
        lag.arrived();
        tokio::task::yield_now().await;
        tokio::time::advance(TICK + Duration::from_millis(30)).await;
        assert_eq!(lag.here(), Duration::from_millis(30), "overdue");
        // Past ACTIVE after the arrival it rests again: no reading.
        tokio::time::sleep(ACTIVE).await;
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(lag.here(), Duration::ZERO);
        probe.abort();
    }
}
